"""GPTQ (Frantar et al., 2023): SpQR's column loop without outliers, on GPTQ's grid (the range always holds 0,
integer zero points; fp16 statistics in its presets)."""

from __future__ import annotations

from spqr_cli.quant.methods import QuantMethod
from spqr_cli.quant.methods.spqr import quantize_obs

METHOD = QuantMethod(
    name="gptq",
    summary="GPTQ: second-order column updates, no outliers",
    quantize=lambda weight, hessian, cfg: quantize_obs(weight, hessian, cfg, outliers=False, holds_zero=True),
    needs_hessian=True,
    permutes=True,
    outliers=False,
    default_preset="gptq-4bit-g128",
)
