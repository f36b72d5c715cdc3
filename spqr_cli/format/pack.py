"""Writing packed checkpoints: ``pack_model`` (quantization directory -> packed directory) and ``unpack_model``
(packed directory -> dense fp16 Hugging Face checkpoint, bit-exact with the quantizer's weights).

Both stream (one record file or layer and one shard's worth of tensors in memory at a time) and write into a
temporary directory beside the output that is swapped in at the end (``core/io``: a lock per output, atomic
swap, recovery of a killed run), so an interrupted or concurrent run never leaves a half-written checkpoint
under the final name nor deletes another run's output.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from spqr_cli.core.errors import SpQRError
from spqr_cli.core.io import (
    chmod_like_open,
    make_temp_dir,
    output_lock,
    read_json,
    recover_output,
    swap_in,
    user_os_errors,
    write_shard_index,
)
from spqr_cli.core.streaming import CheckpointWeights, copy_bytes, safetensors_dtype, safetensors_header, tensor_bytes
from spqr_cli.format.checkpoint import (
    CONFIG_NAME,
    DEFAULT_SHARD_MB,
    FORMAT_NAME,
    FORMAT_VERSION,
    MODEL_FILES,
    SHARD_FILES_KEY,
    SHARD_LAYERS_KEY,
    PackedCheckpoint,
    config_checksum,
    file_sha256,
    layer_scalars,
    model_fingerprint,
    tensor_info,
)
from spqr_cli.quant.driver import model_dir_name
from spqr_cli.quant.record import QuantizedLayer, load_records
from spqr_kernels.layout import PackedWeight

HF_QUANT_METHOD = "spqr-cli"  # transformers' quant_method of packed checkpoints (runtime/hf_quantizer.py)


@contextlib.contextmanager
def output_dir(out_dir: Path, overwrite: bool, source: Path) -> Iterator[Path]:
    """Yield a fresh temp dir beside ``out_dir``; on success it replaces ``out_dir`` atomically (``swap_in``).

    The whole write holds ``out_dir``'s lock, and the emptiness check runs under it, so two writers can never
    both pass it. Leftovers of a killed run are cleaned (or the old output put back) first. ``out_dir`` may not
    be, contain or lie inside ``source``: --overwrite would otherwise delete the input. File-system errors are
    one-line ``SpQRError``s.
    """
    src, dst = source.resolve(), out_dir.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise SpQRError(f"output {out_dir} overlaps the input {source}; choose an output outside it")
    with user_os_errors(f"output {out_dir}"):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with output_lock(out_dir):
            recover_output(out_dir)
            if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
                raise SpQRError(f"output {out_dir} already exists and is not empty; pass --overwrite or choose "
                                "another path")
            tmp = make_temp_dir(out_dir)
            try:
                yield tmp
                swap_in(tmp, out_dir)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise


class ShardWriter:
    """Streams tensors into size-capped safetensors shards; final names are assigned once the count is known.

    A tensor's bytes go to the pending shard's data file as soon as it is added, so host memory holds one tensor,
    not a shard (``safetensors.save_file`` takes every tensor of a file at once and copies them: twice a shard, up
    to 4 GB at the default 2 GB shards, whatever the model's depth). When the shard is full it is written in the
    safetensors layout: the header (``core.streaming.safetensors_header``), then each tensor's bytes copied from the
    data file, largest element size first as safetensors orders them, so every tensor starts aligned to its
    element size. The cost is disk: each shard's data is written twice, and the data file of one shard sits beside
    the finished ones until its shard is written. The files are read back with the safetensors library (tested).
    """

    def __init__(self, directory: Path, shard_size_mb: float, prefix: str = "model",
                 files_sha256: dict[str, str] | None = None) -> None:
        self.directory, self.prefix = directory, prefix
        self.max_bytes = max(1, int(shard_size_mb * 2**20))
        self.files_sha256 = files_sha256
        self.pending_layers: dict[str, dict[str, Any]] = {}
        # the pending shard's tensors in the order added: shape, dtype and where their bytes start in its data file
        self.pending: dict[str, tuple[tuple[int, ...], torch.dtype, int]] = {}
        self.pending_bytes = 0
        self.files: list[Path] = []
        self.shard_of: dict[str, int] = {}
        self.total_bytes = 0

    @property
    def _data_path(self) -> Path:
        return self.directory / f".shard-{len(self.files):05d}.data"

    def add(self, name: str, t: torch.Tensor, layer: str | None = None,
            layer_meta: dict[str, Any] | None = None) -> None:
        """Write tensor ``name`` into the pending shard; ``layer_meta`` (the scalars of its quantized ``layer``)
        goes into the header metadata of the shard that holds it, so the config's values can be cross-checked at
        load."""
        if name in self.shard_of:
            raise SpQRError(f"internal error: tensor {name} was written twice")
        safetensors_dtype(t.dtype, name)
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        with open(self._data_path, "ab") as data:
            data.write(tensor_bytes(t))
        if layer is not None and layer_meta is not None:
            self.pending_layers[layer] = layer_meta
        self.pending[name] = (tuple(t.shape), t.dtype, self.pending_bytes)
        self.pending_bytes += nbytes
        self.total_bytes += nbytes
        self.shard_of[name] = len(self.files)

    def flush(self) -> None:
        if not self.pending:
            return
        metadata = {"format": "pt"}
        if self.files_sha256 is not None:  # packed shards (not unpack's plain HF ones)
            metadata[SHARD_LAYERS_KEY] = json.dumps(self.pending_layers, sort_keys=True, separators=(",", ":"))
            metadata[SHARD_FILES_KEY] = json.dumps(self.files_sha256, sort_keys=True, separators=(",", ":"))
        order = sorted(self.pending, key=lambda n: -self.pending[n][1].itemsize)  # stable: then as added
        head, offsets = safetensors_header({n: self.pending[n][:2] for n in order}, metadata)
        path = self.directory / f".shard-{len(self.files):05d}.tmp"
        with open(path, "wb") as f, open(self._data_path, "rb") as data:
            f.write(head)
            for name in order:
                start, end = offsets[name]
                data.seek(self.pending[name][2])
                copy_bytes(data, f, end - start)
        self._data_path.unlink()
        chmod_like_open(path)
        self.files.append(path)
        self.pending, self.pending_bytes, self.pending_layers = {}, 0, {}

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
    dense_dir = quant_dir / model_dir_name(qcfg.get("dense", True))  # the model files and unquantized tensors
    model_config = read_json(dense_dir / "config.json",
                             f"quantization output directory ({dense_dir.name}/ is missing: finish `spqr quantize`)")
    record_files = sorted((quant_dir / "records").glob("*.safetensors"))
    if not record_files:
        raise SpQRError(f"{quant_dir}/records holds no layer records; run or resume `spqr quantize` first")
    expected_layers = list(qcfg.get("layers", []))
    dense = CheckpointWeights(dense_dir, name=str(dense_dir), fix="re-run `spqr quantize`")

    # hashed before the shards are written: every shard's header carries them (see docs/format.md)
    all_files = {f: file_sha256(dense_dir / f) for f in MODEL_FILES if (dense_dir / f).is_file()}
    files = {f: h for f, h in all_files.items() if f != "config.json"}  # config.json: config_json_sha256
    with output_dir(out_dir, overwrite, quant_dir) as tmp:
        writer = ShardWriter(tmp, shard_size_mb, files_sha256=files)
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
        for tname in sorted(dense.file_of):
            if tname in quantized_weights or (tied and tname == "lm_head.weight"):
                continue  # quantized (packed above) or tied to the input embedding: stored once
            t = dense.get(tname)
            if t.is_floating_point():
                t = t.to(torch.float16)
            dense_meta[tname] = tensor_info(t)
            writer.add(tname, t)
        cfg = finish_packed(tmp, writer, dense_dir, model_config, all_files, layers, dense_meta,
                            {"source_model": qcfg.get("model"), "family": qcfg.get("family"),
                             "quant_config": qcfg.get("config", {})})
    return {"out_dir": str(out_dir), "layers": len(layers), "dense_tensors": len(dense_meta),
            "shards": cfg["shards"], "bytes": sum((out_dir / s).stat().st_size for s in cfg["shards"])}


def finish_packed(tmp: Path, writer: ShardWriter, src_dir: Path, model_config: dict[str, Any],
                  all_files: dict[str, str], layers: dict[str, dict[str, Any]], dense_meta: dict[str, dict[str, Any]],
                  source: dict[str, Any]) -> dict[str, Any]:
    """Close the shards and write the rest of a packed directory into ``tmp``: the model files of ``src_dir``
    (``all_files``: their sha256, hashed before the shards were written), config.json with the
    ``quantization_config``, the shard index, and spqr_config.json. ``pack`` and ``spqr import`` share it."""
    shard_of = writer.close()
    for name, meta in layers.items():
        for tname, info in meta["tensors"].items():
            info["shard"] = shard_of[f"{name}.{tname}"]
    for tname, info in dense_meta.items():
        info["shard"] = shard_of[tname]
    files = {f: h for f, h in all_files.items() if f != "config.json"}  # config.json: config_json_sha256
    for fname in files:
        shutil.copyfile(src_dir / fname, tmp / fname)
        if file_sha256(tmp / fname) != all_files[fname]:
            raise SpQRError(f"{src_dir / fname} changed while packing; run the command again")
    if file_sha256(src_dir / "config.json") != all_files["config.json"]:
        raise SpQRError(f"{src_dir / 'config.json'} changed while packing; run the command again")
    (tmp / "config.json").write_text(json.dumps(_packed_model_config(model_config), indent=2) + "\n")
    chmod_like_open(tmp / "config.json")
    shards = write_shard_index(tmp, shard_of, {"format": FORMAT_NAME})
    cfg: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "source_model": source.get("source_model"),
        "family": source.get("family"),
        "quant_config": source.get("quant_config", {}),
        "model_fingerprint": model_fingerprint(model_config),
        "config_json_sha256": file_sha256(tmp / "config.json"),
        "files_sha256": files,
        "shards": shards,
        "layers": layers,
        "dense_tensors": dense_meta,
    }
    cfg["checksum"] = config_checksum(cfg)
    (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=1) + "\n")
    return cfg


def _packed_model_config(model_config: dict[str, Any]) -> dict[str, Any]:
    """The dense model's config.json plus the ``quantization_config`` that routes transformers'
    ``from_pretrained`` to the ``spqr-cli`` quantizer (``runtime/hf_quantizer``; the per-layer metadata stays in
    spqr_config.json). Any quantization_config of the source model is replaced: its weights are ours now."""
    return {**{k: v for k, v in model_config.items() if k != "quantization_config"},
            "quantization_config": hf_quantization_config()}


def hf_quantization_config() -> dict[str, Any]:
    """The ``quantization_config`` entry of a packed config.json."""
    return {"quant_method": HF_QUANT_METHOD, "format": FORMAT_NAME, "format_version": FORMAT_VERSION}


def _dense_model_config(config_path: Path) -> str:
    """A packed config.json without the ``quantization_config`` that ``pack`` added: the unpacked checkpoint is a
    plain fp16 model (transformers would otherwise route it to the spqr-cli quantizer)."""
    cfg = read_json(config_path, "packed checkpoint")
    if (cfg.get("quantization_config") or {}).get("quant_method") != HF_QUANT_METHOD:
        return config_path.read_text()
    return json.dumps({k: v for k, v in cfg.items() if k != "quantization_config"}, indent=2) + "\n"


def _pack_layer(name: str, rec: QuantizedLayer, dense: CheckpointWeights, writer: ShardWriter) -> dict[str, Any]:
    wname = f"{name}.weight"
    if wname in dense.file_of:
        shape = dense.headers[wname][0]
        if shape != (rec.out_features, rec.in_features):
            raise SpQRError(f"record {name} has shape {(rec.out_features, rec.in_features)} but the dense "
                            f"checkpoint has {shape}; the quantization directory is inconsistent")
    return add_packed_layer(name, rec.pack(), writer)


def add_packed_layer(name: str, pw: PackedWeight, writer: ShardWriter) -> dict[str, Any]:
    """Queue one layer's packed tensors (header copy of its scalars included); return its spqr_config entry."""
    meta: dict[str, Any] = {**pw.meta(), "nnz": pw.nnz, "has_perm": "perm" in pw.tensors, "tensors": {}}
    scalars = layer_scalars(meta)
    for tname, t in pw.tensors.items():
        meta["tensors"][tname] = tensor_info(t)
        writer.add(f"{name}.{tname}", t, layer=name, layer_meta=scalars)
    return meta


# ---------------------------------------------------------------------------------------------------------------
# unpack


def unpack_model(packed_dir: str | Path, out_dir: str | Path, verify: bool = True, overwrite: bool = False,
                 shard_size_mb: int = DEFAULT_SHARD_MB) -> dict[str, Any]:
    """Write a dense fp16 Hugging Face checkpoint; quantized weights are ``QuantizedLayer.dequantize()`` output."""
    out_dir = Path(out_dir)
    ckpt = PackedCheckpoint(packed_dir, verify=verify)
    try:
        with output_dir(out_dir, overwrite, Path(packed_dir)) as tmp:
            writer = ShardWriter(tmp, shard_size_mb)
            for name, pw in ckpt.iter_layers():
                writer.add(f"{name}.weight", QuantizedLayer.from_packed(pw).dequantize())
            for name in ckpt.dense:
                writer.add(name, ckpt.load_dense(name))
            shard_of = writer.close()
            files = write_shard_index(tmp, shard_of, {"total_size": writer.total_bytes})
            for fname in MODEL_FILES:
                if fname == "config.json":
                    (tmp / fname).write_text(_dense_model_config(ckpt.path / fname))
                    chmod_like_open(tmp / fname)
                elif (ckpt.path / fname).is_file():
                    shutil.copyfile(ckpt.path / fname, tmp / fname)
    finally:
        ckpt.close()
    return {"out_dir": str(out_dir), "tensors": len(shard_of), "shards": files}
