"""A runtime tile layout of a packed layer, built once on the GPU for the fused many-token GEMM (``gemm.py``).

The on-disk layout (``layout.py``) packs codes along the output dimension N, ``32 // bits`` per word (10 for 3-bit
codes), with their statistics quantized again in blocks of ``beta2`` rows. That suits the decode kernel, which
reads each code once; a tensor-core GEMM wants the weight as the dot's right operand ``W^T[k, n]``, a ``[BK, BN]``
tile whose elements it decodes each on its own (the earlier fused attempt decoded whole words into 4-D tensors and
spent ~100 instructions per weight on the layout changes, ``benchmarks/k2_fused_gemm``). So at load time:

=================  =======================  ==========================================================
tensor             dtype / shape            meaning
=================  =======================  ==========================================================
codes              int32 ``[K / EPW, N]``   code of ``(n, j)`` (``j``: permuted column) in word ``[j // EPW, n]``
                                            at bit ``(j % EPW) * SLOT``; ``SLOT`` = 4 (EPW 8) for codes of up to
                                            4 bits, 8 (EPW 4) up to 8 bits
scale, zs          fp16 ``[G, N]``          the group's scale ``s`` and ``s * z``: ``w = q s - zs``
=================  =======================  ==========================================================

A tile element computes its own word address and shift, words being contiguous along N (wide loads), and the
statistics come whole, with no second-level decode per weight. The input permutation and the outliers stay as
stored (the kernel reads ``x`` through ``gemm.step_perm``; the outliers are added by ``outlier_epilogue.py``).

Cost: 4 + 2 bits per weight for 3-bit codes in groups of 16 (the on-disk layout is ~4.2), kept beside the
on-disk tensors (the decode kernel reads those) while the layer lives: ``tiles_for`` builds it on the first
many-token call and caches it with the layer's other runtime tensors (``outliers.prepare``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spqr_kernels.decode import decode_stats
from spqr_kernels.layout import PackedWeight, pack_bits, unpack_rows
from spqr_kernels.outliers import prepare


@dataclass(frozen=True)
class Tiles:
    codes: torch.Tensor
    scale: torch.Tensor
    zs: torch.Tensor
    slot: int
    groupsize: int

    @property
    def per_word(self) -> int:
        return 32 // self.slot

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zs))


def slot_bits(wbits: int) -> int:
    """Bits a code takes in the tile layout: 4 or 8 (a power of two, so that a word holds a power of two)."""
    if wbits <= 4:
        return 4
    if wbits <= 8:
        return 8
    raise ValueError(f"the fused GEMM takes codes of up to 8 bits, got {wbits}")


def build_tiles(pw: PackedWeight, chunk_bytes: int = 256 << 20) -> Tiles:
    """The tile layout of ``pw`` (same device): the codes exactly, the statistics rounded to fp16.

    Codes are moved a slice of output rows at a time, so that the int64 temporaries stay under ``chunk_bytes``
    next to a loaded model.
    """
    n, k = pw.out_features, pw.in_features
    slot = slot_bits(pw.wbits)
    if k % (32 // slot) or pw.groupsize % 16:
        raise ValueError(f"no tile layout for {n}x{k} in groups of {pw.groupsize}")
    qweight = pw.tensors["qweight"]
    codes = torch.empty(k // (32 // slot), n, dtype=torch.int32, device=qweight.device)
    cpw = 32 // pw.wbits
    rows = max(cpw, chunk_bytes // (16 * k) // cpw * cpw)  # whole words of the on-disk layout per slice
    for r0 in range(0, n, rows):
        part = unpack_rows(qweight[:, r0 // cpw : (r0 + rows) // cpw + 1], pw.wbits, min(rows, n - r0))  # [R, K]
        codes[:, r0 : r0 + part.shape[0]] = pack_bits(part.t(), slot)
    s, z = decode_stats(pw)
    return Tiles(codes=codes, scale=s.half().contiguous(), zs=(s * z).half().contiguous(), slot=slot,
                 groupsize=pw.groupsize)


def tiles_for(pw: PackedWeight) -> Tiles:
    """``pw``'s tile layout, built on the first call and kept with its runtime tensors."""
    rt = prepare(pw)
    tiles = rt.get("tiles")
    if tiles is None:
        rt["tiles"] = tiles = build_tiles(pw)
    return tiles


def dequantize_tiles(t: Tiles) -> torch.Tensor:
    """fp32 ``W^T`` ``[K, N]`` in permuted column order, without outliers (the torch reference of the layout)."""
    k = t.codes.shape[0] * t.per_word
    shifts = (torch.arange(k, device=t.codes.device) % t.per_word * t.slot).view(-1, 1)
    words = t.codes.to(torch.int64).repeat_interleave(t.per_word, dim=0) & 0xFFFFFFFF
    q = ((words >> shifts) & ((1 << t.slot) - 1)).float()
    g = torch.arange(k, device=t.codes.device) // t.groupsize
    return q * t.scale.float()[g] - t.zs.float()[g]
