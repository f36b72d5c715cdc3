"""``generation.prepare_static_cache``: the compiled decode step is warmed up once per model and cache length, and
each (model, length) keeps one static cache (``spqr serve`` generates many times on one model).

The CUDA path itself runs in ``test_generate.py``'s gpu tests; here the bookkeeping runs on the CPU with stand-ins
for the model, the cache and the warm-up.
"""

from __future__ import annotations

import gc
from typing import Any

import pytest
import torch

from spqr_cli.runtime import generation

IDS = torch.zeros(1, 3, dtype=torch.long)


class _Cache:
    """Stands in for transformers' ``StaticCache``: remembers its length and how often it was emptied."""

    def __init__(self, config: Any, max_cache_len: int) -> None:
        self.length, self.resets = max_cache_len, 0

    def reset(self) -> None:
        self.resets += 1


class _Model:
    config = None


class _WarmUps:
    """Stands in for ``generation._warm_up``: records each call's (model, cache length) and returns the seconds
    queued in ``results`` (2.5 once they run out)."""

    def __init__(self) -> None:
        self.calls: list[tuple[_Model, int]] = []
        self.results: list[float | None] = []

    def __call__(self, model: _Model, ids: torch.Tensor, kwargs: dict[str, Any], on_status: Any) -> float | None:
        assert kwargs["disable_compile"] is False and ids is IDS
        self.calls.append((model, kwargs["past_key_values"].length))
        return self.results.pop(0) if self.results else 2.5


@pytest.fixture
def warm_ups(monkeypatch: pytest.MonkeyPatch) -> _WarmUps:
    import transformers

    fake = _WarmUps()
    monkeypatch.setattr(transformers, "StaticCache", _Cache)
    monkeypatch.setattr(generation, "_warm_up", fake)
    return fake


def _prepare(model: _Model, length: int) -> tuple[float | None, _Cache]:
    kwargs: dict[str, Any] = {"max_new_tokens": 8}
    warm = generation.prepare_static_cache(model, IDS, kwargs, length, None)
    return warm, kwargs["past_key_values"]


def test_warm_up_once_per_model_and_length(warm_ups: _WarmUps) -> None:
    model = _Model()
    first, cache = _prepare(model, 256)
    assert first == 2.5 and warm_ups.calls == [(model, 256)] and cache.resets == 0
    again, same = _prepare(model, 256)  # a later request of the same rounded length: no warm-up, the same cache
    assert again == 0.0 and same is cache and cache.resets == 1 and len(warm_ups.calls) == 1
    longer, other = _prepare(model, 512)  # another length: another shape to compile, another cache
    assert longer == 2.5 and other is not cache and warm_ups.calls[-1] == (model, 512)
    assert _prepare(model, 512)[0] == 0.0 and _prepare(model, 256)[0] == 0.0 and len(warm_ups.calls) == 2
    second = _Model()  # another model warms for itself
    assert _prepare(second, 256)[0] == 2.5 and warm_ups.calls[-1] == (second, 256)


def test_failed_warm_up_is_not_retried_and_an_empty_one_not_remembered(warm_ups: _WarmUps) -> None:
    model = _Model()
    warm_ups.results += [0.0, 2.5, None]
    nothing, cache = _prepare(model, 256)  # one new token: nothing was compiled, nothing remembered
    assert nothing == 0.0
    warmed, same = _prepare(model, 256)
    assert warmed == 2.5 and same is cache and len(warm_ups.calls) == 2
    assert _prepare(model, 256)[0] == 0.0 and len(warm_ups.calls) == 2
    assert _prepare(model, 512)[0] is None  # compiling failed: this request decodes eagerly...
    assert _prepare(model, 512)[0] is None and len(warm_ups.calls) == 3  # ...and so do later ones, at once


def test_caches_go_with_their_model(warm_ups: _WarmUps) -> None:
    model = _Model()
    _prepare(model, 256)
    assert model in generation._STATIC_CACHES
    before = len(generation._STATIC_CACHES)
    warm_ups.calls.clear()  # drop the references the stand-in warm-up kept
    del model
    gc.collect()
    assert len(generation._STATIC_CACHES) == before - 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_later_calls_reuse_the_warm_step_on_cuda(quantized_demo):
    """The real thing: a second call of the same rounded length neither warms up nor changes the text, and
    replays the step recorded on its cache; a longer one warms up for its own length."""
    from spqr_cli.runtime.generation import generate
    from spqr_cli.runtime.loader import load_any_model

    model, tokenizer = load_any_model(str(quantized_demo["packed"]), "fp16", "cuda")
    first = generate(model, tokenizer, "The kernel scheduler", max_new_tokens=16)
    again = generate(model, tokenizer, "The kernel scheduler", max_new_tokens=20)
    eager = generate(model, tokenizer, "The kernel scheduler", max_new_tokens=20, compile=False)
    assert first.compile_seconds > 0 and again.compile_seconds == 0
    assert again.text == eager.text and again.text.startswith(first.text)
    longer = generate(model, tokenizer, "The kernel scheduler", max_new_tokens=300)
    assert longer.compile_seconds > 0
    assert generate(model, tokenizer, "The kernel", max_new_tokens=300).compile_seconds == 0


def test_at_most_a_few_caches_per_model(warm_ups: _WarmUps, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every length used keeps a static cache (GPU memory): the least recently used goes beyond
    ``MAX_STATIC_CACHES``, and is warmed up again if it comes back."""
    monkeypatch.setattr(generation, "MAX_STATIC_CACHES", 2)
    model = _Model()
    _prepare(model, 256)
    _prepare(model, 512)
    _prepare(model, 256)  # used again: now the most recent
    assert _prepare(model, 4096)[0] == 2.5  # a new length evicts the least recently used, 512
    assert list(generation._STATIC_CACHES[model].caches) == [256, 4096]
    assert _prepare(model, 256)[0] == 0.0  # still there, still warm
    assert _prepare(model, 512)[0] == 2.5  # evicted: warmed (and allocated) again
