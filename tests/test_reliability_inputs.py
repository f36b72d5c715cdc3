"""Issue 18, bad inputs to `calibrate` and `quantize` (models, presets, calibration files, output paths, resume
state): each is one `error: ...` line with exit code 2 and no traceback, nothing half-written, never a silently
wrong model. `tests/test_reliability_quantize.py` has the first cases; these are the variants it lacks (the
shared docs-llama-3m model with tied embeddings and a 512-token context, malicious pickles, damaged manifests,
config values of the wrong type, a full disk under `calibrate`, paths checked before torch is imported).

``INPUT_CASES`` at the end counts the bad inputs tried here, for docs/reliability.md.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from spqr_cli.cli import app
from spqr_cli.core.calibrate import load_calibration
from spqr_cli.core.config import QuantConfig, load_preset
from spqr_cli.core.errors import ConfigError, SpQRError
from spqr_cli.demo import DEMO_CALIB

runner = CliRunner()
DOCS_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "docs-llama-3m"
needs_docs_model = pytest.mark.skipif(not DOCS_MODEL.is_dir(), reason="shared docs-llama-3m model not present")


def one_line_error(result, message: str) -> None:  # noqa: ANN001 (a CliRunner result)
    """Exit code 2, exactly one ``error: ...`` line on stderr (the last; lines before it can only be progress
    lines of work done before the error), containing ``message``; no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.stderr, result.stderr
    assert sum(line.startswith("error:") for line in lines) == 1, result.stderr
    assert lines[-1].startswith("error: ") and message in lines[-1], lines[-1]


def quantize_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["quantize", str(model), "--out", str(out), "--dataset", f"file:{DEMO_CALIB}", "--nsamples", "2",
            "--seqlen", "32", "--device", "cpu", *extra]


def nothing_written(out: Path) -> bool:
    """No records were committed (an output directory may exist, holding only the run's state)."""
    records = out / "records"
    return not records.exists() or not any(records.iterdir())


@pytest.fixture
def docs_copy(tmp_path: Path) -> Path:
    """A writable copy of the shared docs-llama-3m model to damage."""
    dst = tmp_path / "docs-model"
    shutil.copytree(DOCS_MODEL, dst, copy_function=shutil.copyfile)
    return dst


# ------------------------------------------------------------------------------- item 1: weights must match

@needs_docs_model
def test_intact_tied_model_loads_strictly() -> None:
    """No false alarm: a model with tied embeddings (no lm_head.weight in the file) and non-persistent buffers
    (rotary inv_freq) loads under the strict check."""
    from spqr_cli.core.models import load_model

    model = load_model(str(DOCS_MODEL), dtype="fp32")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@needs_docs_model
@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.3.self_attn.o_proj.weight"), "1 missing (first: model.layers.3.self_attn.o_proj"),
    (lambda t: t.pop("model.norm.weight"), "1 missing (first: model.norm.weight)"),
    (lambda t: t.update({"model.extra.weight": torch.zeros(3)}), "1 unexpected (first: model.extra.weight)"),
])
def test_docs_model_with_missing_or_extra_weight(edit, message: str, docs_copy: Path, tmp_path: Path) -> None:  # noqa: ANN001
    path = docs_copy / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    out = tmp_path / "q"
    one_line_error(runner.invoke(app, quantize_args(docs_copy, out)), message)
    assert nothing_written(out)


def test_packed_checkpoint_gets_its_own_message(quantized_demo, tmp_path: Path) -> None:
    result = runner.invoke(app, quantize_args(quantized_demo["packed"], tmp_path / "q"))
    one_line_error(result, "is a packed spqr checkpoint")
    assert "quantize the original" in result.stderr
    assert not (tmp_path / "q").exists()


# ----------------------------------------------------------------------------- item 2: pickle is never loaded

class _Exploit:
    """A pickle that would create a marker file if anything unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_only_model_is_never_unpickled(name: str, tmp_path: Path, demo_model_path: Path) -> None:
    model = Path(shutil.copytree(demo_model_path, tmp_path / "model"))
    (model / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (model / name).write_bytes(pickle.dumps({"w": _Exploit(marker)}))
    one_line_error(runner.invoke(app, quantize_args(model, tmp_path / "q")), "safetensors")
    one_line_error(runner.invoke(app, ["eval", str(model), "--dataset", f"file:{DEMO_CALIB}", "--seqlen", "32",
                                       "--max-windows", "1", "--device", "cpu"]), "pickle")
    assert not marker.exists()


# ----------------------------------------------------------------------------------- item 3: damaged weights

@needs_docs_model
@pytest.mark.parametrize("damage", ["half", "header", "empty"])
def test_damaged_docs_weights(damage: str, docs_copy: Path, tmp_path: Path) -> None:
    path = docs_copy / "model.safetensors"
    data = path.read_bytes()
    data = {"half": data[: len(data) // 2], "header": (2**40).to_bytes(8, "little") + data[8:], "empty": b""}[damage]
    path.write_bytes(data)
    one_line_error(runner.invoke(app, quantize_args(docs_copy, tmp_path / "q")), "cannot load model")
    one_line_error(runner.invoke(app, ["eval", str(docs_copy), "--dataset", f"file:{DEMO_CALIB}", "--seqlen", "32",
                                       "--max-windows", "1", "--device", "cpu"]), "cannot load model")
    assert nothing_written(tmp_path / "q")


# ------------------------------------------------------------------------------ item 4: damaged resume state

def _resumable_copy(quantized_demo, tmp_path: Path) -> Path:  # noqa: ANN001
    out = Path(shutil.copytree(quantized_demo["quant"], tmp_path / "q"))
    state = json.loads((out / "quant_config.json").read_text())
    state["complete"] = False
    (out / "quant_config.json").write_text(json.dumps(state))
    return out


RESUME_ARGS = ["--dataset", f"file:{DEMO_CALIB}", "--nsamples", "4", "--seqlen", "64", "--device", "cpu"]


@pytest.mark.parametrize("damage", ["delete-record", "delete-json", "json-list", "json-empty"])
def test_damaged_resume_records(damage: str, quantized_demo, tmp_path: Path, demo_model_path: Path) -> None:
    out = _resumable_copy(quantized_demo, tmp_path)
    record = out / "records" / "block_0000.safetensors"
    meta = record.with_suffix(".json")
    if damage == "delete-record":
        record.unlink()
    elif damage == "delete-json":
        meta.unlink()
    else:
        meta.write_text("[1, 2]" if damage == "json-list" else "")
    one_line_error(runner.invoke(app, ["quantize", str(demo_model_path), "--out", str(out), *RESUME_ARGS]),
                   "--restart")


@pytest.mark.parametrize("text", ["{oops", "[]", "", "[" * 100000])
def test_damaged_state_file(text: str, quantized_demo, tmp_path: Path, demo_model_path: Path) -> None:
    out = Path(shutil.copytree(quantized_demo["quant"], tmp_path / "q"))
    (out / "quant_config.json").write_text(text)
    result = runner.invoke(app, ["quantize", str(demo_model_path), "--out", str(out), *RESUME_ARGS])
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    one_line_error(result, "quant_config.json")


# ---------------------------------------------------------------------------------- items 5 and 7: configs

@pytest.mark.parametrize("text, message", [
    ("3\n", "must be a mapping"),
    ("[]\n", "must be a mapping"),
    ("wbits: 3\nwbits: [\n", "not readable YAML"),
    ("1: 2\n", "unknown config keys: 1"),
    ("extra: 5\n", "extra = 5 must be a mapping"),
    ("groupsize: 16.0\n", "groupsize = 16.0 must be of type int"),
    ("outlier_threshold: .nan\n", "outlier-threshold nan"),
    ("percdamp: .nan\n", "--percdamp"),
    ("sym: 'no'\n", "sym = 'no' must be of type bool"),
    ("[" * 5000 + "\n", "not readable YAML"),
])
def test_malformed_preset_variants(text: str, message: str, tmp_path: Path) -> None:
    preset = tmp_path / "p.yaml"
    preset.write_text(text)
    with pytest.raises(ConfigError, match=None) as e:
        load_preset(str(preset))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_preset_error_through_the_cli(tmp_path: Path, demo_model_path: Path) -> None:
    preset = tmp_path / "p.yaml"
    preset.write_text("wbits: '3'\n")
    one_line_error(runner.invoke(app, quantize_args(demo_model_path, tmp_path / "q", "--preset", str(preset))),
                   "wbits = '3' must be of type int")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("bad", [
    {"wbits": "3"}, {"outlier_threshold": "nan"}, {"outlier_threshold": "-inf"}, {"outlier_threshold": None},
    {"percdamp": "1"}, {"blocksize": 128.0}, {"perm": 0}, {"beta2": None}, {"extra": []}, ["wbits", 3],
])
def test_from_dict_rejects_wrong_types(bad) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError):
        QuantConfig.from_dict(bad)


def test_inf_threshold_round_trips() -> None:
    cfg = QuantConfig.from_dict({"outlier_threshold": "inf"})
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("value", ["nan", "NaN", "-inf", "0", "-1"])
def test_outlier_threshold_flag(value: str, tmp_path: Path, demo_model_path: Path) -> None:
    one_line_error(runner.invoke(app, quantize_args(demo_model_path, tmp_path / "q", "--outlier-threshold", value)),
                   "--outlier-threshold")
    assert not (tmp_path / "q").exists()


# -------------------------------------------------------------------------------- item 6: calibration files

def _calib_file(tmp_path: Path, ids: torch.Tensor, tokenizer, **manifest_changes) -> Path:  # noqa: ANN001, ANN003
    from spqr_cli.core.data import ids_sha256, tokenizer_fingerprint

    manifest = {"format": "spqr-calibration/1", "nsamples": ids.shape[0], "seqlen": ids.shape[-1], "seed": 0,
                "sha256": ids_sha256(ids), "tokenizer_sha256": tokenizer_fingerprint(tokenizer), "source": "test"}
    manifest.update(manifest_changes)
    path = tmp_path / "c.safetensors"
    metadata = {k: str(v) for k, v in manifest.items()}
    save_file({"input_ids": ids.contiguous()}, str(path), metadata=metadata)
    return path


GOOD_IDS = torch.randint(0, 100, (2, 16), dtype=torch.int64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("ids, changes, message", [
    (GOOD_IDS.to(torch.int32), {}, "2-D int64"),
    (GOOD_IDS.float(), {}, "2-D int64"),
    (GOOD_IDS.flatten(), {}, "2-D int64"),
    (GOOD_IDS[None], {}, "2-D int64"),
    (GOOD_IDS, {"sha256": "0" * 64}, "corrupt"),
    (GOOD_IDS, {"format": "something-else"}, "not a `spqr calibrate` file"),
    (GOOD_IDS, {"nsamples": "two"}, "damaged manifest"),
    (GOOD_IDS, {"tokenizer_sha256": "f" * 64}, "another tokenizer"),
    (GOOD_IDS[:, :1], {}, "empty or too short"),
    (torch.zeros(2, 0, dtype=torch.int64), {}, "empty or too short"),
    (GOOD_IDS - 1000, {}, "negative token ids"),
])
def test_bad_calibration_file(ids: torch.Tensor, changes: dict, message: str, tmp_path: Path,
                              demo_model_path: Path, demo_tokenizer) -> None:
    calib = _calib_file(tmp_path, ids, demo_tokenizer, **changes)
    out = tmp_path / "q"
    result = runner.invoke(app, ["quantize", str(demo_model_path), "--out", str(out), "--calib", str(calib),
                                 "--device", "cpu"])
    one_line_error(result, message)
    assert nothing_written(out)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "no-input-ids"])
def test_unreadable_calibration_file(damage: str, tmp_path: Path, demo_tokenizer) -> None:
    path = _calib_file(tmp_path, GOOD_IDS, demo_tokenizer)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-40])
    elif damage == "garbage":
        path.write_bytes(os.urandom(64))
    else:
        save_file({"other": GOOD_IDS}, str(path), metadata={"format": "spqr-calibration/1"})
    with pytest.raises(SpQRError) as e:
        load_calibration(path)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------- item 8: output paths

def test_calibrate_full_disk_leaves_nothing(tmp_path: Path, demo_model_path: Path, monkeypatch) -> None:
    import safetensors.torch

    def full(*args, **kwargs):  # noqa: ANN002, ANN003
        Path(args[1]).write_bytes(b"partial")  # a write that got part-way
        raise OSError(errno.ENOSPC, "No space left on device", str(args[1]))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "sub" / "c.safetensors"
    one_line_error(runner.invoke(app, ["calibrate", str(demo_model_path), "--dataset", f"file:{DEMO_CALIB}",
                                       "--nsamples", "2", "--seqlen", "16", "--out", str(out)]),
                   "No space left on device")
    assert not out.exists() and not [p for p in out.parent.iterdir()]  # no temporary file left behind


def test_quantize_full_disk_at_the_state_write_resumes(tmp_path: Path, demo_model_path: Path, monkeypatch) -> None:
    """ENOSPC while recording block 1 as done (its records already written): one line, no temporary files,
    and the next run resumes from the last recorded block and finishes."""
    import spqr_cli.quant.driver as driver

    real, calls = driver.write_json, {"state": 0}

    def flaky(data, path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if Path(path).name == "quant_config.json":
            calls["state"] += 1
            if calls["state"] == 3:  # 1: the new run, 2: block 0 done, 3: block 1 done
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(data, path, *args, **kwargs)

    monkeypatch.setattr(driver, "write_json", flaky)
    out = tmp_path / "q"
    one_line_error(runner.invoke(app, quantize_args(demo_model_path, out)), "No space left on device")
    state = json.loads((out / "quant_config.json").read_text())
    assert state["completed_blocks"] == 1 and not state["complete"]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    monkeypatch.setattr(driver, "write_json", real)
    result = runner.invoke(app, quantize_args(demo_model_path, out))
    assert result.exit_code == 0, (result.output, result.stderr)
    assert json.loads((out / "quant_config.json").read_text())["complete"]


def test_out_that_is_a_file(tmp_path: Path, demo_model_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    one_line_error(runner.invoke(app, quantize_args(demo_model_path, blocker)), "is a file")
    one_line_error(runner.invoke(app, quantize_args(demo_model_path, blocker / "a" / "b")), "lies below one")
    assert blocker.read_text() == "keep me"


def test_calibrate_out_is_a_directory(tmp_path: Path, demo_model_path: Path) -> None:
    one_line_error(runner.invoke(app, ["calibrate", str(demo_model_path), "--dataset", f"file:{DEMO_CALIB}",
                                       "--nsamples", "2", "--out", str(tmp_path)]), "is a directory")


# --------------------------------------------------------------------------- item 9: calibrate's default seqlen

@needs_docs_model
def test_calibrate_default_seqlen_capped_at_512(tmp_path: Path) -> None:
    out = tmp_path / "c.safetensors"
    result = runner.invoke(app, ["calibrate", str(DOCS_MODEL), "--dataset", f"file:{DEMO_CALIB}", "--nsamples", "1",
                                 "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.stderr)
    assert load_calibration(out).input_ids.shape == (1, 512)


# ------------------------------------------------------------------------------- item 10: a finished run

def test_finished_run_says_so(quantized_demo, demo_model_path: Path) -> None:
    result = runner.invoke(app, ["quantize", str(demo_model_path), "--out", str(quantized_demo["quant"]),
                                 *RESUME_ARGS], terminal_width=200)
    assert result.exit_code == 0, (result.output, result.stderr)
    assert "already holds this finished run" in " ".join(result.output.split())


# --------------------------------------------------------------------- item 11: bad paths before torch loads

_PROBE = ("import sys\nfrom spqr_cli.cli import app\ntry:\n    app(sys.argv[1:], prog_name='spqr')\n"
          "except SystemExit as e:\n    print('torch imported:', 'torch' in sys.modules, 'exit', e.code)\n")


def _early_cases(tmp: Path, model: Path) -> list[tuple[list[str], str]]:
    a_file = tmp / "a-file.txt"
    a_file.write_text("x\n")
    data = f"file:{DEMO_CALIB}"
    return [
        (["calibrate", "./no/such/model", "--dataset", data, "--out", str(tmp / "c.st")], "does not exist"),
        (["calibrate", str(model), "--dataset", f"file:{tmp / 'missing.txt'}", "--out", str(tmp / "c.st")],
         "not found"),
        (["calibrate", str(model), "--dataset", data, "--out", str(a_file / "c.st")], "is a file"),
        (["quantize", "./no/such/model", "--out", str(tmp / "q")], "does not exist"),
        (["quantize", str(model), "--out", str(tmp / "q"), "--calib", str(tmp / "missing.st")], "not found"),
        (["quantize", str(model), "--out", str(tmp / "q"), "--dataset", f"file:{tmp / 'missing.txt'}"], "not found"),
        (["quantize", str(model), "--out", str(a_file / "q")], "lies below one"),
    ]


def test_calibrate_and_quantize_check_paths_before_torch(tmp_path: Path, demo_model_path: Path) -> None:
    cases = _early_cases(tmp_path, demo_model_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, message in cases:
        proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True)
        lines = proc.stderr.strip().splitlines()
        assert "Traceback" not in proc.stderr and len(lines) == 1, (args, proc.stderr)
        assert lines[0].startswith("error: ") and message in lines[0], (args, proc.stderr)
        assert "torch imported: False exit 2" in proc.stdout, (args, proc.stdout)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# Bad inputs tried above (parametrized cases x commands), for docs/reliability.md. Every one is a clean error
# except the intact-model and round-trip controls, which are counted apart.
INPUT_CASES = {
    "weights (item 1)": 3 + 1,
    "pickle (item 2)": 2 * 2,
    "damaged weights (item 3)": 3 * 2,
    "resume state (item 4)": 4 + 4,
    "presets (item 5)": 10 + 1,
    "config values (item 7)": 10 + 5,
    "calibration files (item 6)": 11 + 3,
    "output paths (item 8)": 1 + 1 + 2 + 1,
    "paths before torch (item 11)": 7,
}
