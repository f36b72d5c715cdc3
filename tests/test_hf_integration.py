"""transformers plugin: ``AutoModelForCausalLM.from_pretrained(PACKED_DIR)`` after ``import spqr_cli``.

The packed model is the session's real spqr-3.9bit quantization of docs-llama-3m (``quantized_demo``); every
comparison is against ``load_packed`` (itself tested against the dense dequantized model in test_runtime) and
is exact (``torch.equal``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import spqr_cli  # noqa: F401 (registers the quantizer)
from spqr_cli.core.errors import SpQRError
from spqr_cli.core.io import SHARD_INDEX
from spqr_cli.format.checkpoint import CONFIG_NAME, file_sha256
from spqr_cli.format.pack import pack_model, unpack_model
from spqr_cli.runtime.linear import SpQRLinear
from spqr_cli.runtime.loader import load_any_model, load_packed, model_kind

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_pack import _rewrite_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _auto():  # noqa: ANN202
    """transformers' Auto class, imported inside the tests: importing transformers at collection time would read
    the progress-bar setting before conftest's session environment turns the bars off."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


@pytest.fixture(scope="module")
def packed(quantized_demo, one_thread) -> Path:
    return quantized_demo["packed"]


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 8192, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(packed, ids) -> torch.Tensor:
    with torch.no_grad():
        return load_packed(packed, dtype=torch.float32)(ids).logits


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_from_pretrained_equals_load_packed(packed, ids, reference) -> None:
    config = json.loads((packed / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "spqr-cli"
    model = _auto().from_pretrained(packed, dtype=torch.float32, device_map="cpu")
    layers = [m for m in model.modules() if isinstance(m, SpQRLinear)]
    assert len(layers) == 28 and all(m.qweight.dtype == torch.int32 and m.scale_stats.dtype == torch.float16
                                     for m in layers)
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(_logits(model, ids), reference)
    # greedy generation through transformers' generate: the same tokens as the load_packed model
    ref_model = load_packed(packed, dtype=torch.float32)
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    tokens = ref_model.generate(ids[:1, :8], **kw)
    assert torch.equal(model.generate(ids[:1, :8], **kw), tokens)
    assert torch.equal(model.generate(ids[:1, :8], cache_implementation="static", **kw), tokens)


def test_from_pretrained_fp16_default_dtype(packed, ids) -> None:
    """No dtype: the checkpoint's fp16, as for any transformers model; same values as load_packed's fp16."""
    model = _auto().from_pretrained(packed)
    assert model.model.embed_tokens.weight.dtype == torch.float16
    ref = load_packed(packed)
    assert torch.equal(model.model.norm.weight, ref.model.norm.weight)
    q, r = model.model.layers[0].self_attn.q_proj, ref.model.layers[0].self_attn.q_proj
    assert torch.equal(q.dequantize(), r.dequantize())


def test_save_pretrained_round_trip(packed, ids, reference, tmp_path: Path) -> None:
    model = _auto().from_pretrained(packed, dtype=torch.float32)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "spqr-cli" and len(saved["layers"]) == 28
    again = _auto().from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert torch.equal(_logits(again, ids), reference)
    # spqr run / eval take such a copy too (load_any_model), with the packed model's tokenizer files
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(packed / f, tmp_path / "saved" / f)
    assert model_kind(str(tmp_path / "saved"))[0] == "saved"
    loaded, _ = load_any_model(str(tmp_path / "saved"), device="cpu")
    assert torch.equal(_logits(loaded, ids), reference)


def test_fused_model_refuses_save_pretrained(packed, tmp_path: Path) -> None:
    model = load_packed(packed, dtype=torch.float32, fuse=True)
    with pytest.raises(SpQRError, match="fused"):
        model.save_pretrained(tmp_path / "saved")


def test_from_pretrained_verifies_checksums(packed, tmp_path: Path) -> None:
    """A flipped byte in a tensor fails its sha256 through from_pretrained as through load_packed."""
    d = tmp_path / "damaged"
    shutil.copytree(packed, d)
    cfg = json.loads((d / CONFIG_NAME).read_text())
    shard = d / cfg["shards"][0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # the data of the last tensor in the shard
    shard.write_bytes(bytes(data))
    with pytest.raises(SpQRError, match="checksum mismatch"):
        _auto().from_pretrained(d, dtype=torch.float32)
    with pytest.raises(SpQRError, match="checksum mismatch"):
        load_packed(d, dtype=torch.float32)


def test_older_packs_still_load(packed, ids, reference, tmp_path: Path) -> None:
    """Packed before pack wrote the quantization_config and the shard index: load_packed reads them as before."""
    q = packed.parent / "quant"
    old = tmp_path / "old"
    pack_model(q, old, shard_size_mb=0.5)  # several shards
    assert (old / SHARD_INDEX).is_file()
    multi = tmp_path / "multi"
    shutil.copytree(old, multi)
    assert torch.equal(_logits(_auto().from_pretrained(multi, dtype=torch.float32), ids), reference)
    (old / SHARD_INDEX).unlink()
    config = json.loads((old / "config.json").read_text())
    del config["quantization_config"]
    (old / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _rewrite_config(old, lambda c: c.update(config_json_sha256=file_sha256(old / "config.json")))
    assert torch.equal(_logits(load_packed(old, dtype=torch.float32), ids), reference)


def test_unpacked_config_is_plain(packed, tmp_path: Path) -> None:
    unpack_model(packed, tmp_path / "dense")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    dense = json.loads((packed.parent / "quant" / "dense" / "config.json").read_text())
    assert "quantization_config" not in config and config == dense


def test_registration_is_lazy_and_works_in_a_fresh_process(packed) -> None:
    """``import spqr_cli`` does not import transformers, yet a later from_pretrained finds the quantizer."""
    code = (
        "import sys, spqr_cli\n"
        "assert 'transformers' not in sys.modules, 'import spqr_cli pulled in transformers'\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(packed)!r})\n"
        "print(type(m.model.layers[0].mlp.down_proj).__name__)\n"
    )
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "SpQRLinear"
