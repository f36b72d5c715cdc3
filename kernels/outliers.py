"""Per-layer runtime tensors shared by the kernels: outlier residuals and CSR row pointers.

An outlier *replaces* the dense decode at its position, so the kernels multiply by the dense decode everywhere
and then add ``(val - dense_decode) * x[col]`` per outlier. That residual (``outlier_delta``) is derived once per
layer by ``prepare`` and cached in memory; it is never written to disk, so the packed format stays the spec's.

The residual is kept in fp16 (2 bytes per outlier; the kernels read the stored int16 columns directly, as
unsigned): fp32 residuals and int32 column copies cost 8 bytes per outlier, ~0.6 bits per weight of GPU memory
at 1% outliers (2.6 GB on a 33B model), and are read at every decode step. Rounding the residual to fp16 is an
error of at most 2^-11 of it, the same relative rounding the dense path's fp16 weight copy makes.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from .decode import decode_stats, inverse_perm, outlier_cols, outlier_rows
from .layout import PackedWeight

_CACHE: dict[int, tuple[weakref.ref, dict[str, Any]]] = {}


def _dense_at(pw: PackedWeight, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """fp32 dense decode (no outliers) at original positions ``(rows, cols)``, without building the full matrix."""
    inv = inverse_perm(pw)
    j = inv[cols] if inv is not None else cols
    cpw = 32 // pw.wbits
    words = pw.tensors["qweight"][j, rows // cpw].long() & 0xFFFFFFFF
    q = ((words >> ((rows % cpw) * pw.wbits)) & ((1 << pw.wbits) - 1)).float()
    s, z = decode_stats(pw)
    g = j // pw.groupsize
    return s[g, rows] * (q - z[g, rows])


def prepare(pw: PackedWeight) -> dict[str, Any]:
    """Runtime-only tensors for ``pw`` (cached per object): fp16 outlier residuals and int32 CSR row pointers.
    The kernels keep their per-layer scratch and launch arguments in the same dict.

    The cache is keyed by object identity and dropped when ``pw`` is garbage collected; mutate ``pw.tensors`` and
    the cached residuals go stale, so build a new ``PackedWeight`` instead.
    """
    key = id(pw)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is pw:
        return hit[1]
    dev = pw.tensors["qweight"].device
    rt: dict[str, Any] = {}
    if pw.nnz:
        rows, cols = outlier_rows(pw), outlier_cols(pw)
        delta = pw.tensors["outlier_val"].float() - _dense_at(pw, rows, cols)
        rt["outlier_delta"] = delta.half().contiguous()
    rt["row_ptr"] = pw.tensors["outlier_row_ptr"].to(device=dev, dtype=torch.int32).contiguous()
    _CACHE[key] = (weakref.ref(pw, lambda _ref, key=key: _CACHE.pop(key, None)), rt)
    return rt
