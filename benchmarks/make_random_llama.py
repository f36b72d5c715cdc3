"""Write a random-weight LLaMA-shaped safetensors checkpoint of any width and depth (for memory and speed runs).

    python benchmarks/make_random_llama.py OUT --hidden 4096 --intermediate 11008 --layers 4 --heads 32
    python benchmarks/make_random_llama.py OUT --shape 13b --layers 16 --shard-mb 2000

The weights are written one decoder block at a time (never the whole model in memory), sharded like a Hugging Face
checkpoint (``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``, or one ``model.safetensors``),
as fp16 drawn from N(0, 0.02) with unit norms, seeded. The tokenizer is copied from ``--tokenizer-from`` (default:
``../shared/models/docs-llama-3m``, whose vocabulary sets ``--vocab``) when that directory exists; otherwise only
config.json is written with ``--vocab`` (default 32000) and ``spqr quantize`` needs a ``--calib`` file.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

# LLaMA shapes: hidden, intermediate, heads, kv heads
SHAPES = {
    "7b": (4096, 11008, 32, 32),
    "13b": (5120, 13824, 40, 40),
    "70b": (8192, 28672, 64, 8),
}
DEFAULT_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "models" / "docs-llama-3m"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")


def llama_config(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
                 context: int = 2048, tie: bool = False) -> dict:
    """A config.json for ``LlamaForCausalLM`` of these sizes (fp16)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "float16",
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
        "vocab_size": vocab, "max_position_embeddings": context, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": tie, "bos_token_id": 0,
        "eos_token_id": 1, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "initializer_range": 0.02, "use_cache": True,
    }


def block_tensors(i: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                  gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Decoder block ``i``'s tensors, fp16."""
    head_dim = hidden // heads
    shapes = {
        "self_attn.q_proj.weight": (heads * head_dim, hidden),
        "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.o_proj.weight": (hidden, heads * head_dim),
        "mlp.gate_proj.weight": (intermediate, hidden),
        "mlp.up_proj.weight": (intermediate, hidden),
        "mlp.down_proj.weight": (hidden, intermediate),
    }
    out = {f"model.layers.{i}.{k}": (torch.randn(s, generator=gen) * 0.02).half() for k, s in shapes.items()}
    out[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden, dtype=torch.float16)
    out[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.float16)
    return out


def write_random_llama(out: str | Path, hidden: int, intermediate: int, layers: int, heads: int,
                       kv_heads: int | None = None, vocab: int | None = None, shard_mb: float = 2000,
                       tokenizer_from: str | Path | None = DEFAULT_TOKENIZER, seed: int = 0,
                       context: int = 2048) -> Path:
    """Write the checkpoint to ``out`` (created); return it. Memory: one shard's worth of tensors at most."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kv_heads = kv_heads or heads
    tok = Path(tokenizer_from) if tokenizer_from else None
    if tok is not None and (tok / "tokenizer.json").is_file():
        for name in TOKENIZER_FILES:
            if (tok / name).is_file():
                shutil.copyfile(tok / name, out / name)
        if vocab is None:
            vocab = json.loads((tok / "config.json").read_text())["vocab_size"]
    vocab = vocab or 32000
    (out / "config.json").write_text(json.dumps(
        llama_config(hidden, intermediate, layers, heads, kv_heads, vocab, context), indent=2) + "\n")
    gen = torch.Generator().manual_seed(seed)
    limit = int(shard_mb * 2**20)
    pending: dict[str, torch.Tensor] = {}
    names: list[list[str]] = []
    tmp_files: list[Path] = []

    def flush() -> None:
        if pending:
            path = out / f"shard-{len(tmp_files):05d}.tmp"
            save_file(pending, str(path), metadata={"format": "pt"})
            tmp_files.append(path)
            names.append(list(pending))
            pending.clear()

    def add(tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if pending and sum(t.numel() * t.element_size() for t in pending.values()) + size > limit:
            flush()
        pending.update(tensors)

    add({"model.embed_tokens.weight": (torch.randn(vocab, hidden, generator=gen) * 0.02).half()})
    for i in range(layers):
        add(block_tensors(i, hidden, intermediate, heads, kv_heads, gen))
    add({"model.norm.weight": torch.ones(hidden, dtype=torch.float16),
         "lm_head.weight": (torch.randn(vocab, hidden, generator=gen) * 0.02).half()})
    flush()
    total = len(tmp_files)
    if total == 1:
        tmp_files[0].rename(out / "model.safetensors")
    else:
        weight_map = {}
        for k, (path, keys) in enumerate(zip(tmp_files, names, strict=True)):
            name = f"model-{k + 1:05d}-of-{total:05d}.safetensors"
            path.rename(out / name)
            weight_map.update({key: name for key in keys})
        size = sum((out / f).stat().st_size for f in set(weight_map.values()))
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="LLaMA width preset (overrides the size flags)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=None, help="default: the tokenizer's, else 32000")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--shard-mb", type=float, default=2000)
    ap.add_argument("--tokenizer-from", default=str(DEFAULT_TOKENIZER),
                    help="directory to copy tokenizer files from ('' for none)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    hidden, inter, heads, kv = args.hidden, args.intermediate, args.heads, args.kv_heads
    if args.shape:
        hidden, inter, heads, kv = SHAPES[args.shape]
    path = write_random_llama(args.out, hidden, inter, args.layers, heads, kv, args.vocab, args.shard_mb,
                              args.tokenizer_from or None, args.seed, args.context)
    print(f"wrote {path}: {args.layers} blocks of hidden {hidden}, intermediate {inter}")


if __name__ == "__main__":
    main()
