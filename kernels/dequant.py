"""Triton building blocks shared by the kernels: decode packed codes and statistics in registers.

Kernels work on 3-D tiles ``[KW, BW, slots]``: ``KW`` k-tiles (one per warp), ``BW`` packed word columns (one
per lane) and ``CP`` of the ``cpw`` codes in each word. Word column ``w`` and slot ``c`` are output row
``n = w * cpw + c`` (codes are packed along N, see layout.py). Every tensor of a kernel's inner loop is a
broadcast of the ``[KW, BW, 1]`` word loads, so each thread decodes its own words and their statistics in
registers, with no shuffle through shared memory.

``cpw`` is 10 for 3-bit codes, which is not a power of two; a kernel therefore decodes a word in two parts,
slots ``[0, CP1)`` and ``[CP1, cpw)`` with ``CP1`` the largest power of two <= ``cpw`` (8 + 2 for 3-bit codes),
so no lane computes a code that does not exist.

Kernels that work on output tiles instead (the many-token ``dequantize.py``) use ``run_words`` / ``run_stats`` /
``decode_tile``: each thread decodes runs of 8 consecutive output rows, loading the few words a run touches.
"""

from __future__ import annotations

import triton
import triton.language as tl

ONE_BITS = 0x3F800000  # 1.0 as fp32 bits (see mantissa_codes)


def split_slots(cpw: int) -> tuple[int, int]:
    """``(CP1, CP2)``: the two power-of-two parts a word of ``cpw`` codes is decoded in (CP2 may be 0)."""
    cp1 = 1 << (cpw.bit_length() - 1)
    cp2 = cpw - cp1
    if cp2 & (cp2 - 1):
        raise ValueError(f"{cpw} codes per word cannot be split into two power-of-two parts")
    return cp1, cp2


@triton.jit
def _mantissa_top(C0: tl.constexpr, CP: tl.constexpr, BITS: tl.constexpr, WINDOW: tl.constexpr):
    """Mantissa bit where ``mantissa_codes`` puts the code of each slot ``C0 .. C0+CP-1`` (``[CP]``)."""
    pos = (C0 + tl.arange(0, CP)) * BITS
    if WINDOW:
        top = 11 + pos % 12
    else:
        top = pos * 0 + (23 - BITS)
    return top


@triton.jit
def mantissa_alpha(C0: tl.constexpr, CP: tl.constexpr, BITS: tl.constexpr, WINDOW: tl.constexpr):
    """fp32 ``alpha`` ``[CP]`` of ``mantissa_codes``: ``q = alpha (f - 1)`` (a power of two per slot)."""
    return (1 << (23 - _mantissa_top(C0, CP, BITS, WINDOW))).to(tl.float32)


@triton.jit
def mantissa_codes(words, one, C0: tl.constexpr, CP: tl.constexpr, BITS: tl.constexpr, WINDOW: tl.constexpr):
    """int32 words ``[..., 1]`` -> fp32 ``f = 1 + q / alpha`` ``[..., CP]`` of slots ``C0 .. C0+CP-1``.

    The code is moved under the exponent of 1.0 (mantissa bits ``top .. top+BITS-1``) and or-ed with
    ``0x3F800000``: no int->float conversion and no per-weight subtract. A dot product with these values is
    ``sum_k x_k + (1 / alpha) sum_k q_k x_k``; the caller removes ``sum_k x_k`` once per group, and with ``top >= 11``
    the code part keeps >= 12 significant bits of every fp32 product. With ``WINDOW`` (when every slot fits, see
    ``window_fits``) slots are moved in 12-bit blocks to ``top = 11 + pos % 12``, so one shift serves several
    slots (2 shifts per 3-bit word instead of 10); otherwise every slot goes to the top (``alpha = 2^BITS``).
    The words come with a trailing unit dimension so that the result is a broadcast of their layout (each thread
    decodes its own words in registers, no layout conversion). ``one`` is ``ONE_BITS`` passed in as a *runtime*
    kernel argument: then ptxas keeps it in a register and encodes each slot's mask as the and-or's immediate
    (with both constant it re-materialises a mask per weight, one extra instruction per weight).
    """
    top = _mantissa_top(C0, CP, BITS, WINDOW)
    d = top - (C0 + tl.arange(0, CP)) * BITS
    w = words.to(tl.uint32, bitcast=True)
    moved = tl.where(d >= 0, w << tl.maximum(d, 0).to(tl.uint32), w >> tl.maximum(-d, 0).to(tl.uint32))
    mask = (((1 << BITS) - 1) << top).to(tl.uint32)
    return ((moved & mask) | one.to(tl.uint32, bitcast=True)).to(tl.float32, bitcast=True)


@triton.jit
def run_words(ptr, n0, ok, W, CP: tl.constexpr):
    """int32 ``[..., R, 8]``: for output rows ``n0 + i`` (``n0``: ``[..., R, 1]``, multiples of 8), the word of
    ``ptr[0 .. W)`` holding row ``n`` (``CP`` rows per word, packed along N).

    Kernels that work on output tiles (many tokens) give each thread runs of 8 consecutive output rows, so that its
    stores are 16-byte vectors whatever ``CP`` is (where Triton can prove the alignment: ``N`` divisible by 16). A
    run spans at most ``NW`` words (2 for 3-bit codes): the thread loads those and each row picks its own, instead
    of one load per row, which kept the L1 busy. ``ok`` masks per run (``[..., R, 1]``).
    """
    G8: tl.constexpr = 8 if CP % 8 == 0 else (4 if CP % 4 == 0 else (2 if CP % 2 == 0 else 1))  # gcd(8, CP)
    NW: tl.constexpr = (CP - G8 + 7) // CP + 1  # words a run of 8 rows starting at a multiple of 8 can touch
    w0 = n0 // CP
    rel = (n0 + tl.arange(0, 8)) // CP - w0
    word = tl.where(rel == 0, tl.load(ptr + w0, mask=ok, other=0), 0)
    for v in tl.static_range(1, NW):
        word = tl.where(rel == v, tl.load(ptr + w0 + v, mask=ok & (w0 + v < W), other=0), word)
    return word


@triton.jit
def code_float(word, n, BITS: tl.constexpr, CP: tl.constexpr):
    """fp32 value of row ``n``'s ``BITS``-bit code in ``word``: or-ed under the exponent of ``2^23``, minus
    ``2^23`` (exact, no int->float conversion)."""
    q = (word >> ((n % CP) * BITS)) & ((1 << BITS) - 1)
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def run_stats(g, n0, ok, N, G, WS, NB, sc_ptr, zr_ptr, qs_ptr, qz_ptr, ss_ptr, zs_ptr, STAT_BITS: tl.constexpr,
              BETA2: tl.constexpr):
    """fp32 ``(scale, zero * scale)`` ``[..., R, 8]`` of groups ``g`` for output rows ``n0 + i`` (``run_words``'
    runs; ``ok`` per run), as ``group_stats`` decodes them: one load per stat word, and per second-level pair when
    ``BETA2`` is a multiple of 8 (else per row)."""
    n = n0 + tl.arange(0, 8)
    if STAT_BITS == 16:
        s = tl.load(sc_ptr + g * N + n, mask=ok & (n < N), other=0.0).to(tl.float32)
        z = tl.load(zr_ptr + g * N + n, mask=ok & (n < N), other=0.0).to(tl.float32)
    else:
        CPS: tl.constexpr = 32 // STAT_BITS
        sc = code_float(run_words(qs_ptr + g * WS, n0, ok, WS, CPS), n, STAT_BITS, CPS)
        zc = code_float(run_words(qz_ptr + g * WS, n0, ok, WS, CPS), n, STAT_BITS, CPS)
        if BETA2 % 8 == 0:
            st = g * NB + n0 // BETA2  # one second-level block per run
            st_ok = ok
        else:
            st = g * NB + n // BETA2
            st_ok = ok & (n < N)  # rows past N of the last run would address blocks past NB
        s, z = second_level(sc, zc, st, st_ok, G * NB, ss_ptr, zs_ptr)
    return s, z * s


@triton.jit
def decode_tile(qw_ptr, j, n0, ok, s, zs, W, WBITS: tl.constexpr, CPW: tl.constexpr):
    """fp32 weights ``[..., R, 8]`` of permuted columns ``j`` (``[..., 1, 1]``) and output rows ``n0 + i``
    (``run_words``' runs; ``ok`` per run), given their group's ``s`` and ``z s`` (``run_stats``): ``s q - z s``.
    Rows past ``N`` inside a run decode garbage that the caller does not store."""
    n = n0 + tl.arange(0, 8)
    return code_float(run_words(qw_ptr + j * W, n0, ok, W, CPW), n, WBITS, CPW) * s - zs


def window_fits(bits: int) -> bool:
    """Whether ``mantissa_codes(..., WINDOW=True)`` can place every slot of a ``bits``-bit word (no code crosses
    a 12-bit block)."""
    return all((c * bits) % 12 <= 12 - bits for c in range(32 // bits))


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
        s, z = second_level(sc, zc, g * NB + n // BETA2, n_ok, G * NB, ss_ptr, zs_ptr)
    return s, z * s


@triton.jit
def second_level(sc, zc, st, ok, plane, ss_ptr, zs_ptr):
    """fp32 first-level ``(scale, zero)`` from their codes ``sc``, ``zc`` (fp32) and the second-level pairs of
    blocks ``st``: ``[2, G, NB]`` tensors, ``plane = G * NB`` apart (plane 0 the scales, plane 1 the zeros)."""
    s = tl.load(ss_ptr + st, mask=ok, other=0.0).to(tl.float32) * (
        sc - tl.load(ss_ptr + plane + st, mask=ok, other=0.0).to(tl.float32))
    z = tl.load(zs_ptr + st, mask=ok, other=0.0).to(tl.float32) * (
        zc - tl.load(zs_ptr + plane + st, mask=ok, other=0.0).to(tl.float32))
    return s, z


@triton.jit
def _pair(ptr, st0, ok0, ok1):
    """fp32 second-level values of blocks ``st0`` and ``st0 + 1`` (a word's rows straddle at most two blocks)."""
    lo = tl.load(ptr + st0, mask=ok0, other=0.0).to(tl.float32)
    hi = tl.load(ptr + st0 + 1, mask=ok1, other=0.0).to(tl.float32)
    return lo, hi


@triton.jit
def word_stat(q_ptr, st_ptr, plane, g, WS, offs_w, st0, ok0, ok1, second, one, C0: tl.constexpr, CP: tl.constexpr,
              STAT_BITS: tl.constexpr):
    """First-level stat ``a (code - b)`` ``[KW, BW, CP]`` of a word's rows, from stat codes packed like the codes.

    ``code = 2^bits (f - 1)`` with ``f`` from ``mantissa_codes``, so the stat is one FMA, ``A f - B``, with
    ``A = 2^bits a`` and ``B = a (2^bits + b)`` computed once per word and second-level block.
    """
    TWO: tl.constexpr = 1 << STAT_BITS
    f = mantissa_codes(tl.load(q_ptr + g * WS + offs_w, mask=ok0, other=0), one, C0, CP, STAT_BITS, False)
    a_lo, a_hi = _pair(st_ptr, st0, ok0, ok1)
    b_lo, b_hi = _pair(st_ptr + plane, st0, ok0, ok1)
    a = tl.where(second, a_hi * TWO, a_lo * TWO)
    b = tl.where(second, a_hi * (TWO + b_hi), a_lo * (TWO + b_lo))
    return a * f - b


@triton.jit
def part_stats(g, ok, offs_w, n, second, one, N, G, WS, NB, sc_ptr, zr_ptr, qs_ptr, qz_ptr, ss_ptr, zs_ptr,
               CPW: tl.constexpr, C0: tl.constexpr, CP: tl.constexpr, STAT_BITS: tl.constexpr,
               BETA2: tl.constexpr, WORD_STATS: tl.constexpr):
    """fp32 ``(scale, zero * scale)`` ``[KW, BW, CP]`` of rows ``n`` ``[1, BW, CP]`` in groups ``g`` ``[KW, BW, 1]``."""
    if WORD_STATS:
        b0 = (offs_w * CPW) // BETA2  # [1, BW, 1] second-level block of the word's first row
        st0 = g * NB + b0
        ok1 = ok & (b0 + 1 < NB)
        s = word_stat(qs_ptr, ss_ptr, G * NB, g, WS, offs_w, st0, ok, ok1, second, one, C0, CP, STAT_BITS)
        z = word_stat(qz_ptr, zs_ptr, G * NB, g, WS, offs_w, st0, ok, ok1, second, one, C0, CP, STAT_BITS)
        zs = z * s
    else:
        s, zs = group_stats(g, n, (n < N) & ok, N, G, WS, NB, sc_ptr, zr_ptr, qs_ptr, qz_ptr, ss_ptr, zs_ptr,
                            STAT_BITS, BETA2)
    return s, zs


def stat_args(pw, dummy) -> tuple:  # noqa: ANN001 (PackedWeight, torch.Tensor)
    """The six stats pointers in kernel order; absent ones are replaced by ``dummy`` (never read)."""
    t = pw.tensors
    return tuple(t.get(k, dummy) for k in ("scales", "zeros", "qscale", "qzero", "scale_stats", "zero_stats"))


def layout_args(pw) -> tuple[tuple[int, int, int, int], dict[str, int]]:  # noqa: ANN001 (PackedWeight)
    """What every kernel launch derives from the layout: ``(W, WS, G, NB)`` and the shared constexprs.

    ``W``/``WS`` are the code/stat word columns, ``G`` the groups, ``NB`` the second-level row blocks; the
    constexprs are ``WBITS, CPW, CP1, CP2, GS, GS_T, STAT_BITS, BETA2`` and the decode choices ``WINDOW``
    (``window_fits``) and ``WORD_STATS`` (stat codes packed like the codes, one stat word per code word).
    """
    t = pw.tensors
    cpw = 32 // pw.wbits
    cp1, cp2 = split_slots(cpw)
    beta2 = max(pw.beta2, 1)
    sizes = (t["qweight"].shape[1], t["qscale"].shape[1] if "qscale" in t else 1, pw.num_groups,
             -(-pw.out_features // beta2))
    meta = {"WBITS": pw.wbits, "CPW": cpw, "CP1": cp1, "CP2": cp2, "GS": pw.groupsize,
            "GS_T": tile_k(pw.groupsize), "STAT_BITS": pw.stat_bits, "BETA2": beta2,
            "WINDOW": window_fits(pw.wbits), "WORD_STATS": pw.stat_bits == pw.wbits and cpw <= beta2}
    return sizes, meta


def tile_k(groupsize: int, max_sub: int = 32) -> int:
    """Columns per k-sub-tile: the largest power of two <= ``max_sub`` dividing the group size (>= 16)."""
    if groupsize % 16:
        raise ValueError(f"the kernels need groups of a multiple of 16 columns, got {groupsize}")
    sub = 16
    while sub < max_sub and groupsize % (sub * 2) == 0:
        sub *= 2
    return sub

