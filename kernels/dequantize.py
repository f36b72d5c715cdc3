"""Dequantize a packed layer to a dense fp16 ``W^T`` (``[K, N]``, original input order) for many-token calls.

From ``matvec.MAX_DECODE_TOKENS + 1`` (9) tokens on, ``ops.spqr_linear`` writes the dense weight once and hands the
product to cuBLAS: the decode is paid once per weight, not once per token tile, and it beat every fused
tensor-core kernel we built (the latest, ``benchmarks/k5_run_gemm``: at most 0.28x of fp16 at 4-64 tokens, where this
path gives 0.24-0.46x in the same run; ``docs/benchmarks.md`` section 14).

The kernel works on output tiles: a program decodes ``KT`` tiles of ``[BK, BN]`` (``BK`` permuted columns of one
group, ``BN`` output rows) and stores tile row ``j`` at row ``perm[j]`` of ``W^T``, so the copy is in the
activations' own order and ``x @ W^T`` needs no gather of ``x``. Each thread decodes runs of 8 consecutive output
rows (``dequant.run_words``: the words a run touches, 2 for 3-bit codes, loaded once) and stores each run as one
16-byte vector.
The previous kernel (one thread per code word) stored a word's 10 rows as 20 bytes at 4-byte alignment, 5 stores
per word; this one takes 0.58-0.81x of its time on LLaMA shapes (``docs/benchmarks.md`` section 14). The outliers
are then written into the dense copy at their own columns (``outlier_scatter.py``, a second launch: the dense
values must be in place first).

Precision: the weight copy is fp16 (the stored decode rounded once, as ``unpack`` produces), the matmul is cuBLAS
fp16 with its default accumulation, and bf16 activations are converted to fp16 (activations beyond fp16's range,
|x| > 65504, are not supported on this path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dequant import decode_tile, layout_args, run_stats, stat_args, tile_k
from .launch import Replay
from .layout import PackedWeight
from .outlier_scatter import write_outliers


@triton.jit
def _dequant_kernel(
    qw_ptr, perm_ptr, sc_ptr, zr_ptr, qs_ptr, qz_ptr, ss_ptr, zs_ptr, out_ptr,
    N, K, W, WS, G, NB,
    WBITS: tl.constexpr, CPW: tl.constexpr, GS: tl.constexpr, STAT_BITS: tl.constexpr, BETA2: tl.constexpr,
    BK: tl.constexpr, BN: tl.constexpr, KT: tl.constexpr, HAS_PERM: tl.constexpr,
):
    n0 = tl.program_id(0) * BN + 8 * tl.arange(0, BN // 8)[None, :, None]  # [1, BN / 8, 1] runs of 8 rows
    n = n0 + tl.arange(0, 8)[None, None, :]
    n_ok = n < N
    for i in tl.static_range(KT):
        k0 = (tl.program_id(1) * KT + i) * BK  # BK divides the group size: one group per tile
        j = k0 + tl.arange(0, BK)[:, None, None]
        s, zs = run_stats(tl.minimum(k0 // GS, G - 1), n0, n0 < N, N, G, WS, NB, sc_ptr, zr_ptr, qs_ptr, qz_ptr,
                          ss_ptr, zs_ptr, STAT_BITS, BETA2)
        w = decode_tile(qw_ptr, j, n0, (j < K) & (n0 < N), s, zs, W, WBITS, CPW)
        if HAS_PERM:
            row = tl.load(perm_ptr + j, mask=j < K, other=0)
        else:
            row = j
        tl.store(out_ptr + row.to(tl.int64) * N + n, w.to(tl.float16), mask=(j < K) & n_ok)


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
    bk, bn, kt = tile_k(pw.groupsize, 16), min(128, max(16, triton.next_power_of_2(n))), 2
    dummy = t["qweight"]
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk * kt))
    args = (t["qweight"], t.get("perm", dummy), *stat_args(pw, dummy), out, n, k, *sizes)
    constexprs = dict(WBITS=pw.wbits, CPW=meta["CPW"], GS=pw.groupsize, STAT_BITS=pw.stat_bits,
                      BETA2=meta["BETA2"], BK=bk, BN=bn, KT=kt, HAS_PERM="perm" in t)
    kernel = _dequant_kernel[grid](*args, **constexprs, num_warps=4)
    if out.is_cuda and (replay := Replay.of(_dequant_kernel, kernel, grid, args, constexprs, (8,), out.get_device())):
        pw.launches["dequantize"] = replay
    return write_outliers(out, pw)


def spqr_dense_matmul(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``X @ W.T + bias`` through a transient dense fp16 weight and cuBLAS (for many tokens)."""
    y = torch.matmul(x.to(torch.float16), dequantize_t(pw))
    if bias is not None:
        y += bias.to(torch.float16)
    return y.to(x.dtype)
