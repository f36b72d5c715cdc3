"""The block-by-block driver on a real (tiny) trained LLaMA: outputs, dense checkpoint, resume, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spqr_cli.core.config import QuantConfig, load_preset
from spqr_cli.core.errors import SpQRError
from spqr_cli.quant import driver as qmod
from spqr_cli.quant.record import load_records

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "docs-llama-3m"

pytestmark = pytest.mark.skipif(not MODEL.is_dir(), reason="../shared/models/docs-llama-3m not available")


def _calib(n: int = 4, seqlen: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 8000, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _all_tensors(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted((out / "records").glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


@pytest.fixture(scope="module")
def spqr_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, qmod.QuantReport]:
    out = tmp_path_factory.mktemp("q") / "run"
    report = qmod.quantize_model(str(MODEL), load_preset("spqr-3.9bit"), out, _calib(), device="cpu")
    return out, report


def test_outputs_and_dense_checkpoint(spqr_run: tuple[Path, qmod.QuantReport]) -> None:
    from transformers import AutoModelForCausalLM

    out, report = spqr_run
    state = json.loads((out / "quant_config.json").read_text())
    assert state["complete"] and state["completed_blocks"] == state["num_blocks"] == 4
    names = [name for name, _ in qmod.iter_records(out)]
    assert names == state["layers"] and len(names) == 4 * 7
    dense = AutoModelForCausalLM.from_pretrained(out / "dense", dtype=torch.float16)
    params = dict(dense.named_parameters())
    for name, rec in qmod.iter_records(out):
        assert torch.equal(params[f"{name}.weight"], rec.dequantize()), name
    saved = json.loads((out / "report.json").read_text())
    assert len(saved["layers"]) == len(names)
    assert 3.5 < saved["avg_bits"] < 5.0
    assert all(0 <= r["rel_error"] < 0.5 for r in saved["layers"])
    assert report.avg_bits == pytest.approx(saved["avg_bits"])


def test_resume_is_bit_identical(spqr_run: tuple[Path, qmod.QuantReport], tmp_path: Path,
                                 resume_after_kill) -> None:
    out_full, _ = spqr_run
    out = tmp_path / "run"

    def killed() -> None:
        assert json.loads((out / "quant_config.json").read_text())["completed_blocks"] == 2

    report = resume_after_kill(
        lambda: qmod.quantize_model(str(MODEL), load_preset("spqr-3.9bit"), out, _calib(), device="cpu"), killed)
    a, b = _all_tensors(out_full), _all_tensors(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(report.layers) == 4 * 7


def test_changed_config_or_calibration_is_refused(spqr_run: tuple[Path, qmod.QuantReport]) -> None:
    out, _ = spqr_run
    with pytest.raises(SpQRError, match="different config"):
        qmod.quantize_model(str(MODEL), load_preset("spqr-4.6bit"), out, _calib(), device="cpu")
    with pytest.raises(SpQRError, match="different calibration"):
        qmod.quantize_model(str(MODEL), load_preset("spqr-3.9bit"), out, _calib(seed=1), device="cpu")


def test_foreign_directory_and_bad_calibration(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(SpQRError, match="not empty"):
        qmod.quantize_model(str(MODEL), QuantConfig(), foreign, _calib(), device="cpu")
    assert (foreign / "keep.txt").read_text() == "user data"
    with pytest.raises(SpQRError, match="another tokenizer"):
        qmod.quantize_model(str(MODEL), QuantConfig(), tmp_path / "x", _calib() + 9000, device="cpu")


def test_restart_and_rtn(tmp_path: Path) -> None:
    out = tmp_path / "run"
    qmod.quantize_model(str(MODEL), load_preset("rtn-4bit-g128"), out, _calib(n=2), device="cpu")
    report = qmod.quantize_model(str(MODEL), load_preset("gptq-4bit-g128"), out, _calib(n=2), device="cpu",
                                 restart=True)
    assert report.resumed_from_block == 0
    records = load_records(str(out / "records" / "block_0000.safetensors"))
    assert all(r.stat_bits == 16 and r.nnz == 0 for r in records.values())
