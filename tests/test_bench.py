"""The layer bench's table and peer plumbing (CPU), and the peers themselves on a GPU that has them installed."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from spqr_cli.bench.layers import render_table
from spqr_cli.bench.peers import PEERS, _missing, parse_peers, runs_batch
from spqr_cli.core.errors import SpQRError


def test_missing_peer_messages():
    """Not installed -> how to install; installed but broken -> the loader's error, and only its own hint."""
    assert "pip install gemlite" in str(_missing("gemlite", ModuleNotFoundError("gemlite")))
    broken = str(_missing("gemlite", RuntimeError("no GPU")))
    assert "RuntimeError: no GPU" in broken and "nvcc" not in broken and "leave it out of --peers" in broken


def test_runs_batch():
    assert runs_batch("spqr-quant", 1) and not runs_batch("spqr-quant", 4)
    assert runs_batch("gemlite", 1) and runs_batch("gemlite", 256)


def test_parse_peers():
    assert parse_peers(" spqr-quant, GEMLITE ,gemlite") == ["spqr-quant", "gemlite"]
    assert parse_peers("") == []
    with pytest.raises(SpQRError, match="unknown peer marlin; choose from spqr-quant, gemlite"):
        parse_peers("gemlite,marlin")


def _row(batch: int, peers: dict) -> dict:
    return {"name": "7B qkvo", "N": 4096, "K": 4096, "batch": batch, "fp16_ms": 0.02, "spqr_ms": 0.01,
            "speedup": 2.0, "fp16_gbps": 1700.0, "spqr_gbps": 900.0, "bits_per_param": 4.18, "rel_err": 3e-4,
            "peers": peers}


def test_table_shows_peers_side_by_side():
    rows = [_row(1, {"spqr-quant": {"ms": 0.025, "speedup": 0.8}, "gemlite": {"ms": 0.0125, "speedup": 1.6}}),
            _row(16, {"gemlite": {"ms": 0.04, "speedup": 0.5}})]
    console = Console(record=True, width=250)
    console.print(render_table(rows))
    text = console.export_text()
    assert "spqr-quant ms" in text and "gemlite vs fp16" in text
    lines = [line for line in text.splitlines() if "7B qkvo" in line]
    assert "0.0250" in lines[0] and "0.80x" in lines[0] and "1.60x" in lines[0]
    assert "0.50x" in lines[1] and lines[1].count(" - ") == 2  # spqr-quant runs batch 1 only


def test_table_shows_eager_columns():
    eager = {"fp16_eager_ms": 0.03, "spqr_eager_ms": 0.12, "eager_speedup": 0.25, "fp16_host_us": 18.0,
             "spqr_host_us": 95.0}
    console = Console(record=True, width=250)
    console.print(render_table([{**_row(1, {}), **eager}, _row(16, {})]))
    text = console.export_text()
    assert "eager speedup" in text and "host us fp16/spqr" in text
    lines = [line for line in text.splitlines() if "7B qkvo" in line]
    assert "0.25x" in lines[0] and "18/95" in lines[0] and lines[1].count(" - ") == 4


def test_table_without_peers_has_no_peer_columns():
    console = Console(record=True, width=250)
    console.print(render_table([_row(1, {})]))
    assert "vs fp16" not in console.export_text()


@pytest.mark.gpu
@pytest.mark.parametrize("peer", PEERS)
def test_peer_matches_its_own_dequantization(peer):
    """Each peer's call agrees with its own dense matrix (so the bench times a correct product)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip({"spqr-quant": "spqr_quant", "gemlite": "gemlite"}[peer])
    from spqr_cli.bench.layers import bench_layers

    rows = bench_layers([("7B qkvo", 4096, 4096)], batches=(1, 16), warmup=1, reps=5, peers=[peer])
    got = [r["peers"][peer] for r in rows if peer in r["peers"]]
    assert got and all(g["rel_err"] < 1e-2 and g["ms"] > 1e-4 for g in got)  # (a 16M-weight layer takes > 0.1 us)


def test_e2e_table_shows_compiled_column_and_failures():
    from spqr_cli.bench.e2e import render_e2e

    base = {"weights_gb": 13.5, "decode_tok_s": 122.0, "decode_tok_s_eager": 20.0, "prefill_ms": 63.0,
            "peak_gb": 13.8}
    rows = [{"model": "7B", "kind": "fp16", **base, "decode_tok_s_compiled": 160.0},
            {"model": "7B", "kind": "spqr", **base, "decode_tok_s": 153.0, "decode_tok_s_compiled": 215.0,
             "decode_speedup": 1.25, "prefill_speedup": 0.77, "compiled_speedup": 1.34},
            {"model": "13B", "kind": "spqr", **base, "compile_error": "BackendCompilerFailed: no triton"},
            {"model": "33B", "kind": "spqr", **base, "prefill_ms": None, "cap_gb": 24.0},
            {"model": "65B", "kind": "spqr", "error": "CUDA out of memory. Tried to allocate 2 GiB"}]
    console = Console(width=250, record=True)
    console.print(render_e2e(rows))
    text = console.export_text()
    assert "215.0" in text and "compiled 1.34x" in text and "decode 1.25x, prefill 0.77x" in text
    assert "failed" in text and "compile: BackendCompilerFailed: no triton" in text
    assert "fits in 24 GB" in text and "out of memory" in text
