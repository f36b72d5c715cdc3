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


def test_eval_several_texts_loads_once_and_matches_one_at_a_time(tmp_path, demo_model_path, monkeypatch):
    """Repeated --dataset: one row and one JSON result per text, in order, each equal to its own single run; the
    model loads once; a missing second text stops the command before anything loads."""
    import spqr_cli.runtime.loader as loader

    loads = []
    real = loader.load_any_model
    monkeypatch.setattr(loader, "load_any_model", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    common = [str(demo_model_path), "--seqlen", "128", "--max-windows", "2", "--device", "cpu"]
    out = tmp_path / "both.json"
    both = runner.invoke(app, ["eval", *common, "-d", f"file:{DEMO_TEST}", "-d", f"file:{DEMO_CALIB}",
                               "--json", str(out)])
    assert both.exit_code == 0, both.output
    assert len(loads) == 1
    results = json.loads(out.read_text())["results"]
    assert [r["dataset"] for r in results] == [f"file:{DEMO_TEST}", f"file:{DEMO_CALIB}"]
    for text, r in zip((DEMO_TEST, DEMO_CALIB), results, strict=True):
        one = tmp_path / "one.json"
        assert runner.invoke(app, ["eval", *common, "-d", f"file:{text}", "--json", str(one)]).exit_code == 0
        assert json.loads(one.read_text())["perplexity"] == r["perplexity"]
        assert f"{r['perplexity']:.3f}" in both.output
    bad = runner.invoke(app, ["eval", *common, "-d", f"file:{DEMO_TEST}", "-d", f"file:{tmp_path / 'no.txt'}"])
    assert bad.exit_code != 0 and "not found" in bad.output and len(loads) == 3


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


# ----------------------------------------------------------------------------------------- quantize -> pack -> ...

def test_new_commands_have_help():
    for cmd in ("quantize", "pack", "unpack", "inspect", "run", "bench"):
        result = runner.invoke(app, [cmd, "--help"], terminal_width=200)
        assert result.exit_code == 0 and "Usage" in result.output, (cmd, result.output)
    assert "wikitext2" in runner.invoke(app, ["quantize", "--help"], terminal_width=200).output


def test_quantize_reports_layers_and_totals(quantized_demo):
    out = quantized_demo["quantize_result"].output
    report = json.loads((quantized_demo["quant"] / "report.json").read_text())
    assert len(report["layers"]) == 28 and out.count("model.layers.") == 28  # one table row per layer
    assert f"{report['avg_bits']:.3f}" in out and "average bits (formula)" in out
    assert f"wrote {quantized_demo['quant'] / 'report.json'}" in out
    assert 3.9 < report["avg_bits"] < 5.0  # spqr-3.9bit on tiny layers (the act-order permutation costs more)
    state = json.loads((quantized_demo["quant"] / "quant_config.json").read_text())
    assert state["complete"] and state["config"]["wbits"] == 3 and state["calibration"]["nsamples"] == 4
    assert state["calibration"]["dataset"].startswith("file:")


def test_pack_inspect_json_matches_report(quantized_demo, tmp_path):
    assert "28 quantized layers" in quantized_demo["pack_result"].output
    report = json.loads((quantized_demo["quant"] / "report.json").read_text())
    result = runner.invoke(app, ["inspect", str(quantized_demo["packed"]), "--json", str(tmp_path / "i.json")],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["checksums"] == "ok" and not info["failed"]
    assert info["totals"]["quantized_bits_formula"] == pytest.approx(report["avg_bits"], rel=1e-9)
    assert info["totals"]["outlier_pct"] == pytest.approx(report["outlier_pct"], rel=1e-9)
    stdout = runner.invoke(app, ["inspect", str(quantized_demo["packed"]), "--json", "-"]).stdout
    assert json.loads(stdout)["totals"] == info["totals"]


def test_unpack_is_bit_exact_with_quantizer_dense(quantized_demo, tmp_path):
    from safetensors.torch import load_file

    result = runner.invoke(app, ["unpack", str(quantized_demo["packed"]), "--out", str(tmp_path / "dense")])
    assert result.exit_code == 0, result.output
    ours = load_file(str(tmp_path / "dense" / "model.safetensors"))
    ref = load_file(str(quantized_demo["quant"] / "dense" / "model.safetensors"))
    for name, t in ours.items():
        assert t.dtype == ref[name].dtype and t.equal(ref[name]), name


def test_eval_packed_equals_eval_of_quantizer_dense(quantized_demo, tmp_path):
    ppl = {}
    for key, extra in (("packed", []), ("quant", []), ("packed", ["--no-verify"])):
        out = tmp_path / f"{key}{len(extra)}.json"
        args = ["eval", str(quantized_demo[key]), "--dataset", f"file:{DEMO_TEST}", "--seqlen", "128",
                "--max-windows", "2", "--device", "cpu", "--json", str(out), *extra]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        ppl[f"{key}{len(extra)}"] = json.loads(out.read_text())["perplexity"]
    assert ppl["packed0"] == pytest.approx(ppl["quant0"], rel=1e-5) and ppl["packed1"] == ppl["packed0"]
    assert 5 < ppl["packed0"] < 60


def test_run_streams_text_and_reports_speed(quantized_demo):
    result = runner.invoke(app, ["run", str(quantized_demo["packed"]), "--prompt", "The kernel scheduler",
                                 "--max-new-tokens", "8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() and "Traceback" not in result.output
    assert "8 tokens" in result.stderr and "tokens/s" in result.stderr and "device cpu" in result.stderr


def _one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_quantize_refuses_foreign_non_empty_dir(tmp_path, demo_model_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["quantize", str(demo_model_path), "--out", str(tmp_path), "--dataset",
                                 f"file:{DEMO_CALIB}", "--nsamples", "2", "--seqlen", "32", "--device", "cpu"])
    _one_line_error(result, "not empty")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("args,message", [
    (["--preset", "no-such-preset"], "not found"),
    (["--wbits", "1"], "--wbits 1 is not supported"),
    (["--preset", "spqr-3.9bit", "--method", "gptq"], "contradicts"),
    (["--calib", "{tmp}/c.safetensors", "--dataset", "wikitext2"], "both given"),
    (["--calib", "{tmp}/missing.safetensors"], "not found"),
])
def test_quantize_flag_errors(args, message, tmp_path, demo_model_path):
    args = [a.format(tmp=tmp_path) for a in args]
    result = runner.invoke(app, ["quantize", str(demo_model_path), "--out", str(tmp_path / "q"), *args])
    _one_line_error(result, message)
    assert not (tmp_path / "q").exists()


def test_quantize_refuses_calibration_of_another_tokenizer(tmp_path, demo_model_path, demo_tokenizer):
    from spqr_cli.core.calibrate import build_calibration_set, save_calibration

    calib = build_calibration_set(demo_tokenizer, f"file:{DEMO_CALIB}", nsamples=2, seqlen=32)
    calib.manifest["tokenizer_sha256"] = "0" * 64  # as if made with another tokenizer
    save_calibration(calib, tmp_path / "c.safetensors")
    result = runner.invoke(app, ["quantize", str(demo_model_path), "--out", str(tmp_path / "q"), "--calib",
                                 str(tmp_path / "c.safetensors"), "--device", "cpu"])
    _one_line_error(result, "another tokenizer")


def test_pack_of_missing_dir(tmp_path):
    result = runner.invoke(app, ["pack", str(tmp_path / "nope"), "--out", str(tmp_path / "p")])
    _one_line_error(result, "nope")
    assert not (tmp_path / "p").exists()


def test_inspect_of_corrupted_checkpoint_exits_2(quantized_demo, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(quantized_demo["packed"], bad)
    shard = next(bad.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # inside the last tensor's bytes
    shard.write_bytes(bytes(data))
    result = runner.invoke(app, ["inspect", str(bad)], terminal_width=200)
    _one_line_error(result, "fail their checksum")
    assert "MISMATCH" in result.stdout or "FAILED" in result.stdout


def test_bench_needs_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the bench would run")
    _one_line_error(runner.invoke(app, ["bench"]), "spqr bench needs a CUDA GPU")
