"""Writing packed checkpoints: ``pack_model`` (quantization directory -> packed directory) and ``unpack_model``
(packed directory -> dense fp16 Hugging Face checkpoint, bit-exact with the quantizer's weights).

Both stream (one record file or layer and one shard's worth of tensors in memory at a time) and write into a
temporary directory beside the output that is renamed at the end, so an interrupted run never leaves a
half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from spqr_cli.core.errors import SpQRError
from spqr_cli.core.io import read_json
from spqr_cli.format.checkpoint import (
    CONFIG_NAME,
    DEFAULT_SHARD_MB,
    FORMAT_NAME,
    FORMAT_VERSION,
    MODEL_FILES,
    PackedCheckpoint,
    config_checksum,
    file_sha256,
    model_fingerprint,
    tensor_info,
)
from spqr_cli.quant.record import QuantizedLayer, load_records


def _prepare_out_dir(out_dir: Path, overwrite: bool, source: Path) -> Path:
    """A fresh temp dir beside ``out_dir`` (same file system, so the final rename is atomic).

    ``out_dir`` may not be, contain or lie inside ``source``: --overwrite would otherwise delete the input.
    """
    src, dst = source.resolve(), out_dir.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise SpQRError(f"output {out_dir} overlaps the input {source}; choose an output outside it")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise SpQRError(f"output {out_dir} already exists and is not empty; pass --overwrite or choose another path")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))


def _finish_out_dir(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        if out_dir.is_dir():
            shutil.rmtree(out_dir)
        else:
            out_dir.unlink()
    os.replace(tmp, out_dir)


class _ShardWriter:
    """Streams tensors into size-capped safetensors shards; final names are assigned once the count is known."""

    def __init__(self, directory: Path, max_bytes: int, prefix: str = "model") -> None:
        self.directory, self.max_bytes, self.prefix = directory, max_bytes, prefix
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[Path] = []
        self.shard_of: dict[str, int] = {}
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = t.contiguous().cpu()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes
        self.shard_of[name] = len(self.files)

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.directory / f".shard-{len(self.files):05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append(path)
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> dict[str, str]:
        """Rename the shards to ``<prefix>-0000i-of-0000N.safetensors``; return tensor name -> shard file name."""
        self.flush()
        total = len(self.files)
        names = [f"{self.prefix}-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        if total == 1:
            names = [f"{self.prefix}.safetensors"]
        for path, name in zip(self.files, names, strict=True):
            os.replace(path, self.directory / name)
        return {t: names[i] for t, i in self.shard_of.items()}


# ---------------------------------------------------------------------------------------------------------------
# reading a dense HF checkpoint lazily (the quantizer's dense/ dir)


class _DenseCheckpoint:
    """Lazy name -> tensor access over a HF safetensors checkpoint (single file or index + shards)."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index, "Hugging Face checkpoint")["weight_map"]
        elif (directory / "model.safetensors").is_file():
            with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118
        else:
            raise SpQRError(f"{directory} holds no model.safetensors; the quantization output is incomplete")
        self.directory, self.weight_map = directory, weight_map
        self._handles: dict[str, Any] = {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.directory / file), framework="pt")
        return self._handles[file].get_tensor(name)


# ---------------------------------------------------------------------------------------------------------------
# pack


def pack_model(quant_dir: str | Path, out_dir: str | Path, shard_size_mb: int = DEFAULT_SHARD_MB,
               overwrite: bool = False) -> dict[str, Any]:
    """Write the packed checkpoint of a quantization directory; return a summary (layers, shards, sizes).

    Streams: one record file and one shard's worth of tensors are in memory at a time.
    """
    quant_dir, out_dir = Path(quant_dir), Path(out_dir)
    qcfg = read_json(quant_dir / "quant_config.json", "quantization output directory (spqr quantize --out)")
    if qcfg.get("format") != "spqr-quant":
        raise SpQRError(f"{quant_dir}/quant_config.json is not an spqr quantization config")
    dense_dir = quant_dir / "dense"
    model_config = read_json(dense_dir / "config.json", "quantization output directory (dense/ is missing)")
    record_files = sorted((quant_dir / "records").glob("*.safetensors"))
    if not record_files:
        raise SpQRError(f"{quant_dir}/records holds no layer records; run or resume `spqr quantize` first")
    expected_layers = list(qcfg.get("layers", []))
    dense = _DenseCheckpoint(dense_dir)

    tmp = _prepare_out_dir(out_dir, overwrite, quant_dir)
    try:
        writer = _ShardWriter(tmp, max(1, int(shard_size_mb * 2**20)))
        layers: dict[str, dict[str, Any]] = {}
        for path in record_files:
            try:
                records = load_records(str(path))
            except Exception as e:  # safetensors/json errors of a damaged record file
                raise SpQRError(f"cannot read layer records {path}: {type(e).__name__}; re-run spqr quantize") from None
            for name, rec in records.items():
                layers[name] = _pack_layer(name, rec, dense, writer)
        missing = [n for n in expected_layers if n not in layers]
        if missing:
            raise SpQRError(f"{len(missing)} layers have no record yet (first: {missing[0]}); "
                            "finish `spqr quantize` (it resumes) before packing")
        quantized_weights = {f"{n}.weight" for n in layers}
        tied = bool(model_config.get("tie_word_embeddings", False))
        dense_meta: dict[str, dict[str, Any]] = {}
        for tname in sorted(dense.weight_map):
            if tname in quantized_weights or (tied and tname == "lm_head.weight"):
                continue  # quantized (packed above) or tied to the input embedding: stored once
            t = dense.get(tname)
            if t.is_floating_point():
                t = t.to(torch.float16)
            dense_meta[tname] = tensor_info(t)
            writer.add(tname, t)
        shard_of = writer.close()
        for name, meta in layers.items():
            for tname, info in meta["tensors"].items():
                info["shard"] = shard_of[f"{name}.{tname}"]
        for tname, info in dense_meta.items():
            info["shard"] = shard_of[tname]

        copied = {}
        for fname in MODEL_FILES:
            if (dense_dir / fname).is_file():
                shutil.copyfile(dense_dir / fname, tmp / fname)
                copied[fname] = file_sha256(tmp / fname)
        cfg: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "source_model": qcfg.get("model"),
            "family": qcfg.get("family"),
            "quant_config": qcfg.get("config", {}),
            "model_fingerprint": model_fingerprint(model_config),
            "config_json_sha256": copied["config.json"],
            "shards": sorted(set(shard_of.values())),
            "layers": layers,
            "dense_tensors": dense_meta,
        }
        cfg["checksum"] = config_checksum(cfg)
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=1) + "\n")
        _finish_out_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out_dir": str(out_dir), "layers": len(layers), "dense_tensors": len(dense_meta),
            "shards": cfg["shards"], "bytes": sum((out_dir / s).stat().st_size for s in cfg["shards"])}


def _pack_layer(name: str, rec: QuantizedLayer, dense: _DenseCheckpoint, writer: _ShardWriter) -> dict[str, Any]:
    wname = f"{name}.weight"
    if wname in dense.weight_map:
        shape = tuple(dense.get(wname).shape)
        if shape != (rec.out_features, rec.in_features):
            raise SpQRError(f"record {name} has shape {(rec.out_features, rec.in_features)} but the dense "
                            f"checkpoint has {shape}; the quantization directory is inconsistent")
    pw = rec.pack()
    meta: dict[str, Any] = {**pw.meta(), "nnz": pw.nnz, "has_perm": "perm" in pw.tensors, "tensors": {}}
    for tname, t in pw.tensors.items():
        meta["tensors"][tname] = tensor_info(t)
        writer.add(f"{name}.{tname}", t)
    return meta


# ---------------------------------------------------------------------------------------------------------------
# unpack


def unpack_model(packed_dir: str | Path, out_dir: str | Path, verify: bool = True, overwrite: bool = False,
                 shard_size_mb: int = DEFAULT_SHARD_MB) -> dict[str, Any]:
    """Write a dense fp16 Hugging Face checkpoint; quantized weights are ``QuantizedLayer.dequantize()`` output."""
    out_dir = Path(out_dir)
    ckpt = PackedCheckpoint(packed_dir, verify=verify)
    tmp = _prepare_out_dir(out_dir, overwrite, Path(packed_dir))
    try:
        writer = _ShardWriter(tmp, max(1, int(shard_size_mb * 2**20)))
        for name, pw in ckpt.iter_layers():
            writer.add(f"{name}.weight", QuantizedLayer.from_packed(pw).dequantize())
        for name in ckpt.dense:
            writer.add(name, ckpt.load_dense(name))
        shard_of = writer.close()
        files = sorted(set(shard_of.values()))
        if len(files) > 1:
            index = {"metadata": {"total_size": writer.total_bytes}, "weight_map": dict(sorted(shard_of.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for fname in MODEL_FILES:
            if (ckpt.path / fname).is_file():
                shutil.copyfile(ckpt.path / fname, tmp / fname)
        _finish_out_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        ckpt.close()
    return {"out_dir": str(out_dir), "tensors": len(shard_of), "shards": files}
