"""Round-to-nearest: each group of columns fitted on the original weights and rounded; no calibration data,
no permutation, no error feedback. The baseline every other method must beat."""

from __future__ import annotations

import torch

from spqr_cli.core.config import QuantConfig
from spqr_cli.quant.grid import GroupStats, make_record
from spqr_cli.quant.methods import QuantMethod
from spqr_cli.quant.record import QuantizedLayer


def quantize_rtn(weight: torch.Tensor, hessian: None, cfg: QuantConfig) -> QuantizedLayer:
    """Round ``weight`` ``[N, K]`` group by group on GPTQ's grid (``hessian`` is unused)."""
    n, k = weight.shape
    gs = cfg.group_size_for(k)
    w = weight.detach().to(dtype=torch.float32, copy=True)
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    groups = []
    for g0 in range(0, k, gs):
        stats = GroupStats(w[:, g0 : g0 + gs], cfg, holds_zero=True)
        codes[:, g0 : g0 + gs] = stats.quantize(w[:, g0 : g0 + gs])
        groups.append(stats.stored)
    return make_record(cfg, n, k, gs, codes, groups, None, None, None)


METHOD = QuantMethod(
    name="rtn",
    summary="round-to-nearest, no calibration data",
    quantize=quantize_rtn,
    needs_hessian=False,
    permutes=False,
    outliers=False,
    default_preset="rtn-4bit-g128",
)
