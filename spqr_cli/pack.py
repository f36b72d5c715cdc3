"""The packed checkpoint: write it from a quantization directory, read it back safely, unpack it, inspect it.

A packed directory is the model's own config/tokenizer files, ``spqr_config.json`` (format version, method
parameters, per-layer metadata and a sha256 of every tensor) and safetensors shards holding, per quantized linear
layer, the tensors of ``spqr_kernels.layout`` under ``<module>.<tensor>`` plus every non-quantized tensor in fp16
under its Hugging Face name. ``docs/format.md`` is the full specification.

Why the reader is strict: a packed checkpoint may come from anywhere, so nothing is trusted until checked — JSON
and safetensors only (no pickle), the config's own checksum, each tensor's name, dtype, shape (recomputed from the
layer's metadata, not just read back) and sha256. Every failure is a one-line ``SpQRError``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from spqr_cli.errors import SpQRError
from spqr_cli.record import QuantizedLayer, load_records
from spqr_kernels.layout import PackedWeight, codes_per_word

FORMAT_NAME = "spqr-packed"
FORMAT_VERSION = 1
CONFIG_NAME = "spqr_config.json"
# Files copied verbatim from the dense checkpoint (the ones that exist).
MODEL_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)
# config.json keys that identify the architecture; a packed dir whose config.json disagrees is rejected.
FINGERPRINT_KEYS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "vocab_size", "tie_word_embeddings", "ffn_dim", "word_embed_proj_dim",
)
DEFAULT_SHARD_MB = 2048


# ---------------------------------------------------------------------------------------------------------------
# helpers shared by writer and reader


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw little-endian bytes in C order (what safetensors stores)."""
    raw = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def config_checksum(cfg: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``spqr_config.json`` without its own ``checksum`` field."""
    body = {k: v for k, v in cfg.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_fingerprint(model_config: dict[str, Any]) -> dict[str, Any]:
    return {k: model_config[k] for k in FINGERPRINT_KEYS if k in model_config}


def expected_shapes(meta: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Shapes of a layer's packed tensors, derived from its metadata alone (``spqr_kernels.layout``)."""
    n, k, gs = meta["out_features"], meta["in_features"], meta["groupsize"]
    if gs < 1 or k % gs:
        raise SpQRError(f"invalid layer metadata: groupsize {gs} does not divide in_features {k}")
    g = k // gs
    shapes: dict[str, tuple[int, ...]] = {
        "qweight": (k, -(-n // codes_per_word(meta["wbits"]))),
        "outlier_row_ptr": (n + 1,),
        "outlier_col": (meta["nnz"],),
        "outlier_val": (meta["nnz"],),
    }
    if meta["has_perm"]:
        shapes["perm"] = (k,)
    if meta["stat_bits"] == 16:
        shapes["scales"] = shapes["zeros"] = (g, n)
    else:
        nb = -(-n // meta["beta2"])
        shapes["qscale"] = shapes["qzero"] = (g, -(-n // codes_per_word(meta["stat_bits"])))
        shapes["scale_stats"] = shapes["zero_stats"] = (2, g, nb)
    return shapes


def formula_bits(meta: dict[str, Any]) -> float:
    """``QuantizedLayer.formula_bits`` computed from a layer's metadata (codes + stats + 32 bits/outlier + perm)."""
    n, k, gs = meta["out_features"], meta["in_features"], meta["groupsize"]
    if meta["stat_bits"] == 16:
        stats = 32.0 / gs
    else:
        stats = 2 * meta["stat_bits"] / gs + 2 * 2 * 16 / (gs * meta["beta2"])
    perm = 32.0 / n if meta["has_perm"] else 0.0
    return meta["wbits"] + stats + 32.0 * meta["nnz"] / (n * k) + perm


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _tensor_info(t: torch.Tensor) -> dict[str, Any]:
    return {"dtype": _dtype_name(t), "shape": list(t.shape), "sha256": tensor_sha256(t)}


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpQRError(f"{path} not found; is {path.parent} a {what}?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpQRError(f"{path} is unreadable or corrupted ({type(e).__name__}); re-create it") from None
    if not isinstance(data, dict):
        raise SpQRError(f"{path} is corrupted (not a JSON object); re-create it")
    return data


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
            weight_map = _read_json(index, "Hugging Face checkpoint")["weight_map"]
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
    qcfg = _read_json(quant_dir / "quant_config.json", "quantization output directory (spqr quantize --out)")
    if qcfg.get("format") != "spqr-quant":
        raise SpQRError(f"{quant_dir}/quant_config.json is not an spqr quantization config")
    dense_dir = quant_dir / "dense"
    model_config = _read_json(dense_dir / "config.json", "quantization output directory (dense/ is missing)")
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
            dense_meta[tname] = _tensor_info(t)
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
        meta["tensors"][tname] = _tensor_info(t)
        writer.add(f"{name}.{tname}", t)
    return meta


# ---------------------------------------------------------------------------------------------------------------
# read


class PackedCheckpoint:
    """Validated read access to a packed directory.

    Opening checks the format name and version, the config's own checksum, the model fingerprint against
    ``config.json`` and that every shard exists; each tensor is checked (name, dtype, shape, sha256) when read.
    ``verify=False`` skips only the sha256 checks (structure is always checked).
    """

    def __init__(self, path: str | Path, verify: bool = True) -> None:
        self.path, self.verify = Path(path), verify
        if not self.path.is_dir():
            raise SpQRError(f"packed checkpoint {self.path} does not exist; create it with `spqr pack`")
        cfg = _read_json(self.path / CONFIG_NAME, "packed checkpoint (spqr pack --out)")
        if cfg.get("format") != FORMAT_NAME:
            raise SpQRError(f"{self.path} is not an spqr packed checkpoint (format {cfg.get('format')!r})")
        version = cfg.get("format_version")
        if version != FORMAT_VERSION:
            raise SpQRError(f"{self.path} uses packed format version {version!r}; this spqr reads version "
                            f"{FORMAT_VERSION}: use a matching spqr release or re-pack")
        if verify and cfg.get("checksum") != config_checksum(cfg):
            raise SpQRError(f"{self.path / CONFIG_NAME} fails its checksum (corrupted or edited); re-pack the model")
        try:
            self.layers: dict[str, dict[str, Any]] = dict(cfg["layers"])
            self.dense: dict[str, dict[str, Any]] = dict(cfg["dense_tensors"])
            shards = list(cfg["shards"])
            fingerprint = dict(cfg["model_fingerprint"])
        except (KeyError, TypeError, ValueError):
            raise SpQRError(f"{self.path / CONFIG_NAME} is missing required fields; re-pack the model") from None
        self.config = cfg
        self.model_config = _read_json(self.path / "config.json", "packed checkpoint")
        actual = model_fingerprint(self.model_config)
        if actual != fingerprint:
            diff = sorted(k for k in set(actual) | set(fingerprint) if actual.get(k) != fingerprint.get(k))
            raise SpQRError(f"{self.path}/config.json does not describe the packed model (differs in "
                            f"{', '.join(diff)}); copy back the config.json of the model that was packed")
        if verify and file_sha256(self.path / "config.json") != cfg.get("config_json_sha256"):
            raise SpQRError(f"{self.path}/config.json fails its checksum (corrupted or edited); re-pack the model")
        for shard in shards:
            if not isinstance(shard, str) or "/" in shard or not (self.path / shard).is_file():
                raise SpQRError(f"shard {shard!r} of {self.path} is missing; copy the whole directory or re-pack")
        self.shards = shards
        self._handles: dict[str, Any] = {}

    def _handle(self, shard: str) -> Any:
        from safetensors import safe_open

        if shard not in self.shards:
            raise SpQRError(f"{self.path / CONFIG_NAME} refers to unknown shard {shard!r}; re-pack the model")
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(str(self.path / shard), framework="pt")
            except Exception as e:  # safetensors raises several types on damaged headers/truncation
                raise SpQRError(f"shard {self.path / shard} is corrupted or truncated ({_short(e)}); "
                                "copy it again or re-pack") from None
        return self._handles[shard]

    def _read(self, name: str, info: dict[str, Any], shape: tuple[int, ...] | None = None) -> torch.Tensor:
        try:
            shard, dtype, rec_shape, digest = info["shard"], info["dtype"], tuple(info["shape"]), info["sha256"]
        except (KeyError, TypeError):
            raise SpQRError(f"{self.path / CONFIG_NAME} has no valid entry for tensor {name}; re-pack") from None
        if shape is not None and rec_shape != shape:
            raise SpQRError(f"tensor {name}: recorded shape {rec_shape} does not match the layer metadata "
                            f"({shape}); re-pack the model")
        f = self._handle(shard)
        try:
            if name not in f.keys():
                raise SpQRError(f"tensor {name} is missing from shard {shard}; re-pack the model")
            t = f.get_tensor(name)
        except SpQRError:
            raise
        except Exception as e:
            raise SpQRError(f"cannot read tensor {name} from {shard} ({_short(e)}); the shard is corrupted") from None
        if _dtype_name(t) != dtype or tuple(t.shape) != rec_shape:
            raise SpQRError(f"tensor {name} in {shard} is {_dtype_name(t)}{list(t.shape)}, expected "
                            f"{dtype}{list(rec_shape)}; the shard is corrupted or from another model")
        if self.verify and tensor_sha256(t) != digest:
            raise SpQRError(f"checksum mismatch for tensor {name} in {shard}; the file is corrupted, re-pack or "
                            "copy it again (--no-verify skips the check)")
        return t

    def load_layer(self, name: str) -> PackedWeight:
        """The packed weight of one quantized linear layer (validated)."""
        meta = self.layers[name]
        try:
            shapes = expected_shapes(meta)
            tensors_meta = meta["tensors"]
            pw_meta = {k: int(meta[k]) for k in ("out_features", "in_features", "wbits", "groupsize", "beta2",
                                                 "stat_bits")}
        except (KeyError, TypeError, ValueError):
            raise SpQRError(f"layer {name} has invalid metadata in {CONFIG_NAME}; re-pack the model") from None
        if set(tensors_meta) != set(shapes):
            raise SpQRError(f"layer {name}: tensors {sorted(tensors_meta)} do not match its metadata "
                            f"(expected {sorted(shapes)}); re-pack the model")
        tensors = {t: self._read(f"{name}.{t}", tensors_meta[t], shapes[t]) for t in shapes}
        ptr = tensors["outlier_row_ptr"]
        if ptr.numel() and (int(ptr[0]) != 0 or int(ptr[-1]) != meta["nnz"] or bool((ptr[1:] < ptr[:-1]).any())):
            raise SpQRError(f"layer {name}: outlier row pointers are inconsistent; the checkpoint is corrupted")
        return PackedWeight(**pw_meta, tensors=tensors)

    def load_dense(self, name: str) -> torch.Tensor:
        """A non-quantized tensor (embedding, norm, bias, head) under its Hugging Face name."""
        return self._read(name, self.dense[name])

    def iter_layers(self) -> Iterator[tuple[str, PackedWeight]]:
        for name in self.layers:
            yield name, self.load_layer(name)

    def close(self) -> None:
        self._handles.clear()


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first[:120]}" if first else type(e).__name__


def read_packed(packed_dir: str | Path, verify: bool = True) -> tuple[dict[str, PackedWeight],
                                                                      dict[str, torch.Tensor]]:
    """Every packed layer and non-quantized tensor, fully validated (small models, tests, tools)."""
    ckpt = PackedCheckpoint(packed_dir, verify=verify)
    layers = dict(ckpt.iter_layers())
    dense = {name: ckpt.load_dense(name) for name in ckpt.dense}
    ckpt.close()
    return layers, dense


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


# ---------------------------------------------------------------------------------------------------------------
# inspect


def inspect_packed(packed_dir: str | Path, verify: bool = True) -> dict[str, Any]:
    """Per-layer and total sizes, bits/param (measured from bytes and by formula), outliers and checksum status.

    Measured bits of a layer = 8 x (bytes of its packed tensors) / (out x in); the formula is
    ``QuantizedLayer.formula_bits``. The whole-checkpoint figure divides the shard files' size on disk (headers
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
        fbits = formula_bits(meta)
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


def render_inspect(result: dict[str, Any], console: Any) -> None:
    """Print ``inspect_packed``'s result as rich tables (per layer, then totals)."""
    from rich.table import Table

    qc = result.get("quant_config") or {}
    console.print(f"[bold]{result['path']}[/bold]  format {result['format']} v{result['format_version']}  "
                  f"source {result.get('source_model')}  method {qc.get('method')} w{qc.get('wbits')} "
                  f"g{qc.get('groupsize')} β2={qc.get('beta2')} stats {qc.get('stat_bits')}-bit")
    table = Table(title="quantized layers")
    for col in ("layer", "shape", "wbits", "bits/param (disk)", "bits/param (formula)", "outliers %", "checksum"):
        table.add_column(col, justify="left" if col in ("layer", "checksum") else "right",
                         overflow="fold" if col == "layer" else "ellipsis")
    for r in result["layers"]:
        style = "" if r["checksum"] in ("ok", "skipped") else "red"
        table.add_row(r["name"], f"{r['shape'][0]}x{r['shape'][1]}", str(r["wbits"]), f"{r['bits_measured']:.3f}",
                      f"{r['bits_formula']:.3f}", f"{r['outlier_pct']:.3f}", r["checksum"], style=style)
    console.print(table)
    t = result["totals"]
    tot = Table(title="totals", show_header=False)
    tot.add_column("what")
    tot.add_column("value", justify="right")
    tot.add_row("quantized layers", f"{t['quantized_layers']} ({t['quantized_params']:,} params)")
    tot.add_row("quantized bits/param (disk)", f"{t['quantized_bits_measured']:.3f}")
    tot.add_row("quantized bits/param (formula)", f"{t['quantized_bits_formula']:.3f}")
    tot.add_row("outliers", f"{t['outlier_pct']:.3f} %")
    tot.add_row("non-quantized params (fp16)", f"{t['dense_params']:,}")
    tot.add_row("whole checkpoint bits/param", f"{t['bits_per_param']:.3f}")
    tot.add_row("size on disk", _human(t["disk_bytes"]))
    tot.add_row("fp16 size", _human(t["fp16_bytes"]))
    tot.add_row("compression vs fp16", f"{t['compression_ratio']:.2f}x")
    tot.add_row("checksums", result["checksums"] + (f" ({len(result['failed'])} failed)" if result["failed"] else ""))
    console.print(tot)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)
