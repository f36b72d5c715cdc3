"""The packed weight layout shared by ``spqr pack`` (writer), the runtime (loader) and the Triton kernels.

Bit packing runs along the *output* dimension N: ``cpw = 32 // bits`` codes of consecutive output rows share one
int32 word, and words are stored ``[X, ceil(N / cpw)]`` row-major (``pack_rows``). So code ``(n, k)`` sits in
word ``[k, n // cpw]`` at bit offset ``(n % cpw) * bits``. Why along N:

- a kernel tile is a plain 2-D load ``[BLOCK_K, BLOCK_W]`` of contiguous words (large coalesced loads, many bytes
  in flight, which is what a memory-bound matvec needs);
- shifting a whole tile by ``c * bits`` yields the codes of the output rows ``n = word * cpw + c`` for *every*
  k of the tile at once, so the K axis keeps its natural power-of-two tiling and groups of β1 columns never
  straddle a word, whatever ``cpw`` is (10 for 3-bit: 3.2 bits per code, 2 bits of each word spare);
- first-level statistics are packed the same way along N, so one shift decodes them for the same rows.

Per linear layer of shape ``(N, K)`` with groups of ``gs`` columns (``G = K // gs``), ``NB = ceil(N / beta2)``,
``W = ceil(N / cpw)``, ``WS = ceil(N / cps)`` with ``cps = 32 // stat_bits``:

=================  =======================  ==========================================================
tensor             dtype / shape            meaning
=================  =======================  ==========================================================
qweight            int32 ``[K, W]``         weight codes (column k in permuted order), ``wbits`` each
qscale, qzero      int32 ``[G, WS]``        first-level stats codes, ``stat_bits`` each (quantized stats)
scale_stats        fp16 ``[2, G, NB]``      second-level (scale, zero) of the scale quantizer
zero_stats         fp16 ``[2, G, NB]``      second-level (scale, zero) of the zero quantizer
scales, zeros      fp16 ``[G, N]``          first-level stats when ``stat_bits == 16`` (GPTQ/RTN)
perm               int32 ``[K]``            permuted column j reads input feature perm[j] (absent: identity)
outlier_row_ptr    int32 ``[N + 1]``        CSR row pointers of the outliers
outlier_col        int16 ``[nnz]``          original input column (read as unsigned 16-bit)
outlier_val        fp16 ``[nnz]``           the outlier weight itself (not a residual)
=================  =======================  ==========================================================
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

PACKED_TENSORS = (
    "qweight", "qscale", "qzero", "scale_stats", "zero_stats", "scales", "zeros",
    "perm", "outlier_row_ptr", "outlier_col", "outlier_val",
)


def codes_per_word(bits: int) -> int:
    if not 1 <= bits <= 16:
        raise ValueError(f"cannot pack {bits}-bit codes")
    return 32 // bits


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a ``[K, N]`` tensor of unsigned ``bits``-wide codes into int32 words along dim 0."""
    if codes.dim() != 2:
        raise ValueError(f"pack_bits expects a 2-D tensor, got shape {tuple(codes.shape)}")
    cpw = codes_per_word(bits)
    k, n = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits")
    words = -(-k // cpw)
    padded = torch.zeros(words * cpw, n, dtype=torch.int64, device=codes.device)
    padded[:k] = c
    shifts = (torch.arange(cpw, device=codes.device, dtype=torch.int64) * bits).view(1, cpw, 1)
    packed = (padded.view(words, cpw, n) << shifts).sum(dim=1)
    # int64 -> int32 with wrap-around (bit 31 becomes the sign bit)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_bits(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: int32 ``[ceil(rows/cpw), N]`` -> int64 codes ``[rows, N]``."""
    cpw = codes_per_word(bits)
    w = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(cpw, device=packed.device, dtype=torch.int64) * bits).view(1, cpw, 1)
    codes = (w.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1, packed.shape[1])[:rows]


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[N, X]`` codes along N: int32 ``[X, ceil(N / cpw)]`` (row n in word n // cpw, see module doc)."""
    return pack_bits(codes, bits).t().contiguous()


def unpack_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of ``pack_rows``: int32 ``[X, W]`` -> int64 codes ``[rows, X]``."""
    return unpack_bits(packed.t(), bits, rows)


def formula_bits(wbits: int, groupsize: int, beta2: int, stat_bits: int, out_features: int,
                 outlier_fraction: float = 0.0, has_perm: bool = False) -> float:
    """Average bits per weight by the format's formula: the one definition every report uses.

    ``wbits`` per code; per group of ``groupsize`` columns either an fp16 scale and zero (``stat_bits == 16``) or
    two ``stat_bits`` codes plus their share of the fp16 second-level (scale, zero) pairs of each statistic,
    which cover ``beta2`` rows; 32 bits per outlier (fp16 value + 16-bit column; the CSR row pointers are not
    counted); a 32-bit permutation index per input column, shared by the layer's ``out_features`` rows.
    """
    if stat_bits == 16:
        stats = 32.0 / groupsize
    else:
        stats = 2 * stat_bits / groupsize + 2 * 2 * 16 / (groupsize * beta2)
    perm = 32.0 / out_features if has_perm else 0.0
    return wbits + stats + 32.0 * outlier_fraction + perm


def packed_nbytes(wbits: int, groupsize: int, beta2: int, stat_bits: int, out_features: int, in_features: int,
                  nnz: int = 0, has_perm: bool = False) -> int:
    """Bytes of a layer's packed tensors (the table in the module docstring): what ``PackedWeight.nbytes`` counts
    and ``spqr inspect`` reports as measured bits, known before quantizing (``--target-bits`` budgets with it).

    Unlike ``formula_bits`` it counts the storage as laid out: codes in whole int32 words (``32 // bits`` each, so
    3-bit codes take 3.2 bits), the CSR row pointers and a 32-bit permutation index per input column.
    """
    n, k = out_features, in_features
    words = k * -(-n // codes_per_word(wbits))
    groups = k // groupsize
    if stat_bits == 16:
        stats = 2 * 2 * groups * n
    else:
        stats = 2 * 4 * groups * -(-n // codes_per_word(stat_bits)) + 2 * 2 * 2 * groups * -(-n // max(beta2, 1))
    return 4 * words + stats + 4 * (n + 1) + 4 * nnz + (4 * k if has_perm else 0)


@dataclass
class PackedWeight:
    """One layer's packed buffers plus its shape metadata (see the module docstring for the layout)."""

    out_features: int
    in_features: int
    wbits: int
    groupsize: int
    beta2: int
    stat_bits: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    # ready-to-replay kernel launches of this object's tensors, filled and read by the kernels
    # (``matvec.DecodeReplay``); runtime state, never saved
    launches: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_groups(self) -> int:
        return self.in_features // self.groupsize

    @property
    def nnz(self) -> int:
        v = self.tensors.get("outlier_val")
        return 0 if v is None else int(v.numel())

    def get(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)

    # ``launches`` belongs to these very tensors (a replayed launch holds their addresses): a copy or an unpickled
    # object starts without, and makes its own on its first calls
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "launches"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, launches={})

    def __deepcopy__(self, memo: dict) -> PackedWeight:
        return PackedWeight(**self.meta(), tensors=copy.deepcopy(self.tensors, memo))

    def meta(self) -> dict[str, int]:
        return {
            "out_features": self.out_features, "in_features": self.in_features, "wbits": self.wbits,
            "groupsize": self.groupsize, "beta2": self.beta2, "stat_bits": self.stat_bits,
        }

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def formula_bits(self) -> float:
        """Bits per weight by ``formula_bits`` (measured bits are ``8 * nbytes() / (N * K)``)."""
        return formula_bits(self.wbits, self.groupsize, self.beta2, self.stat_bits, self.out_features,
                            self.nnz / (self.out_features * self.in_features), "perm" in self.tensors)

    def to(self, device: torch.device | str) -> PackedWeight:
        return PackedWeight(**self.meta(), tensors={k: v.to(device) for k, v in self.tensors.items()})


def _cat_packed_rows(parts: list[torch.Tensor], rows: list[int], bits: int,
                     chunk_bytes: int = 32 << 20) -> torch.Tensor:
    """Concatenate ``pack_rows`` tensors ``[X, W_i]`` of ``rows[i]`` rows each along N, exactly.

    Rows are re-packed (a member's last word may be partial: 4096 rows are 409.6 words of 10 3-bit codes), a slice
    of the X axis at a time so that each int64 temporary stays under ``chunk_bytes``: this runs on the GPU next to
    a loaded model (a 33B model under a 24 GB cap ran out of memory with 280 MB temporaries).
    """
    x = parts[0].shape[0]
    out = torch.empty(x, -(-sum(rows) // codes_per_word(bits)), dtype=torch.int32, device=parts[0].device)
    chunk = max(1, chunk_bytes // (8 * sum(rows)))
    for a in range(0, x, chunk):
        codes = torch.cat([unpack_rows(p[a:a + chunk], bits, r) for p, r in zip(parts, rows, strict=True)])
        out[a:a + chunk] = pack_rows(codes, bits)
    return out


def concat_rows(pws: list[PackedWeight]) -> PackedWeight:
    """One ``PackedWeight`` whose output rows are those of ``pws`` in order (sibling layers with one input, e.g.
    q/k/v: one kernel launch instead of three). Exact: the result decodes to the members' rows, bit for bit.

    The members must share the input width, the layout parameters and the input permutation (GPTQ's act-order
    comes from the input's Hessian, so layers fed the same activations have the same one), and every member but
    the last must have a multiple of ``beta2`` rows (second-level statistics cover blocks of ``beta2`` rows).
    Raises ``ValueError`` otherwise.
    """
    first = pws[0]
    meta = {k: v for k, v in first.meta().items() if k != "out_features"}
    for pw in pws[1:]:
        other = {k: v for k, v in pw.meta().items() if k != "out_features"}
        if other != meta or set(pw.tensors) != set(first.tensors):
            raise ValueError(f"cannot concatenate layers with different layouts: {meta} vs {other}")
        if "perm" in pw.tensors and not torch.equal(pw.tensors["perm"], first.tensors["perm"]):
            raise ValueError("cannot concatenate layers with different input permutations")
    rows = [pw.out_features for pw in pws]
    if first.stat_bits != 16 and any(r % first.beta2 for r in rows[:-1]):
        raise ValueError(f"cannot concatenate layers of {rows} rows: second-level blocks are {first.beta2} rows")
    t = [pw.tensors for pw in pws]
    out = {"qweight": _cat_packed_rows([m["qweight"] for m in t], rows, first.wbits)}
    for name in ("qscale", "qzero"):
        if name in first.tensors:
            out[name] = _cat_packed_rows([m[name] for m in t], rows, first.stat_bits)
    for name, dim in (("scale_stats", 2), ("zero_stats", 2), ("scales", 1), ("zeros", 1)):
        if name in first.tensors:
            out[name] = torch.cat([m[name] for m in t], dim=dim)
    if "perm" in first.tensors:
        out["perm"] = first.tensors["perm"]
    ptrs, offset = [], 0
    for m in t:
        ptrs.append(m["outlier_row_ptr"][:-1] + offset)
        offset += int(m["outlier_row_ptr"][-1])
    out["outlier_row_ptr"] = torch.cat([*ptrs, ptrs[0].new_tensor([offset])])
    for name in ("outlier_col", "outlier_val"):
        out[name] = torch.cat([m[name] for m in t])
    return PackedWeight(out_features=sum(rows), **meta, tensors=out)
