"""The embedded offline demo: the whole available pipeline on a small model that ships inside the package.

Assets (``spqr_cli/demo/``, see NOTICE): ``model/`` (docs-llama-3m, a 1.9M-parameter LLaMA trained by this
project), ``valid.txt`` (demo test text) and ``calib.txt`` (demo calibration text).

``run_demo`` runs ``DEMO_STEPS`` in order; each step reads and extends one shared ``DemoState``. New pipeline
stages (quantize, pack, eval packed, run) are appended as further steps.
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

DEMO_SEQLEN = 256
DEMO_NSAMPLES = 64
DEMO_SEED = 0


@dataclass
class DemoState:
    """What the steps share: the working directory, loaded objects and the summary rows printed at the end."""

    workdir: Path
    console: Any
    model: Any = None
    tokenizer: Any = None
    calib_path: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def step_load(state: DemoState) -> None:
    from spqr_cli.evaluate import load_any_model

    state.model, state.tokenizer = load_any_model(str(DEMO_MODEL), dtype="fp16", device="cpu")
    n_params = sum(p.numel() for p in state.model.parameters())
    state.summary["model"] = f"docs-llama-3m ({n_params / 1e6:.1f}M parameters, fp16)"


def step_calibrate(state: DemoState) -> None:
    from spqr_cli.calibrate import build_calibration_set, save_calibration

    calib = build_calibration_set(state.tokenizer, f"file:{DEMO_CALIB}", nsamples=DEMO_NSAMPLES,
                                  seqlen=DEMO_SEQLEN, seed=DEMO_SEED, model=str(DEMO_MODEL))
    state.calib_path = save_calibration(calib, state.workdir / "calib.safetensors")
    state.summary["calibration set"] = f"{DEMO_NSAMPLES} x {DEMO_SEQLEN} tokens, sha256 {calib.sha256[:12]}"


def step_eval_fp16(state: DemoState) -> None:
    from spqr_cli.evaluate import evaluate_perplexity

    result = evaluate_perplexity(state.model, state.tokenizer, f"file:{DEMO_TEST}", seqlen=DEMO_SEQLEN,
                                 progress=True)
    state.summary["fp16 perplexity"] = f"{result.perplexity:.3f} ({result.windows} windows x {result.seqlen})"
    state.summary["fp16_ppl"] = result.perplexity


DEMO_STEPS: list[tuple[str, Callable[[DemoState], None]]] = [
    ("load model", step_load),
    ("calibrate", step_calibrate),
    ("eval fp16", step_eval_fp16),
]


def run_demo(workdir: str | Path | None = None, console: Any = None) -> dict[str, Any]:
    """Run every demo step; artifacts go to ``workdir`` (a temporary directory, removed, when None).

    Returns the summary (including ``fp16_ppl``) and prints it as a table.
    """
    import torch
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    torch.manual_seed(DEMO_SEED)
    with tempfile.TemporaryDirectory(prefix="spqr-demo-") as tmp:
        state = DemoState(workdir=Path(workdir) if workdir else Path(tmp), console=console)
        state.workdir.mkdir(parents=True, exist_ok=True)
        for name, step in DEMO_STEPS:
            started = time.perf_counter()
            step(state)
            state.timings[name] = time.perf_counter() - started
            console.print(f"[green]done[/] {name} ({state.timings[name]:.1f}s)")
    table = Table(title="spqr demo (offline, embedded docs-llama-3m)")
    table.add_column("item")
    table.add_column("value")
    for key, value in state.summary.items():
        if not key.endswith("_ppl"):
            table.add_row(key, str(value))
    table.add_row("total time", f"{sum(state.timings.values()):.1f}s")
    if workdir:
        table.add_row("artifacts", str(state.workdir))
    console.print(table)
    return {**state.summary, "timings": state.timings}
