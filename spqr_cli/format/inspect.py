"""``inspect_packed``: sizes, bits per parameter (measured from the bytes and by the formula), outliers and
checksum status of a packed checkpoint, per layer and in total."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from spqr_cli.core.errors import SpQRError
from spqr_cli.format.checkpoint import FORMAT_NAME, FORMAT_VERSION, PackedCheckpoint, tensor_sha256
from spqr_kernels.layout import formula_bits


def inspect_packed(packed_dir: str | Path, verify: bool = True) -> dict[str, Any]:
    """Per-layer and total sizes, bits/param (measured from bytes and by formula), outliers and checksum status.

    Measured bits of a layer = 8 x (bytes of its packed tensors) / (out x in); the formula is
    ``spqr_kernels.layout.formula_bits``. The whole-checkpoint figure divides the shard files' size on disk (headers
    included) by every parameter of the model (tied embeddings once). Checksum failures are reported, not raised.
    """
    ckpt = PackedCheckpoint(packed_dir, verify=verify)  # config checksums are fatal; tensor ones are reported
    ckpt.verify = False
    rows, bad = [], []
    q_params = q_bytes = q_nnz = 0
    q_formula_bits = 0.0
    for name, meta in ckpt.layers.items():
        status = "skipped"
        try:
            pw = ckpt.load_layer(name)
            if verify:
                mismatched = [t for t, v in pw.tensors.items() if tensor_sha256(v) != meta["tensors"][t]["sha256"]]
                status = "ok" if not mismatched else f"MISMATCH ({', '.join(mismatched)})"
        except SpQRError as e:
            status = f"ERROR ({e})"
            pw = None
        if status != "ok" and status != "skipped":
            bad.append(name)
        n, k = meta["out_features"], meta["in_features"]
        nbytes = sum(math.prod(t["shape"]) * torch.empty((), dtype=getattr(torch, t["dtype"])).element_size()
                     for t in meta["tensors"].values()) if pw is None else pw.nbytes()
        fbits = formula_bits(meta["wbits"], meta["groupsize"], meta["beta2"], meta["stat_bits"], n,
                             meta["nnz"] / (n * k), meta["has_perm"])
        rows.append({
            "name": name, "shape": [n, k], "wbits": meta["wbits"], "groupsize": meta["groupsize"],
            "beta2": meta["beta2"], "stat_bits": meta["stat_bits"], "nnz": meta["nnz"],
            "outlier_pct": 100.0 * meta["nnz"] / (n * k), "has_perm": meta["has_perm"], "bytes": nbytes,
            "bits_measured": 8.0 * nbytes / (n * k), "bits_formula": fbits, "checksum": status,
        })
        q_params += n * k
        q_bytes += nbytes
        q_nnz += meta["nnz"]
        q_formula_bits += fbits * n * k
    dense_params = dense_bytes = 0
    dense_bad = []
    for name, info in ckpt.dense.items():
        dense_params += math.prod(info["shape"])
        dense_bytes += math.prod(info["shape"]) * 2
        if verify:
            try:
                ok = tensor_sha256(ckpt.load_dense(name)) == info["sha256"]
            except SpQRError:
                ok = False
            if not ok:
                dense_bad.append(name)
    ckpt.close()
    disk = sum((ckpt.path / s).stat().st_size for s in ckpt.shards)
    total_params = q_params + dense_params
    fp16_bytes = 2 * total_params
    return {
        "path": str(ckpt.path), "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "source_model": ckpt.config.get("source_model"), "quant_config": ckpt.config.get("quant_config"),
        "layers": rows,
        "totals": {
            "quantized_layers": len(rows), "quantized_params": q_params, "quantized_bytes": q_bytes,
            "quantized_bits_measured": 8.0 * q_bytes / q_params if q_params else 0.0,
            "quantized_bits_formula": q_formula_bits / q_params if q_params else 0.0,
            "outlier_pct": 100.0 * q_nnz / q_params if q_params else 0.0,
            "dense_params": dense_params, "dense_bytes": dense_bytes, "total_params": total_params,
            "disk_bytes": disk, "fp16_bytes": fp16_bytes,
            "bits_per_param": 8.0 * disk / total_params if total_params else 0.0,
            "compression_ratio": fp16_bytes / disk if disk else 0.0,
        },
        "checksums": "skipped" if not verify else ("ok" if not bad and not dense_bad else "FAILED"),
        "failed": bad + dense_bad,
    }
