"""``--target-bits``: each layer keeps as many outliers as fit a bit budget measured from its packed bytes.

The budget is checked the way a user checks it, from the packed bytes (``spqr inspect``), never from the formula.
"""

from __future__ import annotations

import math

import pytest
import torch

from spqr_cli.core.config import QuantConfig
from spqr_cli.core.errors import ConfigError, SpQRError
from spqr_cli.quant.methods import quantize_layer
from spqr_kernels.layout import packed_nbytes
from spqr_kernels.synthetic import random_packed


def _layer(n: int = 48, k: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = 0.02 * torch.randn(n, k, generator=gen)
    x = torch.randn(512, k, generator=gen)
    x[:, :6] *= 8  # a few loud input features, as in LLMs: they attract outliers
    return w, 2 * x.t() @ x / x.shape[0]


def _measured(rec) -> float:  # noqa: ANN001 (QuantizedLayer)
    return 8 * rec.pack().nbytes() / (rec.out_features * rec.in_features)


@pytest.mark.parametrize("case", [(40, 48, 3, 16, 16, 3, True), (33, 96, 4, 16, 16, 3, False),
                                  (40, 64, 4, 16, 0, 16, True), (30, 64, 5, 16, 16, 16, True),
                                  (40, 48, 4, 48, 0, 16, True), (20, 48, 8, 16, 16, 3, False)])
def test_packed_nbytes_counts_the_packed_tensors(case):
    n, k, wbits, gs, beta2, stat_bits, perm = case
    pw = random_packed(n, k, wbits=wbits, groupsize=gs, beta2=beta2 or 16, stat_bits=stat_bits, act_order=perm)
    assert pw.nnz > 0
    assert packed_nbytes(wbits, pw.groupsize, pw.beta2, stat_bits, n, k, pw.nnz, perm) == pw.nbytes()


def test_layer_lands_just_under_its_budget(one_thread):
    w, h = _layer()
    base = 8 * packed_nbytes(3, 16, 16, 3, 48, 128, 0, True) / (48 * 128)
    fits = []
    for extra in (0.15, 0.5):
        target = base + extra
        rec = quantize_layer(w, h, QuantConfig(target_bits=target))
        bits = _measured(rec)
        assert target - 0.05 <= bits <= target, (target, bits)
        fits.append(rec.nnz)
    assert 0 < fits[0] < fits[1]  # a larger budget buys more outliers
    # the budget replaces the threshold: a threshold that alone would make every weight an outlier changes nothing
    same = quantize_layer(w, h, QuantConfig(target_bits=base + 0.5, outlier_threshold=1e-30))
    assert same.nnz == fits[1]


def test_budget_below_the_outlier_free_size_is_a_clear_error(one_thread):
    w, h = _layer()
    with pytest.raises(SpQRError, match=r"--target-bits 3 is below .* without any outlier \(4\.\d+ bits measured"):
        quantize_layer(w, h, QuantConfig(target_bits=3.0))


@pytest.mark.parametrize("bad, match", [(-1.0, "must be a number"), (math.inf, "must be a number"), (16, "and 16"),
                                        (True, "must be a number"), ("4", "must be a number")])
def test_bad_target_bits(bad, match):
    with pytest.raises(ConfigError, match=match):
        QuantConfig(target_bits=bad)


def test_target_bits_needs_a_method_with_outliers():
    with pytest.raises(ConfigError, match="method 'gptq' has none"):
        QuantConfig(method="gptq", stat_bits=16, target_bits=4.0)


def test_saved_config_round_trips_and_keeps_old_fingerprints():
    assert "target_bits" not in QuantConfig().to_dict()  # runs saved before the field existed still match
    cfg = QuantConfig(target_bits=4.25)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


def test_cli_target_bits_measured_by_inspect(tmp_path, demo_model_path):
    """``spqr quantize --target-bits``, pack, inspect: every layer within [target - 0.05, target] measured bits."""
    import json

    from typer.testing import CliRunner

    from spqr_cli.cli import app
    from spqr_cli.core.models import load_config
    from spqr_cli.demo import DEMO_CALIB

    config = load_config(str(demo_model_path))
    h, i = config.hidden_size, config.intermediate_size
    base = max(8 * packed_nbytes(3, 16, 16, 3, n, k, 0, True) / (n * k) for n, k in ((h, h), (i, h), (h, i)))
    target = round(base + 0.2, 2)
    runner = CliRunner()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        quant = runner.invoke(app, ["quantize", str(demo_model_path), "--out", str(tmp_path / "q"), "--target-bits",
                                    str(target), "--dataset", f"file:{DEMO_CALIB}", "--nsamples", "2", "--seqlen",
                                    "32", "--device", "cpu"], terminal_width=200)
    finally:
        torch.set_num_threads(threads)
    assert quant.exit_code == 0, quant.output
    assert f"target_bits={target:g}" in quant.output
    assert runner.invoke(app, ["pack", str(tmp_path / "q"), "--out", str(tmp_path / "p")]).exit_code == 0
    shown = runner.invoke(app, ["inspect", str(tmp_path / "p"), "--json", "-"])
    assert shown.exit_code == 0, shown.output
    info = json.loads(shown.output)
    bits = [row["bits_measured"] for row in info["layers"]]
    assert all(target - 0.05 <= b <= target for b in bits), (target, bits)
    assert target - 0.05 <= info["totals"]["quantized_bits_measured"] <= target
    assert info["quant_config"]["target_bits"] == target
    # the quantize report's packed bits are the inspected ones, layer by layer and in total
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["avg_bits_measured"] == pytest.approx(info["totals"]["quantized_bits_measured"], abs=1e-12)
    assert {r["name"]: r["bits_measured"] for r in report["layers"]} == pytest.approx(
        {row["name"]: row["bits_measured"] for row in info["layers"]}, abs=1e-12)
    assert "average bits (packed)" in quant.output
    too_low = runner.invoke(app, ["quantize", str(demo_model_path), "--out", str(tmp_path / "q2"), "--target-bits",
                                  "2.5", "--dataset", f"file:{DEMO_CALIB}", "--nsamples", "2", "--seqlen", "32",
                                  "--device", "cpu"], terminal_width=200)
    assert too_low.exit_code == 2 and "--target-bits 2.5 is below" in too_low.output


def test_model_bits_match_packed_layers():
    """``QuantConfig.model_bits`` (what ``spqr presets`` shows) equals the bytes of real packed layers of the shapes."""
    cfg = QuantConfig()  # spqr-3.9bit's sizes
    h, i = 64, 160
    shapes = [(h, h)] * 4 + [(i, h)] * 2 + [(h, i)]
    layers = [random_packed(n, k, outlier_fraction=0.0, seed=j) for j, (n, k) in enumerate(shapes)]
    params = sum(n * k for n, k in shapes)
    measured = 8 * sum(pw.nbytes() for pw in layers) / params
    formula = sum(pw.formula_bits() * pw.out_features * pw.in_features for pw in layers) / params
    assert cfg.model_bits(h, i) == pytest.approx((formula, measured))


def test_presets_command_shows_bits():
    from typer.testing import CliRunner

    from spqr_cli.cli import app

    shown = CliRunner().invoke(app, ["presets"], terminal_width=250)
    assert shown.exit_code == 0, shown.output
    row = next(line for line in shown.output.splitlines() if "spqr-3.9bit" in line)
    f, m = QuantConfig().model_bits()
    assert f"{f:.2f} / {m:.2f}" in row
