"""The per-layer algorithm (spqr_cli/spqr.py) on small synthetic layers."""

from __future__ import annotations

import math

import pytest
import torch

from spqr_cli.core.config import QuantConfig
from spqr_cli.core.errors import ConfigError, SpQRError
from spqr_cli.quant.hessian import HessianAccumulator
from spqr_cli.quant.methods import quantize_layer
from spqr_cli.quant.record import QuantizedLayer

SPQR3 = QuantConfig(
    method="spqr",
    wbits=3,
    groupsize=16,
    beta2=16,
    stat_bits=3,
    outlier_threshold=0.2,
    perm="act_order",
    percdamp=1.0,
    blocksize=128,
)


def gptq(wbits: int, groupsize: int = 128, **kw) -> QuantConfig:
    return QuantConfig(
        method="gptq",
        wbits=wbits,
        groupsize=groupsize,
        beta2=0,
        stat_bits=16,
        outlier_threshold=math.inf,
        perm="act_order",
        percdamp=0.01,
        **kw,
    )


def rtn(wbits: int, groupsize: int = 128) -> QuantConfig:
    return QuantConfig(
        method="rtn",
        wbits=wbits,
        groupsize=groupsize,
        beta2=0,
        stat_bits=16,
        outlier_threshold=math.inf,
        perm="identity",
    )


def make_layer(n: int = 96, k: int = 256, tokens: int = 2048, seed: int = 0, dead: int = 0):
    """Heavy-tailed weights with a few planted outliers; correlated inputs X = Z A (columns of different scale)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, k, generator=g) / k**0.5 + torch.diag(torch.rand(k, generator=g) * 2)
    x = torch.randn(tokens, k, generator=g) @ a
    if dead:
        x[:, -dead:] = 0
    w = torch.randn(n, k, generator=g) * torch.exp(0.5 * torch.randn(n, k, generator=g)) * 0.02  # heavy tails
    idx = torch.randint(0, n * k, (n * k // 200,), generator=g)
    w.view(-1)[idx] *= 8.0
    acc = HessianAccumulator(k)
    acc.add_batch(x)
    return w.to(torch.float16), acc.hessian, x


def herr(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the layer's output error on the calibration inputs."""
    d = w.float() - q.float()
    return torch.einsum("nk,kl,nl->", d, h, d).item()


def decode_plainly(r: QuantizedLayer) -> torch.Tensor:
    """The formula of record.py, element by element in plain loops over groups (independent of dequantize)."""
    n, k, gs = r.out_features, r.in_features, r.groupsize
    perm = list(range(k)) if r.perm is None else r.perm.tolist()
    out = torch.zeros(n, k, dtype=torch.float16)
    for g in range(k // gs):
        if r.stat_bits == 16:
            s, z = r.scale[:, g].float(), r.zero[:, g].float()
        else:
            rows = torch.arange(n) // r.beta2
            ss, zs = r.scale_stats[rows, g].float(), r.zero_stats[rows, g].float()
            s = ss[:, 0] * (r.scale_codes[:, g].float() - ss[:, 1])
            z = zs[:, 0] * (r.zero_codes[:, g].float() - zs[:, 1])
        for j in range(g * gs, (g + 1) * gs):
            out[:, perm[j]] = (s * (r.codes[:, j].float() - z)).to(torch.float16)
    for row in range(n):
        for p in range(int(r.outlier_row_ptr[row]), int(r.outlier_row_ptr[row + 1])):
            out[row, int(r.outlier_col[p])] = r.outlier_val[p]
    return out


@pytest.fixture(scope="module")
def layer():
    return make_layer()


def test_hessian_accumulator_matches_direct():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(3, 17, 24, generator=g), torch.randn(40, 24, generator=g).half(), torch.randn(5, 24)]
    acc = HessianAccumulator(24)
    for b in batches:
        acc.add_batch(b)
    x = torch.cat([b.reshape(-1, 24).float() for b in batches]).double()
    assert acc.nsamples == x.shape[0]
    expected = 2.0 / x.shape[0] * x.T @ x
    assert acc.hessian.dtype == torch.float32
    torch.testing.assert_close(acc.hessian.double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(SpQRError):
        acc.add_batch(torch.randn(4, 23))
    with pytest.raises(SpQRError):
        _ = HessianAccumulator(8).hessian


def test_error_ordering_spqr_gptq_rtn(layer):
    w, h, _ = layer
    for bits in (3, 4):
        e_spqr = herr(w, quantize_layer(w, h, SPQR3.replace(wbits=bits)).dequantize(), h)
        e_gptq = herr(w, quantize_layer(w, h, gptq(bits)).dequantize(), h)
        e_rtn = herr(w, quantize_layer(w, None, rtn(bits)).dequantize(), h)
        assert e_spqr < e_gptq < e_rtn, (bits, e_spqr, e_gptq, e_rtn)


def test_more_bits_less_error(layer):
    w, h, _ = layer
    for cfg in (SPQR3, gptq(3), gptq(3, groupsize=0), rtn(3)):
        hh = None if cfg.method == "rtn" else h
        e3 = herr(w, quantize_layer(w, hh, cfg).dequantize(), h)
        e4 = herr(w, quantize_layer(w, hh, cfg.replace(wbits=4)).dequantize(), h)
        assert e4 < 0.6 * e3, (cfg.method, e3, e4)


def test_threshold_controls_outlier_count(layer):
    w, h, _ = layer
    counts = [quantize_layer(w, h, SPQR3.replace(outlier_threshold=t)).nnz for t in (0.1, 0.2, 0.5, 2.0, math.inf)]
    assert counts[0] > 0 and counts[-1] == 0
    assert all(a > b for a, b in zip(counts[:-2], counts[1:-1], strict=True)), counts
    assert counts[-2] >= counts[-1]
    # outliers buy accuracy: at the same wbits, more outliers -> lower error
    e_on = herr(w, quantize_layer(w, h, SPQR3).dequantize(), h)
    e_off = herr(w, quantize_layer(w, h, SPQR3.replace(outlier_threshold=math.inf)).dequantize(), h)
    assert e_on < e_off


@pytest.mark.parametrize(
    "cfg",
    [SPQR3, SPQR3.replace(stat_bits=16, beta2=0), gptq(4), gptq(3, groupsize=0), SPQR3.replace(perm="identity")],
    ids=["spqr", "spqr-fp16stats", "gptq", "gptq-perchannel", "spqr-identity"],
)
def test_dequantize_equals_plain_decode(layer, cfg):
    w, h, _ = layer
    r = quantize_layer(w, h, cfg)
    assert torch.equal(r.dequantize(), decode_plainly(r))


def test_record_layout(layer):
    w, h, _ = layer
    n, k = w.shape
    r = quantize_layer(w, h, SPQR3)
    g = k // 16
    assert r.codes.dtype == torch.uint8 and r.codes.shape == (n, k) and int(r.codes.max()) <= 7
    assert r.scale_codes.shape == r.zero_codes.shape == (n, g) and r.scale_codes.dtype == torch.uint8
    assert int(r.scale_codes.max()) <= 7 and int(r.zero_codes.max()) <= 7
    assert r.scale_stats.shape == r.zero_stats.shape == (math.ceil(n / 16), g, 2)
    assert r.scale_stats.dtype == torch.float16 and r.scale is None and r.zero is None
    assert r.outlier_row_ptr.dtype == torch.int32 and r.outlier_row_ptr.shape == (n + 1,)
    assert r.outlier_col.dtype == torch.int32 and r.outlier_val.dtype == torch.float16
    ptr = r.outlier_row_ptr.long()
    assert ptr[0] == 0 and ptr[-1] == r.nnz and bool((ptr[1:] >= ptr[:-1]).all())
    for row in range(n):  # original column indices, strictly ascending within a row
        cols = r.outlier_col[ptr[row] : ptr[row + 1]]
        assert bool((cols[1:] > cols[:-1]).all())
    # the outliers keep the (error-updated) weight in fp16: close to the original where nothing was propagated
    assert r.nnz > 0
    rg = quantize_layer(w, h, gptq(4))
    assert rg.scale.shape == (n, k // 128) and rg.scale.dtype == torch.float16 and rg.nnz == 0
    assert rg.scale_codes is None and rg.outlier_row_ptr.shape == (n + 1,)


def test_partial_row_block():
    w, h, _ = make_layer(n=40, k=64, seed=3)  # 40 rows: row groups of 16, 16 and 8
    r = quantize_layer(w, h, SPQR3)
    assert r.scale_stats.shape == (3, 4, 2)
    assert torch.equal(r.dequantize(), decode_plainly(r))
    assert herr(w, r.dequantize(), h) < herr(w, quantize_layer(w, None, rtn(3, 16)).dequantize(), h)


def test_act_order_permutation_round_trips(layer):
    w, h, _ = layer
    k = w.shape[1]
    for cfg in (SPQR3, gptq(4)):
        r = quantize_layer(w, h, cfg.replace(wbits=8))
        assert r.perm is not None and r.perm.dtype == torch.int64
        assert torch.equal(torch.sort(r.perm).values, torch.arange(k))
        assert not torch.equal(r.perm, torch.arange(k))
        assert torch.equal(r.perm, torch.argsort(torch.diag(h), descending=True, stable=True))
        # 8-bit codes: the dense weight is close to the original only if every column went back to its place
        rel = (r.dequantize().float() - w.float()).norm() / w.float().norm()
        assert rel < 0.1, rel  # a misplaced column would give ~1.4
    assert quantize_layer(w, h, SPQR3.replace(perm="identity")).perm is None
    assert quantize_layer(w, None, rtn(4)).perm is None


def test_deterministic(layer):
    w, h, _ = layer
    for cfg in (SPQR3, gptq(3)):
        a, b = quantize_layer(w, h, cfg), quantize_layer(w, h, cfg)
        ta, tb = a.to_tensors(), b.to_tensors()
        assert ta.keys() == tb.keys()
        for name in ta:
            assert torch.equal(ta[name], tb[name]), name


def test_inputs_not_modified(layer):
    w, h, _ = layer
    w0, h0 = w.clone(), h.clone()
    quantize_layer(w, h, SPQR3)
    assert torch.equal(w, w0) and torch.equal(h, h0)


def test_dead_columns():
    w, h, x = make_layer(n=64, k=128, dead=20, seed=5)
    assert bool((torch.diag(h)[-20:] == 0).all())
    for cfg in (SPQR3, gptq(4, groupsize=0), gptq(3, groupsize=16), SPQR3.replace(perm="identity")):
        r = quantize_layer(w, h, cfg)
        q = r.dequantize()
        assert torch.isfinite(q).all()
        # the dead inputs are always zero, so only the live columns matter for the outputs
        rel = ((w.float() - q.float()) @ x.T).norm() / (w.float() @ x.T).norm()
        assert rel < 0.25, (cfg.method, rel)
        if cfg.method == "gptq":  # GPTQ's grid always holds 0 exactly: dead weights decode to 0
            assert bool((q[:, -20:] == 0).all())


def test_per_channel_gptq(layer):
    w, h, _ = layer
    n, k = w.shape
    r = quantize_layer(w, h, gptq(4, groupsize=0))
    assert r.groupsize == k and r.num_groups == 1 and r.scale.shape == (n, 1)
    e = herr(w, r.dequantize(), h)
    assert e < herr(w, quantize_layer(w, None, rtn(4, groupsize=0)).dequantize(), h)
    assert e > herr(w, quantize_layer(w, h, gptq(4, groupsize=32)).dequantize(), h)


def test_symmetric_fp16_stats(layer):
    w, h, _ = layer
    r = quantize_layer(w, h, gptq(4, sym=True))
    assert bool((r.zero == 8).all())
    assert torch.equal(r.dequantize(), decode_plainly(r))
    with pytest.raises(SpQRError, match="sym"):
        quantize_layer(w, h, SPQR3.replace(sym=True))


def test_bad_inputs(layer):
    w, h, _ = layer
    with pytest.raises(SpQRError, match="groupsize 128 does not divide in_features 320 of this layer"):
        quantize_layer(torch.zeros(8, 320), torch.eye(320), gptq(4))
    with pytest.raises(SpQRError, match="Hessian shape"):
        quantize_layer(w, h[:-1, :-1], SPQR3)
    with pytest.raises(SpQRError, match="needs a Hessian"):
        quantize_layer(w, None, gptq(4))
    bad = w.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(SpQRError, match="inf/nan"):
        quantize_layer(bad, h, SPQR3)


def test_bits_formula(layer):
    w, h, _ = layer
    r = quantize_layer(w, h, SPQR3)
    expected = 3 + 6 / 16 + 64 / 256 + 32 * r.outlier_fraction + 32 / w.shape[0]
    assert r.formula_bits() == pytest.approx(expected)
    assert SPQR3.formula_bits(w.shape[1], w.shape[0], r.outlier_fraction) == pytest.approx(expected)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [SPQR3, SPQR3.replace(blocksize=32), SPQR3.replace(groupsize=48, blocksize=32),
                                 gptq(4, groupsize=32), SPQR3.replace(outlier_threshold=math.inf)],
                         ids=["spqr", "spqr-b32", "spqr-g48-eager", "gptq", "spqr-no-outliers"])
def test_graph_replay_equals_eager_on_gpu(cfg, monkeypatch):
    """The column loop replayed as CUDA graphs gives the eager loop's record bit for bit: with a partial last
    block (480 columns), when one captured step serves several layers of the same shape (different weights,
    Hessians and outlier thresholds), and when the cache holds one step and two shapes alternate (evicted and
    captured again)."""
    from spqr_cli.quant import column_graphs
    from spqr_cli.quant.methods.spqr import quantize_obs

    column_graphs.clear()
    monkeypatch.setattr(column_graphs, "MAX_CACHED", 1)
    method = {"spqr": dict(outliers=True, holds_zero=False), "gptq": dict(outliers=False, holds_zero=True)}
    for seed, n in ((0, 100), (1, 100), (2, 64), (3, 100)):
        w, h, _ = make_layer(n=n, k=480, seed=seed)
        w, h = w.cuda(), h.cuda()
        graphed = quantize_obs(w, h, cfg, graphs=True, **method[cfg.method])
        eager = quantize_obs(w, h, cfg, graphs=False, **method[cfg.method])
        ta, tb = graphed.to_tensors(), eager.to_tensors()
        assert ta.keys() == tb.keys()
        for name in ta:
            assert torch.equal(ta[name], tb[name]), (seed, name)
    assert len(column_graphs._CACHE) == (0 if cfg.groupsize == 48 else 1)


def test_clipped_range_never_loses_to_min_max():
    """--clip-grid: per row, the range kept quantizes that row with no larger Σ|w - q|^2.4 than the min/max range
    (which is the first candidate), lies inside it, and the layer it fits decodes as the record says."""
    from spqr_cli.quant.grid import CLIP_NORM, clipped_range, minmax_params, quantize_codes

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g) * torch.exp(torch.randn(64, 1, generator=g))
    w[::7, 3] *= 10  # rows with an extreme weight: clipping pays there
    xmin, xmax = w.amin(1), w.amax(1)

    def err(lo, hi):
        s, z = minmax_params(lo, hi, 7, sym=False, round_zero=False)
        s, z = s[:, None], z[:, None]
        return (s * (quantize_codes(w, s, z, 7) - z) - w).abs().pow(CLIP_NORM).sum(1)

    lo, hi = clipped_range(w, xmin, xmax, 7, 50, sym=False, round_zero=False)
    assert (err(lo, hi) <= err(xmin, xmax)).all()
    assert (err(lo, hi) < err(xmin, xmax)).sum() > 8  # at least the rows with an extreme weight
    assert (lo >= xmin).all() and (hi <= xmax).all()
    layer_w, h, _ = make_layer()
    for cfg in (SPQR3.replace(clip_grid=20), gptq(4, clip_grid=20)):
        r = quantize_layer(layer_w, h, cfg)
        assert torch.equal(r.dequantize(), decode_plainly(r))
    assert "clip_grid" not in SPQR3.to_dict() and SPQR3.replace(clip_grid=20).to_dict()["clip_grid"] == 20
    with pytest.raises(ConfigError, match="--clip-grid -1 must be >= 0"):
        SPQR3.replace(clip_grid=-1)


@pytest.mark.gpu
def test_failed_capture_falls_back_to_the_eager_loop(monkeypatch):
    """If this torch cannot capture the block step as a CUDA graph, quantization warns once and runs it eagerly:
    the same record as the eager loop, with the range search on (the spqr-3.9bit preset's)."""
    import contextlib

    from spqr_cli.quant import column_graphs
    from spqr_cli.quant.methods.spqr import quantize_obs

    @contextlib.contextmanager
    def no_capture(*_a, **_k):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")
        yield

    column_graphs.clear()
    cfg = SPQR3.replace(clip_grid=100)
    w, h, _ = make_layer(n=100, k=480)
    w, h = w.cuda(), h.cuda()
    reference = quantize_obs(w, h, cfg, graphs=True, outliers=True, holds_zero=False).to_tensors()  # captured
    column_graphs.clear()
    monkeypatch.setattr(torch.cuda, "graph", no_capture)
    with pytest.warns(UserWarning, match="could not be captured as a CUDA graph .operation not permitted"):
        fallback = quantize_obs(w, h, cfg, graphs=True, outliers=True, holds_zero=False).to_tensors()
    eager = quantize_obs(w, h, cfg, graphs=False, outliers=True, holds_zero=False).to_tensors()
    for name in eager:
        assert torch.equal(fallback[name], eager[name]) and torch.equal(reference[name], eager[name]), name
