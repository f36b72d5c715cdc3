"""What the command line prints: the rich console, the quantization progress bar and the result tables.

Library functions return data (reports, dicts); the commands hand it here to be drawn.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def console() -> Any:
    """The rich console the commands print to (stdout); not wrapped at 80 columns when stdout is a file or pipe
    (``core.progress.make_console``)."""
    from spqr_cli.core.progress import make_console

    return make_console()


def config_line(cfg: Any) -> str:
    """The method parameters that matter for ``cfg``'s method, on one line (``QuantConfig``)."""
    from spqr_cli.quant.methods import get_method

    method = get_method(cfg.method)
    parts = [f"wbits={cfg.wbits}", f"groupsize={cfg.groupsize}"]
    if cfg.stat_bits != 16:
        parts += [f"beta2={cfg.beta2}", f"stat_bits={cfg.stat_bits}"]
    if method.outliers:
        parts.append(f"tau={cfg.outlier_threshold:g}" if cfg.target_bits is None
                     else f"target_bits={cfg.target_bits:g} (tau per layer)")
    if method.permutes:
        parts.append(f"perm={cfg.perm}")
    if cfg.clip_grid:
        parts.append(f"clip_grid={cfg.clip_grid}")
    if cfg.asym_calib:
        parts.append("asym_calib")
    return ", ".join(parts)


@contextlib.contextmanager
def quant_progress(console_: Any = None) -> Iterator:
    """Progress over decoder blocks fed by quantize_model's callback: on a terminal a transient bar (stage, block
    i/N, elapsed, ETA once a block is done, current layer); elsewhere one line per finished block (block i/N,
    elapsed, ETA) on ``console_`` (default stderr), so logs of long runs show a heartbeat
    (``core.progress.eta_progress``).

    Yields the callback ``progress(stage, done, total, detail)``. Also used by the demo.
    """
    from spqr_cli.core.progress import eta_progress

    with eta_progress("[bold]{task.fields[stage]}[/]", "blocks", console_, "{task.description}") as bar:
        task = bar.add_task("", total=None, stage="quantize")

        def update(stage: str, done: int, total: int, detail: str) -> None:
            bar.update(task, completed=done, total=total, description=detail, stage=stage)

        yield update


# Above this many layers the table shows one row per decoder block instead of one per layer.
MAX_LAYER_ROWS = 64


def print_quant_report(report: Any, out: Path, next_step: bool = True) -> None:
    """Per-layer (or per-block, for deep models) errors, outliers, bits and time, then the totals (and, with
    ``next_step``, the `spqr pack` command that comes next)."""
    from rich.table import Table

    rows = report.layers
    per_block = len(rows) > MAX_LAYER_ROWS
    if per_block:  # group "model.layers.12.mlp.up_proj" under "model.layers.12"
        groups: dict[str, list] = {}
        for r in rows:
            groups.setdefault(".".join(r.name.split(".")[:3]), []).append(r)
    else:
        groups = {r.name: [r] for r in rows}
    table = Table(title="quantized layers" + (" (per block, parameter-weighted)" if per_block else ""))
    for col in ("block" if per_block else "layer", "shape" if not per_block else "layers", "rel error",
                "outlier %", "bits (formula)", "bits (packed)", "seconds"):
        table.add_column(col, justify="left" if col in ("layer", "block") else "right",
                         overflow="fold" if col in ("layer", "block") else "ellipsis")
    for name, rs in groups.items():
        params = [r.shape[0] * r.shape[1] for r in rs]
        total = sum(params)

        def avg(attr: str, rs=rs, params=params, total=total) -> float:
            return sum(getattr(r, attr) * p for r, p in zip(rs, params, strict=True)) / total

        shape = str(len(rs)) if per_block else f"{rs[0].shape[0]}x{rs[0].shape[1]}"
        table.add_row(name, shape, f"{avg('rel_error'):.4f}", f"{avg('outlier_pct'):.2f}", f"{avg('bits'):.3f}",
                      f"{avg('bits_measured'):.3f}", f"{sum(r.seconds for r in rs):.1f}")
    totals = Table(title="totals", show_header=False)
    totals.add_column("item")
    totals.add_column("value", justify="right")
    totals.add_row("layers", str(len(rows)) + (f" ({report.resumed_from_block} blocks resumed)"
                                               if report.resumed_from_block else ""))
    totals.add_row("average bits (formula)", f"{report.avg_bits:.3f}")
    totals.add_row("average bits (packed)", f"{report.avg_bits_measured:.3f}")
    totals.add_row("outliers", f"{report.outlier_pct:.3f} %")
    totals.add_row("wall time", f"{report.wall_seconds:.1f} s on {report.device}")
    device_mem = f", {report.device} {report.peak_device_mb:.0f} MB" if report.device.startswith("cuda") else ""
    totals.add_row("peak memory", f"host {report.peak_host_mb:.0f} MB{device_mem}")
    if report.activations:
        totals.add_row("calibration data", report.activations)
    if report.tuning:  # geometric mean of the blocks' held-out error ratios
        ratio = math.exp(sum(math.log(max(t.heldout_after, 1e-30) / max(t.heldout_before, 1e-30))
                             for t in report.tuning) / len(report.tuning))
        totals.add_row("block fine-tune", f"held-out block error x{ratio:.3f} ({len(report.tuning)} blocks, "
                                          f"{report.tuning[0].steps} steps)")
    c = console()
    c.print(table)
    c.print(totals)
    c.print(f"wrote {out / 'report.json'}" + (f"; next: spqr pack {out} --out PACKED" if next_step else ""),
            highlight=False)


def render_inspect(result: dict[str, Any], console: Any) -> None:
    """Print ``inspect_packed``'s result as rich tables (per layer, then totals)."""
    from rich.table import Table

    qc = result.get("quant_config") or {}
    console.print(f"[bold]{result['path']}[/bold]  format {result['format']} v{result['format_version']}  "
                  f"source {result.get('source_model')}  method {qc.get('method')} w{qc.get('wbits')} "
                  f"g{qc.get('groupsize')} β2={qc.get('beta2')} stats {qc.get('stat_bits')}-bit")
    table = Table(title="quantized layers")
    for col in ("layer", "shape", "wbits", "bits/param (disk)", "bits/param (formula)", "outliers %", "checksum"):
        table.add_column(col, justify="left" if col in ("layer", "checksum") else "right",
                         overflow="fold" if col == "layer" else "ellipsis")
    for r in result["layers"]:
        style = "" if r["checksum"] in ("ok", "skipped") else "red"
        table.add_row(r["name"], f"{r['shape'][0]}x{r['shape'][1]}", str(r["wbits"]), f"{r['bits_measured']:.3f}",
                      f"{r['bits_formula']:.3f}", f"{r['outlier_pct']:.3f}", r["checksum"], style=style)
    console.print(table)
    t = result["totals"]
    tot = Table(title="totals", show_header=False)
    tot.add_column("what")
    tot.add_column("value", justify="right")
    tot.add_row("quantized layers", f"{t['quantized_layers']} ({t['quantized_params']:,} params)")
    tot.add_row("quantized bits/param (disk)", f"{t['quantized_bits_measured']:.3f}")
    tot.add_row("quantized bits/param (formula)", f"{t['quantized_bits_formula']:.3f}")
    tot.add_row("outliers", f"{t['outlier_pct']:.3f} %")
    tot.add_row("non-quantized params (fp16)", f"{t['dense_params']:,}")
    tot.add_row("whole checkpoint bits/param", f"{t['bits_per_param']:.3f}")
    tot.add_row("size on disk", _human(t["disk_bytes"]))
    tot.add_row("fp16 size", _human(t["fp16_bytes"]))
    tot.add_row("compression vs fp16", f"{t['compression_ratio']:.2f}x")
    tot.add_row("checksums", result["checksums"] + (f" ({len(result['failed'])} failed)" if result["failed"] else ""))
    console.print(tot)


def render_task_scores(result: Any, console: Any) -> None:
    """Print ``evaluate_task_paths``' result (``TaskEvalResult``) as one table: a row per task and metric, a column
    per model (value ± stderr), and with a baseline the difference of the model from it."""
    from rich.table import Table

    shots = f"{result.num_fewshot}-shot" if result.num_fewshot is not None else "task-default shots"
    table = Table(title=f"lm-eval {result.lm_eval_version}: {shots}"
                  + (f", limit {result.limit}" if result.limit is not None else ""))
    table.add_column("task", overflow="fold")
    table.add_column("metric")
    table.add_column("n", justify="right")
    for m in result.models:
        table.add_column(f"{m.role}: {m.model}", justify="right", overflow="fold")
    if len(result.models) == 2:
        table.add_column("delta", justify="right")
    for score in result.models[-1].scores:
        found = [m.score(score.task, score.metric) for m in result.models]
        row = [score.task, score.metric, str(score.samples or "")]
        row += ["-" if f is None else f"{f.value:.4f}" + ("" if f.stderr is None else f" ± {f.stderr:.4f}")
                for f in found]
        if len(found) == 2:
            row.append("-" if None in found else f"{found[1].value - found[0].value:+.4f}")
        table.add_row(*row)
    console.print(table)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)
