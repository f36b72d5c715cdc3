"""Dequantize a packed layer to a dense fp16 ``W^T`` (``[K, N]``, original input order) for many-token calls.

From ``matvec.MAX_DECODE_TOKENS + 1`` (9) tokens on, ``ops.spqr_linear`` writes the dense weight once and hands the
product to cuBLAS: it beat a fused tensor-core kernel we had (which re-decoded every tile per 16-token block) at
every batch size we measured, and the extra traffic (~2.5 bytes per weight) is a fixed cost next to the matmul
(figures: ``docs/benchmarks.md``, "Design measurements").

The kernel has the decode kernel's structure (``dequant.py``): a program owns ``BW`` word columns (one per lane)
and ``KW`` k-tiles (one per warp); each thread loads its ``GS_T`` words of one tile, decodes the tile's
statistics once and writes ``w = s q - s z`` (``q`` from ``mantissa_codes``). Permuted column ``j`` is written
to row ``perm[j]``, so the copy is in the activations' own order and ``x @ W^T`` needs no gather of ``x`` (a
``[tokens, K]`` column gather, ``index_select``, cost a large share of the matmul itself on the LLaMA down
projections at 2048 tokens). Each row is still one contiguous store, only its address moves. The
outliers are then written into the dense copy at their own columns (``outlier_scatter.py``, a second launch: the
dense values must be in place first).

Precision: the weight copy is fp16 (the stored decode rounded once, as ``unpack`` produces), the matmul is cuBLAS
fp16 with its default accumulation, and bf16 activations are converted to fp16 (activations beyond fp16's range,
|x| > 65504, are not supported on this path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dequant import ONE_BITS, layout_args, mantissa_alpha, mantissa_codes, part_stats, stat_args
from .launch import Replay
from .layout import PackedWeight
from .outlier_scatter import write_outliers


@triton.jit
def _write_part(out_ptr, words, k, a, b, rows, ok, one, C0: tl.constexpr, CP: tl.constexpr, WBITS: tl.constexpr,
                WINDOW: tl.constexpr, N):
    """Store ``a (f - 1) - b`` (``= s q - s z``) of slots ``C0 ..`` of one row of words as fp16 ``W^T[k, rows]``
    (``k``: the row's input feature).

    ``f - 1 = q / alpha`` is exact, so this rounds like the reference's ``s (q - z)`` (no cancellation against
    ``a f``, which would cost ~11 bits when ``q`` is close to ``z``).
    """
    w = a * (mantissa_codes(words, one, C0, CP, WBITS, WINDOW) - 1.0) - b
    tl.store(out_ptr + k * N + rows, w.to(tl.float16), mask=ok)


@triton.jit
def _dequant_kernel(
    qw_ptr, perm_ptr, sc_ptr, zr_ptr, qs_ptr, qz_ptr, ss_ptr, zs_ptr, out_ptr,
    N, K, WS, G, NB, num_tiles, one, W: tl.constexpr,
    WBITS: tl.constexpr, CPW: tl.constexpr, CP1: tl.constexpr, CP2: tl.constexpr,
    GS: tl.constexpr, GS_T: tl.constexpr, STAT_BITS: tl.constexpr, BETA2: tl.constexpr,
    BW: tl.constexpr, KW: tl.constexpr, WINDOW: tl.constexpr, WORD_STATS: tl.constexpr, HAS_PERM: tl.constexpr,
):
    CPB: tl.constexpr = CP2 if CP2 > 0 else 1
    offs_w = (tl.program_id(0) * BW + tl.arange(0, BW))[None, :, None]  # [1, BW, 1] word columns
    col = tl.minimum(offs_w, W - 1)  # columns past W re-read the last one; their rows are >= N, never stored
    t = tl.program_id(1) * KW + tl.arange(0, KW)[:, None, None] + col * 0  # [KW, BW, 1] k-tile of each warp
    t_ok = t < num_tiles
    n1 = col * CPW + tl.arange(0, CP1)[None, None, :]
    n2 = col * CPW + CP1 + tl.arange(0, CPB)[None, None, :]
    b0 = (col * CPW) // BETA2
    g = (t * GS_T) // GS
    s, zs = part_stats(g, t_ok, col, n1, (n1 // BETA2) > b0, one, N, G, WS, NB, sc_ptr, zr_ptr, qs_ptr, qz_ptr,
                       ss_ptr, zs_ptr, CPW, 0, CP1, STAT_BITS, BETA2, WORD_STATS)
    a1 = s * mantissa_alpha(0, CP1, WBITS, WINDOW)  # w = s (alpha (f - 1) - z)
    b1 = zs
    rows1 = offs_w * CPW + tl.arange(0, CP1)[None, None, :]
    ok1 = (rows1 < N) & t_ok
    rows2 = offs_w * CPW + CP1 + tl.arange(0, CPB)[None, None, :]
    ok2 = (rows2 < N) & t_ok & (CP2 > 0)
    if CP2 > 0:
        s, zs = part_stats(g, t_ok, col, n2, (n2 // BETA2) > b0, one, N, G, WS, NB, sc_ptr, zr_ptr, qs_ptr,
                           qz_ptr, ss_ptr, zs_ptr, CPW, CP1, CP2, STAT_BITS, BETA2, WORD_STATS)
        a2 = s * mantissa_alpha(CP1, CPB, WBITS, WINDOW)
        b2 = zs
    for r in tl.static_range(GS_T):  # W is a constexpr: the rows of a tile are immediate offsets
        k = t * GS_T + r  # permuted column: its input feature is perm[k]
        if HAS_PERM:
            k = tl.load(perm_ptr + k, mask=t_ok, other=0)
        words = tl.load(qw_ptr + t * (GS_T * W) + r * W + col, mask=t_ok, other=0, eviction_policy="evict_first")
        _write_part(out_ptr, words, k, a1, b1, rows1, ok1, one, 0, CP1, WBITS, WINDOW, N)
        if CP2 > 0:
            _write_part(out_ptr, words, k, a2, b2, rows2, ok2, one, CP1, CPB, WBITS, WINDOW, N)


def dequantize_t(pw: PackedWeight) -> torch.Tensor:
    """fp16 ``[K, N]``: ``W^T`` with rows in the input's own order (the permutation undone), outliers included.

    The launch is the same on every call but for the output, so after the first one it is replayed through
    Triton's compiled launcher (``launch.Replay``, kept in ``pw.launches``): eager many-token calls are
    host-bound on small layers."""
    n, k = pw.out_features, pw.in_features
    t = pw.tensors
    out = torch.empty(k, n, device=t["qweight"].device, dtype=torch.float16)
    replay = pw.launches.get("dequantize")
    if replay is not None and replay(out):
        return write_outliers(out, pw)
    sizes, meta = layout_args(pw)
    words, gs_t = sizes[0], meta["GS_T"]
    bw, kw = min(32, triton.next_power_of_2(words)), 4
    num_tiles = triton.cdiv(k, gs_t)
    dummy = t["qweight"]
    grid = (triton.cdiv(words, bw), triton.cdiv(num_tiles, kw))
    args = (t["qweight"], t.get("perm", dummy), *stat_args(pw, dummy), out, n, k, *sizes[1:], num_tiles, ONE_BITS)
    constexprs = dict(W=words, **meta, BW=bw, KW=kw, HAS_PERM="perm" in t)
    kernel = _dequant_kernel[grid](*args, **constexprs, num_warps=kw)
    if out.is_cuda and (replay := Replay.of(_dequant_kernel, kernel, grid, args, constexprs, (8,), out.get_device())):
        pw.launches["dequantize"] = replay
    return write_outliers(out, pw)


def spqr_dense_matmul(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``X @ W.T + bias`` through a transient dense fp16 weight and cuBLAS (for many tokens)."""
    y = torch.matmul(x.to(torch.float16), dequantize_t(pw))
    if bias is not None:
        y += bias.to(torch.float16)
    return y.to(x.dtype)
