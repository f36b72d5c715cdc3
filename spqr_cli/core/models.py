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


def load_model(name_or_path: str, dtype: str | torch.dtype = "fp16", device: str = "cpu") -> nn.Module:
    """Load a causal LM by hub id or local directory, check its family is supported, put it in eval mode.

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
    try:
        model, info = AutoModelForCausalLM.from_pretrained(  # (mismatched shapes are reported below, by name)
            name_or_path, dtype=resolve_dtype(dtype), use_safetensors=True, output_loading_info=True,
            ignore_mismatched_sizes=True)
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
    return model.to(resolve_device(device))


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
