"""The embedded offline demo: the whole available pipeline on a small model that ships inside the package.

Assets (``spqr_cli/demo/``, see NOTICE): ``model/`` (docs-llama-3m, a 1.9M-parameter LLaMA trained by this
project), ``valid.txt`` (demo test text) and ``calib.txt`` (demo calibration text).

``run_demo`` runs ``DEMO_STEPS`` in order; each step reads and extends one shared ``DemoState``: load the fp16
model, draw a small calibration set, evaluate fp16, quantize (spqr-3.9bit, CPU), pack, evaluate the packed
checkpoint (``load_packed``, the torch reference path on CPU) and generate a greedy sample from it. The sizes are
kept small (32 x 128 calibration tokens, 24 evaluation windows of 256) so the whole demo takes 10-20 s on
a 2-core CPU; the numbers are real measurements of the real pipeline, just on a tiny model.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_MODEL = DEMO_DIR / "model"
DEMO_TEST = DEMO_DIR / "valid.txt"
DEMO_CALIB = DEMO_DIR / "calib.txt"

DEMO_SEQLEN = 256  # evaluation window
DEMO_EVAL_WINDOWS = 24
DEMO_EVAL_BATCH = 8
DEMO_CALIB_SEQLEN = 128
DEMO_NSAMPLES = 32
DEMO_SEED = 0
DEMO_PRESET = "spqr-3.9bit"
DEMO_PROMPT = "The kernel scheduler"
DEMO_NEW_TOKENS = 24


@dataclass
class DemoState:
    """What the steps share: the working directory, loaded objects and the summary rows printed at the end."""

    workdir: Path
    console: Any
    model: Any = None
    tokenizer: Any = None
    calib: Any = None
    calib_path: Path | None = None
    quant_dir: Path | None = None
    packed_dir: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def step_load(state: DemoState) -> None:
    from spqr_cli.runtime.loader import load_any_model

    state.model, state.tokenizer = load_any_model(str(DEMO_MODEL), dtype="fp16", device="cpu")
    n_params = sum(p.numel() for p in state.model.parameters())
    state.summary["model"] = f"docs-llama-3m ({n_params / 1e6:.1f}M parameters, fp16)"


def step_calibrate(state: DemoState) -> None:
    from spqr_cli.core.calibrate import build_calibration_set, save_calibration

    state.calib = build_calibration_set(state.tokenizer, f"file:{DEMO_CALIB}", nsamples=DEMO_NSAMPLES,
                                        seqlen=DEMO_CALIB_SEQLEN, seed=DEMO_SEED, model=str(DEMO_MODEL))
    state.calib_path = save_calibration(state.calib, state.workdir / "calib.safetensors")
    state.summary["calibration set"] = (f"{DEMO_NSAMPLES} x {DEMO_CALIB_SEQLEN} tokens, "
                                        f"sha256 {state.calib.sha256[:12]}")


def _perplexity(state: DemoState, model: Any) -> Any:
    from spqr_cli.core.evaluate import evaluate_perplexity

    return evaluate_perplexity(model, state.tokenizer, f"file:{DEMO_TEST}", seqlen=DEMO_SEQLEN,
                               max_windows=DEMO_EVAL_WINDOWS, batch_size=DEMO_EVAL_BATCH, progress=True)


def step_eval_fp16(state: DemoState) -> None:
    result = _perplexity(state, state.model)
    state.summary["fp16 perplexity"] = f"{result.perplexity:.3f} ({result.windows} windows x {result.seqlen})"
    state.summary["fp16_ppl"] = result.perplexity


def step_quantize(state: DemoState) -> None:
    from spqr_cli.console import quant_progress
    from spqr_cli.core.config import build_config
    from spqr_cli.quant.driver import quantize_model

    state.quant_dir = state.workdir / "quant"
    with quant_progress(state.console) as progress:
        report = quantize_model(str(DEMO_MODEL), build_config(DEMO_PRESET), state.quant_dir, state.calib.input_ids,
                                state.calib.manifest, device="cpu", restart=True, progress=progress)
    state.summary["quantization"] = (f"{DEMO_PRESET}: {len(report.layers)} layers, "
                                     f"{report.outlier_pct:.2f}% outliers, {report.wall_seconds:.1f}s")
    state.summary["average bits (formula)"] = f"{report.avg_bits:.3f}"


def step_pack(state: DemoState) -> None:
    from spqr_cli.format.inspect import inspect_packed
    from spqr_cli.format.pack import pack_model

    state.packed_dir = state.workdir / "packed"
    pack_model(state.quant_dir, state.packed_dir, overwrite=True)
    t = inspect_packed(state.packed_dir)["totals"]
    fp16_disk = sum(p.stat().st_size for p in DEMO_MODEL.glob("*.safetensors"))
    state.summary["bits/param measured on disk"] = (f"{t['quantized_bits_measured']:.3f} in quantized layers, "
                                                    f"{t['bits_per_param']:.3f} overall (embeddings stay fp16)")
    state.summary["size on disk"] = (f"fp16 {fp16_disk / 2**20:.2f} MiB -> packed {t['disk_bytes'] / 2**20:.2f} MiB "
                                     f"({fp16_disk / t['disk_bytes']:.2f}x smaller)")


def step_eval_packed(state: DemoState) -> None:
    import torch

    from spqr_cli.runtime.loader import load_packed

    state.model = load_packed(state.packed_dir, device="cpu", dtype=torch.float32)
    result = _perplexity(state, state.model)
    fp16 = state.summary["fp16_ppl"]
    state.summary["quantized perplexity"] = f"{result.perplexity:.3f} ({100 * (result.perplexity / fp16 - 1):+.2f}%)"
    state.summary["quant_ppl"] = result.perplexity


def step_run(state: DemoState) -> None:
    from spqr_cli.runtime.generation import generate

    result = generate(state.model, state.tokenizer, DEMO_PROMPT, max_new_tokens=DEMO_NEW_TOKENS)
    state.summary["sample (packed, greedy)"] = " ".join(f"{DEMO_PROMPT}{result.text}".split())
    state.summary["generation speed"] = f"{result.tokens_per_second:.1f} tokens/s on {result.device} (torch path)"


DEMO_STEPS: list[tuple[str, Callable[[DemoState], None]]] = [
    ("load model", step_load),
    ("calibrate", step_calibrate),
    ("eval fp16", step_eval_fp16),
    ("quantize", step_quantize),
    ("pack", step_pack),
    ("eval packed", step_eval_packed),
    ("run", step_run),
]


def run_demo(workdir: str | Path | None = None, console: Any = None) -> dict[str, Any]:
    """Run every demo step; artifacts go to ``workdir`` (a temporary directory, removed, when None).

    Returns the summary (including ``fp16_ppl`` and ``quant_ppl``) and prints it as a table.
    """
    import torch
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    torch.manual_seed(DEMO_SEED)
    threads = torch.get_num_threads()
    # The demo's tensors are tiny (128-wide layers): intra-op threads only add synchronization, and on a shared
    # or busy CPU that overhead dominates (measured: 84 s with 2 threads vs 10 s with 1 on a loaded 2-core box).
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="spqr-demo-") as tmp:
        state = DemoState(workdir=Path(workdir) if workdir else Path(tmp), console=console)
        state.workdir.mkdir(parents=True, exist_ok=True)
        try:
            for name, step in DEMO_STEPS:
                started = time.perf_counter()
                step(state)
                state.timings[name] = time.perf_counter() - started
                console.print(f"[green]done[/] {name} ({state.timings[name]:.1f}s)")
        finally:
            torch.set_num_threads(threads)
    table = Table(title="spqr demo (offline, embedded docs-llama-3m)")
    table.add_column("item")
    table.add_column("value", overflow="fold")
    for key, value in state.summary.items():
        if not key.endswith("_ppl"):
            table.add_row(key, str(value))
    table.add_row("total time", f"{sum(state.timings.values()):.1f}s")
    if workdir:
        table.add_row("artifacts", str(state.workdir))
    console.print(table)
    return {**state.summary, "timings": state.timings}
