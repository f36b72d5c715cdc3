"""The quantizer's per-layer result (``QuantizedLayer``) and the one function that decodes it.

This is the contract between the methods (``quant/methods/``), the packer (``format/pack.py``) and the kernels:
every dense weight the tool ever reports is produced by this decode (``QuantizedLayer.dequantize``, or
``spqr_kernels.decode.dequantize_fp16`` from the packed buffers, tested equal), so "unpack is bit-exact with the
quantizer" holds by construction.

Decoding, for output row ``n`` and *permuted* column ``j`` (original column ``perm[j]``), group ``g = j // gs``:

    stat_bits == 16:  s = scale[n, g]                      z = zero[n, g]                       (fp16 -> fp32)
    stat_bits  < 16:  s = ss[n // b2, g, 0] * (scale_codes[n, g] - ss[n // b2, g, 1])
                      z = zs[n // b2, g, 0] * (zero_codes[n, g]  - zs[n // b2, g, 1])      (fp32 from fp16 stats)
    w[n, perm[j]] = fp16( s * (codes[n, j] - z) )            (computed in fp32, rounded once)
    outliers overwrite: w[n, col] = outlier_val               (col is an *original* column index)
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from spqr_kernels.layout import PackedWeight, formula_bits, pack_rows, packed_nbytes, unpack_rows

RECORD_FIELDS = (
    "codes", "scale", "zero", "scale_codes", "zero_codes", "scale_stats", "zero_stats",
    "perm", "outlier_row_ptr", "outlier_col", "outlier_val",
)


@dataclass
class QuantizedLayer:
    """One linear layer after quantization, in plain (unpacked) tensors.

    Shapes, for a weight of ``(out_features, in_features) = (N, K)``, ``G = K // groupsize`` groups and
    ``NB = ceil(N / beta2)`` row blocks:

    - ``codes``: uint8 ``[N, K]``, columns in permuted order.
    - fp16 stats (``stat_bits == 16``): ``scale``, ``zero``: fp16 ``[N, G]``.
    - quantized stats: ``scale_codes``, ``zero_codes``: uint8 ``[N, G]``; ``scale_stats``, ``zero_stats``:
      fp16 ``[NB, G, 2]`` holding (scale, zero) of the second-level quantizer.
    - ``perm``: int64 ``[K]`` (``None`` for identity): permuted column ``j`` is original column ``perm[j]``.
    - outliers in CSR over rows: ``outlier_row_ptr`` int32 ``[N + 1]``, ``outlier_col`` int32 ``[nnz]``
      (original column index, ascending within a row), ``outlier_val`` fp16 ``[nnz]``.
    """

    out_features: int
    in_features: int
    wbits: int
    groupsize: int
    beta2: int
    stat_bits: int
    codes: torch.Tensor
    outlier_row_ptr: torch.Tensor
    outlier_col: torch.Tensor
    outlier_val: torch.Tensor
    perm: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    scale_codes: torch.Tensor | None = None
    zero_codes: torch.Tensor | None = None
    scale_stats: torch.Tensor | None = None
    zero_stats: torch.Tensor | None = None

    @property
    def num_groups(self) -> int:
        return self.in_features // self.groupsize

    @property
    def nnz(self) -> int:
        return int(self.outlier_val.numel())

    @property
    def outlier_fraction(self) -> float:
        return self.nnz / (self.out_features * self.in_features)

    def stats_fp32(self) -> tuple[torch.Tensor, torch.Tensor]:
        """First-level (scale, zero) per ``[N, G]`` in fp32, decoded from the second level when quantized."""
        if self.stat_bits == 16:
            return self.scale.float(), self.zero.float()
        rows = torch.arange(self.out_features, device=self.codes.device) // self.beta2

        def decode(codes: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
            st = stats.float()[rows]  # [N, G, 2]
            return st[..., 0] * (codes.float() - st[..., 1])

        return decode(self.scale_codes, self.scale_stats), decode(self.zero_codes, self.zero_stats)

    def dequantize_permuted(self) -> torch.Tensor:
        """fp32 ``[N, K]`` dense weight in *permuted* column order, outliers not applied."""
        s, z = self.stats_fp32()
        s = s.repeat_interleave(self.groupsize, dim=1)
        z = z.repeat_interleave(self.groupsize, dim=1)
        return s * (self.codes.float() - z)

    def dequantize(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """The ``[N, K]`` weight in original column order, outliers included: the fp32 decode rounded once to
        ``dtype``. fp16 is the bit-exact contract; fp32 over trainable statistics is the block fine-tune's
        differentiable decode (``quant.tune``), which rounds to this exactly."""
        w = self.dequantize_permuted().to(dtype)
        if self.perm is not None:
            dense = torch.empty_like(w)
            dense[:, self.perm] = w
            w = dense
        if self.nnz:
            rows = torch.repeat_interleave(
                torch.arange(self.out_features, device=w.device),
                (self.outlier_row_ptr[1:] - self.outlier_row_ptr[:-1]).long(),
            )
            w[rows, self.outlier_col.long()] = self.outlier_val.to(dtype)
        return w

    def formula_bits(self) -> float:
        """Average bits per parameter by the format's formula (``spqr_kernels.layout.formula_bits``)."""
        return formula_bits(self.wbits, self.groupsize, self.beta2, self.stat_bits, self.out_features,
                            self.outlier_fraction, self.perm is not None)

    def packed_bits(self) -> float:
        """Bits per parameter of this layer's packed tensors (``spqr_kernels.layout.packed_nbytes``: what ``spqr
        inspect`` measures once packed, and what ``--target-bits`` budgets)."""
        nbytes = packed_nbytes(self.wbits, self.groupsize, self.beta2, self.stat_bits, self.out_features,
                               self.in_features, self.nnz, self.perm is not None)
        return 8 * nbytes / (self.out_features * self.in_features)

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flat dict for safetensors (absent optional fields are skipped)."""
        out = {}
        for name in RECORD_FIELDS:
            t = getattr(self, name)
            if t is not None:
                out[prefix + name] = t.contiguous().cpu()
        return out

    def meta(self) -> dict[str, int]:
        return {
            "out_features": self.out_features, "in_features": self.in_features, "wbits": self.wbits,
            "groupsize": self.groupsize, "beta2": self.beta2, "stat_bits": self.stat_bits,
        }

    def pack(self) -> PackedWeight:
        """Bit-pack this record into the kernel layout of ``spqr_kernels.layout`` (lossless)."""
        if self.in_features > 65536:
            raise ValueError(f"in_features {self.in_features} > 65536 cannot be packed: outlier columns are 16-bit")
        t: dict[str, torch.Tensor] = {
            "qweight": pack_rows(self.codes, self.wbits),
            "outlier_row_ptr": self.outlier_row_ptr.to(torch.int32),
            "outlier_col": self.outlier_col.to(torch.int32).to(torch.int16),  # wraps above 32767: read unsigned
            "outlier_val": self.outlier_val.to(torch.float16),
        }
        if self.perm is not None:
            t["perm"] = self.perm.to(torch.int32)
        if self.stat_bits == 16:
            t["scales"] = self.scale.t().contiguous().to(torch.float16)
            t["zeros"] = self.zero.t().contiguous().to(torch.float16)
        else:
            t["qscale"] = pack_rows(self.scale_codes, self.stat_bits)
            t["qzero"] = pack_rows(self.zero_codes, self.stat_bits)
            t["scale_stats"] = self.scale_stats.permute(2, 1, 0).contiguous().to(torch.float16)
            t["zero_stats"] = self.zero_stats.permute(2, 1, 0).contiguous().to(torch.float16)
        return PackedWeight(**self.meta(), tensors={k: v.contiguous().cpu() for k, v in t.items()})

    @classmethod
    def from_packed(cls, pw: PackedWeight) -> QuantizedLayer:
        """Inverse of ``pack``: exact reconstruction of the record from the packed buffers."""
        t = {k: v.cpu() for k, v in pw.tensors.items()}
        n = pw.out_features
        fields: dict[str, torch.Tensor | None] = {
            "codes": unpack_rows(t["qweight"], pw.wbits, n).to(torch.uint8),
            "outlier_row_ptr": t["outlier_row_ptr"].to(torch.int32),
            "outlier_col": (t["outlier_col"].to(torch.int32) & 0xFFFF),
            "outlier_val": t["outlier_val"],
            "perm": t["perm"].to(torch.int64) if "perm" in t else None,
        }
        if pw.stat_bits == 16:
            fields["scale"] = t["scales"].t().contiguous()
            fields["zero"] = t["zeros"].t().contiguous()
        else:
            fields["scale_codes"] = unpack_rows(t["qscale"], pw.stat_bits, n).to(torch.uint8)
            fields["zero_codes"] = unpack_rows(t["qzero"], pw.stat_bits, n).to(torch.uint8)
            fields["scale_stats"] = t["scale_stats"].permute(2, 1, 0).contiguous()
            fields["zero_stats"] = t["zero_stats"].permute(2, 1, 0).contiguous()
        return cls(**pw.meta(), **fields)

    @classmethod
    def from_tensors(cls, meta: dict[str, int], tensors: dict[str, torch.Tensor], prefix: str = "") -> QuantizedLayer:
        fields = {name: tensors.get(prefix + name) for name in RECORD_FIELDS}
        return cls(**meta, **fields)


def save_records(path: str, records: dict[str, QuantizedLayer], extra_meta: dict[str, str] | None = None,
                 block_tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write layer records to one safetensors file atomically; metadata holds the shapes. ``block_tensors``: other
    tensors of the block saved beside them under their own names (the block fine-tune's trained norms,
    ``read_record_file``)."""
    from spqr_cli.core.io import save_safetensors

    tensors: dict[str, torch.Tensor] = {k: v.contiguous().cpu() for k, v in (block_tensors or {}).items()}
    for name, rec in records.items():
        tensors.update(rec.to_tensors(prefix=f"{name}."))
    meta = {"layers": json.dumps({name: rec.meta() for name, rec in records.items()})}
    meta.update(extra_meta or {})
    save_safetensors(tensors, path, metadata=meta)


def read_record_file(path: str) -> tuple[dict[str, QuantizedLayer], dict[str, torch.Tensor], dict[str, str]]:
    """Everything ``save_records`` wrote, in one read (safetensors only: no pickle): the layer records, the other
    ``block_tensors`` (empty for files written without any) and the metadata."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    layers = json.loads(meta["layers"])
    records = {name: QuantizedLayer.from_tensors(m, tensors, prefix=f"{name}.") for name, m in layers.items()}
    fields = {f"{name}.{field}" for name in layers for field in RECORD_FIELDS}
    return records, {k: t for k, t in tensors.items() if k not in fields}, meta


def load_records(path: str) -> dict[str, QuantizedLayer]:
    """The layer records of a file written by ``save_records``."""
    return read_record_file(path)[0]
