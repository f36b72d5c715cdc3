"""``spqr_linear``: the one entry point the runtime calls; picks a kernel by token count, layer config and device.

- CUDA tensors: 1 to ``MAX_DECODE_TOKENS`` (8) tokens go to the decode kernel (``matvec.py``), more to
  dequantize-to-fp16 + cuBLAS (``dequantize.py``).
- CPU tensors: the torch reference, or the same Triton kernels when ``TRITON_INTERPRET=1`` is set (that is how
  CI tests the kernels without a GPU).
- Group sizes that are not a multiple of 16 have no kernel; they fall back to the reference on any device.
"""

from __future__ import annotations

import os

import torch

from .layout import PackedWeight
from .reference import linear_reference

_DTYPES = (torch.float16, torch.bfloat16)
MAX_DECODE_TOKENS = 8  # more tokens go to dequantize + cuBLAS (dequantize.py); see matvec.py's docstring


def _use_triton(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def check_inputs(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None) -> None:
    """Raise a ValueError/TypeError that says what is wrong with the arguments of ``spqr_linear``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"spqr_linear expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != pw.in_features:
        raise ValueError(f"spqr_linear: x has shape {tuple(x.shape)} but the layer takes {pw.in_features} "
                         f"input features (its weight is {pw.out_features}x{pw.in_features})")
    if x.dtype not in _DTYPES:
        raise TypeError(f"spqr_linear: x must be float16 or bfloat16, got {x.dtype}")
    wdev = pw.tensors["qweight"].device
    if x.device != wdev:
        raise ValueError(f"spqr_linear: x is on {x.device} but the packed weight is on {wdev}; move one of them")
    if bias is not None and (bias.shape != (pw.out_features,) or bias.device != wdev):
        raise ValueError(f"spqr_linear: bias must have shape ({pw.out_features},) on {wdev}, "
                         f"got {tuple(bias.shape)} on {bias.device}")


def spqr_linear(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for ``x`` of shape ``[..., K]`` (fp16/bf16) and a packed ``W`` of shape ``[N, K]``.

    Returns ``[..., N]`` in ``x``'s dtype. The Triton kernels accumulate in fp32; the many-token path is cuBLAS fp16.
    """
    check_inputs(x, pw, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, pw.in_features)
    tokens = x2.shape[0]
    if tokens == 0:
        return x.new_empty(*lead, pw.out_features)
    if not _use_triton(x.device) or pw.groupsize % 16:
        y = linear_reference(x2, pw, bias)
    else:
        from . import dequantize, matvec  # imported lazily: triton is only needed on this path

        if tokens <= MAX_DECODE_TOKENS:
            y = matvec.spqr_matvec(x2, pw, bias)
        else:
            y = dequantize.spqr_dense_matmul(x2, pw, bias)
    return y.reshape(*lead, pw.out_features)
