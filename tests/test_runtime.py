"""Loading a packed checkpoint: SpQRLinear's torch path and load_packed against the dense dequantized model."""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import spqr_kernels.ops as ops
from spqr_cli.core.config import QuantConfig
from spqr_cli.core.errors import SpQRError
from spqr_cli.format.checkpoint import CONFIG_NAME, file_sha256, model_fingerprint
from spqr_cli.format.inspect import inspect_packed
from spqr_cli.format.pack import pack_model
from spqr_cli.quant.record import QuantizedLayer
from spqr_cli.runtime.linear import SpQRLinear
from spqr_cli.runtime.loader import load_packed
from spqr_kernels.decode import dequantize_fp16
from spqr_kernels.layout import PackedWeight
from spqr_kernels.synthetic import random_packed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_pack import _rewrite_config, build_quant_dir, tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("rt")
    q = build_quant_dir(root / "quant", tiny_llama(seed=3), QuantConfig())
    pack_model(q, root / "packed")
    return q, root / "packed"


def _tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def test_spqr_linear_matches_dequantized_matmul() -> None:
    rec = QuantizedLayer.from_packed(random_packed(48, 64, outlier_fraction=0.03, seed=5))
    bias = torch.randn(48).half()
    layer = SpQRLinear(rec.pack(), bias)
    x = torch.randn(3, 5, 64)
    ref = F.linear(x, rec.dequantize().float(), bias.float())
    assert torch.equal(layer(x), ref)
    # fp16 activations on CPU: fp32 compute, one rounding
    x16 = x.half()
    assert torch.equal(layer(x16), F.linear(x16.float(), rec.dequantize().float(), bias.float()).half())
    # a dtype cast of the module must not change the packed layout the kernels read
    layer.float()
    assert layer.packed.get("outlier_val").dtype == torch.float16
    assert torch.equal(layer(x), ref)


def test_spqr_linear_holds_only_packed_bytes() -> None:
    rec = QuantizedLayer.from_packed(random_packed(256, 512, outlier_fraction=0.0))
    pw = rec.pack()
    layer = SpQRLinear(pw)
    held = sum(b.numel() * b.element_size() for b in layer.buffers())
    # qweight 512 x 26 words (256 rows, 10 codes per word) + qscale/qzero 32 x 26 words each (32 groups) +
    # two [2, 32, 16] fp16 second-level stats + perm int32[512] + row pointers int32[257] (no outliers)
    assert held == pw.nbytes() == 4 * 512 * 26 + 2 * 4 * 32 * 26 + 2 * 2 * 2 * 32 * 16 + 4 * 512 + 4 * 257
    assert not list(layer.parameters())


def test_load_packed_matches_dense_forward(dirs) -> None:
    from transformers import AutoModelForCausalLM

    q, p = dirs
    dense = AutoModelForCausalLM.from_pretrained(q / "dense", dtype=torch.float32).eval()
    model = load_packed(p, dtype=torch.float32)
    spqr = [m for m in model.modules() if isinstance(m, SpQRLinear)]
    assert len(spqr) == 14 and not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = _tokens()
    with torch.no_grad():
        ref = dense(ids).logits
        got = model(ids).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_load_packed_fp16_on_cpu(dirs) -> None:
    from transformers import AutoModelForCausalLM

    q, p = dirs
    dense = AutoModelForCausalLM.from_pretrained(q / "dense", dtype=torch.float16).eval()
    model = load_packed(p)  # fp16 default
    assert model.model.embed_tokens.weight.dtype == torch.float16
    ids = _tokens()
    with torch.no_grad():
        ref = dense(ids).logits.float()
        got = model(ids).logits.float()
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-2)


def test_loaded_model_memory_is_packed_size(dirs) -> None:
    _, p = dirs
    model = load_packed(p)
    held = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    totals = inspect_packed(p, verify=False)["totals"]
    rotary = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "rotary" in n)
    assert sum(held.values()) - rotary == totals["quantized_bytes"] + totals["dense_bytes"]


def test_generate_runs(dirs) -> None:
    _, p = dirs
    model = load_packed(p, dtype=torch.float32)
    out = model.generate(_tokens()[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("fuse", [False, True])
def test_compiled_model_matches_eager(dirs, fuse: bool) -> None:
    """torch.compile traces a packed model in one graph whose quantized layers are ``spqr::linear`` nodes (dynamo
    does not see the Triton launcher) and computes the same logits; fused siblings are one node per group (the
    memo of ``siblings.SiblingGroup`` traces away). ``aot_eager`` runs the traced graph without code generation
    (no C compiler on CI)."""
    from torch._dynamo.backends.common import aot_autograd

    _, p = dirs
    model = load_packed(p, dtype=torch.float32, fuse=fuse)
    ids = _tokens()
    seen: list[int] = []

    def count_ops(gm: torch.fx.GraphModule, _inputs: list) -> torch.fx.GraphModule:
        seen.append(sum(node.target is torch.ops.spqr.linear.default for node in gm.graph.nodes))
        return gm

    with torch.no_grad():
        ref = model(ids).logits
        torch._dynamo.reset()
        got = torch.compile(model, backend=aot_autograd(fw_compiler=count_ops), fullgraph=True)(ids).logits
    assert torch.equal(got, ref)
    layers = sum(isinstance(m, SpQRLinear) for m in model.modules())
    assert layers == (4 if fuse else 7) * len(model.model.layers) and seen == [layers]


def test_view_follows_buffers() -> None:
    """A cast or move rebuilds the layer's view (and the registry entry the compiled op finds); a no-op ``.to()``
    keeps it, so a CUDA graph recorded with its scratch stays valid; loading a state dict rebuilds it."""
    layer = SpQRLinear(random_packed(24, 32, outlier_fraction=0.05, seed=4))
    view = layer.packed
    layer.to("cpu")
    assert layer.packed is view
    layer.float()  # casts the fp16 buffers: a new view, registered under the (unchanged) code buffer
    assert layer.packed is not view
    assert ops._VIEWS[ops._view_key(layer.qweight)] is layer.packed
    changed = {k: v * 2 if k == "outlier_val" else v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(2, 32)
    before = layer(x)
    for assign in (False, True):  # copied into the buffers, or the buffers replaced
        layer.load_state_dict(changed, assign=assign)
        assert not torch.equal(layer(x), before)
        fresh = SpQRLinear(PackedWeight(**layer.packed.meta(), tensors=dict(changed)))
        assert torch.equal(layer(x), fresh(x))


def test_linear_op_with_unregistered_tensors() -> None:
    """Called with tensors no SpQRLinear owns (e.g. from another program), the op builds its own view."""
    rec = QuantizedLayer.from_packed(random_packed(40, 64, outlier_fraction=0.05, seed=2))
    bias = torch.randn(40).half()
    layer = SpQRLinear(rec.pack(), bias)
    x = torch.randn(3, 64)
    tensors = [None if t is None else t.clone() for t in (layer._buffers.get(n) for n in ops.PACKED_TENSORS)]
    meta = [getattr(layer, f) for f in ops.META_FIELDS]
    assert ops._VIEWS.get(ops._view_key(tensors[0])) is None
    assert torch.equal(torch.ops.spqr.linear(x, tensors, meta, bias), layer(x))
    # the layer's own buffers find its cached view
    own = [layer._buffers.get(n) for n in ops.PACKED_TENSORS]
    assert ops._VIEWS[ops._view_key(own[0])] is layer.packed
    assert torch.equal(torch.ops.spqr.linear(x, own, meta, bias), layer(x))


def test_load_packed_rejects_damage(dirs, tmp_path: Path) -> None:
    _, p = dirs
    d = tmp_path / "d"
    shutil.copytree(p, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpQRError, match="intermediate_size"):
        load_packed(d)
    # even with a consistent fingerprint, the layers must fit the model that config.json builds
    _rewrite_config(d, lambda c: c.update(model_fingerprint=model_fingerprint(cfg),
                                          config_json_sha256=file_sha256(d / "config.json")))
    with pytest.raises(SpQRError, match="shape mismatch"):
        load_packed(d)
    shutil.rmtree(d)
    shutil.copytree(p, d)
    _rewrite_config(d, lambda c: c.update(format_version=99))
    with pytest.raises(SpQRError, match="version 99"):
        load_packed(d)
    assert json.loads((p / CONFIG_NAME).read_text())["format_version"] == 1


def test_kernel_import_failure_falls_back_once(monkeypatch) -> None:
    """Triton that cannot be imported: one warning, then the torch path (same result as the CPU path)."""
    import spqr_kernels

    monkeypatch.setitem(sys.modules, "spqr_kernels.matvec", None)  # makes the import raise ImportError
    monkeypatch.delattr(spqr_kernels, "matvec", raising=False)
    monkeypatch.setattr(ops, "_kernel_modules", None)
    monkeypatch.setattr(ops, "_kernels_failed", False)
    monkeypatch.setattr(ops, "_use_triton", lambda device: True)
    pw = random_packed(16, 32)
    x = torch.randn(1, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ops._kernels() is None
        assert torch.equal(ops.spqr_linear(x, pw), F.linear(x, dequantize_fp16(pw).float()))
    assert len(caught) == 1 and "torch path" in str(caught[0].message)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_load_packed_cuda_matches_cpu(dirs) -> None:
    _, p = dirs
    ids = _tokens()
    with torch.no_grad():
        ref = load_packed(p, dtype=torch.float32)(ids).logits
        got = load_packed(p, device="cuda")(ids.cuda()).logits.float().cpu()
    torch.testing.assert_close(got, ref, rtol=0, atol=5e-2)


def test_copies_and_pickles_of_a_packed_layer_keep_no_replayed_launches() -> None:
    """A replayed kernel launch holds the addresses of its layer's tensors (``PackedWeight.launches``): a deep
    copy or a pickled-and-restored layer must make its own, not launch on the original's memory (nor fail to
    pickle)."""
    import copy
    import pickle

    from spqr_kernels.synthetic import random_packed

    layer = SpQRLinear(random_packed(24, 32))
    layer.packed.launches[("shape", "dtype", True)] = lambda *a: pytest.fail("a copied launch was used")
    x = torch.randn(2, 32)
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):  # our own object, in memory
        assert other.packed.launches == {}
        assert other.qweight.data_ptr() != layer.qweight.data_ptr()
        assert ops._VIEWS[ops._view_key(other.qweight)] is other.packed  # the custom op finds the copy's view
        assert torch.equal(other(x), F.linear(x, dequantize_fp16(layer.packed).float()))
