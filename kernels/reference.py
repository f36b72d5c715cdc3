"""Plain-torch reference for the packed SpQR layout: the ground truth every Triton kernel is tested against.

It decodes the packed buffers directly (``decode.py``, not through ``QuantizedLayer``), so comparing it with
``QuantizedLayer.from_packed(pw).dequantize()`` checks the layout spec itself, and comparing the kernels with it
checks the kernels. Everything is computed in fp32 and never rounded to fp16, so it is the "exact" product the
kernels approximate (they accumulate in fp32 too). It is only a test oracle: the CPU production path is
``decode.linear_torch``.
"""

from __future__ import annotations

import torch

from .decode import dense_weight
from .layout import PackedWeight


def dequantize(pw: PackedWeight) -> torch.Tensor:
    """fp32 ``[N, K]`` weight in original column order with the outliers written in (no fp16 rounding)."""
    return dense_weight(pw, torch.float32)


def linear_reference(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` computed in fp32 from the decoded weight, returned in ``x``'s dtype."""
    y = x.float() @ dequantize(pw).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
