"""Turning a path into a runnable model: ``load_packed`` (a ``spqr pack`` directory) and ``load_any_model`` (any
path the commands accept: hub id, HF directory, ``spqr quantize`` output, packed directory).

Memory is the point of the format, so ``load_packed`` never materializes a dense weight: the model skeleton is built
with empty (meta) parameters, each quantized linear becomes an ``SpQRLinear`` that owns only the packed buffers,
and the non-quantized tensors are assigned as they are read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from spqr_cli.core.errors import SpQRError
from spqr_cli.core.models import adapter_for, load_model, load_tokenizer, resolve_device, resolve_dtype
from spqr_cli.format.checkpoint import PackedCheckpoint
from spqr_cli.runtime.linear import SpQRLinear
from spqr_cli.runtime.siblings import fuse_siblings


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def load_packed(packed_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16,
                verify: bool = True, fuse: bool | None = None) -> Any:
    """A transformers causal LM whose quantized linears are ``SpQRLinear`` modules; eval mode, on ``device``.

    ``dtype`` is the dtype of the non-quantized tensors and the activations (the packed buffers keep the
    layout's dtypes). Peak host memory is about the packed size plus one dense layer. ``fuse`` (default: on CUDA)
    runs layers that share an input (q/k/v, gate/up) as one kernel launch (``siblings.fuse_siblings``); on CPU it
    would only cost load time, the torch path decodes each layer per call either way.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    device = resolve_device(device) if isinstance(device, str) else device
    ckpt = PackedCheckpoint(packed_dir, verify=verify)
    try:
        config = AutoConfig.from_pretrained(str(ckpt.path))
    except (OSError, ValueError) as e:
        raise SpQRError(f"cannot read {ckpt.path}/config.json: {str(e).splitlines()[0] if str(e) else e}") from None
    adapter_for(config)
    with init_empty_weights():  # parameters on meta, buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    try:  # the shards' file handles are closed on every error below too
        for name in ckpt.layers:
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise SpQRError(f"packed layer {name} does not exist in the model of config.json; "
                                "the packed dir is from another model") from None
            pw = ckpt.load_layer(name)
            if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != (pw.out_features,
                                                                                           pw.in_features):
                raise SpQRError(f"packed layer {name} has shape {(pw.out_features, pw.in_features)} but the model "
                                f"expects {tuple(getattr(old, 'weight', torch.empty(0)).shape)}; shape mismatch")
            bias_name = f"{name}.bias"
            bias = ckpt.load_dense(bias_name).to(dtype) if bias_name in ckpt.dense else None
            if (bias is None) != (old.bias is None):
                raise SpQRError(f"layer {name}: bias presence differs from the model config; the packed dir is "
                                "from another model")
            _set_module(model, name, SpQRLinear(pw, bias))

        expected = dict(model.state_dict(keep_vars=True))
        state = {}
        for name in ckpt.dense:
            if name.endswith(".bias") and name[: -len(".bias")] in ckpt.layers:
                continue  # already inside its SpQRLinear
            if name not in expected:
                raise SpQRError(f"packed tensor {name} has no place in the model of config.json; "
                                "the packed dir is from another model")
            t = ckpt.load_dense(name)
            if tuple(t.shape) != tuple(expected[name].shape):
                raise SpQRError(f"tensor {name} has shape {tuple(t.shape)} but the model expects "
                                f"{tuple(expected[name].shape)}; shape mismatch")
            state[name] = t.to(dtype) if t.is_floating_point() else t
        model.load_state_dict(state, strict=False, assign=True)
    finally:
        ckpt.close()
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    still_empty = [n for n, p in model.named_parameters() if p.is_meta]
    if still_empty:
        raise SpQRError(f"the packed checkpoint lacks {len(still_empty)} tensors (first: {still_empty[0]}); "
                        "re-pack the model")
    if (ckpt.path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(ckpt.path))
    model.eval()
    if fuse if fuse is not None else device.type == "cuda":
        fuse_siblings(model, device)
    return model.to(device)


def model_kind(path: str) -> tuple[str, str]:
    """What ``path`` holds and where its HF files are: ``("packed", path)`` for a ``spqr pack`` directory,
    ``("quant", path/dense)`` for a ``spqr quantize`` output (its dequantized checkpoint), else ``("dense", path)``.
    """
    p = Path(path)
    if (p / "spqr_config.json").is_file():
        return "packed", path
    if (p / "quant_config.json").is_file():
        if not (p / "dense" / "config.json").is_file():
            raise SpQRError(f"{path} is an unfinished quantization run (no dense/ checkpoint yet); "
                            "re-run the same `spqr quantize` command to resume it")
        return "quant", str(p / "dense")
    if p.is_dir() and _holds_packed_tensors(p):
        raise SpQRError(f"{path} holds packed SpQR tensors but no spqr_config.json; it cannot be loaded as a plain "
                        "model (its layers would be random): restore spqr_config.json or re-pack the model")
    return "dense", path


# Names only a packed checkpoint's shards hold (``spqr_kernels.layout``); a plain HF checkpoint has none.
_PACKED_SUFFIXES = (".qweight", ".outlier_row_ptr", ".outlier_col", ".scale_stats", ".qscale")


def _holds_packed_tensors(directory: Path) -> bool:
    """Whether any safetensors file in ``directory`` names a packed tensor (header only; unreadable files are left
    to the regular loader, which reports them)."""
    for f in directory.glob("*.safetensors"):
        try:
            names = _safetensors_names(f)
        except (OSError, ValueError, RecursionError):
            continue
        if any(n.endswith(_PACKED_SUFFIXES) for n in names):
            return True
    return False


def _safetensors_names(path: Path) -> list[str]:
    """Tensor names from a safetensors header (8-byte little-endian length, then JSON), without loading data."""
    import json

    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= 100 * 2**20:
            raise ValueError("bad safetensors header size")
        header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise ValueError("bad safetensors header")
    return [k for k in header if k != "__metadata__"]


def load_any_model(path: str, dtype: str = "fp16", device: str = "auto", verify: bool = True) -> tuple[nn.Module, Any]:
    """Load the model and tokenizer at ``path`` for evaluation or generation.

    ``path`` is a hub id, a local HF directory, a ``spqr quantize`` output directory (its ``dense/``
    checkpoint) or a ``spqr pack`` directory (loaded with ``load_packed``; ``verify`` checks its tensors'
    checksums). On CPU, fp16 weights are computed in fp32: the values are exactly the fp16 ones, but CPU fp16
    matmuls are slow or missing. bf16 and fp32 run as asked.
    """
    dev = resolve_device(device)
    kind, hf_path = model_kind(path)
    tokenizer = load_tokenizer(hf_path)
    if kind == "packed":
        torch_dtype = resolve_dtype(dtype)
        if dev.type == "cpu" and torch_dtype == torch.float16:
            torch_dtype = torch.float32
        return load_packed(hf_path, device=dev, dtype=torch_dtype, verify=verify), tokenizer
    model = load_model(hf_path, dtype=dtype, device="cpu")
    if dev.type == "cpu" and next(model.parameters()).dtype == torch.float16:
        model = model.float()
    return model.to(dev), tokenizer
