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


