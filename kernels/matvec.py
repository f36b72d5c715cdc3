"""Decode kernel: ``y = W x`` for 1-8 tokens, fused dequantize + matvec + outliers + bias, one launch.

Batch-1 decode is memory-bound: the kernel must keep many bytes in flight and spend few instructions per weight.

- A few tokens (speculative decoding, small batches): a third grid axis takes one token per program; the
  programs of different tokens read the same code words at about the same time, so all but the first mostly hit
  L2. One token per program beat holding 2 or 4 tokens per program (more registers, fewer resident warps), and
  beats the dequantize + cuBLAS path up to 8 tokens; at 16 it loses (``docs/benchmarks.md``, "Design
  measurements").
- Code words are read once, so they are loaded ``evict_first``: the stream of weights does not push ``x``, the
  permutation, the statistics and the scratch row out of L2 (measurably faster on every LLaMA shape).
- Work split. A program owns ``BW`` packed word columns (``BW * cpw`` output rows) and a ``1 / SPLIT`` share of
  the k-tiles (``GS_T`` permuted columns inside one group). Its ``KW`` warp rows take ``KW`` consecutive k-tiles
  per iteration; a thread owns one word column of one k-tile, so its ``GS_T`` word loads are independent and in
  flight together, and the k reduction of a tile stays in the thread's registers. Partial row sums are kept per
  warp row and reduced across warps once, at the end.
- Per weight: an and-or moves the code under the exponent of 1.0 (``dequant.mantissa_codes``: ``f = 1 + q /
  alpha``, one shift serves several codes) and one FMA accumulates ``f * x``. Statistics are applied per group:
  ``sum_k s (q_k - z) x_k = s (alpha (P - X) - z X)`` with ``P = sum_k f_k x_k`` and ``X = sum_k x_k``.
- The activations are read through the permutation (``x[perm[k]]``), so the weight is never un-permuted and no
  gather launch is needed.
- Outliers (row-wise CSR: the stored int16 columns, fp16 runtime residuals from ``outliers.prepare``): each
  program takes a slice of its block's rows and walks their outliers with coalesced ``[R, L]`` tiles (rows x
  consecutive entries), so a row's entries are read contiguously instead of one scattered load per row per step.
- The pieces are summed with fp32 atomics into a per-layer scratch row per token; the last program of a row
  block (an atomic ticket) reads the sum back while zeroing it, adds the bias and stores the result. The scratch
  returns to zero after every call, so no memset or epilogue launch is needed (one launch per linear; concurrent
  calls on one layer from two streams would race).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .dequant import (
    ONE_BITS,
    layout_args,
    mantissa_alpha,
    mantissa_codes,
    part_stats,
    stat_args,
    tile_k,
)
from .launch import Replay
from .layout import PackedWeight
from .outliers import prepare

MAX_DECODE_TOKENS = 8  # more tokens go to dequantize + cuBLAS (dequantize.py): see the module docstring


@functools.cache
def _num_sms() -> int:
    """Streaming multiprocessors of the current GPU (132 on an H100 SXM or H200; also the CPU interpreter's
    stand-in)."""
    return torch.cuda.get_device_properties().multi_processor_count if torch.cuda.is_available() else 132


@triton.jit
def _outliers(x_ptr, rp_ptr, oc_ptr, od_ptr, acc_ptr, row0, row_end, rows_per, R: tl.constexpr,
              L: tl.constexpr):
    """``acc[n] += sum_i delta_i * x[col_i]`` for rows ``[row0, min(row0 + rows_per, row_end))``.

    A ``[R, L]`` tile holds ``L`` consecutive entries of each of ``R`` rows, so loads are contiguous in a row.
    """
    for r0 in range(0, rows_per, R):
        rows = row0 + r0 + tl.arange(0, R)
        r_ok = (r0 + tl.arange(0, R) < rows_per) & (rows < row_end)
        start = tl.load(rp_ptr + rows, mask=r_ok, other=0)
        cnt = tl.load(rp_ptr + rows + 1, mask=r_ok, other=0) - start
        total = tl.zeros([R], dtype=tl.float32)
        for j0 in range(0, tl.max(cnt, axis=0), L):
            j = j0 + tl.arange(0, L)[None, :]
            live = j < cnt[:, None]
            idx = start[:, None] + j
            col = tl.load(oc_ptr + idx, mask=live, other=0).to(tl.int32) & 0xFFFF  # int16 read as unsigned
            d = tl.load(od_ptr + idx, mask=live, other=0.0).to(tl.float32)
            total += tl.sum(d * tl.load(x_ptr + col, mask=live, other=0.0).to(tl.float32), axis=1)
        tl.atomic_add(acc_ptr + rows, total, mask=r_ok & (cnt > 0), sem="relaxed")


@triton.jit
def _finish(n, ok, acc_ptr, out_ptr, bias_ptr, HAS_BIAS: tl.constexpr):
    """Read the summed rows at L2 (an atomic, so no stale cache line), leave the scratch at zero, store ``y``."""
    total = tl.atomic_add(acc_ptr + n, tl.zeros(n.shape, tl.float32), mask=ok, sem="relaxed")
    tl.store(acc_ptr + n, tl.zeros(n.shape, tl.float32), mask=ok)
    total = tl.where(ok, total, 0.0)  # lanes of other programs hold no sum
    if HAS_BIAS:
        total += tl.load(bias_ptr + n, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + n, total.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _matvec_kernel(
    x_ptr, perm_ptr, qw_ptr, sc_ptr, zr_ptr, qs_ptr, qz_ptr, ss_ptr, zs_ptr,
    rp_ptr, oc_ptr, od_ptr, bias_ptr, acc_ptr, cnt_ptr, out_ptr,
    N, K, WS, G, NB, num_tiles, iters_per_split, SPLIT, rows_per_split, stride_x, stride_y, one,
    W: tl.constexpr,
    WBITS: tl.constexpr, CPW: tl.constexpr, CP1: tl.constexpr, CP2: tl.constexpr,
    GS: tl.constexpr, GS_T: tl.constexpr, STAT_BITS: tl.constexpr, BETA2: tl.constexpr,
    BW: tl.constexpr, KW: tl.constexpr, R: tl.constexpr, L: tl.constexpr, WINDOW: tl.constexpr,
    WORD_STATS: tl.constexpr, EVEN_K: tl.constexpr, HAS_PERM: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    CPB: tl.constexpr = CP2 if CP2 > 0 else 1
    pid_w = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2)  # the token: its own x row, scratch row, tickets and output row
    x_ptr += pid_b * stride_x
    out_ptr += pid_b * stride_y
    acc_ptr += pid_b * N
    cnt_ptr += pid_b * tl.num_programs(0)
    # 3-D tiles [KW, BW, slots]: every tensor of the loop is a broadcast of the [KW, BW, 1] word loads, so each
    # thread decodes and reduces its own words in registers; the dimension order makes Triton's default layout
    # (lanes along BW, warps along KW) the same as the loads' coalesced one, so even the gathered x needs no
    # shuffle through shared memory. W is a constexpr so that the k rows of a tile are immediate offsets from one
    # address; columns past W read column W - 1 (no mask: their rows are >= N and never stored)
    offs_w = (pid_w * BW + tl.arange(0, BW))[None, :, None]  # [1, BW, 1] word columns
    col = tl.minimum(offs_w, W - 1)
    lane_k = tl.arange(0, KW)[:, None, None]  # [KW, 1, 1] the k-tile of each warp row within an iteration
    n1 = col * CPW + tl.arange(0, CP1)[None, None, :]  # [1, BW, CP1] output rows of slots 0..CP1-1
    n2 = col * CPW + CP1 + tl.arange(0, CPB)[None, None, :]
    b0 = (col * CPW) // BETA2
    second1 = (n1 // BETA2) > b0  # rows past the word's first second-level block
    second2 = (n2 // BETA2) > b0
    alpha1 = mantissa_alpha(0, CP1, WBITS, WINDOW)
    alpha2 = mantissa_alpha(CP1, CPB, WBITS, WINDOW)
    acc1 = tl.zeros([KW, BW, CP1], dtype=tl.float32)
    acc2 = tl.zeros([KW, BW, CPB], dtype=tl.float32)
    it0 = pid_k * iters_per_split
    for it in range(it0, tl.minimum(it0 + iters_per_split, tl.cdiv(num_tiles, KW))):
        t = it * KW + lane_k + offs_w * 0  # [KW, BW, 1] k-tile
        if EVEN_K:  # KW divides the tiles: no masks, so no predicated loads or zero fills
            t_ok = tl.full(t.shape, True, tl.int1)
        else:
            t_ok = t < num_tiles
        p1 = tl.zeros([KW, BW, CP1], dtype=tl.float32)
        p2 = tl.zeros([KW, BW, CPB], dtype=tl.float32)
        xs = tl.zeros([KW, BW, 1], dtype=tl.float32)
        w_ptr = qw_ptr + t * (GS_T * W) + col  # row r of the tile is at + r * W: an immediate load offset
        for r in tl.static_range(GS_T):  # unrolled: GS_T independent word loads in flight per thread
            k = t * GS_T + r
            if HAS_PERM:
                src = tl.load(perm_ptr + k, mask=t_ok, other=0)
            else:
                src = k
            xk = tl.load(x_ptr + src, mask=t_ok, other=0.0).to(tl.float32)
            words = tl.load(w_ptr + r * W, mask=t_ok, other=0, eviction_policy="evict_first")
            p1 += mantissa_codes(words, one, 0, CP1, WBITS, WINDOW) * xk
            if CP2 > 0:
                p2 += mantissa_codes(words, one, CP1, CP2, WBITS, WINDOW) * xk
            xs += xk
        g = (t * GS_T) // GS
        s, zs = part_stats(g, t_ok, col, n1, second1, one, N, G, WS, NB, sc_ptr, zr_ptr, qs_ptr, qz_ptr, ss_ptr,
                           zs_ptr, CPW, 0, CP1, STAT_BITS, BETA2, WORD_STATS)
        acc1 += s * (alpha1 * (p1 - xs)) - zs * xs  # sum_k s (q_k - z) x_k
        if CP2 > 0:
            s, zs = part_stats(g, t_ok, col, n2, second2, one, N, G, WS, NB, sc_ptr, zr_ptr, qs_ptr, qz_ptr,
                               ss_ptr, zs_ptr, CPW, CP1, CP2, STAT_BITS, BETA2, WORD_STATS)
            acc2 += s * (alpha2 * (p2 - xs)) - zs * xs

    if HAS_OUTLIERS:
        block0 = pid_w * BW * CPW
        _outliers(x_ptr, rp_ptr, oc_ptr, od_ptr, acc_ptr, block0 + pid_k * rows_per_split,
                  tl.minimum(block0 + BW * CPW, N), rows_per_split, R, L)
    rows1 = tl.sum(offs_w * CPW + tl.arange(0, CP1)[None, None, :], axis=0)  # [BW, CP1] like the row sums
    rows2 = tl.sum(offs_w * CPW + CP1 + tl.arange(0, CPB)[None, None, :], axis=0)
    ok1 = rows1 < N  # (columns past W have rows >= W * CPW >= N)
    ok2 = (rows2 < N) & (CP2 > 0)
    tl.atomic_add(acc_ptr + rows1, tl.sum(acc1, axis=0), mask=ok1, sem="relaxed")
    if CP2 > 0:
        tl.atomic_add(acc_ptr + rows2, tl.sum(acc2, axis=0), mask=ok2, sem="relaxed")
    tl.debug_barrier()  # every thread's partial sums are in before this program takes its ticket
    ticket_ptr = cnt_ptr + pid_w + tl.zeros((1,), tl.int32)
    is_last = tl.atomic_add(ticket_ptr, 1) == SPLIT - 1
    _finish(rows1, ok1 & is_last, acc_ptr, out_ptr, bias_ptr, HAS_BIAS)
    if CP2 > 0:
        _finish(rows2, ok2 & is_last, acc_ptr, out_ptr, bias_ptr, HAS_BIAS)
    tl.store(ticket_ptr, 0, mask=is_last)  # the scratch is clean for the next call


def pick_config(n: int, k: int, pw: PackedWeight) -> tuple[int, int, int, int]:
    """``(BW, KW, SPLIT, num_warps)`` for a layer: 32 word columns (one per lane) x 4 warps per program, each warp
    on its own k-tile, and as many k-splits as it takes to reach ~4 programs per SM (>= 1 iteration each).

    From sweeps on LLaMA-7B/65B shapes (``benchmarks/bench_layers.py --sweep decode``): 4 warps beat 8 and 16
    (more, smaller programs), one word column per lane beats 2-8 (x is loaded once per word), and 4 programs per
    SM was best or close to the best split on every shape.
    """
    words = triton.cdiv(n, 32 // pw.wbits)
    bw = min(32, triton.next_power_of_2(words))
    kw = 4
    iters = triton.cdiv(triton.cdiv(k, tile_k(pw.groupsize)), kw)
    split = max(1, min(triton.cdiv(4 * _num_sms(), triton.cdiv(words, bw)), iters))
    return bw, kw, split, kw


def _scratch(pw: PackedWeight, rt: dict, tokens: int, blocks: int, device: torch.device) -> tuple:
    """fp32 row accumulators and per-block tickets for ``tokens`` tokens; zero at rest (the kernel re-zeroes them).

    One pair per power-of-two token count, kept for the layer's lifetime: a CUDA graph that captured one stays
    valid when a call with more tokens comes later (at most 15 fp32 rows per output row if 1, 2, 4 and 8 tokens
    all occur). A launch config with more row blocks (tuning) or another device replaces the pair: capture graphs
    after such calls, not before. The one-token pair is made at load time (``prepare_decode``); the others on the
    first call of their width, so compile/capture a multi-token step only after one eager call of it.
    """
    size = triton.next_power_of_2(tokens)
    acc, cnt = rt.get(f"matvec_acc_{size}"), rt.get(f"matvec_cnt_{size}")
    if acc is None or acc.device != device or cnt.numel() < size * blocks:  # (more blocks: a tuning config)
        rt[f"matvec_acc_{size}"] = acc = torch.zeros(size * pw.out_features, device=device, dtype=torch.float32)
        rt[f"matvec_cnt_{size}"] = cnt = torch.zeros(size * blocks, device=device, dtype=torch.int32)
    return acc, cnt


def prepare_decode(pw: PackedWeight) -> None:
    """Build the layer's runtime tensors for a one-token call now (outlier residuals, scratch, tickets).

    Call it outside any CUDA graph: torch.compile's CUDA graphs (mode ``reduce-overhead``, used by transformers'
    ``generate``) refuse a replayed step that allocates tensors and keeps them, which the lazy first call would.
    """
    _launch(pw, 1, False, None)


def _row_blocks(pw: PackedWeight, bw: int) -> int:
    """Programs along N (grid axis 0): blocks of ``bw`` packed word columns; one ticket each per token."""
    return triton.cdiv(pw.tensors["qweight"].shape[1], bw)


class _Launch(NamedTuple):
    """The kernel's arguments apart from ``x``, ``bias`` and ``out``, in kernel order.

    Kept per layer, token count and bias presence (``outliers.prepare``'s dict): working them out on every call
    was about a quarter of an eager call's host time. Most of the rest was Triton's argument binding, which a
    repeated call now skips (``DecodeReplay``; figures in ``docs/benchmarks.md``).
    """

    grid: tuple[int, int, int]
    weights: tuple[torch.Tensor, ...]  # perm, codes, six statistics, CSR row pointers, columns, residuals
    scratch: tuple[torch.Tensor, torch.Tensor]  # fp32 rows, tickets
    ints: tuple[int, ...]  # N, K, WS, G, NB, tiles, iterations per split, splits, rows per split, x/out strides
    meta: dict[str, int | bool]  # the constexprs but HAS_BIAS


def _launch(pw: PackedWeight, b: int, has_bias: bool, config: tuple[int, int, int, int] | None) -> _Launch:
    """The launch for ``b`` tokens, cached unless ``config`` overrides ``pick_config`` (tuning)."""
    rt = prepare(pw)
    key = f"matvec_launch_{b}_{int(has_bias)}"
    if config is None and key in rt:
        return rt[key]
    n, k = pw.out_features, pw.in_features
    t = pw.tensors
    sizes, meta = layout_args(pw)
    words, gs_t, cpw = sizes[0], meta["GS_T"], meta["CPW"]
    bw, kw, split, warps = config or pick_config(n, k, pw)
    if bw & (bw - 1) or kw & (kw - 1):
        raise ValueError(f"BW and KW must be powers of two, got {bw} and {kw}")
    num_tiles = triton.cdiv(k, gs_t)
    per_split = triton.cdiv(triton.cdiv(num_tiles, kw), split)
    split = triton.cdiv(triton.cdiv(num_tiles, kw), per_split)
    blocks = _row_blocks(pw, bw)
    rows_per_split = triton.cdiv(bw * cpw, split)
    dummy = t["qweight"]
    plan = _Launch(
        grid=(blocks, split, b),
        weights=(t.get("perm", dummy), dummy, *stat_args(pw, dummy), rt["row_ptr"], t.get("outlier_col", dummy),
                 rt.get("outlier_delta", dummy)),
        scratch=_scratch(pw, rt, b, blocks, dummy.device),
        ints=(n, k, *sizes[1:], num_tiles, per_split, split, rows_per_split, k, n),
        meta=dict(W=words, **meta, BW=bw, KW=kw, R=min(32, triton.next_power_of_2(rows_per_split)), L=32,
                  EVEN_K=num_tiles % kw == 0, HAS_PERM="perm" in t, HAS_OUTLIERS=pw.nnz > 0, num_warps=warps),
    )
    if config is None:
        rt[key] = plan
    return plan


class DecodeReplay:
    """``spqr_matvec`` of one layer for one input shape, dtype and bias presence, launched through
    ``launch.Replay`` (a few us of host time instead of Triton's ~30 us binding; see ``launch.py``).

    ``ops.spqr_linear`` finds it in ``PackedWeight.launches`` by ``(x.shape, x.dtype, bias is None)``; a call
    whose tensors the compiled launch does not fit (not contiguous, not 16-byte aligned, another device, a bias of
    another dtype or shape) returns ``None`` and takes the ordinary path.
    """

    __slots__ = ("_replay", "_device", "_index", "_out_shape", "_n")

    def __init__(self, replay: Replay, x: torch.Tensor, n: int) -> None:
        self._replay = replay
        self._device = x.device
        self._index = x.get_device()
        self._out_shape = x.shape[:-1] + (n,)
        self._n = n

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        if not x.is_contiguous() or x.data_ptr() % 16 or x.get_device() != self._index:
            return None
        if bias is not None and (bias.dtype != x.dtype or bias.shape != (self._n,) or bias.get_device() != self._index
                                 or not bias.is_contiguous() or bias.data_ptr() % 16):
            return None
        out = torch.empty(self._out_shape, device=self._device, dtype=x.dtype)
        launched = self._replay(x, out) if bias is None else self._replay(x, bias, out)
        return out if launched else None


def _aligned(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or (t.is_contiguous() and t.data_ptr() % 16 == 0) for t in tensors)


def spqr_matvec(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None,
                config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for 1 to ``MAX_DECODE_TOKENS`` tokens: ``x`` of shape ``[..., K]`` (fp16/bf16);
    returns ``[..., N]``.

    ``config``: optional ``(BW, KW, SPLIT, num_warps)`` overriding ``pick_config`` (for tuning); ``BW`` and ``KW``
    must be powers of two. A call with the default config and aligned contiguous tensors leaves a
    ``DecodeReplay`` in ``pw.launches`` for the next call of the same shape.
    """
    n, k = pw.out_features, pw.in_features
    b = x.numel() // k if x.shape[-1] == k else 0
    if not 1 <= b <= MAX_DECODE_TOKENS:
        raise ValueError(f"spqr_matvec expects 1 to {MAX_DECODE_TOKENS} tokens of {k} features, "
                         f"got shape {tuple(x.shape)}")
    if x.device != pw.tensors["qweight"].device:
        raise ValueError(f"x is on {x.device} but the weight is on {pw.tensors['qweight'].device}")
    xc = x.contiguous()
    p = _launch(pw, b, bias is not None, config)
    out = torch.empty(x.shape[:-1] + (n,), device=x.device, dtype=x.dtype)
    args = (xc, *p.weights, bias if bias is not None else p.weights[1], *p.scratch, out, *p.ints, ONE_BITS)
    constexprs = dict(p.meta, HAS_BIAS=bias is not None)
    warps = constexprs.pop("num_warps")
    kernel = _matvec_kernel[p.grid](*args, **constexprs, num_warps=warps)
    if config is None and xc is x and x.is_cuda and _aligned(x, bias, out):
        bias_at = len(p.weights) + 1  # args: x, weights, bias, two scratch tensors, out
        swap = (0, bias_at + 3) if bias is None else (0, bias_at, bias_at + 3)
        replay = Replay.of(_matvec_kernel, kernel, p.grid, args, constexprs, swap, x.get_device())
        if replay is not None:
            pw.launches[(x.shape, x.dtype, bias is None)] = DecodeReplay(replay, x, n)
    return out
