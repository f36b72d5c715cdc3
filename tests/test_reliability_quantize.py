"""Issue 18, the quantize / calibrate / config part: every bad input ends in one ``error:`` line (exit 2, no
traceback), a model that does not match its config is never quantized with random layers, a damaged resumable run
says how to recover, and a finished run returns at once.

``QUANTIZE_BAD_INPUTS`` counts the bad inputs tried here (docs/reliability.md).
"""

from __future__ import annotations

import errno
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from spqr_cli.cli import app
from spqr_cli.core.calibrate import CalibrationSet, save_calibration
from spqr_cli.core.config import QuantConfig
from spqr_cli.core.errors import ConfigError
from spqr_cli.demo import DEMO_CALIB

runner = CliRunner()


def one_line_error(result, message: str) -> None:
    """Exit code 2, exactly one ``error: ...`` line on stderr, the last, containing ``message``; no traceback.
    (Lines before it can only be the progress heartbeat of work done before the error.)"""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.stderr and sum(line.startswith("error:") for line in lines) == 1, result.stderr
    assert all(line.startswith(("quantize: ", "replay: ")) for line in lines[:-1]), result.stderr
    assert lines[-1].startswith("error: ") and message in lines[-1], lines[-1]


def quantize_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["quantize", str(model), "--out", str(out), "--dataset", f"file:{DEMO_CALIB}", "--nsamples", "2",
            "--seqlen", "32", "--device", "cpu", *extra]


@pytest.fixture
def model_copy(tmp_path: Path, demo_model_path: Path) -> Path:
    """A copy of the demo model to damage."""
    return Path(shutil.copytree(demo_model_path, tmp_path / "model"))


def _edit_weights(model: Path, edit) -> None:  # noqa: ANN001 (a function of the state dict)
    path = model / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# ------------------------------------------------------------------------------------- models that do not match

def test_missing_weight_is_refused(model_copy: Path, tmp_path: Path) -> None:
    _edit_weights(model_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    result = runner.invoke(app, quantize_args(model_copy, tmp_path / "q"))
    one_line_error(result, "1 missing (first: model.layers.1.mlp.up_proj.weight)")
    assert not (tmp_path / "q" / "records").exists() or not any((tmp_path / "q" / "records").iterdir())


def test_unexpected_weight_is_refused(model_copy: Path, tmp_path: Path) -> None:
    _edit_weights(model_copy, lambda t: t.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2).half()}))
    one_line_error(runner.invoke(app, quantize_args(model_copy, tmp_path / "q")), "1 unexpected")


def test_wrong_shape_is_refused(model_copy: Path, tmp_path: Path) -> None:
    def shrink(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"][:-1].clone()

    _edit_weights(model_copy, shrink)
    result = runner.invoke(app, quantize_args(model_copy, tmp_path / "q"))
    one_line_error(result, "model.layers.0.self_attn.q_proj.weight")


def test_truncated_weights_are_refused(model_copy: Path, tmp_path: Path) -> None:
    path = model_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    one_line_error(runner.invoke(app, quantize_args(model_copy, tmp_path / "q")), "damaged")
    one_line_error(runner.invoke(app, ["eval", str(model_copy), "--dataset", f"file:{DEMO_CALIB}", "--seqlen",
                                       "32", "--max-windows", "1", "--device", "cpu"]), "damaged")


def test_pickle_only_model_is_refused_without_unpickling(model_copy: Path, tmp_path: Path) -> None:
    (model_copy / "model.safetensors").unlink()
    (model_copy / "pytorch_model.bin").write_bytes(b"not even a pickle: nothing may try to load it")
    one_line_error(runner.invoke(app, quantize_args(model_copy, tmp_path / "q")), "pickle weights")


def test_packed_and_quant_dirs_are_not_models(quantized_demo, tmp_path: Path) -> None:
    one_line_error(runner.invoke(app, quantize_args(quantized_demo["packed"], tmp_path / "a")),
                   "is a packed spqr checkpoint")
    one_line_error(runner.invoke(app, quantize_args(quantized_demo["quant"], tmp_path / "b")),
                   "`spqr quantize` output directory")


# ------------------------------------------------------------------------------------------------- bad config

@pytest.mark.parametrize("flags, message", [
    (["--outlier-threshold", "nan"], "outlier-threshold nan"),
    (["--outlier-threshold", "-inf"], "outlier-threshold -inf"),
    (["--percdamp", "inf"], "percdamp inf"),
    (["--wbits", "9"], "--wbits 9"),
    (["--groupsize", "12"], "--groupsize 12"),
    (["--tune-steps", "-1"], "--tune-steps -1"),
    (["--tune-lr", "0"], "--tune-lr 0"),
])
def test_bad_flags(flags: list[str], message: str, tmp_path: Path, demo_model_path: Path) -> None:
    one_line_error(runner.invoke(app, quantize_args(demo_model_path, tmp_path / "q", *flags)), message)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("text, message", [
    ("wbits: [3\n", "not readable YAML"),
    ("- wbits: 3\n", "must be a mapping"),
    ("wbits: three\n", "wbits = 'three' must be of type int"),
    ("wbits: true\n", "wbits = True must be of type int"),
    ("outlier_threshold: lots\n", "outlier_threshold = 'lots'"),
    ("bits: 3\n", "unknown config keys: bits"),
])
def test_malformed_preset_file(text: str, message: str, tmp_path: Path, demo_model_path: Path) -> None:
    preset = tmp_path / "p.yaml"
    preset.write_text(text)
    one_line_error(runner.invoke(app, quantize_args(demo_model_path, tmp_path / "q", "--preset", str(preset))),
                   message)


def test_config_types_checked_in_python() -> None:
    for bad in ({"outlier_threshold": float("nan")}, {"groupsize": 1.5}, {"sym": "yes"}, {"method": 3}):
        with pytest.raises(ConfigError):
            QuantConfig.from_dict(bad)


# ------------------------------------------------------------------------------------------- calibration sets

@pytest.mark.parametrize("ids, message", [
    (torch.full((2, 16), -5, dtype=torch.int64), "negative token ids"),
    (torch.zeros(0, 16, dtype=torch.int64), "empty or too short"),
    (torch.full((2, 16), 10**6, dtype=torch.int64), "outside this model's vocabulary"),
])
def test_bad_calibration_ids(ids: torch.Tensor, message: str, tmp_path: Path, demo_model_path: Path,
                             demo_tokenizer) -> None:
    from spqr_cli.core.data import ids_sha256, tokenizer_fingerprint

    manifest = {"format": "spqr-calibration/1", "nsamples": ids.shape[0], "seqlen": ids.shape[1], "seed": 0,
                "sha256": ids_sha256(ids), "tokenizer_sha256": tokenizer_fingerprint(demo_tokenizer),
                "source": "test"}
    calib = save_calibration(CalibrationSet(ids, manifest), tmp_path / "c.safetensors")
    result = runner.invoke(app, ["quantize", str(demo_model_path), "--out", str(tmp_path / "q"), "--calib",
                                 str(calib), "--device", "cpu"])
    one_line_error(result, message)


def test_calibrate_default_seqlen_follows_the_model(tmp_path: Path, demo_model_path: Path) -> None:
    """The demo model's context is shorter than 2048: the default window is capped, not an error."""
    result = runner.invoke(app, ["calibrate", str(demo_model_path), "--dataset", f"file:{DEMO_CALIB}",
                                 "--nsamples", "2", "--out", str(tmp_path / "c.safetensors")])
    assert result.exit_code == 0, result.output
    from transformers import AutoConfig

    context = AutoConfig.from_pretrained(demo_model_path).max_position_embeddings
    assert f"2 x {min(2048, context)} tokens" in result.output


# ------------------------------------------------------------------------------------- output dirs, resume

def test_out_below_a_file(tmp_path: Path, demo_model_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(runner.invoke(app, quantize_args(demo_model_path, blocker / "q")), "lies below one")
    one_line_error(runner.invoke(app, ["calibrate", str(demo_model_path), "--dataset", f"file:{DEMO_CALIB}",
                                       "--nsamples", "2", "--out", str(blocker / "c.safetensors")]), "is a file")


def test_full_disk_is_one_line_and_resumable(tmp_path: Path, demo_model_path: Path, monkeypatch) -> None:
    """A write that fails with ENOSPC mid-run: one line, and the committed blocks resume afterwards."""
    import spqr_cli.core.io as io

    real, calls = io.save_safetensors, {"n": 0}

    def flaky(*args, **kwargs):  # noqa: ANN002, ANN003
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(io, "save_safetensors", flaky)
    out = tmp_path / "q"
    one_line_error(runner.invoke(app, quantize_args(demo_model_path, out)), "No space left on device")
    state = json.loads((out / "quant_config.json").read_text())
    assert state["completed_blocks"] == 1 and not state["complete"]
    assert not list((out / "records").glob("*.tmp"))  # nothing half-written is left
    monkeypatch.setattr(io, "save_safetensors", real)
    result = runner.invoke(app, quantize_args(demo_model_path, out))
    assert result.exit_code == 0, result.output
    assert "1 blocks resumed" in result.output


def test_damaged_record_on_resume(quantized_demo, tmp_path: Path, demo_model_path: Path) -> None:
    out = Path(shutil.copytree(quantized_demo["quant"], tmp_path / "q"))
    state = json.loads((out / "quant_config.json").read_text())
    state["complete"] = False  # resumable: the committed blocks are replayed
    (out / "quant_config.json").write_text(json.dumps(state))
    record = out / "records" / "block_0001.safetensors"
    record.write_bytes(record.read_bytes()[:100])
    args = ["quantize", str(demo_model_path), "--out", str(out), "--dataset", f"file:{DEMO_CALIB}", "--nsamples",
            "4", "--seqlen", "64", "--device", "cpu"]  # the command that made quantized_demo
    one_line_error(runner.invoke(app, args), "records of model.layers.1 (block_0001.safetensors) are damaged")
    record.with_suffix(".json").write_text("{not json")
    one_line_error(runner.invoke(app, args), "--restart")


def test_finished_run_returns_at_once(quantized_demo, demo_model_path: Path) -> None:
    args = ["quantize", str(demo_model_path), "--out", str(quantized_demo["quant"]), "--dataset",
            f"file:{DEMO_CALIB}", "--nsamples", "4", "--seqlen", "64", "--device", "cpu"]
    before = json.loads((quantized_demo["quant"] / "report.json").read_text())
    t0 = time.perf_counter()
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert time.perf_counter() - t0 < 10
    num_blocks = json.loads((quantized_demo["quant"] / "quant_config.json").read_text())["num_blocks"]
    assert f"({num_blocks} blocks resumed)" in result.output
    assert json.loads((quantized_demo["quant"] / "report.json").read_text()) == before  # nothing rewritten


QUANTIZE_BAD_INPUTS = 8 + 7 + 6 + 4 + 3 + 2 + 1 + 2  # per group of tests above, in order (33)
