"""``spqr sweep``: every point is quantized, packed and scored; budgets hold in measured bits; JSON, table, plot."""

from __future__ import annotations

import json

import pytest
import torch

from spqr_cli.bench.sweep import _measured_bits, _shapes, config_for_budget
from spqr_cli.core.models import load_config


def test_configs_fit_their_budgets(demo_model_path):
    shapes = _shapes(load_config(str(demo_model_path)))
    for budget in (3.0, 4.0, 4.5, 5.2):
        for method in ("gptq", "rtn"):
            cfg = config_for_budget(method, budget, shapes)
            assert cfg is not None and cfg.method == method and _measured_bits(cfg, shapes) <= budget
        spqr = config_for_budget("spqr", budget, shapes)
        if spqr is not None:
            assert spqr.target_bits == budget and _measured_bits(spqr, shapes) <= budget
    assert config_for_budget("spqr", 3.0, shapes) is None  # 3-bit codes and statistics alone take more
    assert config_for_budget("gptq", 1.0, shapes) is None
    # SpQR's budget holds per layer: between the average and the costliest layer's size it is skipped, not run
    three = config_for_budget("spqr", 9.0, shapes).replace(wbits=3)
    per_layer = three.layer_bits(shapes)
    assert _measured_bits(three, shapes) < max(per_layer)
    assert config_for_budget("spqr", (_measured_bits(three, shapes) + max(per_layer)) / 2, shapes) is None
    # GPTQ/RTN take the most code bits that fit: never 2-bit codes in fine groups when 3- or 4-bit codes fit
    for budget in (4.0, 4.25, 4.5):
        assert config_for_budget("rtn", budget, shapes).wbits >= 3


def test_sweep_command(tmp_path, demo_model_path):
    pytest.importorskip("matplotlib")
    from typer.testing import CliRunner

    from spqr_cli.cli import app
    from spqr_cli.demo import DEMO_CALIB, DEMO_TEST

    shapes = _shapes(load_config(str(demo_model_path)))
    spqr_base = _measured_bits(config_for_budget("spqr", 9.0, shapes).replace(wbits=3), shapes)
    budgets = [3.0, round(spqr_base + 0.3, 2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(app, [
            "sweep", str(demo_model_path), "--bits", ",".join(map(str, budgets)), "--methods", "spqr,gptq",
            "--datasets", f"file:{DEMO_TEST}", "--calib-dataset", f"file:{DEMO_CALIB}", "--nsamples", "2",
            "--seqlen", "32", "--max-windows", "2", "--seeds", "0,1", "--work-dir", str(tmp_path / "w"), "--json",
            str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png"), "--device", "cpu"], terminal_width=200)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "s.json").read_text())
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = {(p["method"], p["budget"]): p for p in data["points"]}
    assert points[("spqr", 3.0)]["skipped"] and "quality per bit" in result.output
    dataset = f"file:{DEMO_TEST}"
    for (_, budget), p in points.items():
        if p["skipped"]:
            continue
        assert p["bits_measured"] <= budget
        assert p["increase_pct"][dataset] == pytest.approx(100 * (p["perplexity"][dataset] / data["fp16"][dataset]
                                                                   - 1))
    assert budgets[1] - 0.05 <= points[("spqr", budgets[1])]["bits_measured"]
    # two seeds: each point is the mean of its two runs, and the runs differ (different calibration windows)
    gptq = points[("gptq", budgets[1])]
    runs = [r["perplexity"][dataset] for r in gptq["per_seed"]]
    assert [r["seed"] for r in gptq["per_seed"]] == [0, 1] and runs[0] != runs[1]
    assert gptq["perplexity"][dataset] == pytest.approx(sum(runs) / 2)
    assert gptq["increase_spread"][dataset] > 0
    assert points[("spqr", budgets[1])]["outlier_pct"] > 0
    # the packed checkpoint of a point is what was scored: its own inspect agrees with the JSON
    from spqr_cli.format.inspect import inspect_packed

    packed = tmp_path / "w" / f"gptq-{budgets[1]:g}-s1-packed"
    assert inspect_packed(packed)["totals"]["quantized_bits_measured"] == gptq["per_seed"][1]["bits_measured"]


def test_sweep_rejects_bad_flags(demo_model_path):
    from typer.testing import CliRunner

    from spqr_cli.cli import app

    for flags, message in ((["--bits", "4,x"], "must be comma-separated numbers"),
                           (["--bits", "-1"], "numbers > 0"), (["--methods", "awq"], "choose from spqr, gptq, rtn"),
                           (["--seeds", "0,a"], "comma-separated integers"),
                           (["--datasets", ","], "names no test set")):
        result = CliRunner().invoke(app, ["sweep", str(demo_model_path), *flags], terminal_width=200)
        assert result.exit_code == 2 and message in result.output, result.output
