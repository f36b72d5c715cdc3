"""Sibling fusion: ``layout.concat_rows`` is exact, and a fused model computes what the unfused one does."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from spqr_cli.core.config import QuantConfig
from spqr_cli.format.pack import pack_model
from spqr_cli.quant.record import QuantizedLayer
from spqr_cli.runtime.linear import SpQRLinear
from spqr_cli.runtime.loader import load_packed
from spqr_cli.runtime.siblings import SiblingGroup, SiblingSlice, fuse_siblings
from spqr_kernels.layout import concat_rows
from spqr_kernels.reference import dequantize
from spqr_kernels.synthetic import random_packed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_pack import build_quant_dir, tiny_llama  # noqa: E402


def _siblings(rows: tuple[int, ...], k: int = 64, **kw) -> list[QuantizedLayer]:
    recs = [QuantizedLayer.from_packed(random_packed(n, k, seed=i, outlier_fraction=0.05, **kw))
            for i, n in enumerate(rows)]
    for r in recs[1:]:
        r.perm = recs[0].perm
    return recs


@pytest.mark.parametrize("rows, kw", [
    ((48, 32, 16), {}),  # 3-bit codes and stats: 10 codes per word, members end mid-word
    ((37, 24, 5), {"stat_bits": 16}),  # fp16 statistics, odd row counts
    ((32, 32), {"wbits": 4, "stat_bits": 4}),
    ((64, 16), {"wbits": 2, "act_order": False}),  # identity order
])
def test_concat_rows_is_exact(rows, kw) -> None:
    pws = [r.pack() for r in _siblings(rows, **kw)]
    merged = concat_rows(pws)
    assert merged.out_features == sum(rows) and merged.nnz == sum(p.nnz for p in pws)
    assert torch.equal(dequantize(merged), torch.cat([dequantize(p) for p in pws]))
    # the record decoder (the bit-exact contract) agrees too
    want = torch.cat([QuantizedLayer.from_packed(p).dequantize() for p in pws])
    assert torch.equal(QuantizedLayer.from_packed(merged).dequantize(), want)


def test_concat_rows_refuses_what_does_not_fuse() -> None:
    a, b = (r.pack() for r in _siblings((32, 32)))
    other = random_packed(32, 64, seed=9)  # its own permutation
    with pytest.raises(ValueError, match="permutations"):
        concat_rows([a, other])
    with pytest.raises(ValueError, match="layouts"):
        concat_rows([a, random_packed(32, 64, wbits=4, stat_bits=4, seed=1)])
    odd = _siblings((24, 32))  # 24 rows is not a whole number of 16-row second-level blocks
    with pytest.raises(ValueError, match="second-level"):
        concat_rows([r.pack() for r in odd])
    assert concat_rows([odd[1].pack(), odd[0].pack()]).out_features == 56  # ... as the last member it is fine
    assert concat_rows([a, b]).out_features == 64


class _Counting(SpQRLinear):
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return super().forward(x)


def _group(rows: tuple[int, ...] = (32, 48, 16)) -> tuple[SiblingGroup, list[SiblingSlice], list[SpQRLinear]]:
    recs = _siblings(rows)
    singles = [SpQRLinear(r.pack()) for r in recs]
    group = SiblingGroup(_Counting(concat_rows([s.packed for s in singles])), list(rows))
    return group, [SiblingSlice(group, i) for i in range(len(rows))], singles


def test_group_computes_once_per_input() -> None:
    group, members, singles = _group()
    x = torch.randn(2, 3, 64)
    _Counting.calls = 0
    for m, s in zip(members, singles, strict=True):
        assert torch.equal(m(x), s(x))
    assert _Counting.calls == 1 and group._memo is None  # dropped once every member was served
    with torch.inference_mode():  # no version counter there; still one call
        xi = torch.randn(4, 64)
        assert all(torch.equal(m(xi), s(xi)) for m, s in zip(members, singles, strict=True))
    assert _Counting.calls == 2 and group._memo is None
    assert torch.equal(members[1].dequantize(), singles[1].dequantize())


def test_group_recomputes_when_the_memo_does_not_apply() -> None:
    group, members, singles = _group()
    x = torch.randn(3, 64)
    _Counting.calls = 0
    members[0](x)
    members[0](x)  # the same member twice: a new forward pass, not a sibling
    assert _Counting.calls == 2
    x.mul_(2)  # changed in place: the memo's output is stale
    assert torch.equal(members[1](x), singles[1](x)) and _Counting.calls == 3
    y = torch.randn(3, 64)  # another input
    assert torch.equal(members[2](y), singles[2](y)) and _Counting.calls == 4
    assert group._memo is not None  # members 0 and 1 of y's pass are still owed
    assert torch.equal(members[0](y), singles[0](y)) and torch.equal(members[1](y), singles[1](y))
    assert _Counting.calls == 4 and group._memo is None


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sib")
    q = build_quant_dir(root / "quant", tiny_llama(seed=5), QuantConfig())
    pack_model(q, root / "packed")
    return root / "packed"


def test_fused_model_matches_unfused(packed_dir: Path) -> None:
    plain = load_packed(packed_dir, dtype=torch.float32)
    fused = load_packed(packed_dir, dtype=torch.float32, fuse=True)
    attn = fused.model.layers[0].self_attn
    assert isinstance(attn.q_proj, SiblingSlice) and isinstance(fused.model.layers[0].mlp.up_proj, SiblingSlice)
    assert isinstance(attn.o_proj, SpQRLinear)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(fused(ids).logits, plain(ids).logits)
    out = fused.generate(ids[:1, :4], max_new_tokens=4, do_sample=False)
    assert torch.equal(out, plain.generate(ids[:1, :4], max_new_tokens=4, do_sample=False))


def test_groups_that_do_not_fuse_stay_apart(packed_dir: Path) -> None:
    model = load_packed(packed_dir, dtype=torch.float32)
    mlp = model.model.layers[0].mlp
    mlp.up_proj = SpQRLinear(random_packed(mlp.up_proj.out_features, mlp.up_proj.in_features, seed=7))
    assert fuse_siblings(model) == 2 * len(model.model.layers) - 1  # every q/k/v group, gate/up of layer 0 not
    assert isinstance(mlp.up_proj, SpQRLinear) and isinstance(mlp.gate_proj, SpQRLinear)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_kernels_match_unfused_on_gpu(packed_dir: Path) -> None:
    plain = load_packed(packed_dir, device="cuda", fuse=False)
    fused = load_packed(packed_dir, device="cuda")  # fused by default on CUDA
    assert isinstance(fused.model.layers[0].self_attn.k_proj, SiblingSlice)
    ids = torch.randint(0, 256, (1, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    with torch.no_grad():
        for n in (1, 4, 16):  # decode kernel (one and a few tokens) and the dense path
            a, b = plain(ids[:, :n]).logits.float(), fused(ids[:, :n]).logits.float()
            assert (a - b).abs().max() <= 2e-3 * a.abs().max(), n
