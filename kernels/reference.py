"""Plain-torch reference for the packed SpQR layout: the ground truth every Triton kernel is tested against.

It decodes the packed buffers directly (not through ``QuantizedLayer``), so comparing it with
``QuantizedLayer.from_packed(pw).dequantize()`` checks the layout spec itself, and comparing the kernels with it
checks the kernels. Everything is computed in fp32 and never rounded to fp16, so it is the "exact" product the
kernels approximate (they accumulate in fp32 too).
"""

from __future__ import annotations

import torch

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


def dequantize(pw: PackedWeight) -> torch.Tensor:
    """fp32 ``[N, K]`` weight in original column order with the outliers written in (no fp16 rounding)."""
    w = dequantize_permuted(pw)
    perm = pw.get("perm")
    if perm is not None:
        dense = torch.empty_like(w)
        dense[:, perm.long()] = w
        w = dense
    if pw.nnz:
        w[outlier_rows(pw), outlier_cols(pw)] = pw.tensors["outlier_val"].float()
    return w


def linear_reference(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` computed in fp32 from the decoded weight, returned in ``x``'s dtype."""
    y = x.float() @ dequantize(pw).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
