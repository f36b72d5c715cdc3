"""The block fine-tune (``quant.tune``): its differentiable decode equals the record's, training lowers the held-out
block error, the trained records are what the block then computes with, and a killed tuned run resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from spqr_cli.core.config import load_preset
from spqr_cli.quant import driver
from spqr_cli.quant.methods import quantize_layer
from spqr_cli.quant.tune import TunedLinear, tune_block

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "docs-llama-3m"


def _layer(preset: str, seed: int = 0, n: int = 48, k: int = 256):
    """A quantized record of a random layer (act-order, outliers at a low threshold) and its fp32 weight."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    x = torch.randn(256, k, generator=gen)
    h = 2 * x.t() @ x / x.shape[0]
    cfg = load_preset(preset)
    if cfg.has_outliers:
        cfg = cfg.replace(outlier_threshold=0.05)
    return quantize_layer(w, h, cfg), w


@pytest.mark.parametrize("preset", ["spqr-3.9bit", "gptq-4bit-g128"])
def test_tuned_decode_is_the_record_decode(preset: str) -> None:
    rec, _ = _layer(preset)
    assert rec.perm is not None and (rec.nnz > 0 or preset.startswith("gptq"))
    tl = TunedLinear(rec, None, torch.device("cpu"))
    assert torch.equal(tl.weight().half(), rec.dequantize())  # fp32 decode, rounded once: bit-identical
    again = tl.record()
    for name in ("scale_stats", "zero_stats", "scale", "zero", "outlier_val", "codes"):
        a, b = getattr(rec, name), getattr(again, name)
        assert (a is None and b is None) or torch.equal(a, b), name


class _Block(nn.Module):
    """A norm and two quantizable linears: the shape of a decoder block's MLP."""

    def __init__(self, k: int = 128, hidden: int = 128) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(k)
        self.up = nn.Linear(k, hidden, bias=False)
        self.down = nn.Linear(hidden, k, bias=True)
        self.half().float()  # fp16 values, as a checkpoint's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


@pytest.mark.parametrize("preset", ["spqr-3.9bit", "gptq-4bit-g128"])
def test_tune_block_lowers_the_heldout_error_and_keeps_records_and_block_in_step(preset: str) -> None:
    torch.manual_seed(0)
    block = _Block().requires_grad_(False)  # as the driver's blocks
    inps = torch.randn(16, 8, 128) * torch.linspace(0.2, 3, 128)  # uneven features: act-order permutes
    with torch.no_grad():
        targets = block(inps)
    records = {}
    # min/max ranges (the preset's range search leaves this toy block's held-out error too small to gain on)
    cfg = load_preset(preset).replace(clip_grid=0)
    for name in ("up", "down"):
        lin = block.get_submodule(name)
        x = (inps if name == "up" else torch.relu(block.up(block.norm(inps)))).reshape(-1, lin.in_features)
        rec = quantize_layer(lin.weight.data.clone(), 2 * x.t() @ x / x.shape[0], cfg)
        assert rec.perm is not None and not torch.equal(rec.perm, torch.arange(lin.in_features))
        lin.weight.data = rec.dequantize().float()
        records[f"b.{name}"] = rec
    new, result = tune_block(block, "b", records, inps, targets, {}, torch.device("cpu"), steps=40, lr=3e-3, batch=4)
    assert result.heldout_after <= result.heldout_before  # never worse: kept only where the stored block gains
    if preset.startswith("spqr"):  # 3-bit codes in 16x16 groups leave room to gain (4-bit GPTQ here: none)
        assert result.heldout_after < result.heldout_before and result.best_step > 0
    for name in ("up", "down"):  # the block computes with exactly the trained records' decode
        assert torch.equal(block.get_submodule(name).weight.data, new[f"b.{name}"].dequantize().float())
        assert new[f"b.{name}"].codes is records[f"b.{name}"].codes  # discrete choices untouched
    for p in block.parameters():  # trained values stored as fp16; nothing left trainable or holding a gradient
        assert torch.equal(p.data, p.data.half().float()) and not p.requires_grad and p.grad is None
    with torch.no_grad():  # the reported error is the stored block's
        err = (block(inps[-2:]) - targets[-2:]).pow(2).sum() / targets[-2:].pow(2).sum()
    assert float(err) == pytest.approx(result.heldout_after, rel=1e-5)


def test_tune_that_does_not_help_changes_nothing() -> None:
    """Zero steps (or no gain after rounding to fp16): the records and the block stay exactly as they were."""
    torch.manual_seed(0)
    block = _Block()
    inps = torch.randn(4, 8, 128)
    with torch.no_grad():
        targets = block(inps)
    rec = quantize_layer(block.up.weight.data.clone(), torch.eye(128), load_preset("spqr-3.9bit"))
    block.up.weight.data = rec.dequantize().float()
    before = {k: v.clone() for k, v in block.state_dict().items()}
    new, result = tune_block(block, "b", {"b.up": rec}, inps, targets, {}, torch.device("cpu"), steps=0, lr=1e-3,
                             batch=2)
    assert new["b.up"] is rec and result.best_step == 0 and result.heldout_after == result.heldout_before
    assert all(torch.equal(before[k], v) for k, v in block.state_dict().items())


@pytest.mark.skipif(not MODEL.is_dir(), reason="../shared/models/docs-llama-3m not available")
def test_tuned_run_reports_and_resumes_exactly(tmp_path: Path, resume_after_kill) -> None:
    cfg = load_preset("spqr-3.9bit").replace(tune_steps=4)
    calib = torch.randint(3, 8000, (8, 32), generator=torch.Generator().manual_seed(0))
    full = tmp_path / "full"
    report = driver.quantize_model(str(MODEL), cfg, full, calib, device="cpu", dense=False)
    assert [t.block for t in report.tuning] == [f"model.layers.{i}" for i in range(4)]
    saved = json.loads((full / "report.json").read_text())
    assert saved["config"]["tune_steps"] == 4 and len(saved["tuning"]) == 4
    out = tmp_path / "resumed"
    resumed = resume_after_kill(lambda: driver.quantize_model(str(MODEL), cfg, out, calib, device="cpu", dense=False))
    # every block's result, the replayed ones read back: equal to the uninterrupted run's (CPU: deterministic)
    assert [t.to_dict() for t in resumed.tuning] == [t.to_dict() for t in report.tuning]
    for f in sorted((full / "records").glob("*.safetensors")):  # trained norms included
        a, b = load_file(str(f)), load_file(str(out / "records" / f.name))
        assert a.keys() == b.keys() and any("layernorm" in k for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a), f.name
    a, b = (load_file(str(next((d / "unquantized").glob("*.safetensors")))) for d in (full, out))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the packed model's norms: the trained ones
