"""Decode kernel: fused dequantize + matrix-vector product for 1..16 tokens, reading each packed word once.

Why it is shaped this way (batch-1 decode is memory-bound, but unpacking integers can become the bottleneck):

- Codes are packed ``cpw = 32 // wbits`` per int32 along K, and groups have ``gs`` columns; for 3-bit codes
  (``cpw = 10``) and ``gs = 16`` a group straddles words. The kernel therefore walks K in *superblocks* of
  ``lcm(cpw, gs)`` codes (80 for w3/g16: 8 words, 5 groups) and fully unrolls them, so every word is loaded once
  per column, every code is extracted with a compile-time shift and every group boundary is known statically.
- Stats are applied per group, not per weight: ``y[n] += s[n,g] * (sum_j q[n,j] x[j] - z[n,g] * sum_j x[j])``,
  so the per-weight work is shift, mask, int->float and one FMA per token. The int->float conversion uses the
  2^23 magic-number trick (or-in the exponent, subtract 2^23), which runs on the FP32 pipes instead of the slow
  conversion unit.
- ``x`` is gathered into the permuted column order once per call (``index_select``), then read with scalar
  loads (one per code, shared by every column a thread owns).
- Split-K gives enough programs to fill the GPU on short-N layers; the fp32 partial sums are reduced by the
  epilogue kernel in ``outliers.py``, which also adds the outliers, the bias and casts: 2-3 launches per linear.

Layer configurations whose superblock would be too long to unroll (e.g. 3-bit with groups of 128, or per-channel
stats) are not handled here; ``ops.spqr_linear`` sends them to the tensor-core kernel of ``matmul.py``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .layout import PackedWeight
from .outliers import outlier_epilogue

MAX_BATCH = 16
MAX_SUPERBLOCK = 160  # codes; longer superblocks would unroll into very large kernels


@triton.jit
def load_stats(g, offs_n, mask, N, G, NB, beta2, sc_ptr, zr_ptr, qs_ptr, qz_ptr, ss_ptr, zs_ptr,
               STAT_BITS: tl.constexpr):
    """fp32 (scale, zero) of group ``g`` for output rows ``offs_n`` (any broadcastable shapes), 0 where masked."""
    m = mask & (offs_n * 0 + g < G)  # tensor-shaped: the interpreter rejects scalar-bool masks
    if STAT_BITS == 16:
        s = tl.load(sc_ptr + g * N + offs_n, mask=m, other=0.0).to(tl.float32)
        z = tl.load(zr_ptr + g * N + offs_n, mask=m, other=0.0).to(tl.float32)
    else:
        CPS: tl.constexpr = 32 // STAT_BITS
        SMASK: tl.constexpr = (1 << STAT_BITS) - 1
        word_off = (g // CPS) * N + offs_n
        shift = (g % CPS) * STAT_BITS
        sc = ((tl.load(qs_ptr + word_off, mask=m, other=0) >> shift) & SMASK).to(tl.float32)
        zc = ((tl.load(qz_ptr + word_off, mask=m, other=0) >> shift) & SMASK).to(tl.float32)
        st = g * NB + offs_n // beta2
        second = G * NB  # offset of the "zero" plane of scale_stats / zero_stats ([2, G, NB])
        s = tl.load(ss_ptr + st, mask=m, other=0.0).to(tl.float32) * (
            sc - tl.load(ss_ptr + second + st, mask=m, other=0.0).to(tl.float32))
        z = tl.load(zs_ptr + st, mask=m, other=0.0).to(tl.float32) * (
            zc - tl.load(zs_ptr + second + st, mask=m, other=0.0).to(tl.float32))
    return s, z


@triton.jit
def code_to_float(word, SHIFT: tl.constexpr, WBITS: tl.constexpr):
    """Extract the code at bit ``SHIFT`` of int32 ``word`` as fp32 via the 2^23 magic number (exact for <23 bits)."""
    MASK: tl.constexpr = (1 << WBITS) - 1
    bits = ((word >> SHIFT) & MASK) | 0x4B000000
    return bits.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _decode_kernel(
    x_ptr, qw_ptr, sc_ptr, zr_ptr, qs_ptr, qz_ptr, ss_ptr, zs_ptr, part_ptr,
    B, N, K, G, NB, beta2, stride_x, sb_per_split, num_sb,
    WBITS: tl.constexpr, GS: tl.constexpr, SB_WORDS: tl.constexpr, STAT_BITS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    CPW: tl.constexpr = 32 // WBITS
    SB: tl.constexpr = SB_WORDS * CPW
    GPS: tl.constexpr = SB // GS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_b = tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    y = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    sb_start = pid_k * sb_per_split
    sb_end = tl.minimum(sb_start + sb_per_split, num_sb)
    for sb in range(sb_start, sb_end):
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        xs = tl.zeros([BLOCK_B], dtype=tl.float32)
        for wi in tl.static_range(SB_WORDS):
            widx = sb * SB_WORDS + wi
            word = tl.load(qw_ptr + widx * N + offs_n, mask=mask_n & (offs_n * 0 + widx * CPW < K), other=0)
            for c in tl.static_range(CPW):
                k = sb * SB + wi * CPW + c
                k_in = offs_b * 0 + k < K
                xk = tl.load(x_ptr + offs_b * stride_x + k, mask=mask_b & k_in, other=0.0).to(tl.float32)
                q = code_to_float(word, c * WBITS, WBITS)
                acc += xk[:, None] * q[None, :]
                xs += xk
                if (wi * CPW + c + 1) % GS == 0:
                    g = sb * GPS + (wi * CPW + c) // GS
                    s, z = load_stats(g, offs_n, mask_n, N, G, NB, beta2, sc_ptr, zr_ptr, qs_ptr, qz_ptr,
                                      ss_ptr, zs_ptr, STAT_BITS)
                    y += s[None, :] * (acc - z[None, :] * xs[:, None])
                    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
                    xs = tl.zeros([BLOCK_B], dtype=tl.float32)
    out = part_ptr + (pid_k * B + offs_b[:, None]) * N + offs_n[None, :]
    tl.store(out, y, mask=mask_b[:, None] & mask_n[None, :])


def superblock_codes(pw: PackedWeight) -> int:
    """Codes per unrolled superblock: the shortest run that starts on a word and ends on a group boundary."""
    cpw = 32 // pw.wbits
    return cpw * pw.groupsize // math.gcd(cpw, pw.groupsize)


def supports(pw: PackedWeight) -> bool:
    """Whether the decode kernel handles this layer configuration (else use the tensor-core kernel)."""
    return superblock_codes(pw) <= MAX_SUPERBLOCK


def pick_config(n: int, k: int, sb_codes: int, batch: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, split): the best of a small sweep on an H200 at batch 1 (7B and 65B up/gate)."""
    num_sb = triton.cdiv(k, sb_codes)
    return 128, 4, max(1, min(8, num_sb // 4))


def spqr_matvec(
    x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for ``x`` of shape ``[B, K]`` with ``1 <= B <= 16``; returns ``[B, N]`` in x's dtype.

    ``config``: optional ``(BLOCK_N, num_warps, split)`` to override the per-shape heuristic (for tuning).
    """
    n, k = pw.out_features, pw.in_features
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"spqr_matvec expects x of shape [B, {k}], got {tuple(x.shape)}")
    b = x.shape[0]
    if not 1 <= b <= MAX_BATCH:
        raise ValueError(f"spqr_matvec handles 1..{MAX_BATCH} tokens, got {b}")
    if not supports(pw):
        raise ValueError(f"spqr_matvec cannot unroll {pw.wbits}-bit codes with groups of {pw.groupsize}")
    if x.device != pw.tensors["qweight"].device:
        raise ValueError(f"x is on {x.device} but the weight is on {pw.tensors['qweight'].device}")
    x_orig = x.contiguous()  # the outliers index original columns
    t = pw.tensors
    perm = t.get("perm")
    # gather x into the weight's permuted column order once (one small launch) instead of once per code per
    # program: dependent scalar loads through perm inside the unrolled loop cost registers and latency
    x = (x.index_select(1, perm) if perm is not None else x).contiguous()
    sb_codes = superblock_codes(pw)
    block_n, num_warps, split = config or pick_config(n, k, sb_codes, b)
    num_sb = triton.cdiv(k, sb_codes)
    sb_per_split = triton.cdiv(num_sb, split)
    split = triton.cdiv(num_sb, sb_per_split)
    partials = torch.empty(split, b, n, device=x.device, dtype=torch.float32)
    dummy = t["qweight"]
    _decode_kernel[(triton.cdiv(n, block_n), split)](
        x, t["qweight"],
        t.get("scales", dummy), t.get("zeros", dummy), t.get("qscale", dummy), t.get("qzero", dummy),
        t.get("scale_stats", dummy), t.get("zero_stats", dummy), partials,
        b, n, k, pw.num_groups, triton.cdiv(n, max(pw.beta2, 1)), max(pw.beta2, 1), x.stride(0),
        sb_per_split, num_sb,
        WBITS=pw.wbits, GS=pw.groupsize, SB_WORDS=sb_codes // (32 // pw.wbits), STAT_BITS=pw.stat_bits,
        BLOCK_B=max(1, triton.next_power_of_2(b)), BLOCK_N=block_n,
        num_warps=num_warps,
    )
    out = torch.empty(b, n, device=x_orig.device, dtype=x_orig.dtype)
    return outlier_epilogue(partials, x_orig, pw, bias, out)
