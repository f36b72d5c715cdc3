"""Decode kernel: ``y = W x`` for one token, fused dequantize + matvec + outliers + bias, one launch.

Batch-1 decode is memory-bound: the kernel must keep many bytes in flight and spend few instructions per weight.

- Codes are packed along N (layout.py): a program owns ``BW`` words (``BW * cpw`` output rows) and walks its
  share of K one k-tile of ``GS_T`` columns (inside one group) at a time, unrolled, so each thread has
  ``GS_T`` independent coalesced word loads in flight. Each word held as a ``[BW, 1]`` column is shifted into
  its ``cpw`` codes without a layout change; per weight that is a shift, a bit-field extract, an or and an fp32
  subtract (2^23 magic number instead of the quarter-rate int->float unit) and one FMA.
- Statistics are applied per group, not per weight: ``y += s * sum_k q_k x_k - s * z * sum_k x_k``. When the
  stat codes are packed like the codes (``stat_bits == wbits``) one stat word serves a code word's rows
  (``dequant.word_stats``). The activations are read through the permutation (``x[perm[k]]``, one address per
  k for the whole program), so the weight is never un-permuted and no gather launch is needed.
- Split-K gives every layer enough programs to fill the GPU. The pieces are summed with fp32 atomics into a
  per-layer scratch row; the last program of a row block (an atomic ticket) reads the sum back while zeroing it,
  adds the bias and stores the result. The scratch therefore returns to zero after every call and no memset or
  epilogue launch is needed (one launch per linear; concurrent calls on one layer from two streams would race).
- The outliers of the program's rows are added by the split programs in turn (row-wise CSR, strided by the
  split index) from the runtime residuals of ``outliers.prepare`` (outlier value minus the dense decode).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .dequant import group_stats, layout_args, slot_bits, stat_args, tile_k, word_stats
from .layout import PackedWeight
from .outliers import prepare


@functools.cache
def _num_sms() -> int:
    """Streaming multiprocessors of the current GPU (132 on an H100 SXM; also the CPU interpreter's stand-in)."""
    return torch.cuda.get_device_properties().multi_processor_count if torch.cuda.is_available() else 132


@triton.jit
def _outliers_part(total, n, n_ok, x_ptr, rp_ptr, oc_ptr, od_ptr, pid_k, SPLIT):
    """``total[w, c] += sum_i delta_i * x[col_i]`` over this split's share of row ``n``'s outliers."""
    start = tl.load(rp_ptr + n, mask=n_ok, other=0)
    cnt = tl.load(rp_ptr + n + 1, mask=n_ok, other=0) - start
    longest = tl.max(tl.max(cnt, axis=1), axis=0)
    for j in range(pid_k, longest, SPLIT):
        live = j < cnt
        col = tl.load(oc_ptr + start + j, mask=live, other=0)
        d = tl.load(od_ptr + start + j, mask=live, other=0.0)
        total += d * tl.load(x_ptr + col, mask=live, other=0.0).to(tl.float32)
    return total


@triton.jit
def _finish_part(total, n, n_ok, acc_ptr, out_ptr, bias_ptr, is_last, HAS_BIAS: tl.constexpr,
                 SPLIT_K: tl.constexpr):
    if SPLIT_K:  # read the sum at L2 (an atomic, so no stale cache line), then leave the scratch at zero
        total = tl.atomic_add(acc_ptr + n, tl.zeros_like(total), mask=n_ok & is_last)
        tl.store(acc_ptr + n, tl.zeros_like(total), mask=n_ok & is_last)
    if HAS_BIAS:
        total += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + n, total.to(out_ptr.dtype.element_ty), mask=n_ok & is_last)


@triton.jit
def _matvec_kernel(
    x_ptr, perm_ptr, qw_ptr, sc_ptr, zr_ptr, qs_ptr, qz_ptr, ss_ptr, zs_ptr,
    rp_ptr, oc_ptr, od_ptr, bias_ptr, acc_ptr, cnt_ptr, out_ptr,
    N, K, W, WS, G, NB, tiles_per_split, num_tiles, SPLIT,
    WBITS: tl.constexpr, CPW: tl.constexpr, CP1: tl.constexpr, CP2: tl.constexpr,
    GS: tl.constexpr, GS_T: tl.constexpr, NGI: tl.constexpr, BW: tl.constexpr,
    STAT_BITS: tl.constexpr, BETA2: tl.constexpr, SPLIT_K: tl.constexpr, WORD_STATS: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    pid_w = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_w = (pid_w * BW + tl.arange(0, BW))[:, None]  # [BW, 1]: words keep the layout of the [BW, CP] tiles
    w_ok = offs_w < W
    n1 = offs_w * CPW + tl.arange(0, CP1)[None, :]  # [BW, CP1] output rows of slots 0..CP1-1
    n1_ok = n1 < N
    n2 = offs_w * CPW + CP1 + tl.arange(0, CP2 if CP2 > 0 else 1)[None, :]
    n2_ok = (n2 < N) & (CP2 > 0)
    total1 = tl.zeros([BW, CP1], dtype=tl.float32)
    total2 = tl.zeros([BW, CP2 if CP2 > 0 else 1], dtype=tl.float32)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, num_tiles)
    for t in range(t_start, t_end):  # NGI k-tiles of GS_T permuted columns, each inside one group
        for gi in tl.static_range(NGI):
            part1 = tl.zeros([BW, CP1], dtype=tl.float32)
            part2 = tl.zeros([BW, CP2 if CP2 > 0 else 1], dtype=tl.float32)
            xs = 0.0
            for r in tl.static_range(GS_T):  # unrolled: NGI * GS_T independent word loads in flight per thread
                k = (t * NGI + gi) * GS_T + r
                k_ok = (offs_w * 0 + k) < K
                if HAS_PERM:  # x is read through the permutation: no gather launch before the kernel
                    src = tl.load(perm_ptr + k + offs_w * 0, mask=k_ok, other=0)
                else:
                    src = k + offs_w * 0
                xk = tl.load(x_ptr + src, mask=k_ok, other=0.0).to(tl.float32)  # [BW, 1], one address
                words = tl.load(qw_ptr + k * W + offs_w, mask=w_ok & k_ok, other=0)
                part1 += slot_bits(words, 0, CP1, WBITS) * xk
                if CP2 > 0:
                    part2 += slot_bits(words, CP1, CP2, WBITS) * xk
                xs += xk
            g = ((t * NGI + gi) * GS_T) // GS
            if WORD_STATS:
                s1, zs1 = word_stats(g, offs_w, w_ok, N, G, WS, NB, qs_ptr, qz_ptr, ss_ptr, zs_ptr, CPW, 0, CP1,
                                     STAT_BITS, BETA2)
            else:
                s1, zs1 = group_stats(g, n1, n1_ok & ((n1 * 0 + g) < G), N, G, WS, NB, sc_ptr, zr_ptr, qs_ptr,
                                      qz_ptr, ss_ptr, zs_ptr, STAT_BITS, BETA2)
            total1 += s1 * part1 - zs1 * xs  # sum_k s (q_k - z) x_k = s sum_k q_k x_k - s z sum_k x_k
            if CP2 > 0:
                if WORD_STATS:
                    s2, zs2 = word_stats(g, offs_w, w_ok, N, G, WS, NB, qs_ptr, qz_ptr, ss_ptr, zs_ptr, CPW, CP1,
                                         CP2, STAT_BITS, BETA2)
                else:
                    s2, zs2 = group_stats(g, n2, n2_ok & ((n2 * 0 + g) < G), N, G, WS, NB, sc_ptr, zr_ptr,
                                          qs_ptr, qz_ptr, ss_ptr, zs_ptr, STAT_BITS, BETA2)
                total2 += s2 * part2 - zs2 * xs

    if HAS_OUTLIERS:
        total1 = _outliers_part(total1, n1, n1_ok, x_ptr, rp_ptr, oc_ptr, od_ptr, pid_k, SPLIT)
        if CP2 > 0:
            total2 = _outliers_part(total2, n2, n2_ok, x_ptr, rp_ptr, oc_ptr, od_ptr, pid_k, SPLIT)

    is_last = tl.full((1,), 1, tl.int32) > 0
    if SPLIT_K:
        tl.atomic_add(acc_ptr + n1, total1, mask=n1_ok)
        if CP2 > 0:
            tl.atomic_add(acc_ptr + n2, total2, mask=n2_ok)
        tl.debug_barrier()  # every thread's partial sums are in before this program takes its ticket
        ticket_ptr = cnt_ptr + pid_w + tl.zeros((1,), tl.int32)
        is_last = tl.atomic_add(ticket_ptr, 1) == SPLIT - 1
    _finish_part(total1, n1, n1_ok, acc_ptr, out_ptr, bias_ptr, is_last, HAS_BIAS, SPLIT_K)
    if CP2 > 0:
        _finish_part(total2, n2, n2_ok, acc_ptr, out_ptr, bias_ptr, is_last, HAS_BIAS, SPLIT_K)
    if SPLIT_K:
        tl.store(ticket_ptr, 0, mask=is_last)  # the scratch is clean for the next call


def pick_config(n: int, k: int, pw: PackedWeight) -> tuple[int, int, int, int]:
    """``(BW, NGI, SPLIT, num_warps)`` for a layer: ~6 programs per SM, each with >= 2 iterations.

    From sweeps on an H100 (LLaMA-7B/65B shapes, batch 1; benchmarks/bench_layers.py --sweep decode): 4 warps,
    128 words (1280 rows at 3 bits) per program on wide layers, 32 on narrow ones, one k-tile per iteration (a
    second one in flight did not help) and as many k-splits as it takes to reach ~6 programs per SM.
    """
    words = triton.cdiv(n, 32 // pw.wbits)
    bw = 128 if words >= 1024 else 32
    ngi = 1
    tiles = triton.cdiv(k, tile_k(pw.groupsize) * ngi)
    blocks = triton.cdiv(words, bw)
    split = max(1, min(triton.cdiv(6 * _num_sms(), blocks), tiles // 2, 128))
    return bw, ngi, split, 4


def _scratch(pw: PackedWeight, rt: dict[str, torch.Tensor], blocks: int, device: torch.device) -> tuple:
    """Per-layer fp32 row accumulator and per-block tickets; zero at rest (the kernel re-zeroes them)."""
    acc, cnt = rt.get("matvec_acc"), rt.get("matvec_cnt")
    if acc is None or acc.device != device or cnt.numel() < blocks:
        rt["matvec_acc"] = acc = torch.zeros(pw.out_features, device=device, dtype=torch.float32)
        rt["matvec_cnt"] = cnt = torch.zeros(blocks, device=device, dtype=torch.int32)
    return acc, cnt


def spqr_matvec(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None,
                config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """``W @ x + bias`` for one token: ``x`` of shape ``[K]`` or ``[1, K]`` (fp16/bf16); returns the same rank.

    ``config``: optional ``(BW, NGI, SPLIT, num_warps)`` overriding ``pick_config`` (for tuning).
    """
    n, k = pw.out_features, pw.in_features
    if x.shape[-1] != k or x.numel() != k:
        raise ValueError(f"spqr_matvec expects one token of {k} features, got shape {tuple(x.shape)}")
    if x.device != pw.tensors["qweight"].device:
        raise ValueError(f"x is on {x.device} but the weight is on {pw.tensors['qweight'].device}")
    xv = x.reshape(k).contiguous()
    t = pw.tensors
    sizes, meta = layout_args(pw)
    words, gs_t = sizes[0], meta["GS_T"]
    bw, ngi, split, warps = config or pick_config(n, k, pw)
    num_tiles = triton.cdiv(k, gs_t * ngi)
    per_split = triton.cdiv(num_tiles, split)
    split = triton.cdiv(num_tiles, per_split)
    blocks = triton.cdiv(words, bw)
    rt = prepare(pw)
    acc, cnt = _scratch(pw, rt, blocks, x.device)
    out = torch.empty(n, device=x.device, dtype=x.dtype)
    dummy = t["qweight"]
    _matvec_kernel[(blocks, split)](
        xv, t.get("perm", dummy), t["qweight"], *stat_args(pw, dummy),
        rt["row_ptr"], rt.get("outlier_col", dummy), rt.get("outlier_delta", dummy),
        bias if bias is not None else dummy, acc, cnt, out,
        n, k, *sizes, per_split, num_tiles, split, **meta, NGI=ngi, BW=bw, SPLIT_K=split > 1,
        WORD_STATS=pw.stat_bits == pw.wbits and 32 // pw.wbits <= max(pw.beta2, 1),
        HAS_PERM="perm" in t, HAS_OUTLIERS=pw.nnz > 0, HAS_BIAS=bias is not None,
        num_warps=warps,
    )
    return out.reshape(x.shape[:-1] + (n,))
