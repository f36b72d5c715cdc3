from __future__ import annotations

import json
import math

import pytest
import torch

from spqr_cli.core.errors import SpQRError
from spqr_cli.core.evaluate import evaluate_perplexity
from spqr_cli.core.io import write_json
from spqr_cli.runtime.loader import load_any_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_llama(demo_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(demo_tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def test_perplexity_equals_exp_of_independent_cross_entropy(tiny_llama, demo_tokenizer, text_file):
    result = evaluate_perplexity(tiny_llama, demo_tokenizer, f"file:{text_file}", seqlen=50, batch_size=3)

    # Independent computation: the protocol written out by hand.
    rows = [line for line in text_file.read_text().splitlines() if line.strip()]
    ids = demo_tokenizer("\n\n".join(rows))["input_ids"]
    n = len(ids) // 50
    nlls = []
    with torch.no_grad():
        for i in range(n):
            x = torch.tensor([ids[i * 50:(i + 1) * 50]])
            logp = torch.log_softmax(tiny_llama(x).logits[0, :-1].double(), dim=-1)
            nlls.append(-logp.gather(1, x[0, 1:, None]).squeeze(1))
    expected = math.exp(torch.cat(nlls).mean().item())

    assert result.windows == n and result.seqlen == 50 and result.tokens == n * 49
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
    assert 1000 < result.perplexity < 20000  # a random model over an 8k vocabulary


def test_batch_size_and_max_windows(tiny_llama, demo_tokenizer, text_file):
    a = evaluate_perplexity(tiny_llama, demo_tokenizer, f"file:{text_file}", seqlen=40, max_windows=5)
    b = evaluate_perplexity(tiny_llama, demo_tokenizer, f"file:{text_file}", seqlen=40, max_windows=5,
                            batch_size=4)
    assert a.windows == 5
    assert a.perplexity == pytest.approx(b.perplexity, rel=1e-5)


def test_seqlen_defaults_to_context_and_is_checked(tiny_llama, demo_tokenizer, text_file):
    assert evaluate_perplexity(tiny_llama, demo_tokenizer, f"file:{text_file}").seqlen == 128
    with pytest.raises(SpQRError, match="larger than the model's context of 128"):
        evaluate_perplexity(tiny_llama, demo_tokenizer, f"file:{text_file}", seqlen=256)


def test_cpu_fp16_keeps_weight_values(demo_model_path):
    from spqr_cli.core.models import load_model

    model, tokenizer = load_any_model(str(demo_model_path), dtype="fp16", device="cpu")
    ref = load_model(str(demo_model_path), dtype="fp16", device="cpu")
    p, q = next(model.parameters()), next(ref.parameters())
    assert p.dtype == torch.float32 and q.dtype == torch.float16
    assert torch.equal(p, q.float())
    assert len(tokenizer) == 8192


def test_demo_model_in_domain_perplexity(demo_model_path):
    from spqr_cli.demo import DEMO_TEST

    model, tokenizer = load_any_model(str(demo_model_path), dtype="fp16", device="cpu")
    result = evaluate_perplexity(model, tokenizer, f"file:{DEMO_TEST}", seqlen=512, max_windows=8)
    assert 10 < result.perplexity < 40  # a trained model on its own domain (docs valid loss ~3.0)


def test_write_json_atomic(tmp_path):
    path = write_json({"a": 1}, tmp_path / "out" / "r.json")
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_model_kind_and_packed_loading(quantized_demo, demo_model_path, tmp_path):
    from spqr_cli.runtime.linear import SpQRLinear
    from spqr_cli.runtime.loader import model_kind

    assert model_kind(str(quantized_demo["packed"]))[0] == "packed"
    assert model_kind(str(quantized_demo["quant"])) == ("quant", str(quantized_demo["quant"] / "dense"))
    assert model_kind(str(demo_model_path))[0] == "dense"
    (tmp_path / "quant_config.json").write_text("{}")
    with pytest.raises(SpQRError, match="unfinished quantization run"):
        model_kind(str(tmp_path))

    packed, tokenizer = load_any_model(str(quantized_demo["packed"]), "fp16", "cpu")
    dense, _ = load_any_model(str(quantized_demo["quant"]), "fp16", "cpu")
    assert isinstance(packed.model.layers[0].mlp.down_proj, SpQRLinear)
    assert torch.equal(packed.model.layers[0].mlp.down_proj.dequantize().float(),
                       dense.model.layers[0].mlp.down_proj.weight)
    ids = tokenizer("The kernel scheduler picks the next task", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
