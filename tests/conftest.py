"""Shared fixtures. Tests run offline: the hub is skipped (SPQR_OFFLINE=1) unless a test says otherwise.

The environment is set for the test session only (undone at its end), so module- and session-scoped fixtures
see it too; a test that needs the hub or a data dir changes it with its own ``monkeypatch``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def _import_kernels_interpreted() -> None:
    """Without a GPU, build the Triton kernels in interpreter mode (decided when their modules are imported), so
    ``test_kernels`` can run them on the CPU, then unset ``TRITON_INTERPRET`` again: with it set, every CPU
    ``spqr_linear`` would take the (slow, interpreted) kernel path instead of the torch path the runtime uses on
    CPU. ``test_kernels`` sets it back around its own tests."""
    if torch.cuda.is_available() or "TRITON_INTERPRET" in os.environ:
        return
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import spqr_kernels.dequantize
        import spqr_kernels.matvec
        import spqr_kernels.outlier_scatter  # noqa: F401
    finally:
        del os.environ["TRITON_INTERPRET"]


_import_kernels_interpreted()

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"

QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip themselves where there is no CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPQR_OFFLINE", "1")
        mp.delenv("SPQR_DATA_DIR", raising=False)
        for key, value in QUIET_ENV.items():
            if key not in os.environ:
                mp.setenv(key, value)
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's torch work on one thread: with tiny models intra-op threads only add synchronization, which
    dominates on a busy CPU (measured 10-25x slower with 2 threads on a loaded 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def kill_quantize_at(monkeypatch):
    """``kill_quantize_at(n)`` makes the driver's ``n``-th ``quantize_layer`` call raise ``KeyboardInterrupt`` (a kill
    in the middle of a run); ``kill_quantize_at(None)`` puts the real one back, to resume."""
    from spqr_cli.quant import driver

    real = driver.quantize_layer

    def arm(n: int | None) -> None:
        calls = {"n": 0}

        def dying(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(driver, "quantize_layer", real if n is None else dying)

    return arm


@pytest.fixture
def resume_after_kill(kill_quantize_at):
    """``resume_after_kill(run)``: ``run()`` (a quantization of a model with 7 linears per block) killed in the
    middle of block 2, ``after_kill()`` called, then ``run()`` again; returns the second run's report, which must
    have resumed at block 2."""

    def go(run, after_kill=lambda: None):
        kill_quantize_at(2 * 7 + 3)
        with pytest.raises(KeyboardInterrupt):
            run()
        after_kill()
        kill_quantize_at(None)
        report = run()
        assert report.resumed_from_block == 2
        return report

    return go


@pytest.fixture(scope="session")
def quantized_demo(tmp_path_factory, demo_model_path):
    """The embedded demo model quantized (spqr-3.9bit, 4 x 64 calibration tokens, CPU) and packed, once per
    session, through the CLI; returns the directories and both commands' results."""
    import torch
    from typer.testing import CliRunner

    from spqr_cli.cli import app
    from spqr_cli.demo import DEMO_CALIB

    root = tmp_path_factory.mktemp("quantized-demo")
    runner = CliRunner()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny layers: threads only add overhead (and a lot of it on a busy CPU)
    try:
        quant = runner.invoke(app, ["quantize", str(demo_model_path), "--out", str(root / "quant"), "--dataset",
                                    f"file:{DEMO_CALIB}", "--nsamples", "4", "--seqlen", "64", "--device", "cpu"],
                              terminal_width=200)
    finally:
        torch.set_num_threads(threads)
    assert quant.exit_code == 0, quant.output
    packed = runner.invoke(app, ["pack", str(root / "quant"), "--out", str(root / "packed")], terminal_width=200)
    assert packed.exit_code == 0, packed.output
    return {"quant": root / "quant", "packed": root / "packed", "quantize_result": quant, "pack_result": packed}


@pytest.fixture(scope="session")
def demo_model_path() -> Path:
    from spqr_cli.demo import DEMO_MODEL

    return DEMO_MODEL


@pytest.fixture(scope="session")
def demo_tokenizer(demo_model_path):
    from spqr_cli.core.models import load_tokenizer

    return load_tokenizer(str(demo_model_path))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "wikitext2" / "wiki.test.raw").is_file():
        pytest.skip("../shared/data is not available")
    return SHARED_DATA


@pytest.fixture
def text_file(tmp_path) -> Path:
    """A small corpus file: 200 numbered rows."""
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"Row {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(200)))
    return path
