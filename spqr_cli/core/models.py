"""Model loading and per-family adapters.

An adapter names, for one architecture family, where the decoder blocks live, which modules run before the
first block (embeddings) and after the last (final norm, head), and the linear sub-layers of a block in the
order the quantizer processes them ("true sequential": each group sees inputs produced by the already
quantized groups before it, as in the reference implementations).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spqr_cli.core.errors import SpQRError

DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "float32": torch.float32}


@dataclass(frozen=True)
class FamilyAdapter:
    """Module paths for one architecture family (dotted, relative to the CausalLM model)."""

    name: str
    model_types: tuple[str, ...]
    blocks: str
    pre_block: tuple[str, ...]
    post_block: tuple[str, ...]
    sequential: tuple[tuple[str, ...], ...]

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    def pre_modules(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in (_maybe_submodule(model, p) for p in self.pre_block) if m is not None]

    def post_modules(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in (_maybe_submodule(model, p) for p in self.post_block) if m is not None]

    def linear_names(self) -> list[str]:
        """All quantized sub-layer names of one block, in quantization order."""
        return [name for group in self.sequential for name in group]


def _maybe_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


_LLAMA_SEQ = (
    ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"),
    ("self_attn.o_proj",),
    ("mlp.up_proj", "mlp.gate_proj"),
    ("mlp.down_proj",),
)

FAMILIES: tuple[FamilyAdapter, ...] = (
    FamilyAdapter("llama", ("llama",), "model.layers", ("model.embed_tokens", "model.rotary_emb"),
                  ("model.norm", "lm_head"), _LLAMA_SEQ),
    FamilyAdapter("mistral", ("mistral",), "model.layers", ("model.embed_tokens", "model.rotary_emb"),
                  ("model.norm", "lm_head"), _LLAMA_SEQ),
    FamilyAdapter("qwen2", ("qwen2",), "model.layers", ("model.embed_tokens", "model.rotary_emb"),
                  ("model.norm", "lm_head"), _LLAMA_SEQ),
    FamilyAdapter(
        "opt", ("opt",), "model.decoder.layers",
        ("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
        ("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
        (("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"), ("self_attn.out_proj",), ("fc1",),
         ("fc2",)),
    ),
    FamilyAdapter(
        "falcon", ("falcon",), "transformer.h", ("transformer.word_embeddings", "transformer.rotary_emb"),
        ("transformer.ln_f", "lm_head"),
        (("self_attention.query_key_value",), ("self_attention.dense",), ("mlp.dense_h_to_4h",),
         ("mlp.dense_4h_to_h",)),
    ),
)

SUPPORTED = ", ".join(f.name for f in FAMILIES)


def adapter_for(model_or_config: Any) -> FamilyAdapter:
    """The adapter for a model (or its config); a clear error for anything else."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise SpQRError(f"unsupported architecture {model_type!r}; supported families: {SUPPORTED}")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise SpQRError(f"unknown dtype {dtype!r}; choose fp16, bf16 or fp32") from None


def resolve_device(device: str) -> torch.device:
    """``auto`` picks cuda when available; asking for cuda without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SpQRError("--device cuda was requested but no CUDA GPU is available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise SpQRError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None


def _check_model_ref(name_or_path: str) -> None:
    path = Path(name_or_path)
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        raise SpQRError(f"model path {name_or_path!r} does not exist or has no config.json; "
                        "pass a local model directory or a hub id")


def load_config(name_or_path: str) -> Any:
    from transformers import AutoConfig

    _check_model_ref(name_or_path)
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise SpQRError(f"cannot load model config {name_or_path!r}: {_first_line(e)}") from None


def load_tokenizer(name_or_path: str) -> Any:
    from transformers import AutoTokenizer

    _check_model_ref(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise SpQRError(f"cannot load tokenizer of {name_or_path!r}: {_first_line(e)}") from None


def load_model(name_or_path: str, dtype: str | torch.dtype = "fp16", device: str = "cpu",
               max_memory: dict[int | str, int] | None = None, offload_folder: str | Path | None = None) -> nn.Module:
    """Load a causal LM by hub id or local directory, check its family is supported, put it in eval mode.

    ``max_memory`` (accelerate's ``{gpu index: bytes, "cpu": bytes}``) places the weights with
    ``device_map="auto"`` instead of on ``device``: each device up to its cap, in that order, and what does not fit
    is offloaded to disk (``offload_folder``; safetensors weights are read from the checkpoint's own shards when
    needed, nothing is copied). The accelerate hooks move each module's weights to its execution device at forward
    time, so a model larger than the GPU (or the host) still runs.

    Strict, because every later step trusts the weights: a checkpoint that lacks a weight of the architecture
    (transformers would initialise it at random and only log it) or holds one the architecture does not have is
    refused, and so are directories of other formats (a packed or quantization output, pickle-only weights, which
    this tool never unpickles) and damaged safetensors.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    check_weight_files(name_or_path)
    config = load_config(name_or_path)
    adapter_for(config)
    placement: dict[str, Any] = {}
    if max_memory is not None:
        placement = {"device_map": "auto", "max_memory": max_memory, "offload_folder": offload_folder}
    try:
        model, info = AutoModelForCausalLM.from_pretrained(  # (mismatched shapes are reported below, by name)
            name_or_path, dtype=resolve_dtype(dtype), use_safetensors=True, output_loading_info=True,
            ignore_mismatched_sizes=True, **placement)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise SpQRError(f"cannot load model {name_or_path!r}: {_first_line(e)}; the weights are missing or "
                        "damaged (re-download or re-save the model)") from None
    problems = {kind: sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or ()) for kind, key in (
        ("missing", "missing_keys"), ("unexpected", "unexpected_keys"), ("mismatched", "mismatched_keys"))}
    problems = {kind: names for kind, names in problems.items() if names}
    if problems:
        what = "; ".join(f"{len(v)} {k} (first: {v[0]})" for k, v in problems.items())
        raise SpQRError(f"the weights of {name_or_path!r} do not match its config.json: {what}; the checkpoint is "
                        "incomplete or belongs to another model")
    model.eval()
    if max_memory is not None:
        return model
    return model.to(resolve_device(device))


def execution_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: its parameters' device, or for a model placed by accelerate (``hf_device_map``,
    weights offloaded to the host or disk) the first GPU it uses, else the CPU (offloaded weights are on the meta
    device until a hook brings them to this device)."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        gpus = [d for d in device_map.values() if isinstance(d, int) or str(d).startswith(("cuda", "xpu", "mps"))]
        if not gpus:
            return torch.device("cpu")
        return torch.device(f"cuda:{gpus[0]}" if isinstance(gpus[0], int) else gpus[0])
    return next(model.parameters()).device


def placement(model: nn.Module) -> str:
    """A model's device for reports: ``cuda:0``, or where accelerate placed its weights after the execution device:
    ``cuda:0+cpu+disk``, ``cpu+disk`` (computed on the CPU, weights read from disk)."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return str(next(model.parameters()).device)
    names = [str(execution_device(model))] + [f"cuda:{d}" if isinstance(d, int) else str(d)
                                               for d in device_map.values()]
    order = {"cpu": 1, "disk": 2}
    return "+".join([names[0], *sorted(dict.fromkeys(n for n in names[1:] if n != names[0]),
                                       key=lambda d: (order.get(d, 0), d))])


def is_offloaded(model: nn.Module) -> bool:
    """Whether accelerate keeps some of the model's weights off its execution device (host or disk)."""
    device_map = getattr(model, "hf_device_map", None) or {}
    where = {str(d) for d in device_map.values()}
    return "disk" in where or ("cpu" in where and execution_device(model).type != "cpu")


def empty_model(name_or_path: str, dtype: str | torch.dtype = "fp16") -> nn.Module:
    """The model's skeleton on the meta device, in eval mode: every module built from config.json, no weight read
    (non-persistent buffers such as rotary tables are real, computed as ``from_pretrained`` computes them). The
    streamed quantizer fills one block at a time from the checkpoint (``core.streaming``)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = load_config(name_or_path)
    adapter_for(config)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype))
    return model.eval()


def tied_weight_names(model: nn.Module) -> set[str]:
    """Names of the weights that are tied to another one (``lm_head.weight`` with tied embeddings): a checkpoint
    need not store them and a saved one does not."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is None:
        tied = getattr(model, "_tied_weights_keys", None) or {}
    tie = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    return set(tied) if tie else set()


def check_checkpoint(model: nn.Module, weights: Any, name_or_path: str) -> None:
    """The strict checks of ``load_model``, from the safetensors headers only (no tensor is read): a weight of the
    architecture that the checkpoint lacks, one the architecture does not have, or one of another shape is refused
    with the same one-line error. ``weights`` is a ``core.streaming.CheckpointWeights``."""
    import re

    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    weights.align_to(expected, getattr(model, "base_model_prefix", ""))
    stored = weights.model_names()
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]
    non_persistent = {f"{m}.{b}" if m else b for m, sub in model.named_modules()
                      for b in sub._non_persistent_buffers_set}
    tied = tied_weight_names(model)
    problems = {
        "missing": sorted(k for k in expected if k not in stored and k not in tied),
        "unexpected": sorted(k for k in stored if k not in expected and k not in non_persistent
                             and not any(p.search(k) for p in ignore)),
        "mismatched": sorted(k for k in expected if k in stored and weights.shape(k) != expected[k]),
    }
    problems = {kind: names for kind, names in problems.items() if names}
    if problems:
        what = "; ".join(f"{len(v)} {k} (first: {v[0]})" for k, v in problems.items())
        raise SpQRError(f"the weights of {name_or_path!r} do not match its config.json: {what}; the checkpoint is "
                        "incomplete or belongs to another model")


def check_weight_files(name_or_path: str) -> None:
    """Local directories that are not plain safetensors Hugging Face checkpoints get a message naming what they
    are instead of a loader error (or worse, a model with random layers)."""
    path = Path(name_or_path)
    if not path.is_dir():
        return  # a hub id: transformers resolves it
    if (path / "spqr_config.json").is_file():
        raise SpQRError(f"{name_or_path!r} is a packed spqr checkpoint, not a dense model: quantize the original "
                        f"model, or `spqr unpack {name_or_path} --out DIR` to get a dense one")
    if (path / "quant_config.json").is_file():
        raise SpQRError(f"{name_or_path!r} is a `spqr quantize` output directory: quantize the original model "
                        f"(its dequantized copy is {path / 'dense'})")
    has_safetensors = any(path.glob("*.safetensors"))
    pickled = [p.name for p in (*path.glob("*.bin"), *path.glob("*.pt"), *path.glob("*.pth"))]
    if not has_safetensors and pickled:
        raise SpQRError(f"{name_or_path!r} holds only pickle weights ({pickled[0]}); spqr never unpickles model "
                        "files: convert it once with transformers (`from_pretrained(..., weights_only=True)` then "
                        "`save_pretrained(DIR)`, which writes safetensors) and pass DIR")


def model_max_length(config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
