"""Triton building blocks shared by the decode and prefill kernels: decode a tile of packed codes and stats.

A tile is 4-D ``[NGI, GS_T, BW, CP]``: ``NGI`` k-sub-tiles of ``GS_T`` permuted input columns (each inside one
group of the layer's statistics), ``BW`` packed word columns and ``CP`` of the ``cpw`` codes in each word. Word
column ``w`` and code slot ``c`` are output row ``n = w * cpw + c`` (codes are packed along N, see layout.py),
so one coalesced ``[NGI, GS_T, BW]`` load of int32 words feeds ``CP`` rows each, and the statistics of a whole
``[NGI, 1, BW, CP]`` slice are decoded once and broadcast over the ``GS_T`` columns.

``cpw`` is 10 for 3-bit codes, which is not a power of two; a kernel therefore decodes a word in two parts,
slots ``[0, CP1)`` and ``[CP1, cpw)`` with ``CP1`` the largest power of two <= ``cpw`` (8 + 2 for 3-bit codes),
so no lane computes a code that does not exist.
"""

from __future__ import annotations

import triton
import triton.language as tl

MAGIC = tl.constexpr(0x4B000000)  # 2^23 as fp32 bits: or-ing a small integer into the mantissa gives 2^23 + q


def split_slots(cpw: int) -> tuple[int, int]:
    """``(CP1, CP2)``: the two power-of-two parts a word of ``cpw`` codes is decoded in (CP2 may be 0)."""
    cp1 = 1 << (cpw.bit_length() - 1)
    cp2 = cpw - cp1
    if cp2 & (cp2 - 1):
        raise ValueError(f"{cpw} codes per word cannot be split into two power-of-two parts")
    return cp1, cp2


@triton.jit
def slot_codes(words, C0: tl.constexpr, CP: tl.constexpr, WBITS: tl.constexpr):
    """int32 words of any shape ``[...]`` -> fp32 codes ``[..., CP]`` of slots ``C0 .. C0+CP-1``.

    int->float goes through the 2^23 magic number (shift, mask|or, one fp32 subtract), which runs on the
    integer and FP32 pipes instead of the quarter-rate conversion unit.
    """
    MASK: tl.constexpr = (1 << WBITS) - 1
    shifts = ((C0 + tl.arange(0, CP)) * WBITS).to(tl.uint32)
    bits = ((tl.expand_dims(words, -1).to(tl.uint32, bitcast=True) >> shifts) & MASK) | MAGIC
    return bits.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def slot_bits(words, C0: tl.constexpr, CP: tl.constexpr, WBITS: tl.constexpr):
    """``[BW, 1]`` int32 words -> fp32 codes ``[BW, CP]`` of slots ``C0 .. C0+CP-1`` (no layout change).

    Same arithmetic as ``slot_codes``; taking the words as a ``[BW, 1]`` column keeps them in the layout of the
    ``[BW, CP]`` result, so the decode kernel needs no shared-memory shuffle per loaded row.
    """
    MASK: tl.constexpr = (1 << WBITS) - 1
    shifts = ((C0 + tl.arange(0, CP)) * WBITS).to(tl.uint32)[None, :]
    bits = ((words.to(tl.uint32, bitcast=True) >> shifts) & MASK) | MAGIC
    return bits.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _pick(ptr, st0, ok0, ok1, second):
    """Per row, the second-level value of block ``st0`` or ``st0 + 1`` (two loads per word, not one per row)."""
    lo = tl.load(ptr + st0, mask=ok0, other=0.0).to(tl.float32)
    hi = tl.load(ptr + st0 + 1, mask=ok1, other=0.0).to(tl.float32)
    return tl.where(second, hi, lo)


@triton.jit
def word_stats(g, offs_w, w_ok, N, G, WS, NB, qs_ptr, qz_ptr, ss_ptr, zs_ptr,
               CPW: tl.constexpr, C0: tl.constexpr, CP: tl.constexpr, STAT_BITS: tl.constexpr,
               BETA2: tl.constexpr):
    """``(scale, zero * scale)`` ``[BW, CP]`` for quantized stats packed like the codes (``stat_bits == wbits``).

    Then row ``w * CPW + c``'s stat codes sit in stat word ``w`` at slot ``c``: one load per word and stat
    instead of one per row. The second-level block of a row is one of two per word (a word's ``CPW`` rows
    straddle at most one ``BETA2`` boundary when ``CPW <= BETA2``), so 2 loads per word and array suffice.
    """
    SMASK: tl.constexpr = (1 << STAT_BITS) - 1
    slot = (C0 + tl.arange(0, CP))[None, :]
    n = offs_w * CPW + slot
    g_ok = w_ok & ((offs_w * 0 + g) < G)  # a tensor: the interpreter rejects scalar masks
    n_ok = g_ok & (n < N)
    shifts = (slot * STAT_BITS).to(tl.uint32)
    sw = tl.load(qs_ptr + g * WS + offs_w, mask=g_ok, other=0).to(tl.uint32, bitcast=True)
    zw = tl.load(qz_ptr + g * WS + offs_w, mask=g_ok, other=0).to(tl.uint32, bitcast=True)
    sc = ((sw >> shifts) & SMASK).to(tl.float32)
    zc = ((zw >> shifts) & SMASK).to(tl.float32)
    b0 = (offs_w * CPW) // BETA2  # [BW, 1] block of the word's first row
    second = (n // BETA2) > b0  # [BW, CP] rows past the boundary use block b0 + 1
    st0 = g * NB + b0
    ok0 = g_ok
    ok1 = ok0 & (b0 + 1 < NB)
    plane = G * NB

    s = _pick(ss_ptr, st0, ok0, ok1, second) * (sc - _pick(ss_ptr + plane, st0, ok0, ok1, second))
    z = _pick(zs_ptr, st0, ok0, ok1, second) * (zc - _pick(zs_ptr + plane, st0, ok0, ok1, second))
    s = tl.where(n_ok, s, 0.0)
    return s, tl.where(n_ok, z * s, 0.0)


@triton.jit
def group_stats(g, n, n_ok, N, G, WS, NB, sc_ptr, zr_ptr, qs_ptr, qz_ptr, ss_ptr, zs_ptr,
                STAT_BITS: tl.constexpr, BETA2: tl.constexpr):
    """fp32 ``(scale, zero * scale)`` of groups ``g`` for output rows ``n`` (broadcastable tensors).

    Returning ``zero * scale`` lets the caller dequantize with one FMA: ``w = q * s - zs``.
    """
    if STAT_BITS == 16:
        s = tl.load(sc_ptr + g * N + n, mask=n_ok, other=0.0).to(tl.float32)
        z = tl.load(zr_ptr + g * N + n, mask=n_ok, other=0.0).to(tl.float32)
    else:
        CPS: tl.constexpr = 32 // STAT_BITS
        SMASK: tl.constexpr = (1 << STAT_BITS) - 1
        word = g * WS + n // CPS
        shift = (n % CPS) * STAT_BITS
        sc = ((tl.load(qs_ptr + word, mask=n_ok, other=0) >> shift) & SMASK).to(tl.float32)
        zc = ((tl.load(qz_ptr + word, mask=n_ok, other=0) >> shift) & SMASK).to(tl.float32)
        st = g * NB + n // BETA2
        plane = G * NB  # [2, G, NB]: plane 0 holds the second-level scales, plane 1 the zeros
        s = tl.load(ss_ptr + st, mask=n_ok, other=0.0).to(tl.float32) * (
            sc - tl.load(ss_ptr + plane + st, mask=n_ok, other=0.0).to(tl.float32))
        z = tl.load(zs_ptr + st, mask=n_ok, other=0.0).to(tl.float32) * (
            zc - tl.load(zs_ptr + plane + st, mask=n_ok, other=0.0).to(tl.float32))
    return s, z * s


@triton.jit
def dequant_part(words, g, offs_w, N, G, WS, NB, sc_ptr, zr_ptr, qs_ptr, qz_ptr, ss_ptr, zs_ptr,
                 CPW: tl.constexpr, C0: tl.constexpr, CP: tl.constexpr, WBITS: tl.constexpr,
                 STAT_BITS: tl.constexpr, BETA2: tl.constexpr):
    """fp32 weights ``[NGI, GS_T, BW, CP]`` of rows ``offs_w * CPW + C0 + c`` from a ``[NGI, GS_T, BW]`` word tile.

    ``g`` is ``[NGI, 1, 1, 1]`` (the group of each k-sub-tile); returns the rows ``n`` ``[1, 1, BW, CP]`` too.
    """
    n = offs_w[None, None, :, None] * CPW + (C0 + tl.arange(0, CP))[None, None, None, :]
    n_ok = (n < N) & (g < G)  # sub-tiles past K (when NGI * GS_T does not divide it) read no stats
    s, zs = group_stats(g, n, n_ok, N, G, WS, NB, sc_ptr, zr_ptr, qs_ptr, qz_ptr, ss_ptr, zs_ptr,
                        STAT_BITS, BETA2)
    q = slot_codes(words, C0, CP, WBITS)
    return q * s - zs, n


def stat_args(pw, dummy) -> tuple:  # noqa: ANN001 (PackedWeight, torch.Tensor)
    """The six stats pointers in kernel order; absent ones are replaced by ``dummy`` (never read)."""
    t = pw.tensors
    return tuple(t.get(k, dummy) for k in ("scales", "zeros", "qscale", "qzero", "scale_stats", "zero_stats"))


def layout_args(pw) -> tuple[tuple[int, int, int, int], dict[str, int]]:  # noqa: ANN001 (PackedWeight)
    """What every kernel launch derives from the layout: ``(W, WS, G, NB)`` and the shared constexprs.

    ``W``/``WS`` are the code/stat word columns, ``G`` the groups, ``NB`` the second-level row blocks; the
    constexprs are ``WBITS, CPW, CP1, CP2, GS, GS_T, STAT_BITS, BETA2``.
    """
    t = pw.tensors
    cpw = 32 // pw.wbits
    cp1, cp2 = split_slots(cpw)
    beta2 = max(pw.beta2, 1)
    sizes = (t["qweight"].shape[1], t["qscale"].shape[1] if "qscale" in t else 1, pw.num_groups,
             -(-pw.out_features // beta2))
    meta = {"WBITS": pw.wbits, "CPW": cpw, "CP1": cp1, "CP2": cp2, "GS": pw.groupsize,
            "GS_T": tile_k(pw.groupsize), "STAT_BITS": pw.stat_bits, "BETA2": beta2}
    return sizes, meta


def tile_k(groupsize: int, max_sub: int = 32) -> int:
    """Columns per k-sub-tile: the largest power of two <= ``max_sub`` dividing the group size (>= 16)."""
    if groupsize % 16:
        raise ValueError(f"the kernels need groups of a multiple of 16 columns, got {groupsize}")
    sub = 16
    while sub < max_sub and groupsize % (sub * 2) == 0:
        sub *= 2
    return sub

