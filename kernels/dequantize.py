"""Dequantize a packed layer to a dense fp16 ``W^T`` (``[K, N]``, permuted column order) for large-batch prefill.

Above a few dozen tokens a matmul is compute-bound, and cuBLAS on a dense fp16 weight beats any fused kernel we
have; writing the dense weight once costs ~2.5 bytes per weight of traffic, small next to the matmul at
hundreds of tokens. The tile decode is the same as the other kernels' (``dequant.py``). The outliers are written
into the dense copy at their permuted positions, so ``x[:, perm] @ W^T`` is the whole product.

Precision: the weight copy is fp16 (exactly the stored decode rounded once, as ``unpack`` produces), the matmul is
cuBLAS fp16 with its default accumulation, and bf16 activations are converted to fp16 (activations beyond fp16's
range, |x| > 65504, are not supported on this path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dequant import dequant_part, layout_args, stat_args
from .layout import PackedWeight
from .outliers import prepare


@triton.jit
def _store_part(out_ptr, w, n, k, N, K):
    ok = (n < N) & (k[:, :, None, None] < K)
    tl.store(out_ptr + k[:, :, None, None] * N + n, w.to(tl.float16), mask=ok)


@triton.jit
def _dequant_kernel(
    qw_ptr, sc_ptr, zr_ptr, qs_ptr, qz_ptr, ss_ptr, zs_ptr, out_ptr,
    N, K, W, WS, G, NB,
    WBITS: tl.constexpr, CPW: tl.constexpr, CP1: tl.constexpr, CP2: tl.constexpr,
    GS: tl.constexpr, GS_T: tl.constexpr, NGI: tl.constexpr, BW: tl.constexpr,
    STAT_BITS: tl.constexpr, BETA2: tl.constexpr,
):
    pid_w = tl.program_id(0)
    t = tl.program_id(1)
    offs_w = pid_w * BW + tl.arange(0, BW)
    k = (t * NGI + tl.arange(0, NGI)[:, None]) * GS_T + tl.arange(0, GS_T)[None, :]  # [NGI, GS_T]
    words = tl.load(qw_ptr + k[:, :, None] * W + offs_w[None, None, :],
                    mask=(k < K)[:, :, None] & (offs_w < W)[None, None, :], other=0)
    g = (((t * NGI + tl.arange(0, NGI)) * GS_T) // GS)[:, None, None, None]
    w1, n1 = dequant_part(words, g, offs_w, N, G, WS, NB, sc_ptr, zr_ptr, qs_ptr, qz_ptr, ss_ptr, zs_ptr,
                          CPW, 0, CP1, WBITS, STAT_BITS, BETA2)
    _store_part(out_ptr, w1, n1, k, N, K)
    if CP2 > 0:
        w2, n2 = dequant_part(words, g, offs_w, N, G, WS, NB, sc_ptr, zr_ptr, qs_ptr, qz_ptr, ss_ptr, zs_ptr,
                              CPW, CP1, CP2, WBITS, STAT_BITS, BETA2)
        _store_part(out_ptr, w2, n2, k, N, K)


def dequantize_t(pw: PackedWeight) -> torch.Tensor:
    """fp16 ``[K, N]``: row j is permuted input column j (original ``perm[j]``), outliers included."""
    n, k = pw.out_features, pw.in_features
    t = pw.tensors
    sizes, meta = layout_args(pw)
    words, gs_t = sizes[0], meta["GS_T"]
    ngi, bw = max(1, 32 // gs_t), 16
    out = torch.empty(k, n, device=t["qweight"].device, dtype=torch.float16)
    dummy = t["qweight"]
    _dequant_kernel[(triton.cdiv(words, bw), triton.cdiv(k, gs_t * ngi))](
        t["qweight"], *stat_args(pw, dummy), out,
        n, k, *sizes, **meta, NGI=ngi, BW=bw, num_warps=4,
    )
    if pw.nnz:
        ptr = t["outlier_row_ptr"].long()
        rows = torch.repeat_interleave(torch.arange(n, device=out.device), ptr[1:] - ptr[:-1], output_size=pw.nnz)
        cols = t["outlier_col"].long() & 0xFFFF
        inv = prepare(pw).get("inv_perm")
        out[inv[cols] if inv is not None else cols, rows] = t["outlier_val"]
    return out


def spqr_dense_matmul(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``X @ W.T + bias`` through a transient dense fp16 weight and cuBLAS (for many tokens)."""
    perm = pw.tensors.get("perm")
    xp = x.index_select(1, perm) if perm is not None else x
    w_t = dequantize_t(pw)
    y = torch.matmul(xp.to(torch.float16), w_t)
    if bias is not None:
        y += bias.to(torch.float16)
    return y.to(x.dtype)
