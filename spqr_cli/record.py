"""The quantizer's per-layer result (``QuantizedLayer``) and the one function that decodes it.

This is the contract between the algorithm (``spqr.py``), the packer (``pack.py``) and the kernels: every dense
weight the tool ever reports is produced by ``QuantizedLayer.dequantize``, so "unpack is bit-exact with the
quantizer" holds by construction.

Decoding, for output row ``n`` and *permuted* column ``j`` (original column ``perm[j]``), group ``g = j // gs``:

    stat_bits == 16:  s = scale[n, g]                      z = zero[n, g]                       (fp16 -> fp32)
    stat_bits  < 16:  s = ss[n // b2, g, 0] * (scale_codes[n, g] - ss[n // b2, g, 1])
                      z = zs[n // b2, g, 0] * (zero_codes[n, g]  - zs[n // b2, g, 1])      (fp32 from fp16 stats)
    w[n, perm[j]] = fp16( s * (codes[n, j] - z) )            (computed in fp32, rounded once)
    outliers overwrite: w[n, col] = outlier_val               (col is an *original* column index)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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

    def dequantize(self) -> torch.Tensor:
        """The fp16 ``[N, K]`` weight in original column order, outliers included (bit-exact contract)."""
        w = self.dequantize_permuted().to(torch.float16)
        if self.perm is not None:
            dense = torch.empty_like(w)
            dense[:, self.perm] = w
            w = dense
        if self.nnz:
            rows = torch.repeat_interleave(
                torch.arange(self.out_features, device=w.device),
                (self.outlier_row_ptr[1:] - self.outlier_row_ptr[:-1]).long(),
            )
            w[rows, self.outlier_col.long()] = self.outlier_val.to(torch.float16)
        return w

    def formula_bits(self) -> float:
        """Average bits per parameter by the formula (codes + stats + outliers at 32 bits + permutation)."""
        gs = self.groupsize
        if self.stat_bits == 16:
            stats = 32.0 / gs
        else:
            stats = 2 * self.stat_bits / gs + 2 * 2 * 16 / (gs * self.beta2)
        perm = 32.0 / self.out_features if self.perm is not None else 0.0
        return self.wbits + stats + 32.0 * self.outlier_fraction + perm

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

    @classmethod
    def from_tensors(cls, meta: dict[str, int], tensors: dict[str, torch.Tensor], prefix: str = "") -> QuantizedLayer:
        fields = {name: tensors.get(prefix + name) for name in RECORD_FIELDS}
        return cls(**meta, **fields)


def save_records(path: str, records: dict[str, QuantizedLayer], extra_meta: dict[str, str] | None = None) -> None:
    """Write layer records to one safetensors file atomically (temp file + rename); metadata holds the shapes."""
    import json
    import os

    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, rec in records.items():
        tensors.update(rec.to_tensors(prefix=f"{name}."))
    meta = {"layers": json.dumps({name: rec.meta() for name, rec in records.items()})}
    meta.update(extra_meta or {})
    tmp = f"{path}.tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def load_records(path: str) -> dict[str, QuantizedLayer]:
    """Read layer records written by ``save_records`` (safetensors only: no pickle)."""
    import json

    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metas = json.loads(f.metadata()["layers"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    return {name: QuantizedLayer.from_tensors(meta, tensors, prefix=f"{name}.") for name, meta in metas.items()}
