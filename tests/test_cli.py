from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from spqr_cli.cli import app
from spqr_cli.demo import DEMO_CALIB, DEMO_TEST

runner = CliRunner()


@pytest.mark.parametrize("args", [["--help"], ["eval", "--help"], ["calibrate", "--help"], ["demo", "--help"],
                                  ["presets", "--help"]])
def test_help(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_help_shows_defaults():
    out = runner.invoke(app, ["calibrate", "--help"], terminal_width=200).output
    assert "default: 128" in out and "default: 2048" in out and "default: wikitext2" in out


def test_eval_small(tmp_path, demo_model_path):
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["eval", str(demo_model_path), "--dataset", f"file:{DEMO_TEST}", "--seqlen", "256",
                                 "--max-windows", "2", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["windows"] == 2 and data["seqlen"] == 256 and data["requested_dtype"] == "fp16"
    assert f"{data['perplexity']:.3f}" in result.output


def test_calibrate(tmp_path, demo_model_path):
    out = tmp_path / "c.safetensors"
    args = ["calibrate", str(demo_model_path), "--dataset", f"file:{DEMO_CALIB}", "--nsamples", "4",
            "--seqlen", "64", "--seed", "1", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert out.is_file() and "4 x 64" in result.output


@pytest.mark.parametrize("args,message", [
    (["eval", "/no/such/model"], "does not exist"),
    (["eval", "{model}", "--dataset", "wikitext2"], "cannot load wikitext2"),
    (["eval", "{model}", "--dataset", "file:/no/such.txt"], "not found"),
    (["eval", "{model}", "--seqlen", "4096"], "larger than the model's context"),
    (["calibrate", "{model}", "--dataset", f"file:{DEMO_CALIB}", "--nsamples", "999", "--seqlen", "512",
      "--out", "{tmp}/c.safetensors"], "more than the calibration text holds"),
])
def test_user_errors_are_one_line(args, message, tmp_path, demo_model_path):
    args = [a.format(model=demo_model_path, tmp=tmp_path) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "c.safetensors").exists()


def test_presets_lists_descriptions():
    result = runner.invoke(app, ["presets"], terminal_width=250)
    assert result.exit_code == 0
    assert "spqr-3.9bit" in result.output and "3-bit weights" in result.output


def test_python_dash_m_and_fast_import():
    import subprocess
    import sys

    code = "import sys, spqr_cli.cli; print(any(m in sys.modules for m in ('torch', 'transformers', 'datasets')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    proc = subprocess.run([sys.executable, "-m", "spqr_cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and "spqr 0.1.0" in proc.stdout
