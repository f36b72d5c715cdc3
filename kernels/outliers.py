"""Outlier handling shared by the kernels: runtime residuals, and the decode epilogue (split-K sum + CSR SpMV).

An outlier *replaces* the dense decode at its position, so the kernels multiply by the dense decode everywhere
and then add ``(val - dense_decode) * x[col]`` per outlier. That residual (``outlier_delta``) is derived once per
layer by ``prepare`` and cached in memory; it is never written to disk, so the packed format stays the spec's.
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from .layout import PackedWeight
from .reference import decode_stats, outlier_cols, outlier_rows

_CACHE: dict[int, tuple[weakref.ref, dict[str, torch.Tensor]]] = {}


def _dense_at(pw: PackedWeight, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """fp32 dense decode (no outliers) at original positions ``(rows, cols)``, without building the full matrix."""
    k = pw.in_features
    perm = pw.get("perm")
    if perm is not None:
        inv = torch.empty_like(perm, dtype=torch.long)
        inv[perm.long()] = torch.arange(k, device=perm.device)
        j = inv[cols]
    else:
        j = cols
    cpw = 32 // pw.wbits
    words = pw.tensors["qweight"][j, rows // cpw].long() & 0xFFFFFFFF
    q = ((words >> ((rows % cpw) * pw.wbits)) & ((1 << pw.wbits) - 1)).float()
    s, z = decode_stats(pw)
    g = j // pw.groupsize
    return s[g, rows] * (q - z[g, rows])


def prepare(pw: PackedWeight) -> dict[str, torch.Tensor]:
    """Runtime-only tensors for ``pw`` (cached per object): int32 outlier columns and fp32 residuals.

    The cache is keyed by object identity and dropped when ``pw`` is garbage collected; mutate ``pw.tensors`` and
    the cached residuals go stale, so build a new ``PackedWeight`` instead.
    """
    key = id(pw)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is pw:
        return hit[1]
    dev = pw.tensors["qweight"].device
    rt: dict[str, torch.Tensor] = {}
    if pw.nnz:
        rows, cols = outlier_rows(pw), outlier_cols(pw)
        delta = pw.tensors["outlier_val"].float() - _dense_at(pw, rows, cols)
        rt["outlier_col"] = cols.to(torch.int32).contiguous()
        rt["outlier_delta"] = delta.contiguous()
    rt["row_ptr"] = pw.tensors["outlier_row_ptr"].to(device=dev, dtype=torch.int32).contiguous()
    perm = pw.get("perm")
    if perm is not None:  # original column -> permuted position (the dense prefill path writes outliers there)
        inv = torch.empty(pw.in_features, dtype=torch.long, device=dev)
        inv[perm.long()] = torch.arange(pw.in_features, device=dev)
        rt["inv_perm"] = inv
    _CACHE[key] = (weakref.ref(pw, lambda _ref, key=key: _CACHE.pop(key, None)), rt)
    return rt


@triton.jit
def outlier_accumulate(acc, x_ptr, stride_x, offs_b, mask_b, offs_r, mask_r, row_ptr, col_ptr, delta_ptr):
    """acc[b, r] += sum over outliers i of row r: delta[i] * x[b, col[i]]  (acc is fp32 ``[BLOCK_B, BLOCK_R]``)."""
    start = tl.load(row_ptr + offs_r, mask=mask_r, other=0)
    end = tl.load(row_ptr + offs_r + 1, mask=mask_r, other=0)
    cnt = end - start
    longest = tl.max(cnt, axis=0)
    for j in range(0, longest):
        live = j < cnt
        col = tl.load(col_ptr + start + j, mask=live, other=0)
        d = tl.load(delta_ptr + start + j, mask=live, other=0.0)
        xv = tl.load(x_ptr + offs_b[:, None] * stride_x + col[None, :], mask=mask_b[:, None] & live[None, :], other=0.0)
        acc += xv.to(tl.float32) * d[None, :]
    return acc


@triton.jit
def _epilogue_kernel(
    part_ptr, out_ptr, x_ptr, bias_ptr, row_ptr, col_ptr, delta_ptr,
    B, N, SPLIT, stride_x, stride_o,
    HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < N
    offs_b = tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    mask = mask_b[:, None] & mask_r[None, :]
    acc = tl.zeros([BLOCK_B, BLOCK_R], dtype=tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(part_ptr + (s * B + offs_b[:, None]) * N + offs_r[None, :], mask=mask, other=0.0)
    if HAS_OUTLIERS:
        acc = outlier_accumulate(acc, x_ptr, stride_x, offs_b, mask_b, offs_r, mask_r, row_ptr, col_ptr, delta_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_b[:, None] * stride_o + offs_r[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def outlier_epilogue(
    partials: torch.Tensor, x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    """``out[b, n] = sum_s partials[s, b, n] + outliers(x)[b, n] + bias[n]``, cast to ``out.dtype``.

    ``partials``: fp32 ``[SPLIT, B, N]`` (the split-K pieces of the dense product); ``x``: ``[B, K]`` contiguous.
    """
    split, b, n = partials.shape
    if x.dim() != 2 or x.shape[0] != b or out.shape != (b, n) or n != pw.out_features:
        raise ValueError(f"epilogue shapes disagree: partials {tuple(partials.shape)}, x {tuple(x.shape)}, "
                         f"out {tuple(out.shape)}, layer {pw.out_features}x{pw.in_features}")
    rt = prepare(pw)
    has_out = pw.nnz > 0
    dummy = partials
    block_r = 128
    _epilogue_kernel[(triton.cdiv(n, block_r),)](
        partials, out, x, bias if bias is not None else dummy, rt["row_ptr"],
        rt.get("outlier_col", dummy), rt.get("outlier_delta", dummy),
        b, n, split, x.stride(0), out.stride(0),
        HAS_OUTLIERS=has_out, HAS_BIAS=bias is not None,
        BLOCK_B=max(1, triton.next_power_of_2(b)), BLOCK_R=block_r, num_warps=4,
    )
    return out
