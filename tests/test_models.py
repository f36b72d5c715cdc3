from __future__ import annotations

import pytest

from spqr_cli.core.errors import SpQRError
from spqr_cli.core.models import SUPPORTED, adapter_for, load_model


def test_unsupported_architecture_is_one_line_error(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
    model.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(SpQRError) as exc:
        load_model(str(tmp_path / "gpt2"))
    msg = str(exc.value)
    assert "unsupported architecture 'gpt2'" in msg and SUPPORTED in msg and "\n" not in msg


def test_missing_model_path(tmp_path):
    with pytest.raises(SpQRError, match="does not exist or has no config.json"):
        load_model(str(tmp_path / "nope"))


def test_demo_model_is_llama(demo_model_path):
    model = load_model(str(demo_model_path), dtype="fp32")
    adapter = adapter_for(model)
    assert adapter.name == "llama"
    blocks = adapter.get_blocks(model)
    assert len(blocks) == 4
    for name in adapter.linear_names():
        blocks[0].get_submodule(name)
