"""transformers plugin: ``AutoModelForCausalLM.from_pretrained(PACKED_DIR)`` builds ``SpQRLinear`` modules.

A packed directory's ``config.json`` carries ``"quantization_config": {"quant_method": "spqr-cli", ...}`` (written
by ``spqr pack``); transformers looks that name up in its quantizer registry, where ``register()`` puts
``SpQRCliConfig`` / ``SpQRCliHfQuantizer``. The name is ours because transformers already uses ``"spqr"`` for
the authors' format (``spqr export --to hf-spqr`` writes that one).

Why a quantizer and not a custom model class: everything else stays transformers' own (model classes,
``dtype``, ``device_map``, ``generate``, static caches, ``torch.compile``, ``save_pretrained``); the quantizer only
swaps each quantized ``nn.Linear`` of the skeleton for an ``SpQRLinear`` whose buffers (the layout's tensors, on the
meta device, in the layout's dtypes) transformers then fills from the shards under their packed names.

Where the per-layer metadata comes from, in order:

1. ``spqr_config.json`` beside the shards (a ``spqr pack`` directory): opened with ``PackedCheckpoint``, which
   runs every check of the format (config and file checksums, fingerprint, coverage, shard headers) and, before
   transformers reads anything, reads each tensor once to check its dtype, shape, sha256 and index invariants
   (``verify=False`` in the quantization config skips only the sha256, as ``--no-verify`` does);
2. ``quantization_config["layers"]`` (the per-layer scalars): what ``save_pretrained`` of a loaded model writes,
   and how ``load_packed`` passes the tensors it has already read and verified (``state_dict=``).

This module imports transformers at the top, so it is imported only on demand: ``spqr_cli/__init__.py`` arranges
for ``register()`` to run when transformers' quantizer registry is first imported (``runtime/hf_hook.py``), so
that a plain ``import spqr_cli`` stays cheap and still makes ``from_pretrained(PACKED_DIR)`` work.

``from_pretrained`` always verifies the checksums (transformers keeps the checkpoint's own quantization_config and
ignores one passed as an argument); ``load_packed(..., verify=False)`` is the way to skip them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from spqr_cli.core.errors import SpQRError
from spqr_cli.format.checkpoint import (
    CONFIG_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    PackedCheckpoint,
    expected_shapes,
    layer_scalars,
    validate_meta,
)
from spqr_cli.format.pack import HF_QUANT_METHOD as QUANT_METHOD
from spqr_cli.runtime.linear import SpQRLinear
from spqr_kernels.layout import PackedWeight

# dtype of each packed tensor (``spqr_kernels.layout``); the placeholders carry them so transformers keeps them.
TENSOR_DTYPES = {
    "qweight": torch.int32, "qscale": torch.int32, "qzero": torch.int32, "perm": torch.int32,
    "outlier_row_ptr": torch.int32, "outlier_col": torch.int16, "outlier_val": torch.float16,
    "scale_stats": torch.float16, "zero_stats": torch.float16, "scales": torch.float16, "zeros": torch.float16,
}


class SpQRCliConfig(QuantizationConfigMixin):
    """``quantization_config`` of a packed checkpoint (``quant_method: "spqr-cli"``).

    ``verify``: check every tensor's sha256 against ``spqr_config.json`` (structure is always checked).
    ``layers``: per-layer metadata (``out_features``, ``in_features``, ``wbits``, ``groupsize``, ``beta2``,
    ``stat_bits``, ``nnz``, ``has_perm``) for directories without ``spqr_config.json``; filled on load, so that
    ``save_pretrained`` writes it.
    """

    def __init__(self, verify: bool = True, layers: dict[str, dict[str, Any]] | None = None,
                 format: str = FORMAT_NAME, format_version: int = FORMAT_VERSION, **kwargs: Any) -> None:  # noqa: A002
        self.quant_method = QUANT_METHOD
        self.format = format
        self.format_version = format_version
        self.verify = bool(verify)
        self.layers = layers

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if not (k == "layers" and v is None)}


def placeholder(meta: dict[str, Any], bias: torch.Tensor | None) -> SpQRLinear:
    """An ``SpQRLinear`` with empty (meta-device) buffers of the shapes and dtypes ``meta`` implies."""
    shapes = expected_shapes(meta)
    tensors = {t: torch.empty(shape, dtype=TENSOR_DTYPES[t], device="meta") for t, shape in shapes.items()}
    fields = {k: int(meta[k]) for k in ("out_features", "in_features", "wbits", "groupsize", "beta2", "stat_bits")}
    return SpQRLinear(PackedWeight(**fields, tensors=tensors), bias)


def replace_linears(model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    """Swap each listed ``nn.Linear`` of ``model`` for a placeholder ``SpQRLinear`` (bias kept as it is)."""
    for name, meta in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise SpQRError(f"packed layer {name} does not exist in the model of config.json; "
                            "the packed dir is from another model") from None
        shape = (meta["out_features"], meta["in_features"])
        if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != shape:
            raise SpQRError(f"packed layer {name} has shape {shape} but the model expects "
                            f"{tuple(getattr(old, 'weight', torch.empty(0)).shape)}; shape mismatch")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, placeholder(meta, old.bias))


class SpQRCliHfQuantizer(HfQuantizer):
    """Loads ``spqr-cli`` checkpoints: ``SpQRLinear`` placeholders before the weights, views built after."""

    requires_calibration = True
    quantization_config: SpQRCliConfig

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._expected_keys: set[str] | None = None

    def _layers_and_check(self, checkpoint_files: list[str] | None) -> dict[str, dict[str, Any]]:
        """Per-layer metadata (see the module docstring); a ``spqr pack`` directory is fully validated here."""
        directory = Path(checkpoint_files[0]).parent if checkpoint_files else None
        if directory is not None and (directory / CONFIG_NAME).is_file():
            ckpt = PackedCheckpoint(directory, verify=self.quantization_config.verify)
            try:  # (this runs inside transformers' meta-device init context: the checks need real tensors)
                with torch.device("cpu"):
                    for name in ckpt.layers:  # read once: dtype, shape, sha256, header copy, index invariants
                        ckpt.load_layer(name)
                    for name in ckpt.dense:
                        ckpt.load_dense(name)
            finally:
                ckpt.close()
            foreign = sorted({Path(f).name for f in checkpoint_files} - set(ckpt.shards))
            if foreign:
                raise SpQRError(f"{directory} lists weight file {foreign[0]} which is not a shard of "
                                f"{CONFIG_NAME}; re-pack the model")
            self._expected_keys = {f"{n}.{t}" for n, m in ckpt.layers.items() for t in m["tensors"]} | set(ckpt.dense)
            return {name: layer_scalars(meta) for name, meta in ckpt.layers.items()}
        version = self.quantization_config.format_version
        if version != FORMAT_VERSION:
            raise SpQRError(f"the checkpoint uses packed format version {version!r}; this spqr reads version "
                            f"{FORMAT_VERSION}: use a matching spqr release")
        layers = self.quantization_config.layers
        if not isinstance(layers, dict) or not layers:
            where = f" and {directory} has no {CONFIG_NAME}" if directory is not None else ""
            raise SpQRError(f"the {QUANT_METHOD} quantization_config has no per-layer metadata{where}; load a "
                            "`spqr pack` directory or a save_pretrained copy of a loaded packed model")
        for name, meta in layers.items():
            validate_meta(name, {**meta, "tensors": {}})
        return layers

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> None:
        layers = self._layers_and_check(checkpoint_files)
        replace_linears(model, layers)
        self.quantization_config.layers = {n: dict(m) for n, m in layers.items()}  # save_pretrained writes them

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        """Every packed buffer must have been loaded (none left on meta); then the kernels' views are built now,
        not in the first forward (which may run inside a compiled CUDA graph)."""
        if self._expected_keys is not None:
            tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
            missing = sorted(set(model.state_dict()) - self._expected_keys - tied)
            if missing:
                raise SpQRError(f"the packed checkpoint lacks {len(missing)} tensors (first: {missing[0]}); "
                                "re-pack the model")
        for name, module in model.named_modules():
            if not isinstance(module, SpQRLinear):
                continue
            if any(getattr(module, t).is_meta for t in module._tensor_names):
                raise SpQRError(f"layer {name}: its packed tensors were not in the checkpoint; re-pack the model")
            if module.bias is not None:
                module.bias.requires_grad_(False)
            module._rebuild_view()
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[None, dict[str, Any]]:
        from spqr_cli.runtime.siblings import SiblingGroup

        if any(isinstance(m, SiblingGroup) for m in model.modules()):
            raise SpQRError("this model runs fused sibling layers (load_packed on CUDA fuses them); save_pretrained "
                            "needs the per-layer form: load it with fuse=False or with from_pretrained")
        return None, {}

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True  # SpQRLinear is one custom op under torch.compile

    def is_serializable(self) -> bool:
        return True


def register() -> None:
    """Register ``spqr-cli`` with transformers' quantizer registry (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(SpQRCliConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(SpQRCliHfQuantizer)


register()  # importing the plugin registers it (also when transformers' registry import brought us here)
