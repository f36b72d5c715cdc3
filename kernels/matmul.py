"""Tensor-core kernel: ``Y = X W^T`` for a few tokens (2..63, see ops.py); dequantize tiles in registers + ``tl.dot``.

Each program owns ``BM`` tokens x ``BW`` packed word columns (``BW * cpw`` output rows) and walks K in tiles of
``NGI * GS_T`` permuted columns. A tile is decoded exactly as in the decode kernel (``dequant.py``), flattened
to ``[KT, BW * CP]`` and fed to ``tl.dot`` with the activation tile gathered through the permutation
(``X[:, perm[k]]``): one dot per power-of-two part of the word (8 + 2 slots for 3-bit codes). The outliers of
the program's rows (runtime residuals of ``outliers.prepare``) and the bias are added at the end; one launch.

The dot runs in fp16 with fp32 accumulation: the dequantized weights are fp16 by contract, and bf16 activations
are converted to fp16 in registers (3 more mantissa bits; activations beyond fp16's range, |x| > 65504, are not
supported on this path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dequant import dequant_part, layout_args, split_slots, stat_args, tile_k
from .layout import PackedWeight
from .outliers import prepare


@triton.jit
def _dot_part(acc, xt, words, g, offs_w, N, G, WS, NB, sc_ptr, zr_ptr, qs_ptr, qz_ptr, ss_ptr, zs_ptr,
              CPW: tl.constexpr, C0: tl.constexpr, CP: tl.constexpr, WBITS: tl.constexpr,
              STAT_BITS: tl.constexpr, BETA2: tl.constexpr, KT: tl.constexpr, BW: tl.constexpr):
    w, _ = dequant_part(words, g, offs_w, N, G, WS, NB, sc_ptr, zr_ptr, qs_ptr, qz_ptr, ss_ptr, zs_ptr,
                        CPW, C0, CP, WBITS, STAT_BITS, BETA2)
    w2d = tl.reshape(w, (KT, BW * CP)).to(tl.float16)
    return tl.dot(xt, w2d, acc)


@triton.jit
def _finish(acc, offs_m, m_ok, w0, x_ptr, stride_x, rp_ptr, oc_ptr, od_ptr, bias_ptr, out_ptr, stride_o, N,
            CPW: tl.constexpr, C0: tl.constexpr, CP: tl.constexpr, BW: tl.constexpr,
            HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr):
    j = tl.arange(0, BW * CP)
    n = (w0 + j // CP) * CPW + C0 + j % CP  # output row of flattened column j
    n_ok = n < N
    if HAS_OUTLIERS:
        start = tl.load(rp_ptr + n, mask=n_ok, other=0)
        cnt = tl.load(rp_ptr + n + 1, mask=n_ok, other=0) - start
        for i in range(0, tl.max(cnt, axis=0)):
            live = i < cnt
            col = tl.load(oc_ptr + start + i, mask=live, other=0)
            d = tl.load(od_ptr + start + i, mask=live, other=0.0)
            xv = tl.load(x_ptr + offs_m[:, None] * stride_x + col[None, :], mask=m_ok[:, None] & live[None, :],
                         other=0.0).to(tl.float32)
            acc += xv * d[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_o + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _matmul_kernel(
    x_ptr, perm_ptr, qw_ptr, sc_ptr, zr_ptr, qs_ptr, qz_ptr, ss_ptr, zs_ptr,
    rp_ptr, oc_ptr, od_ptr, bias_ptr, out_ptr,
    M, N, K, W, WS, G, NB, stride_x, stride_o,
    WBITS: tl.constexpr, CPW: tl.constexpr, CP1: tl.constexpr, CP2: tl.constexpr,
    GS: tl.constexpr, GS_T: tl.constexpr, NGI: tl.constexpr, BW: tl.constexpr, BM: tl.constexpr,
    STAT_BITS: tl.constexpr, BETA2: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    KT: tl.constexpr = NGI * GS_T
    pid_m = tl.program_id(1)
    pid_w = tl.program_id(0)
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_ok = offs_m < M
    offs_w = pid_w * BW + tl.arange(0, BW)
    w_ok = offs_w < W
    sub = tl.arange(0, NGI)[:, None]
    row = tl.arange(0, GS_T)[None, :]
    acc1 = tl.zeros([BM, BW * CP1], dtype=tl.float32)
    acc2 = tl.zeros([BM, BW * (CP2 if CP2 > 0 else 1)], dtype=tl.float32)
    for t in range(0, tl.cdiv(K, KT)):
        k = (t * NGI + sub) * GS_T + row  # [NGI, GS_T]
        k_ok = k < K
        kf = t * KT + tl.arange(0, KT)  # the same columns, flattened
        kf_ok = kf < K
        if HAS_PERM:
            src = tl.load(perm_ptr + kf, mask=kf_ok, other=0)
        else:
            src = kf
        xt = tl.load(x_ptr + offs_m[:, None] * stride_x + src[None, :], mask=m_ok[:, None] & kf_ok[None, :],
                     other=0.0).to(tl.float16)
        words = tl.load(qw_ptr + k[:, :, None] * W + offs_w[None, None, :],
                        mask=k_ok[:, :, None] & w_ok[None, None, :], other=0)
        g = (((t * NGI + tl.arange(0, NGI)) * GS_T) // GS)[:, None, None, None]
        acc1 = _dot_part(acc1, xt, words, g, offs_w, N, G, WS, NB, sc_ptr, zr_ptr, qs_ptr, qz_ptr, ss_ptr,
                         zs_ptr, CPW, 0, CP1, WBITS, STAT_BITS, BETA2, KT, BW)
        if CP2 > 0:
            acc2 = _dot_part(acc2, xt, words, g, offs_w, N, G, WS, NB, sc_ptr, zr_ptr, qs_ptr, qz_ptr, ss_ptr,
                             zs_ptr, CPW, CP1, CP2, WBITS, STAT_BITS, BETA2, KT, BW)
    _finish(acc1, offs_m, m_ok, pid_w * BW, x_ptr, stride_x, rp_ptr, oc_ptr, od_ptr, bias_ptr, out_ptr, stride_o, N,
            CPW, 0, CP1, BW, HAS_OUTLIERS, HAS_BIAS)
    if CP2 > 0:
        _finish(acc2, offs_m, m_ok, pid_w * BW, x_ptr, stride_x, rp_ptr, oc_ptr, od_ptr, bias_ptr, out_ptr, stride_o,
                N, CPW, CP1, CP2, BW, HAS_OUTLIERS, HAS_BIAS)


def pick_config(m: int, n: int, pw: PackedWeight) -> tuple[int, int, int, int]:
    """``(BM, BW, NGI, num_warps)``: tensor-core tiles of >= 16 x 16 per dot part, 64 columns of K per step."""
    bm = 16  # larger BM (64) hit an illegal address on an H100 (triton 3.6); 16 is the verified tile
    cp1, cp2 = split_slots(32 // pw.wbits)
    bw = max(8, 16 // cp1, 16 // cp2 if cp2 else 1)  # every dot part needs >= 16 output columns
    gs_t = tile_k(pw.groupsize)
    ngi = max(1, 64 // gs_t)
    return bm, bw, ngi, 4


def spqr_matmul(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None,
                config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """``X @ W.T + bias`` for ``X`` of shape ``[M, K]`` (fp16/bf16); returns ``[M, N]`` in X's dtype.

    ``config``: optional ``(BM, BW, NGI, num_warps)`` overriding ``pick_config`` (for tuning).
    """
    n, k = pw.out_features, pw.in_features
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"spqr_matmul expects x of shape [M, {k}], got {tuple(x.shape)}")
    if x.device != pw.tensors["qweight"].device:
        raise ValueError(f"x is on {x.device} but the weight is on {pw.tensors['qweight'].device}")
    m = x.shape[0]
    x = x.contiguous()
    t = pw.tensors
    sizes, meta = layout_args(pw)
    words = sizes[0]
    bm, bw, ngi, warps = config or pick_config(m, n, pw)
    rt = prepare(pw)
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    dummy = t["qweight"]
    grid = (triton.cdiv(words, bw), triton.cdiv(m, bm))
    _matmul_kernel[grid](
        x, t.get("perm", dummy), t["qweight"], *stat_args(pw, dummy),
        rt["row_ptr"], rt.get("outlier_col", dummy), rt.get("outlier_delta", dummy),
        bias if bias is not None else dummy, out,
        m, n, k, *sizes, x.stride(0), out.stride(0), **meta, NGI=ngi, BW=bw, BM=bm,
        HAS_PERM="perm" in t, HAS_OUTLIERS=pw.nnz > 0, HAS_BIAS=bias is not None,
        num_warps=warps,
    )
    return out
