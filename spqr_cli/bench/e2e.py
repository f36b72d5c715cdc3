"""End-to-end speed and memory: a LLaMA-shaped model with random weights, packed (SpQR kernels) vs fp16.

Random weights are fine here: speed and memory do not depend on the values (never use these for accuracy).
Both models run the same decode loop: transformers' model forward with a static KV cache, one token per step.
The step is captured once in a CUDA graph and replayed, so the time is GPU time and not Python launch
overhead (reported too, as ``eager``). With ``compile`` the step is also timed through ``torch.compile`` (inductor,
the SpQR linears as the opaque ``spqr::linear`` op) before capture: the fused norms/rotary/activations are what
``spqr run`` gets. Prefill is one forward over a ``prefill_tokens`` prompt.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from spqr_cli.bench.layers import LLAMA_DIMS
from spqr_kernels.synthetic import random_packed

# (layers, heads) of OpenLLaMA-3B and LLaMA-7B, 13B, 33B, 65B; vocabulary 32000
LLAMA_DEPTH = {"3B": (26, 32), "7B": (32, 32), "13B": (40, 40), "33B": (60, 52), "65B": (80, 64)}


def llama_config(size: str, max_len: int = 4096) -> Any:
    from transformers import LlamaConfig

    hidden, inter = LLAMA_DIMS[size]
    layers, heads = LLAMA_DEPTH[size]
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32000,
                       max_position_embeddings=max_len, tie_word_embeddings=False)


def random_model(size: str, packed: bool, device: str = "cuda", seed: int = 0, fuse: bool = True,
                 **packed_kwargs: Any) -> nn.Module:
    """A LLaMA-``size``-shaped causal LM on ``device``; its linears are ``SpQRLinear`` when ``packed``.

    Weights are created directly on the device, layer by layer, so a 33B packed model never needs fp16 room.
    Layers that share an input share their permutation, as quantized ones do, and with ``fuse`` run as one
    launch (``siblings.fuse_block`` per block, what ``load_packed`` does on CUDA).
    """
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    from spqr_cli.core.models import adapter_for
    from spqr_cli.runtime.linear import SpQRLinear
    from spqr_cli.runtime.siblings import fuse_block

    config = llama_config(size)
    with init_empty_weights():
        model = LlamaForCausalLM(config).to(torch.float16)
    gen = torch.Generator(device=device).manual_seed(seed)
    adapter = adapter_for(model)
    blocks = adapter.get_blocks(model)
    if packed:
        for i, block in enumerate(blocks):
            for group in adapter.sequential:
                perm = None
                for name in group:
                    lin = block.get_submodule(name)
                    pw = random_packed(lin.out_features, lin.in_features, device=device, seed=seed + i,
                                       **packed_kwargs)
                    if perm is not None:
                        pw.tensors["perm"] = perm
                    perm = pw.tensors.get("perm")
                    parent, _, attr = name.rpartition(".")
                    setattr(block.get_submodule(parent), attr, SpQRLinear(pw))
            if fuse:  # block by block, as load_packed does (see siblings.fuse_block on memory)
                fuse_block(block, adapter.sequential)
    state = {}
    for name, p in model.named_parameters():
        if p.is_meta:
            std = 1.0 if "norm" in name else 0.02
            t = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float16) * std
            state[name] = t.abs() + 0.5 if "norm" in name else t
    model.load_state_dict(state, strict=False, assign=True)
    return model.to(device).eval()


def _model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@torch.no_grad()
def decode_speed(model: nn.Module, new_tokens: int = 128, prompt_tokens: int = 16, graph: bool = True,
                 compiled: bool = False) -> float:
    """Tokens per second of greedy one-token steps with a static KV cache (CUDA-graph replay when ``graph``; the
    step through ``torch.compile`` when ``compiled``)."""
    from transformers import StaticCache

    device = next(model.parameters()).device
    cache = StaticCache(config=model.config, max_cache_len=prompt_tokens + new_tokens + 8)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), device=device)
    pos = torch.arange(prompt_tokens, device=device)
    logits = model(input_ids=prompt, past_key_values=cache, position_ids=pos[None], cache_position=pos,
                   use_cache=True).logits
    token = logits[:, -1:].argmax(-1)
    step_pos = torch.tensor([prompt_tokens], device=device)
    forward = torch.compile(model) if compiled else model

    def step() -> torch.Tensor:
        out = forward(input_ids=token, past_key_values=cache, position_ids=step_pos[None], cache_position=step_pos,
                    use_cache=True).logits
        return out[:, -1:].argmax(-1)

    nxt = step()  # warm-up: compiles the kernels and fills the per-layer runtime caches before any capture
    torch.cuda.synchronize()
    replay = step
    if graph:
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(g):
            nxt = step()

        def replay() -> torch.Tensor:
            g.replay()
            return nxt
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(new_tokens):
        token.copy_(replay())
        step_pos += 1
    torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - start)


@torch.no_grad()
def prefill_ms(model: nn.Module, tokens: int = 2048, reps: int = 3) -> float:
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    model(input_ids=ids, use_cache=False)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def bench_model(size: str, packed: bool, new_tokens: int = 128, prefill_tokens: int = 2048, compile: bool = False,
                fuse: bool = True, **packed_kwargs: Any) -> dict[str, Any]:
    """Decode tokens/s (graph, eager and, with ``compile``, compiled + graph), prefill time and peak memory of one
    model, built and freed here (``peak_gb``: while running; ``build_peak_gb``: while building it)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = random_model(size, packed, fuse=fuse, **packed_kwargs)
    row: dict[str, Any] = {"model": size, "kind": ("spqr" if fuse else "spqr unfused") if packed else "fp16",
                           "weights_gb": _model_bytes(model) / 1e9,
                           "build_peak_gb": torch.cuda.max_memory_allocated() / 1e9}
    # the peak while running is what a loaded model needs; building random weights has its own temporaries (int64
    # codes of the layer being generated), which load_packed does not
    torch.cuda.reset_peak_memory_stats()
    row["decode_tok_s"] = decode_speed(model, new_tokens, graph=True)
    row["decode_tok_s_eager"] = decode_speed(model, min(new_tokens, 32), graph=False)
    if compile:
        torch._dynamo.reset()  # the fp16 and the packed model must not share compiled code or guards
        try:
            row["decode_tok_s_compiled"] = decode_speed(model, new_tokens, graph=True, compiled=True)
        except Exception as e:  # noqa: BLE001 (a compiler failure is a result to report, not the end of the bench)
            row["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    row["prefill_ms"] = prefill_ms(model, prefill_tokens) if prefill_tokens else None
    row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    del model
    torch.cuda.empty_cache()
    return row


def bench_e2e(size: str = "7B", cap_size: str | None = "33B", cap_gb: float = 24.0, new_tokens: int = 128,
              prefill_tokens: int = 2048, compile: bool = True, fuse: bool = True) -> list[dict[str, Any]]:
    """fp16 vs packed ``size`` (same loop, same process), then a packed ``cap_size`` under a ``cap_gb`` limit.

    ``fuse``: the packed models run sibling layers as one launch (the default of ``load_packed`` on CUDA)."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench_e2e needs a CUDA GPU")
    rows = [_guarded(bench_model, size, packed, new_tokens, prefill_tokens, compile, fuse) for packed in (False, True)]
    if "error" not in rows[0] and "error" not in rows[1]:
        rows[1]["decode_speedup"] = rows[1]["decode_tok_s"] / rows[0]["decode_tok_s"]
        rows[1]["prefill_speedup"] = rows[0]["prefill_ms"] / rows[1]["prefill_ms"]
        if "decode_tok_s_compiled" in rows[0] and "decode_tok_s_compiled" in rows[1]:
            rows[1]["compiled_speedup"] = rows[1]["decode_tok_s_compiled"] / rows[0]["decode_tok_s_compiled"]
    if cap_size:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 1e9 / total))
        try:
            rows.append({**_guarded(bench_model, cap_size, True, new_tokens=32, prefill_tokens=0, fuse=fuse),
                         "cap_gb": cap_gb})
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
    return rows


def _guarded(fn: Any, size: str, packed: bool, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """One row; a model that does not fit becomes a row with its error instead of ending the benchmark."""
    try:
        return fn(size, packed, *args, **kwargs)
    except torch.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return {"model": size, "kind": "spqr" if packed else "fp16", "error": str(e).splitlines()[0]}


def render_e2e(rows: list[dict[str, Any]]) -> object:
    from rich.table import Table

    table = Table(title="SpQR end to end (random weights, batch 1)")
    for col in ("model", "weights", "decode tok/s", "compiled tok/s", "eager tok/s", "prefill ms", "peak GB run/build",
                "vs fp16"):
        table.add_column(col, justify="right")
    for r in rows:
        if "error" in r:
            table.add_row(f"{r['model']} {r['kind']}", "", "", "", "", "", "out of memory", r["error"][:40])
            continue
        vs = f"decode {r['decode_speedup']:.2f}x, prefill {r['prefill_speedup']:.2f}x" if "decode_speedup" in r else ""
        if "compiled_speedup" in r:
            vs += f", compiled {r['compiled_speedup']:.2f}x"
        if "cap_gb" in r:
            vs = f"fits in {r['cap_gb']:.0f} GB"
        compiled = f"{r['decode_tok_s_compiled']:.1f}" if "decode_tok_s_compiled" in r else ""
        if "compile_error" in r:
            compiled = "failed"
            vs += f" (compile: {r['compile_error'][:60]})"
        table.add_row(f"{r['model']} {r['kind']}", f"{r['weights_gb']:.2f} GB", f"{r['decode_tok_s']:.1f}", compiled,
                      f"{r['decode_tok_s_eager']:.1f}", "" if r["prefill_ms"] is None else f"{r['prefill_ms']:.1f}",
                      f"{r['peak_gb']:.2f}" + (f" / {r['build_peak_gb']:.2f}" if "build_peak_gb" in r else ""), vs)
    return table
