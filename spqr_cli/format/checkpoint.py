"""The packed checkpoint: its constants, checksums and metadata rules, and the strict reader.

A packed directory is the model's own config/tokenizer files, ``spqr_config.json`` (format version, method
parameters, per-layer metadata and a sha256 of every tensor) and safetensors shards holding, per quantized linear
layer, the tensors of ``spqr_kernels.layout`` under ``<module>.<tensor>`` plus every non-quantized tensor in fp16
under its Hugging Face name. ``docs/format.md`` is the full specification; ``pack.py`` writes it (and unpacks it),
``inspect.py`` describes it.

Why the reader is strict: a packed checkpoint may come from anywhere, so nothing is trusted until checked — JSON
and safetensors only (no pickle), the config's own checksum, each tensor's name, dtype, shape (recomputed from the
layer's metadata, not just read back) and sha256. Every failure is a one-line ``SpQRError``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from spqr_cli.core.errors import SpQRError
from spqr_cli.core.io import read_json
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
# Keys of each packed shard's safetensors header metadata: a copy of the per-layer scalars of the layers it holds
# and the sha256 of every copied model file. Editing spqr_config.json (even with its checksum recomputed) cannot
# change them without rewriting the shards, so the reader cross-checks the config against them.
SHARD_LAYERS_KEY = "spqr_layers"
SHARD_FILES_KEY = "spqr_files_sha256"
# Per-layer metadata fields: name -> (min, max) for ints; has_perm is a bool. beta2 is 0 for fp16 statistics.
META_RANGES = {
    "out_features": (1, 1 << 24), "in_features": (1, 1 << 24), "wbits": (1, 16), "stat_bits": (1, 16),
    "groupsize": (1, 1 << 24), "beta2": (0, 1 << 24), "nnz": (0, 1 << 48),
}


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


def layer_scalars(meta: dict[str, Any]) -> dict[str, Any]:
    """A layer's metadata without its tensor table: what the shard headers repeat."""
    return {k: v for k, v in meta.items() if k != "tensors"}


def validate_meta(name: str, meta: Any) -> None:
    """Types and ranges of one layer's metadata, before any arithmetic on it (0, negatives, strings, null and
    floats would otherwise end in ZeroDivisionError/TypeError or a wrong decode)."""
    if not isinstance(meta, dict):
        raise SpQRError(f"layer {name} has invalid metadata in {CONFIG_NAME}; re-pack the model")
    for key, (lo, hi) in META_RANGES.items():
        v = meta.get(key)
        if type(v) is not int or not lo <= v <= hi:
            raise SpQRError(f"layer {name}: {key}={v!r} in {CONFIG_NAME} is invalid (expected an integer in "
                            f"[{lo}, {hi}]); the checkpoint is corrupted, re-pack the model")
    if type(meta.get("has_perm")) is not bool:
        raise SpQRError(f"layer {name}: has_perm={meta.get('has_perm')!r} in {CONFIG_NAME} is invalid (expected "
                        "true or false); the checkpoint is corrupted, re-pack the model")
    if not isinstance(meta.get("tensors"), dict):
        raise SpQRError(f"layer {name} has no valid tensor table in {CONFIG_NAME}; re-pack the model")
    if meta["stat_bits"] != 16 and meta["beta2"] < 1:
        raise SpQRError(f"layer {name}: beta2={meta['beta2']} is invalid with {meta['stat_bits']}-bit statistics "
                        "(must be >= 1); re-pack the model")


def validate_tensors(name: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Index tensors must stay in range: a bad perm or outlier column would read out of bounds in the kernels."""
    k, nnz = meta["in_features"], meta["nnz"]
    ptr = tensors["outlier_row_ptr"].to(torch.int64)
    if ptr.numel() and (int(ptr[0]) != 0 or int(ptr[-1]) != nnz or bool((ptr[1:] < ptr[:-1]).any())):
        raise SpQRError(f"layer {name}: outlier row pointers are inconsistent; the checkpoint is corrupted")
    cols = tensors["outlier_col"].to(torch.int64) & 0xFFFF  # stored as int16, read as unsigned
    if cols.numel() and int(cols.max()) >= k:
        raise SpQRError(f"layer {name}: an outlier column is >= in_features {k}; the checkpoint is corrupted")
    if "perm" in tensors:
        perm = tensors["perm"].to(torch.int64)
        if not torch.equal(torch.sort(perm).values, torch.arange(k)):
            raise SpQRError(f"layer {name}: perm is not a permutation of 0..{k - 1}; the checkpoint is corrupted")


def expected_layer_names(model_config: dict[str, Any]) -> set[str]:
    """Every quantizable linear of the model config.json describes (family adapter x num_hidden_layers)."""
    from types import SimpleNamespace

    from spqr_cli.core.models import adapter_for

    adapter = adapter_for(SimpleNamespace(model_type=model_config.get("model_type")))
    blocks = model_config.get("num_hidden_layers")
    if type(blocks) is not int or blocks < 0:
        raise SpQRError(f"config.json has an invalid num_hidden_layers {blocks!r}; re-pack the model")
    return {f"{adapter.blocks}.{b}.{sub}" for b in range(blocks) for sub in adapter.linear_names()}


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def tensor_info(t: torch.Tensor) -> dict[str, Any]:
    return {"dtype": dtype_name(t), "shape": list(t.shape), "sha256": tensor_sha256(t)}


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
        cfg = read_json(self.path / CONFIG_NAME, "packed checkpoint (spqr pack --out)")
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
        self.model_config = read_json(self.path / "config.json", "packed checkpoint")
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
        for name, meta in self.layers.items():
            validate_meta(name, meta)
        self._check_files(cfg.get("files_sha256"))
        self._check_coverage()
        self._check_shard_headers(cfg.get("files_sha256"))

    def _check_files(self, files: Any) -> None:
        """Every copied model file but config.json (tokenizer included) against its sha256; a model file that is
        present but not listed is an error too. Checkpoints packed before ``files_sha256`` existed check
        config.json only (its own ``config_json_sha256``)."""
        if files is None:
            return
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise SpQRError(f"{self.path / CONFIG_NAME} has an invalid files_sha256 table; re-pack the model")
        for fname in MODEL_FILES[1:]:  # config.json: config_json_sha256 and the fingerprint
            present = (self.path / fname).is_file()
            if present != (fname in files):
                state = "is missing" if not present else "is not part of the packed model"
                raise SpQRError(f"{self.path / fname} {state}; copy the whole packed directory or re-pack")
            if present and self.verify and file_sha256(self.path / fname) != files[fname]:
                raise SpQRError(f"{self.path / fname} fails its checksum (corrupted or edited); re-pack the model "
                                "or copy it again (--no-verify skips the check)")

    def _check_coverage(self) -> None:
        """The quantized layers plus dense weights must cover every linear of the model: a layer removed from
        the config would otherwise unpack/load as an incomplete model."""
        missing = sorted(n for n in expected_layer_names(self.model_config)
                         if n not in self.layers and f"{n}.weight" not in self.dense)
        if missing:
            raise SpQRError(f"{self.path} lacks {len(missing)} linear layers of the model (first: {missing[0]}); "
                            "the checkpoint is incomplete, re-pack the model")

    def _check_shard_headers(self, files: Any) -> None:
        """Cross-check the config against the copies pack wrote into the shards' header metadata: the model file
        checksums, and which layers each shard holds (a layer removed from or added to the config). The layers'
        values are compared when each is loaded (``load_layer``).

        A shard without them (packed by an older spqr) is accepted: its config entries are trusted as before.
        """
        self._shard_layers: dict[str, dict[str, Any]] = {}
        config_side: dict[str, set[str]] = {}
        for name, meta in self.layers.items():
            for info in meta["tensors"].values():
                if isinstance(info, dict) and isinstance(info.get("shard"), str):
                    config_side.setdefault(info["shard"], set()).add(name)
        for shard in self.shards:
            try:
                header = self._handle(shard).metadata() or {}
                layers = json.loads(header[SHARD_LAYERS_KEY]) if SHARD_LAYERS_KEY in header else None
                shard_files = json.loads(header[SHARD_FILES_KEY]) if SHARD_FILES_KEY in header else None
            except (json.JSONDecodeError, RecursionError, TypeError):
                raise SpQRError(f"shard {self.path / shard} has damaged header metadata; re-pack") from None
            if layers is None:
                continue
            if not isinstance(layers, dict) or shard_files != files:
                raise SpQRError(f"{self.path / CONFIG_NAME} does not match the header of shard {shard} (model "
                                "file checksums); the config was edited, re-pack the model")
            if set(layers) != config_side.get(shard, set()):
                diff = sorted(set(layers) ^ config_side.get(shard, set()))
                raise SpQRError(f"the layers of {CONFIG_NAME} do not match the header of shard {shard} (first: "
                                f"{diff[0]}); the config was edited, re-pack the model")
            self._shard_layers[shard] = layers

    def _check_layer_header(self, name: str, meta: dict[str, Any]) -> None:
        """A layer's config values must equal the copy in the header of every shard holding its tensors: a
        shape-preserving edit (beta2 16 -> 17) would otherwise decode wrongly."""
        for info in meta["tensors"].values():
            header = self._shard_layers.get(info["shard"])
            if header is not None and header.get(name) != layer_scalars(meta):
                raise SpQRError(f"layer {name}: its metadata in {CONFIG_NAME} differs from the copy in shard "
                                f"{info['shard']}; the config was edited, re-pack the model")

    def _handle(self, shard: str) -> Any:
        from safetensors import safe_open

        if shard not in self.shards:
            raise SpQRError(f"{self.path / CONFIG_NAME} refers to unknown shard {shard!r}; re-pack the model")
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(str(self.path / shard), framework="pt")
            except Exception as e:  # safetensors raises several types on damaged headers/truncation
                raise SpQRError(f"shard {self.path / shard} is corrupted or truncated ({short_error(e)}); "
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
            raise SpQRError(f"cannot read tensor {name} from {shard} ({short_error(e)}); "
                            "the shard is corrupted") from None
        if dtype_name(t) != dtype or tuple(t.shape) != rec_shape:
            raise SpQRError(f"tensor {name} in {shard} is {dtype_name(t)}{list(t.shape)}, expected "
                            f"{dtype}{list(rec_shape)}; the shard is corrupted or from another model")
        if self.verify and tensor_sha256(t) != digest:
            raise SpQRError(f"checksum mismatch for tensor {name} in {shard}; the file is corrupted, re-pack or "
                            "copy it again (--no-verify skips the check)")
        return t

    def load_layer(self, name: str) -> PackedWeight:
        """The packed weight of one quantized linear layer (validated)."""
        meta = self.layers[name]
        validate_meta(name, meta)
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
        self._check_layer_header(name, meta)
        validate_tensors(name, meta, tensors)
        return PackedWeight(**pw_meta, tensors=tensors)

    def load_dense(self, name: str) -> torch.Tensor:
        """A non-quantized tensor (embedding, norm, bias, head) under its Hugging Face name."""
        return self._read(name, self.dense[name])

    def iter_layers(self) -> Iterator[tuple[str, PackedWeight]]:
        for name in self.layers:
            yield name, self.load_layer(name)

    def close(self) -> None:
        self._handles.clear()


def short_error(e: BaseException) -> str:
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


