"""Block fine-tune: after a block's linears are quantized, train its continuous parameters to match the original
block's outputs on the calibration set.

GPTQ/SpQR fix each layer against its own inputs and never look at what the block computes as a whole. Here the
discrete choices stay (weight codes, first-level statistic codes, outlier positions) and everything continuous in
the block is trained by Adam on the relative squared error of the block output against the original fp16
block's output, given the same (quantized model's) inputs:

- per quantized linear: the fp16 second-level statistics (``scale_stats``, ``zero_stats``: the scale and zero of
  the quantizer of the first-level scales and zeros, per ``beta2`` rows and group), or the fp16 first-level
  ``scale``/``zero`` when the statistics are not quantized (GPTQ/RTN), and the outlier values;
- the block's other parameters: the norms' weights and any biases.

So the bits per weight do not change. AQLM and PV-tuning fine-tune their codebooks the same way; SpQR's authors
did not. A held-out slice of the calibration windows picks the best step (the parameters after it are kept,
rounded to fp16 as they are stored) and keeps the tune from making a block worse than it was before it.
Learning rates are relative: each tensor's is ``lr`` times its mean magnitude, since second-level scales (~1e-3),
zeros (~1) and norm weights (~1) live on different scales.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spqr_cli.quant.record import RECORD_FIELDS, QuantizedLayer


class TunedLinear(nn.Module):
    """A quantized linear layer whose continuous parameters train, decoded by ``QuantizedLayer.dequantize`` itself
    (in fp32, differentiable in the statistics and outlier values)."""

    def __init__(self, rec: QuantizedLayer, bias: nn.Parameter | None, device: torch.device) -> None:
        super().__init__()
        self.rec = rec
        self.bias = bias
        # the fixed fields on the training device (codes stay uint8: 1 byte per weight while the block trains)
        self.fixed = dataclasses.replace(rec, **{f: t.to(device) for f in RECORD_FIELDS
                                                 if (t := getattr(rec, f)) is not None})
        f32 = {"device": device, "dtype": torch.float32}
        if rec.stat_bits == 16:
            self.scale = nn.Parameter(rec.scale.to(**f32))
            self.zero = nn.Parameter(rec.zero.to(**f32))
        else:
            # (scale, zero) of each second-level quantizer as separate tensors: their magnitudes differ (~1e-3 vs
            # ~1), and the learning rate is relative to a tensor's mean magnitude
            self.scale_a, self.scale_b = (nn.Parameter(t.to(**f32).contiguous()) for t in rec.scale_stats.unbind(-1))
            self.zero_a, self.zero_b = (nn.Parameter(t.to(**f32).contiguous()) for t in rec.zero_stats.unbind(-1))
        self.outlier_val = nn.Parameter(rec.outlier_val.to(**f32))

    def trained(self) -> dict[str, torch.Tensor]:
        """The record fields this layer trains, as the record holds them."""
        if self.rec.stat_bits == 16:
            stats = {"scale": self.scale, "zero": self.zero}
        else:
            stats = {"scale_stats": torch.stack([self.scale_a, self.scale_b], dim=-1),
                     "zero_stats": torch.stack([self.zero_a, self.zero_b], dim=-1)}
        return {**stats, "outlier_val": self.outlier_val}

    def weight(self) -> torch.Tensor:
        """fp32 ``[N, K]`` in original column order, outliers written in."""
        return dataclasses.replace(self.fixed, **self.trained()).dequantize(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), self.bias)

    def record(self) -> QuantizedLayer:
        """The record with the trained values, rounded to fp16 as stored."""
        cpu = self.rec.codes.device
        return dataclasses.replace(self.rec, **{name: t.detach().to(device=cpu, dtype=torch.float16)
                                                for name, t in self.trained().items()})


@dataclass
class TuneResult:
    """Relative squared error of the block output on the held-out windows, before and after (kept best)."""

    block: str
    steps: int
    best_step: int
    heldout_before: float
    heldout_after: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _relative_error(block: nn.Module, inps: torch.Tensor, targets: torch.Tensor, idx: torch.Tensor,
                    kwargs: dict[str, Any], device: torch.device, backward: bool = False) -> float:
    """Sum of squared errors of the block's output over the windows ``idx``, divided by the targets' sum of
    squares. With ``backward``, its gradient is accumulated too, one window at a time (so the autograd graph holds
    one window's activations, whatever the batch)."""
    ref = sum(float(targets[j].to(device=device, dtype=torch.float32).pow(2).sum()) for j in idx.tolist())
    total = 0.0
    for j in idx.tolist():
        y = targets[j : j + 1].to(device=device, dtype=torch.float32)
        out = block(inps[j : j + 1].to(device=device, dtype=torch.float32), **kwargs)
        err = ((out[0] if isinstance(out, tuple) else out) - y).pow(2).sum() / max(ref, 1e-30)
        if backward:
            err.backward()
        total += float(err.detach())
    return total


def tune_block(block: nn.Module, prefix: str, records: dict[str, QuantizedLayer], inps: torch.Tensor,
               targets: torch.Tensor, kwargs: dict[str, Any], device: torch.device, steps: int, lr: float,
               batch: int, seed: int = 0,
               notify: Callable[[str], None] | None = None) -> tuple[dict[str, QuantizedLayer], TuneResult]:
    """Fine-tune ``block`` (its linears hold ``records``' weights; ``records`` keyed ``f"{prefix}.{name}"``) for
    ``steps`` Adam steps of ``batch`` windows; returns the trained records and leaves the block's linears holding
    their decode and its other parameters the trained values (rounded to fp16), in the block's dtype.

    The last eighth of the windows (at least one, unless there is only one window: then it is trained on and
    checked on) is held out; the parameters of the best held-out step are kept, and only if the block as stored
    (fp16 values, decoded weights) is then better than before; otherwise nothing changes. On CUDA the result is
    not bit-reproducible (the backward passes of attention and indexing accumulate in a varying order).
    """
    dtype = next(block.parameters()).dtype
    names = [key[len(prefix) + 1:] for key in records]
    originals = {name: block.get_submodule(name) for name in names}
    tuned = {name: TunedLinear(records[f"{prefix}.{name}"], originals[name].bias, device) for name in names}
    quantized = {id(m.weight) for m in originals.values()}
    others = [p for p in block.parameters() if id(p) not in quantized and p.is_floating_point()]
    trained = [p for m in tuned.values() for n, p in m.named_parameters(recurse=False)
               if n != "bias" and p.numel()] + others
    initial = [p.detach().clone() for p in trained]
    n = inps.shape[0]
    held = max(1, n // 8) if n > 1 else 0
    gen = torch.Generator().manual_seed(seed)
    train_idx = torch.arange(n - held)
    held_idx = torch.arange(n - held, n) if held else train_idx
    best_step = 0
    try:
        with torch.no_grad():  # the block as stored (the records' fp16 decode), computed in fp32
            for module in originals.values():
                module.weight.data = module.weight.data.float()
            block.float()
            before = _relative_error(block, inps, targets, held_idx, kwargs, device)
            for name, module in tuned.items():
                block.set_submodule(name, module)
                originals[name].weight.data = originals[name].weight.data.to(dtype)  # not kept in fp32
            best = _relative_error(block, inps, targets, held_idx, kwargs, device)  # step 0 of the fp32 decode
        for p in others:
            p.requires_grad_(True)
        # each tensor's learning rate relative to its magnitude (a floor keeps all-zero biases trainable)
        opt = torch.optim.Adam([{"params": [p], "lr": lr * max(float(p.detach().abs().mean()), 1e-3)}
                                for p in trained])
        best_state = initial
        order, pos = train_idx[torch.randperm(train_idx.numel(), generator=gen)], 0
        check_every = max(1, steps // 8)
        with torch.enable_grad():  # (quantize_model may be called under no_grad)
            for step in range(1, steps + 1):
                if pos + batch > order.numel():
                    order, pos = train_idx[torch.randperm(train_idx.numel(), generator=gen)], 0
                sel = order[pos : pos + batch]
                pos += batch
                opt.zero_grad(set_to_none=True)
                _relative_error(block, inps, targets, sel, kwargs, device, backward=True)
                opt.step()
                if step % check_every and step != steps:
                    continue
                with torch.no_grad():
                    now = _relative_error(block, inps, targets, held_idx, kwargs, device)
                if now < best:
                    best, best_step, best_state = now, step, [p.detach().clone() for p in trained]
                if notify is not None:
                    notify(f"tune step {step}/{steps}: held-out error {now:.3e} (before {before:.3e})")
        with torch.no_grad():
            for p, b in zip(trained, best_state, strict=True):
                p.copy_(b.to(torch.float16).to(p.dtype))  # what is stored: fp16
            new = {f"{prefix}.{name}": tuned[name].record() for name in names}
            for name, module in originals.items():  # the block as stored: fp16 decode of the trained records
                block.set_submodule(name, module)
                module.weight.data = new[f"{prefix}.{name}"].dequantize().to(device=device, dtype=torch.float32)
            after = _relative_error(block, inps, targets, held_idx, kwargs, device)
            if after >= before:  # rounding undid the gain (or there was none): keep the block as it was
                for p, b in zip(trained, initial, strict=True):
                    p.copy_(b)
                new = {key: records[key] for key in new}
                for name, module in originals.items():
                    module.weight.data = records[f"{prefix}.{name}"].dequantize().to(device=device,
                                                                                    dtype=torch.float32)
                after, best_step = before, 0
    finally:
        for p in trained:
            p.requires_grad_(False)
            p.grad = None
        for name, module in originals.items():
            block.set_submodule(name, module)
        block.to(dtype)
    return new, TuneResult(block=prefix, steps=steps, best_step=best_step, heldout_before=before,
                           heldout_after=after)
