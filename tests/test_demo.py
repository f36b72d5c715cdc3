from __future__ import annotations

import time

from typer.testing import CliRunner

from spqr_cli.cli import app
from spqr_cli.demo import DEMO_CALIB, DEMO_MODEL, DEMO_TEST


def test_demo_assets_are_small_and_present():
    assert (DEMO_MODEL / "model.safetensors").is_file() and (DEMO_MODEL / "tokenizer.json").is_file()
    assert DEMO_TEST.stat().st_size <= 100_000 and DEMO_CALIB.stat().st_size <= 100_000


def test_demo_runs_offline_end_to_end(tmp_path):
    from spqr_cli.format.inspect import inspect_packed

    started = time.perf_counter()
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    for item in ("fp16 perplexity", "quantized perplexity", "average bits (formula)", "bits/param measured",
                 "size on disk", "sample (packed, greedy)"):
        assert item in result.output, item
    assert (tmp_path / "calib.safetensors").is_file() and (tmp_path / "quant" / "report.json").is_file()
    info = inspect_packed(tmp_path / "packed")
    assert info["checksums"] == "ok" and 4.0 < info["totals"]["quantized_bits_measured"] < 5.5
    assert time.perf_counter() - started < 240  # < 2 min on an idle 2-core CPU; slack for busy CI machines
