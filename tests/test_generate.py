"""``spqr_cli.runtime.generation`` against transformers' own ``generate`` on the same model (greedy is
deterministic)."""

from __future__ import annotations

import pytest
import torch

from spqr_cli.core.errors import SpQRError
from spqr_cli.runtime.generation import generate, run_model
from spqr_cli.runtime.loader import load_any_model

PROMPT = "The kernel scheduler"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def packed_model(quantized_demo):
    return load_any_model(str(quantized_demo["packed"]), "fp16", "cpu")


def test_greedy_matches_model_generate(packed_model):
    model, tokenizer = packed_model
    pieces: list[str] = []
    result = generate(model, tokenizer, PROMPT, max_new_tokens=12, on_text=pieces.append)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    new = ref[0, ids.shape[1]:]
    assert result.new_tokens == new.numel()
    assert result.text == tokenizer.decode(new, skip_special_tokens=True)
    assert "".join(pieces) == result.text and result.text.strip()
    assert result.prefill_seconds > 0 and result.tokens_per_second > 0 and result.device == "cpu"


def test_sampling_is_seeded(packed_model):
    model, tokenizer = packed_model
    a = generate(model, tokenizer, PROMPT, max_new_tokens=10, do_sample=True, seed=3)
    b = generate(model, tokenizer, PROMPT, max_new_tokens=10, do_sample=True, seed=3)
    assert a.text == b.text


def test_run_model_on_quant_dir_equals_packed(quantized_demo, packed_model):
    model, tokenizer = packed_model
    expected = generate(model, tokenizer, PROMPT, max_new_tokens=6).text
    assert run_model(quantized_demo["quant"], PROMPT, device="cpu", max_new_tokens=6).text == expected


@pytest.mark.parametrize("kwargs,message", [
    ({"max_new_tokens": 0}, "--max-new-tokens must be >= 1"),
    ({"max_new_tokens": 4096}, "exceeds the model's context"),
    ({"do_sample": True, "temperature": 0.0}, "--temperature must be > 0"),
])
def test_generate_errors(packed_model, kwargs, message):
    model, tokenizer = packed_model
    with pytest.raises(SpQRError, match=message):
        generate(model, tokenizer, PROMPT, **kwargs)


def test_public_api_names_resolve():
    import spqr_cli

    for name in spqr_cli.__all__:
        assert getattr(spqr_cli, name) is not None, name
    from spqr_cli import generate as api_generate

    assert api_generate is generate  # a function, not a submodule of the same name


class _Cache:
    resets = 0

    def reset(self) -> None:
        self.resets += 1


class _Model:
    """Stands in for a model whose compiled step fails (dynamo/inductor errors come in many types)."""

    calls = 0

    def generate(self, ids, **kwargs):  # noqa: ANN001, ANN003, ANN201
        self.calls += 1
        assert kwargs["max_new_tokens"] == 3
        raise RuntimeError("inductor: no kernel for this op\nsecond line")


def test_warm_up_failure_falls_back_to_eager():
    from spqr_cli.runtime.generation import _warm_up

    said: list[str] = []
    kwargs = {"max_new_tokens": 3, "past_key_values": _Cache()}
    assert _warm_up(_Model(), torch.zeros(1, 2, dtype=torch.long), kwargs, said.append) is None
    assert said[-1] == "compiling failed (RuntimeError: inductor: no kernel for this op); decoding eagerly"
    assert kwargs["past_key_values"].resets == 1  # the shared cache is left empty for the real run
    # one new token comes from the prefill: nothing to compile, the model is not called
    model = _Model()
    assert _warm_up(model, torch.zeros(1, 2, dtype=torch.long), {"max_new_tokens": 1}, said.append) == 0.0
    assert model.calls == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_generation_matches_eager_on_cuda(quantized_demo):
    """The compiled one-token step (torch.compile + CUDA graph around the Triton kernels) gives the eager text.

    Compiled first, on a fresh model: the kernels' per-layer tensors must exist before the CUDA graph records."""
    model, tokenizer = load_any_model(str(quantized_demo["packed"]), "fp16", "cuda")
    compiled = generate(model, tokenizer, PROMPT, max_new_tokens=16, compile=True)
    eager = generate(model, tokenizer, PROMPT, max_new_tokens=16, compile=False)
    assert compiled.compile_seconds > 0 and eager.compile_seconds == 0
    assert compiled.text == eager.text and compiled.new_tokens == eager.new_tokens


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 2])
def test_compiled_generation_short_and_sampled_on_cuda(quantized_demo, tokens):
    """Fewer new tokens than the warm-up takes, and sampling (the warm-up must not move the RNG)."""
    model, tokenizer = load_any_model(str(quantized_demo["packed"]), "fp16", "cuda")
    for kwargs in ({"max_new_tokens": tokens}, {"max_new_tokens": 12, "do_sample": True, "seed": 5}):
        compiled = generate(model, tokenizer, PROMPT, compile=True, **kwargs)
        eager = generate(model, tokenizer, PROMPT, compile=False, **kwargs)
        assert compiled.text == eager.text and compiled.new_tokens == eager.new_tokens
