"""Plain-torch decoding of the packed layout, and the CPU production path built on it.

``dequantize_fp16`` is exactly ``QuantizedLayer.dequantize`` (the record's decoder, the bit-exact contract) computed
from the packed buffers: statistics decoded in fp32 from their fp16 second-level pairs, ``fp16(s * (q - z))``
rounded once, columns put back in their original order, outliers written over. ``linear_torch`` multiplies by it;
on CPU in fp32 even for fp16 activations (CPU fp16 GEMM is slow and, where it exists, accumulates in fp32 anyway),
rounded to the activation dtype once, so the result equals the dense fp16 model up to summation order.

The helpers here are shared with the kernels' runtime tensors (``outliers.py``) and the test oracle
(``reference.py``); they only read the layout, they choose nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import PackedWeight, unpack_rows


def decode_stats(pw: PackedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """First-level ``(scale, zero)`` as fp32 ``[G, N]`` (decoded through the second level when quantized)."""
    t = pw.tensors
    if pw.stat_bits == 16:
        return t["scales"].float(), t["zeros"].float()
    n = pw.out_features
    block = torch.arange(n, device=t["qscale"].device) // pw.beta2

    def decode(packed: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        codes = unpack_rows(packed, pw.stat_bits, n).float().t()  # [G, N]
        st = second.float()[:, :, block]  # [2, G, N]
        return st[0] * (codes - st[1])

    return decode(t["qscale"], t["scale_stats"]), decode(t["qzero"], t["zero_stats"])


def dequantize_permuted(pw: PackedWeight) -> torch.Tensor:
    """fp32 ``[N, K]`` dense weight in *permuted* column order, without outliers."""
    codes = unpack_rows(pw.tensors["qweight"], pw.wbits, pw.out_features).float().t()  # [K, N]
    s, z = decode_stats(pw)
    s = s.repeat_interleave(pw.groupsize, dim=0)
    z = z.repeat_interleave(pw.groupsize, dim=0)
    return (s * (codes - z)).t().contiguous()


def inverse_perm(pw: PackedWeight) -> torch.Tensor | None:
    """int64 ``[K]``: the permuted position of each original input column (``None`` for the identity order)."""
    perm = pw.get("perm")
    if perm is None:
        return None
    inv = torch.empty(pw.in_features, dtype=torch.long, device=perm.device)
    inv[perm.long()] = torch.arange(pw.in_features, device=perm.device)
    return inv


def outlier_rows(pw: PackedWeight) -> torch.Tensor:
    """int64 ``[nnz]`` output row of each outlier (expanded from the CSR row pointers)."""
    ptr = pw.tensors["outlier_row_ptr"].long()
    counts = ptr[1:] - ptr[:-1]
    return torch.repeat_interleave(torch.arange(pw.out_features, device=ptr.device), counts)


def outlier_cols(pw: PackedWeight) -> torch.Tensor:
    """int64 ``[nnz]`` original input column of each outlier (the int16 storage is read as unsigned)."""
    return pw.tensors["outlier_col"].long() & 0xFFFF


def dequantize_fp16(pw: PackedWeight) -> torch.Tensor:
    """The fp16 ``[N, K]`` dense weight in original column order, outliers included (= the record's decode)."""
    w = dequantize_permuted(pw).to(torch.float16)
    inv = pw.get("perm")
    if inv is not None:
        dense = torch.empty_like(w)
        dense[:, inv.long()] = w
        w = dense
    if pw.nnz:
        w[outlier_rows(pw), outlier_cols(pw)] = pw.tensors["outlier_val"].to(torch.float16)
    return w


def linear_torch(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` through ``dequantize_fp16``; ``x`` of any float dtype, the result in ``x``'s dtype."""
    w = dequantize_fp16(pw).to(x.device)
    compute = torch.float32 if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    bias = None if bias is None else bias.to(compute)
    return F.linear(x.to(compute), w.to(compute), bias).to(x.dtype)
