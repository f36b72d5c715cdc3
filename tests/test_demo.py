from __future__ import annotations

from typer.testing import CliRunner

from spqr_cli.cli import app
from spqr_cli.demo import DEMO_CALIB, DEMO_MODEL, DEMO_TEST


def test_demo_assets_are_small_and_present():
    assert (DEMO_MODEL / "model.safetensors").is_file() and (DEMO_MODEL / "tokenizer.json").is_file()
    assert DEMO_TEST.stat().st_size <= 100_000 and DEMO_CALIB.stat().st_size <= 100_000


def test_demo_runs_offline(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "fp16 perplexity" in result.output
    assert (tmp_path / "calib.safetensors").is_file()
