"""Quality per bit: quantize one model at several bit budgets with several methods, measure, tabulate and plot.

``spqr sweep`` is the figure a user looks at before choosing a method and a size: perplexity increase over fp16
against the bits per weight *measured from the packed checkpoint* (``spqr inspect``'s figure, not the formula), one
line per method, on the same calibration windows and test windows for every point.

How a budget ``B`` becomes a config, per method:

- ``spqr``: 3-bit codes with 16x16 groups and 3-bit statistics (``spqr-3.9bit``), or 4-bit codes (``spqr-4.6bit``)
  when the budget covers them, with ``target_bits = B``: every layer keeps as many outliers as fit (the budget is
  met to ~0.01 bits).
- ``gptq`` and ``rtn``: their sizes are discrete, so the grid of ``wbits`` 2-8 x ``groupsize`` per-channel, 128,
  64, 32, 16 (fp16 statistics) is searched for the largest measured size ``<= B`` on this model's layer shapes.

A budget a method cannot meet is reported as skipped, not silently moved. With several calibration sets (``spqr
sweep --seeds 0,1,2``) every point is quantized once per set; it reports the means over the seeds, the spread
(sample standard deviation) of the perplexity increase, and each seed's own figures; the plot draws the spread as
error bars: differences smaller than the spread are not results.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spqr_cli.core.calibrate import CalibrationSet
from spqr_cli.core.config import QuantConfig, load_preset
from spqr_cli.core.errors import SpQRError
from spqr_cli.core.io import atomic_path, write_json

SWEEP_METHODS = ("spqr", "gptq", "rtn")
_GRID_BITS = (2, 3, 4, 5, 6, 8)
_GRID_GROUPS = (0, 128, 64, 32, 16)


@dataclass
class SweepPoint:
    """One quantized model of the sweep: what was asked, what it measures, what it scores."""

    method: str
    budget: float
    config: dict[str, Any] | None
    bits_measured: float = math.nan
    bits_formula: float = math.nan
    outlier_pct: float = 0.0
    perplexity: dict[str, float] = field(default_factory=dict)  # mean over the calibration seeds
    increase_pct: dict[str, float] = field(default_factory=dict)  # mean over the seeds
    increase_spread: dict[str, float] = field(default_factory=dict)  # sample std over the seeds (0 with one)
    per_seed: list[dict[str, Any]] = field(default_factory=list)  # seed, bits_measured, perplexity per seed
    seconds: float = 0.0
    skipped: str | None = None


def _shapes(model_config: Any) -> list[tuple[int, int]]:
    """``(out, in)`` of a LLaMA-style block's linear layers (q/k/v/o, gate/up, down; grouped-query k/v narrower)."""
    h, i = model_config.hidden_size, model_config.intermediate_size
    heads = model_config.num_attention_heads
    kv = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or h // heads
    return [(h, h), (kv * head_dim, h), (kv * head_dim, h), (h, h), (i, h), (i, h), (h, i)]


def _measured_bits(cfg: QuantConfig, shapes: Sequence[tuple[int, int]]) -> float:
    """Parameter-weighted measured bits of the layer shapes without outliers (``QuantConfig.layer_bits``)."""
    params = [n * k for n, k in shapes]
    return sum(b * p for b, p in zip(cfg.layer_bits(list(shapes)), params, strict=True)) / sum(params)


OUTLIER_ROOM = 0.05  # bits per weight a budget must leave above 4-bit SpQR's size before the sweep picks 4-bit codes


def config_for_budget(method: str, budget: float, shapes: Sequence[tuple[int, int]]) -> QuantConfig | None:
    """The config ``method`` runs at ``budget`` measured bits on layers of ``shapes`` (module docstring), or
    ``None`` when even its smallest size does not fit.

    SpQR's budget holds per layer (``--target-bits``), so its codes must fit in *every* layer (grouped-query k/v
    projections are narrow and cost more per weight); 4-bit codes are chosen once they fit everywhere with
    ``OUTLIER_ROOM`` to spare for outliers. GPTQ/RTN take the most code bits that fit on average, then the finest
    groups: more bits per code beat finer groups (2-bit codes in groups of 16 measure about as much as 3-bit codes
    in groups of 64 and are far worse).
    """
    if method == "spqr":
        four = load_preset("spqr-4.6bit")
        base = four if max(four.layer_bits(list(shapes))) + OUTLIER_ROOM <= budget else load_preset("spqr-3.9bit")
        if max(base.layer_bits(list(shapes))) > budget:
            return None
        return base.replace(target_bits=float(budget))
    template = load_preset(f"{method}-4bit-g128")
    fits = []
    for wbits in _GRID_BITS:
        for gs in _GRID_GROUPS:
            if gs and any(k % gs for _, k in shapes):
                continue
            cfg = template.replace(wbits=wbits, groupsize=gs)
            bits = _measured_bits(cfg, shapes)
            if bits <= budget:
                fits.append(((wbits, bits), cfg))
    return max(fits, key=lambda f: f[0])[1] if fits else None


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def run_sweep(
    model: str, methods: Sequence[str], budgets: Sequence[float], calibrations: Sequence[CalibrationSet],
    datasets: Sequence[str], work_dir: str | Path, *, device: str = "auto",
    seqlen: int | None = None, max_windows: int | None = None, data_dir: str | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Quantize, pack and evaluate ``model`` for every (method, budget) and calibration set; returns ``{"fp16": ...,
    "points": ...}``.

    Each run's quantization and packed checkpoint go to ``work_dir/<method>-<budget>-s<seed>`` (kept, so a sweep
    that stops can be re-run: finished quantizations are found and not repeated, as ``spqr quantize`` does).
    """
    from spqr_cli.core.evaluate import default_seqlen, evaluate_perplexity
    from spqr_cli.core.models import load_config
    from spqr_cli.format.inspect import inspect_packed
    from spqr_cli.format.pack import pack_model
    from spqr_cli.quant.driver import quantize_model
    from spqr_cli.runtime.loader import load_any_model

    for m in methods:
        if m not in SWEEP_METHODS:
            raise SpQRError(f"unknown sweep method {m!r}; choose from {', '.join(SWEEP_METHODS)}")
    config = load_config(model)
    default_seqlen(config, seqlen)  # a too-long --seqlen fails before any work
    shapes = _shapes(config)
    work = Path(work_dir)

    def scores(path: str) -> dict[str, float]:  # one load (with its checksum pass) for every test set
        net, tokenizer = load_any_model(path, "fp16", device)
        return {d: evaluate_perplexity(net, tokenizer, d, seqlen=seqlen, max_windows=max_windows,
                                       data_dir=data_dir).perplexity for d in datasets}

    fp16 = scores(model)
    log(f"fp16: {fp16}")
    points = []
    for method in methods:
        for budget in budgets:
            cfg = config_for_budget(method, budget, shapes)
            if cfg is None:
                points.append(SweepPoint(method, budget, None, skipped=f"{method}'s smallest size is above {budget:g} "
                                                                      "bits on these layer shapes"))
                log(f"{method} @ {budget:g}: skipped ({points[-1].skipped})")
                continue
            t = time.perf_counter()
            runs = []
            for calib in calibrations:
                seed = calib.manifest.get("seed", 0)
                log(f"{method} @ {budget:g} bits, seed {seed}: quantizing "
                    f"({', '.join(f'{k}={v}' for k, v in cfg.to_dict().items())})")
                quant, packed = work / f"{method}-{budget:g}-s{seed}", work / f"{method}-{budget:g}-s{seed}-packed"
                try:
                    quantize_model(model, cfg, quant, calib.input_ids, calib.manifest, device=device)
                except SpQRError as e:
                    if "--restart" not in str(e):
                        raise
                    raise SpQRError(f"{quant} holds a run with other settings than this sweep's; choose another "
                                    f"--work-dir or delete {quant}") from None
                pack_model(quant, packed, overwrite=True)  # from this run's records, whatever was there before
                info = inspect_packed(packed, verify=False)["totals"]  # (scoring loads it with its checksums)
                runs.append({"seed": seed, "bits_measured": info["quantized_bits_measured"],
                             "bits_formula": info["quantized_bits_formula"], "outlier_pct": info["outlier_pct"],
                             "perplexity": scores(str(packed))})
            increase = {d: [100.0 * (r["perplexity"][d] / fp16[d] - 1) for r in runs] for d in datasets}
            point = SweepPoint(
                method, budget, cfg.to_dict(), _mean_std([r["bits_measured"] for r in runs])[0],
                _mean_std([r["bits_formula"] for r in runs])[0], _mean_std([r["outlier_pct"] for r in runs])[0],
                {d: _mean_std([r["perplexity"][d] for r in runs])[0] for d in datasets},
                {d: _mean_std(increase[d])[0] for d in datasets}, {d: _mean_std(increase[d])[1] for d in datasets},
                runs, time.perf_counter() - t)
            points.append(point)
            spread = {d: f" ± {point.increase_spread[d]:.2f}" if len(runs) > 1 else "" for d in datasets}
            log(f"{method} @ {budget:g}: {point.bits_measured:.3f} bits, " + ", ".join(
                f"{d} {point.perplexity[d]:.3f} (+{point.increase_pct[d]:.2f}%{spread[d]})" for d in datasets))
    return {"model": model, "datasets": list(datasets), "seqlen": seqlen, "max_windows": max_windows,
            "calibration": [c.manifest for c in calibrations], "fp16": fp16, "points": [asdict(p) for p in points]}


def check_plot_support() -> None:
    """Raise the one-line error a missing matplotlib gets (``--plot``), before any work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SpQRError('--plot needs matplotlib: pip install -e ".[plot]" (or leave out --plot)') from None


def write_sweep(result: dict[str, Any], json_path: Path | None, plot_path: Path | None) -> None:
    """The sweep's JSON and its plot (perplexity increase vs measured bits, one line per method, one panel per
    dataset); both written atomically. The plot needs matplotlib (``pip install -e ".[plot]"``)."""
    if json_path is not None:
        write_json(result, json_path)
    if plot_path is None:
        return
    check_plot_support()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    datasets = result["datasets"]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False)
    for ax, d in zip(axes[0], datasets, strict=True):
        for method in dict.fromkeys(p["method"] for p in result["points"]):
            pts = sorted((p["bits_measured"], p["increase_pct"][d], p.get("increase_spread", {}).get(d, 0.0))
                         for p in result["points"] if p["method"] == method and not p["skipped"])
            if pts:
                x, y, err = zip(*pts, strict=True)
                ax.errorbar(x, y, yerr=err if any(err) else None, marker="o", capsize=3, label=method)
        ax.set_title(f"{Path(result['model']).name}: {Path(d.removeprefix('file:')).name}")
        ax.set_xlabel("bits per weight (measured, packed)")
        ax.set_ylabel(f"perplexity increase over fp16 {result['fp16'][d]:.3f} (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(plot_path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def sweep_rows(result: dict[str, Any]) -> list[list[str]]:
    """Table rows: method, budget, measured bits, outliers, then perplexity (+increase) per dataset."""
    rows = [["fp16", "", "16", "", *(f"{result['fp16'][d]:.3f}" for d in result["datasets"])]]
    for p in result["points"]:
        if p["skipped"]:
            rows.append([p["method"], f"{p['budget']:g}", "skipped", "", *["" for _ in result["datasets"]]])
            continue
        spread = p.get("increase_spread", {})
        rows.append([p["method"], f"{p['budget']:g}", f"{p['bits_measured']:.3f}", f"{p['outlier_pct']:.2f}%",
                     *(f"{p['perplexity'][d]:.3f} (+{p['increase_pct'][d]:.2f}%"
                       + (f" ± {spread[d]:.2f})" if spread.get(d) else ")") for d in result["datasets"])])
    return rows
