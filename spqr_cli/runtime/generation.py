"""`spqr run`: streaming text generation from a packed (or dense) model, with tokens/s measured.

Generation goes through transformers' ``generate`` so sampling, stopping and caching behave exactly as users
expect. On GPU the KV cache is static (fixed shapes) and, by default, transformers compiles the one-token step
(``torch.compile``, mode ``reduce-overhead``: inductor fuses the norms, rotary and activations around the opaque
``spqr::linear`` op, and the step replays as one CUDA graph). Eager, a 7B-shaped packed model spends more time in
Python launching ~230 kernels a token than on the GPU (eager vs compiled tokens/s: ``docs/benchmarks.md``).
Compiling costs a warm-up, run before the timed generation and reported apart, once per model and cache length:
the model keeps that length's static cache for later calls (``spqr serve``), which then start at once.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from spqr_cli.core.errors import SpQRError
from spqr_cli.core.models import execution_device, is_offloaded, resolve_device

CACHE_STEP = 256  # static cache lengths are rounded up to a multiple of this (fewer distinct compiled shapes)


@dataclass
class GenerationResult:
    prompt: str
    text: str
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    device: str
    compile_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first, over the time after the first token appeared."""
        return max(self.new_tokens - 1, 0) / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


def load_for_generation(path: str | Path, device: str = "auto", verify: bool = True,
                        **memory: Any) -> tuple[Any, Any]:
    """A packed checkpoint (``spqr_config.json``) through ``load_packed``, otherwise a dense HF model. ``memory``:
    ``max_gpu_memory`` / ``max_cpu_memory`` / ``offload_dir`` of ``load_any_model`` (a model larger than the
    GPU)."""
    from spqr_cli.runtime.loader import load_any_model

    return load_any_model(str(path), "fp16", device, verify=verify, **memory)


def check_generation_args(max_new_tokens: int, do_sample: bool, temperature: float, top_p: float,
                          top_k: int) -> None:
    """Refuse generation settings transformers would reject mid-run or silently misuse (``top_p=2`` used to be
    accepted); called by ``generate`` and, before the model is loaded, by ``run_model`` (``spqr run``). The
    temperature only matters when sampling (greedy ignores it)."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise SpQRError(f"--max-new-tokens must be >= 1 (an integer), got {max_new_tokens!r}")
    if not 0 < top_p <= 1:  # also refuses nan
        raise SpQRError(f"--top-p must be in (0, 1] (1 turns nucleus sampling off), got {top_p}")
    if not _is_int(top_k) or top_k < 0:
        raise SpQRError(f"--top-k must be an integer >= 0 (0 turns top-k sampling off), got {top_k!r}")
    if do_sample and not (temperature > 0 and math.isfinite(temperature)):
        raise SpQRError(f"--temperature must be > 0 and finite when sampling, got {temperature}; use --greedy for "
                        "the most likely tokens")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def prompt_ids(tokenizer: Any, prompt: str, add_special_tokens: bool = True) -> torch.Tensor:
    """``prompt`` as a (1, n) tensor of token ids; an empty prompt becomes the BOS token (generation needs one).

    ``add_special_tokens=False`` for text that already carries them (a rendered chat template starts with BOS)."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens).input_ids
    if ids.shape[1] == 0:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
        ids = torch.tensor([[bos]])
    return ids


def context_limit(model: Any) -> int | None:
    """The model's context length in tokens (``max_position_embeddings``), if it has one."""
    return getattr(model.config, "max_position_embeddings", None)


def check_context(model: Any, prompt_tokens: int, max_new_tokens: int, flag: str = "--max-new-tokens") -> None:
    """Refuse a prompt + generation longer than the model's context (positions past it are undefined)."""
    limit = context_limit(model)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise SpQRError(f"prompt ({prompt_tokens} tokens) + {flag} {max_new_tokens} exceeds the model's "
                        f"context of {limit} tokens; shorten the prompt or lower {flag}")


def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 0.8, top_p: float = 0.95, top_k: int = 50, seed: int = 0,
             on_text: Callable[[str], None] | None = None, compile: bool = True,
             on_status: Callable[[str], None] | None = None, add_special_tokens: bool = True) -> GenerationResult:
    """Generate from ``prompt``; ``on_text`` receives the decoded text piece by piece as it is produced.

    ``compile`` (CUDA only): compile the decode step and warm it up first (``on_status`` hears about it).
    ``on_text`` may raise to stop generating (``spqr serve`` does on a stop string or a closed connection): the
    exception leaves ``generate`` as it is. ``add_special_tokens``: see ``prompt_ids``.
    """
    from transformers import TextStreamer

    check_generation_args(max_new_tokens, do_sample, temperature, top_p, top_k)
    device = execution_device(model)
    ids = prompt_ids(tokenizer, prompt, add_special_tokens).to(device)
    limit = context_limit(model)
    check_context(model, ids.shape[1], max_new_tokens)
    torch.manual_seed(seed)

    marks: list[float] = []
    pieces: list[str] = []

    class _Stream(TextStreamer):
        def put(self, value: torch.Tensor) -> None:
            marks.append(time.perf_counter())
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            pieces.append(text)
            if on_text is not None and text:
                on_text(text)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "pad_token_id": pad}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    compile_seconds = 0.0
    if is_offloaded(model):
        pass  # weights move in at every step (accelerate hooks): no static cache or CUDA graph to capture
    elif device.type == "cuda" and compile:
        # the static cache's length is rounded up so that later calls with similar lengths reuse the compiled step
        # (each new cache shape compiles again)
        length = -(-(ids.shape[1] + max_new_tokens) // CACHE_STEP) * CACHE_STEP
        warm = prepare_static_cache(model, ids, kwargs, min(length, limit) if limit else length, on_status)
        if warm is None:
            kwargs["disable_compile"] = True
        compile_seconds = warm or 0.0
        torch.manual_seed(seed)
    elif device.type == "cuda":
        kwargs.update(cache_implementation="static", disable_compile=True)
    start = time.perf_counter()
    with torch.no_grad(), _quiet_cache_kwarg():
        out = model.generate(ids, attention_mask=torch.ones_like(ids),
                             streamer=_Stream(tokenizer, skip_prompt=True, skip_special_tokens=True), **kwargs)
    end = time.perf_counter()
    new = int(out.shape[1] - ids.shape[1])
    # marks[0] is the prompt, marks[1] the first generated token: prefill ends there
    first = marks[1] if len(marks) > 1 else end
    return GenerationResult(prompt=prompt, text="".join(pieces), new_tokens=new, prefill_seconds=first - start,
                            decode_seconds=end - first, device=str(device), compile_seconds=compile_seconds)


@contextlib.contextmanager
def _quiet_cache_kwarg() -> Iterator[None]:
    """transformers >= 5 renamed ``generate``'s ``past_key_values`` to ``cache`` (with a FutureWarning); the old
    name is the one every supported version takes, so its warning is noise for ``spqr run`` users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        yield


MAX_STATIC_CACHES = 2  # per model: a 7B model's 4096-token cache takes 2 GB of GPU memory


@dataclass
class _StaticCaches:
    """One model's static KV caches by length (least recently used first), and the lengths its compiled decode
    step was warmed up for."""

    caches: OrderedDict[int, Any] = field(default_factory=OrderedDict)
    warmed: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)  # lengths whose compile failed (decoded eagerly from then on)


# per model (dropped with it): a compiled step's CUDA graph is recorded on its cache's tensors, so a later call of
# the same length replays it only with the same cache object; a new one would compile and record again
_STATIC_CACHES: weakref.WeakKeyDictionary[Any, _StaticCaches] = weakref.WeakKeyDictionary()


def prepare_static_cache(model: Any, ids: torch.Tensor, kwargs: dict[str, Any], length: int,
                         on_status: Callable[[str], None] | None) -> float | None:
    """Put ``model``'s static cache of ``length`` tokens in ``kwargs`` (made on first use, emptied on every later
    one) and warm the compiled step up for that length once per model (``spqr serve`` generates many times).

    Returns the warm-up's seconds, 0.0 when this length was warmed before (or there was nothing to compile), or
    ``None`` when compiling failed (now or for this length before: not tried again). The caches live as long as
    the model, one per length used, up to ``MAX_STATIC_CACHES`` (the least recently used is dropped, and warmed
    again if it comes back); one generation at a time per model, as they are shared."""
    from transformers import StaticCache

    state = _STATIC_CACHES.setdefault(model, _StaticCaches())
    cache = state.caches.get(length)
    if cache is None:
        while len(state.caches) >= MAX_STATIC_CACHES:  # the least recently used goes, and its warm-up with it
            state.warmed.discard(state.caches.popitem(last=False)[0])
        cache = state.caches[length] = StaticCache(config=model.config, max_cache_len=length)
    else:
        cache.reset()
        state.caches.move_to_end(length)
    kwargs.update(past_key_values=cache, disable_compile=False)
    if length in state.failed:  # compiling failed for this length before: decode eagerly at once
        return None
    if length in state.warmed:
        return 0.0
    warm = _warm_up(model, ids, kwargs, on_status)
    if warm is None:  # every request would pay the failed compile again
        state.failed.add(length)
    elif warm:  # (0.0: a single new token, nothing was compiled)
        state.warmed.add(length)
    return warm


def _warm_up(model: Any, ids: torch.Tensor, kwargs: dict[str, Any],
             on_status: Callable[[str], None] | None) -> float | None:
    """Compile and warm the one-token step before the timed run; seconds taken, or ``None`` if compiling failed
    (said through ``on_status``; the caller then decodes eagerly). Leaves the shared cache empty."""
    steps = min(4, kwargs["max_new_tokens"])  # trace + compile, CUDA-graph warm-up, record, replay
    if steps < 2:
        return 0.0  # a single new token comes from the (eager) prefill: there is no step to compile
    say = on_status or (lambda _m: None)
    say("compiling the decode step (once per cache size; --no-compile skips it)")
    start = time.perf_counter()
    try:
        with torch.no_grad(), _quiet_cache_kwarg():
            model.generate(ids, attention_mask=torch.ones_like(ids), **{**kwargs, "max_new_tokens": steps})
    except Exception as e:  # noqa: BLE001 (dynamo/inductor raise many types; eager decoding still works)
        say(f"compiling failed ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
            "decoding eagerly")
        return None
    finally:
        kwargs["past_key_values"].reset()
    return time.perf_counter() - start


def run_model(path: str | Path, prompt: str, device: str = "auto", verify: bool = True,
              on_text: Callable[[str], None] | None = None, max_gpu_memory: str | int | None = None,
              max_cpu_memory: str | int | None = None, offload_dir: str | Path | None = None,
              **gen_kwargs: Any) -> GenerationResult:
    """Load ``path`` and generate: the library function behind ``spqr run`` (settings checked before loading).
    ``max_gpu_memory`` / ``max_cpu_memory`` / ``offload_dir``: see ``load_any_model``."""
    given = {**_GENERATE_DEFAULTS, **gen_kwargs}
    check_generation_args(*(given[k] for k in ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k")))
    resolve_device(device)
    model, tokenizer = load_for_generation(path, device, verify, max_gpu_memory=max_gpu_memory,
                                           max_cpu_memory=max_cpu_memory, offload_dir=offload_dir)
    return generate(model, tokenizer, prompt, on_text=on_text, **gen_kwargs)


# ``generate``'s keyword defaults, so that ``run_model`` checks the settings ``generate`` will use
_GENERATE_DEFAULTS = {name: p.default for name, p in inspect.signature(generate).parameters.items()
                      if p.default is not inspect.Parameter.empty}
