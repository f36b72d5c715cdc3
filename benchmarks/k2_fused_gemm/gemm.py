"""Kernels II prototype (not shipped, see README.md): fused dequantize + tensor-core GEMM, ``y = X W^T``, many tokens.

The packed codes and their statistics are decoded tile by tile in registers and fed straight to ``tl.dot`` (fp32
accumulation); the dense weight never exists in global memory. This replaces dequantize-to-fp16 + cuBLAS, which
wrote and re-read ~4x the bytes of the fp16 weight at every call.

Tiles. A program owns ``BW`` packed word columns (``BW * cpw`` output rows) and ``BM`` tokens, and walks K in steps
of ``NT`` sub-tiles of ``GS_T`` columns inside one group each (``BK = NT * GS_T`` permuted columns; ``GS_T`` is
``dequant.tile_k``, 16 or 32). Per step it loads the ``[BK, BW]`` code words once, decodes each sub-tile's
statistics once per word (``dequant.part_stats``, as the decode kernel does), broadcasts them over its columns, and
turns every code into ``s q - s z`` with an and-or and two FMAs (``dequant.mantissa_codes``). A word's ``cpw`` codes
are decoded in two power-of-two parts (8 + 2 for 3-bit codes), so there are two dots per step, ``[BK, BW * CP1]``
and ``[BK, BW * CP2]``; their output rows are ``word * cpw + slot``, interleaved, which only the epilogue's store
addresses know about.

The product is computed transposed, ``Y^T = W X^T``: the decoded weight tile, in registers, is the dot's left
operand and the activations its right one, so the tensor-core instruction's 64-row side is filled with output rows,
never with padding tokens, and a few tokens cost a narrow ``BM`` of 16.

Activations. The input permutation is applied once per call by the launcher: ``x[:, perm]`` is written transposed,
``[K, M]``, one gather of ``tokens x K`` elements. Both the dot's activation tiles and the outlier epilogue
(``outlier_epilogue.py``, which reads ``x[:, col]`` per outlier: contiguous over the tokens in this layout) then
read it with plain strided loads.

Split-K. When the output tiles alone leave SMs idle (few tokens, narrow layers), ``SPLIT`` programs share a tile's K
range and add their partial sums with fp32 atomics into a zeroed scratch; the epilogue kernel adds the outliers and
the bias and writes ``y``. Without split the GEMM writes ``y`` itself (bias fused) and the epilogue runs only for
the outliers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from outlier_epilogue import permuted_outliers, run_epilogue

from spqr_kernels.dequant import (
    ONE_BITS,
    layout_args,
    mantissa_alpha,
    mantissa_codes,
    part_stats,
    stat_args,
    tile_k,
)
from spqr_kernels.layout import PackedWeight


@triton.jit
def _decode_part(words, s, zs, one, C0: tl.constexpr, CP: tl.constexpr, WBITS: tl.constexpr,
                 WINDOW: tl.constexpr, BK: tl.constexpr, BW: tl.constexpr, DTYPE: tl.constexpr):
    """``[BK, BW * CP]`` weights ``s q - s z`` of slots ``C0 ..`` of ``words`` ``[NT, GS_T, BW, 1]``, whose
    sub-tiles' ``(s, s z)`` are ``[NT, BW, CP]``; row ``t * GS_T + r`` is permuted column ``k0 + t * GS_T + r``."""
    a = (s * mantissa_alpha(C0, CP, WBITS, WINDOW))[:, None, :, :]  # s q = a (f - 1), f from mantissa_codes
    w = a * (mantissa_codes(words, one, C0, CP, WBITS, WINDOW) - 1.0) - zs[:, None, :, :]
    return tl.reshape(w.to(DTYPE), (BK, BW * CP))


@triton.jit
def _store(acc, out_ptr, bias_ptr, m, m_ok, pid_n, N, stride_om, C0: tl.constexpr, CP: tl.constexpr,
           CPW: tl.constexpr, BW: tl.constexpr, ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Write one part's ``[BW * CP, BM]`` tile: its row ``j`` is output row ``(pid_n * BW + j // CP) * CPW + C0 +
    j % CP``."""
    j = tl.arange(0, BW * CP)
    rows = (pid_n * BW + j // CP) * CPW + C0 + j % CP
    r_ok = rows < N
    ptrs = out_ptr + m[None, :] * stride_om + rows[:, None]
    ok = r_ok[:, None] & m_ok[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=ok, sem="relaxed")
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gemm_kernel(
    x_ptr, qw_ptr, sc_ptr, zr_ptr, qs_ptr, qz_ptr, ss_ptr, zs_ptr, bias_ptr, out_ptr,
    M, N, K, W, WS, G, NB, num_tiles, stride_xm, stride_xk, stride_om, steps_per_split, one,
    WBITS: tl.constexpr, CPW: tl.constexpr, CP1: tl.constexpr, CP2: tl.constexpr,
    GS: tl.constexpr, GS_T: tl.constexpr, STAT_BITS: tl.constexpr, BETA2: tl.constexpr, WINDOW: tl.constexpr,
    WORD_STATS: tl.constexpr, BM: tl.constexpr, BW: tl.constexpr, NT: tl.constexpr,
    ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    BK: tl.constexpr = NT * GS_T
    CPB: tl.constexpr = CP2 if CP2 > 0 else 1
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    m = pid_m * BM + tl.arange(0, BM)
    m_ok = m < M
    offs_w = (pid_n * BW + tl.arange(0, BW))[None, :, None]  # [1, BW, 1] word columns
    col = tl.minimum(offs_w, W - 1)  # columns past W re-read the last one; their rows are >= N, never stored
    lane_t = tl.arange(0, NT)[:, None, None]  # [NT, 1, 1] the sub-tiles of a step
    n1 = col * CPW + tl.arange(0, CP1)[None, None, :]
    n2 = col * CPW + CP1 + tl.arange(0, CPB)[None, None, :]
    b0 = (col * CPW) // BETA2
    second1 = (n1 // BETA2) > b0
    second2 = (n2 // BETA2) > b0
    # word (k, column) of a step as [NT, GS_T, BW, 1]: k = k0 + t * GS_T + r
    kr = (tl.arange(0, NT)[:, None, None] * GS_T + tl.arange(0, GS_T)[None, :, None])  # [NT, GS_T, 1]
    w_off = kr * W + tl.reshape(col, (1, 1, BW))
    kk = tl.arange(0, BK)
    acc1 = tl.zeros([BW * CP1, BM], dtype=tl.float32)  # Y^T tiles: output rows x tokens
    acc2 = tl.zeros([BW * CPB, BM], dtype=tl.float32)
    steps = tl.cdiv(num_tiles, NT)
    s0 = pid_k * steps_per_split
    for step in tl.range(s0, tl.minimum(s0 + steps_per_split, steps), num_stages=NUM_STAGES):
        k0 = step * BK
        t = step * NT + lane_t + offs_w * 0  # [NT, BW, 1]
        g_ok = t < num_tiles
        g = (t * GS_T) // GS
        k_ok = (k0 + kk) < K
        xt = tl.load(x_ptr + (k0 + kk)[:, None] * stride_xk + m[None, :] * stride_xm,
                     mask=k_ok[:, None] & m_ok[None, :], other=0.0)  # [BK, BM]
        words = tl.load(qw_ptr + k0 * W + w_off, mask=(k0 + kr) < K, other=0)[:, :, :, None]
        s, zs = part_stats(g, g_ok, col, n1, second1, one, N, G, WS, NB, sc_ptr, zr_ptr, qs_ptr, qz_ptr, ss_ptr,
                           zs_ptr, CPW, 0, CP1, STAT_BITS, BETA2, WORD_STATS)
        acc1 = tl.dot(tl.trans(_decode_part(words, s, zs, one, 0, CP1, WBITS, WINDOW, BK, BW, DTYPE)), xt, acc1)
        if CP2 > 0:
            s, zs = part_stats(g, g_ok, col, n2, second2, one, N, G, WS, NB, sc_ptr, zr_ptr, qs_ptr, qz_ptr,
                               ss_ptr, zs_ptr, CPW, CP1, CP2, STAT_BITS, BETA2, WORD_STATS)
            w2 = _decode_part(words, s, zs, one, CP1, CPB, WBITS, WINDOW, BK, BW, DTYPE)
            acc2 = tl.dot(tl.trans(w2), xt, acc2)
    _store(acc1, out_ptr, bias_ptr, m, m_ok, pid_n, N, stride_om, 0, CP1, CPW, BW, ATOMIC, HAS_BIAS)
    if CP2 > 0:
        _store(acc2, out_ptr, bias_ptr, m, m_ok, pid_n, N, stride_om, CP1, CPB, CPW, BW, ATOMIC, HAS_BIAS)


class GemmConfig(NamedTuple):
    """One launch shape: ``BM`` tokens x ``BW`` word columns per program, ``NT`` sub-tiles per K step, ``SPLIT``
    programs per output tile along K, warps, pipeline stages."""

    bm: int
    bw: int
    nt: int
    split: int
    warps: int
    stages: int


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def pick_config(tokens: int, pw: PackedWeight, device: torch.device) -> GemmConfig:
    """The launch shape for ``tokens`` tokens on ``pw``: token tiles by bucket, K steps of 64 columns, and a split
    of K when the output tiles cannot fill ~2 programs per SM."""
    gs_t = tile_k(pw.groupsize)
    nt = max(1, 64 // gs_t)
    bm = min(128, max(16, triton.next_power_of_2(tokens)))
    bw, warps, stages = 16, 4 if bm <= 64 else 8, 3
    words = pw.tensors["qweight"].shape[1]
    tiles = triton.cdiv(words, bw) * triton.cdiv(tokens, bm)
    steps = triton.cdiv(pw.in_features // gs_t, nt)
    split = max(1, min(triton.cdiv(2 * _num_sms(device), tiles), steps // 4 or 1))
    return GemmConfig(bm, bw, nt, split, warps, stages)


def permuted_activations(x: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """``x[:, perm]`` transposed, ``[K, M]`` (one gather launch), or ``x`` transposed when there is no permutation."""
    perm = pw.tensors.get("perm")
    xt = x.t()
    return xt.index_select(0, perm) if perm is not None else xt.contiguous()


def spqr_gemm(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None,
              config: GemmConfig | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for ``x`` of shape ``[M, K]`` (fp16 or bf16); returns ``[M, N]`` in ``x``'s dtype.

    ``config`` overrides ``pick_config`` (tuning). Accumulates in fp32; weights are rounded to ``x``'s dtype for
    the tensor cores (as an fp16 dense copy would be).
    """
    n, k = pw.out_features, pw.in_features
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"spqr_gemm expects x of shape [tokens, {k}], got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"spqr_gemm takes float16 or bfloat16 activations, got {x.dtype}")
    if pw.groupsize % 16:
        raise ValueError(f"spqr_gemm needs groups of a multiple of 16 columns, got {pw.groupsize}")
    dev = pw.tensors["qweight"].device
    if x.device != dev:
        raise ValueError(f"x is on {x.device} but the weight is on {dev}")
    tokens = x.shape[0]
    cfg = config or pick_config(tokens, pw, dev)
    sizes, meta = layout_args(pw)
    words = sizes[0]
    xp = permuted_activations(x, pw)  # [K, M]
    num_tiles = k // meta["GS_T"]
    steps = triton.cdiv(num_tiles, cfg.nt)
    per_split = triton.cdiv(steps, cfg.split)
    split = triton.cdiv(steps, per_split)
    nnz = pw.nnz
    if split > 1:
        out = torch.zeros(tokens, n, device=dev, dtype=torch.float32)
    else:
        out = torch.empty(tokens, n, device=dev, dtype=x.dtype)
    dummy = pw.tensors["qweight"]
    grid = (triton.cdiv(words, cfg.bw), triton.cdiv(tokens, cfg.bm), split)
    _gemm_kernel[grid](
        xp, dummy, *stat_args(pw, dummy), bias if bias is not None else dummy, out,
        tokens, n, k, *sizes, num_tiles, 1, tokens, n, per_split, ONE_BITS,
        **meta, BM=cfg.bm, BW=cfg.bw, NT=cfg.nt, ATOMIC=split > 1,
        HAS_BIAS=bias is not None and split == 1, NUM_STAGES=cfg.stages, num_warps=cfg.warps,
    )
    if split == 1 and not nnz:
        return out
    y = out if split == 1 else torch.empty(tokens, n, device=dev, dtype=x.dtype)
    return run_epilogue(out, y, xp, permuted_outliers(pw), bias if split > 1 else None)
