"""Prefill kernel: dequantize weight tiles to fp16 in registers and multiply on the tensor cores (``tl.dot``).

Each program owns a ``[BLOCK_M, BLOCK_N]`` output tile and walks K in tiles of ``BK`` permuted columns. A tile
is decoded as a 3-D ``[GB, GS_T, BLOCK_N]`` block (``GB`` groups of ``GS_T`` columns), so the stats are loaded
once per group and broadcast, not gathered per weight; then it is flattened to ``[BK, BLOCK_N]`` for the dot.
The activations are gathered through the permutation (``x[:, perm[k]]``), so the weight never has to be
un-permuted. The outliers of the tile's rows are added after the K loop from the runtime residuals of
``outliers.prepare`` (a short CSR loop), then the bias, and the tile is stored in the activation dtype: one
launch per linear.

The dot runs in fp16 with fp32 accumulation: bf16 activations are converted to fp16 in registers (the weights
are fp16 by contract, and fp16 keeps 3 more mantissa bits than bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import PackedWeight
from .matvec import load_stats
from .outliers import outlier_accumulate, prepare


def tile_k(groupsize: int) -> tuple[int, int]:
    """``(GB, GS_T)``: groups per K tile and columns per stats sub-tile; ``BK = GB * GS_T`` is 64 or more.

    Groups of <= 64 columns are tiled several per K tile; longer groups (128, per-channel) are cut into
    sub-tiles of their largest power-of-two divisor up to 64, each of which lies inside one group.
    """
    if groupsize % 16:
        raise ValueError(f"the tensor-core kernel needs groups of a multiple of 16 columns, got {groupsize}")
    if groupsize <= 64 and groupsize & (groupsize - 1) == 0:
        return 64 // groupsize, groupsize
    sub = 16
    while sub < 64 and groupsize % (sub * 2) == 0:
        sub *= 2
    return 1, sub


@triton.jit
def _prefill_kernel(
    x_ptr, perm_ptr, qw_ptr, sc_ptr, zr_ptr, qs_ptr, qz_ptr, ss_ptr, zs_ptr,
    row_ptr, col_ptr, delta_ptr, bias_ptr, out_ptr,
    M, N, K, G, NB, beta2, stride_x, stride_o,
    WBITS: tl.constexpr, GS: tl.constexpr, GB: tl.constexpr, GS_T: tl.constexpr, STAT_BITS: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    CPW: tl.constexpr = 32 // WBITS
    MASK: tl.constexpr = (1 << WBITS) - 1
    BK: tl.constexpr = GB * GS_T
    # grouped launch order: programs that share weight tiles run close together (L2 reuse)
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    rows_here = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_here
    pid_n = (pid % per_group) // rows_here

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    n3 = offs_n[None, None, :]
    mask_n3 = mask_n[None, None, :]
    k_loc = tl.arange(0, GB)[:, None, None] * GS_T + tl.arange(0, GS_T)[None, :, None]  # [GB, GS_T, 1]
    g_loc = tl.arange(0, GB)[:, None, None] * GS_T  # first column of each sub-tile
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + k_loc
        word = tl.load(qw_ptr + (k // CPW) * N + n3, mask=(k < K) & mask_n3, other=0)
        bits = ((word >> ((k % CPW) * WBITS)) & MASK) | 0x4B000000
        q = bits.to(tl.float32, bitcast=True) - 8388608.0
        s, z = load_stats((k0 + g_loc) // GS, n3, mask_n3, N, G, NB, beta2, sc_ptr, zr_ptr, qs_ptr, qz_ptr,
                          ss_ptr, zs_ptr, STAT_BITS)
        w = tl.reshape((s * (q - z)).to(tl.float16), (BK, BLOCK_N))
        kk = k0 + tl.arange(0, BK)
        if HAS_PERM:
            cols = tl.load(perm_ptr + kk, mask=kk < K, other=0)
        else:
            cols = kk
        xt = tl.load(x_ptr + offs_m[:, None] * stride_x + cols[None, :], mask=mask_m[:, None] & (kk < K)[None, :],
                     other=0.0)
        acc = tl.dot(xt.to(tl.float16), w, acc)
    if HAS_OUTLIERS:
        acc = outlier_accumulate(acc, x_ptr, stride_x, offs_m, mask_m, offs_n, mask_n, row_ptr, col_ptr, delta_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_o + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def pick_config(m: int, n: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) by token count; tuned on an H100 (docs/benchmarks.md)."""
    if m <= 16:
        return 16, 64, 4, 3
    if m <= 64:
        return 64, 128, 4, 3
    return 128, 128, 8, 3


def spqr_matmul(
    x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for ``x`` of shape ``[M, K]`` (any M >= 1); returns ``[M, N]`` in x's dtype.

    ``config``: optional ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` overriding the per-shape choice.
    """
    n, k = pw.out_features, pw.in_features
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"spqr_matmul expects x of shape [M, {k}], got {tuple(x.shape)}")
    if x.device != pw.tensors["qweight"].device:
        raise ValueError(f"x is on {x.device} but the weight is on {pw.tensors['qweight'].device}")
    x = x.contiguous()
    m = x.shape[0]
    t = pw.tensors
    gb, gs_t = tile_k(pw.groupsize)
    block_m, block_n, num_warps, num_stages = config or pick_config(m, n)
    rt = prepare(pw)
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    dummy = t["qweight"]
    perm = t.get("perm")
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _prefill_kernel[grid](
        x, perm if perm is not None else dummy, t["qweight"],
        t.get("scales", dummy), t.get("zeros", dummy), t.get("qscale", dummy), t.get("qzero", dummy),
        t.get("scale_stats", dummy), t.get("zero_stats", dummy),
        rt["row_ptr"], rt.get("outlier_col", dummy), rt.get("outlier_delta", dummy),
        bias if bias is not None else dummy, out,
        m, n, k, pw.num_groups, triton.cdiv(n, max(pw.beta2, 1)), max(pw.beta2, 1), x.stride(0), out.stride(0),
        WBITS=pw.wbits, GS=pw.groupsize, GB=gb, GS_T=gs_t, STAT_BITS=pw.stat_bits,
        HAS_PERM=perm is not None, HAS_OUTLIERS=pw.nnz > 0, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=8, num_warps=num_warps, num_stages=num_stages,
    )
    return out
