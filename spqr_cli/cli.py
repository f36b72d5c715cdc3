"""The ``spqr`` command line: one thin Typer function per subcommand, each calling a library function.

Keep this module's top-level imports light (no torch/transformers/datasets): ``spqr --help`` must be fast.
Every command body runs inside ``user_errors()``, which turns ``SpQRError``/``ConfigError`` into a one-line
``error: ...`` on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from spqr_cli import __version__

app = typer.Typer(
    name="spqr",
    help="SpQR: compress LLM weights to ~3-4 bits (sparse-quantized representation), pack, evaluate and run them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

EXIT_USER_ERROR = 2


class DType(str, Enum):
    fp16 = "fp16"
    bf16 = "bf16"
    fp32 = "fp32"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


# ----------------------------------------------------------------------------------------------- shared helpers

def error(message: str) -> None:
    """Print a one-line user error to stderr."""
    first = " ".join(str(message).split())
    typer.echo(f"error: {first}", err=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Run a command body; user-fixable errors end the command with ``error: ...`` and exit code 2."""
    from spqr_cli.config import ConfigError
    from spqr_cli.errors import SpQRError

    try:
        yield
    except (SpQRError, ConfigError) as e:
        error(str(e))
        raise typer.Exit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        error("interrupted")
        raise typer.Exit(130) from None


def console():
    from rich.console import Console

    return Console()


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"spqr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """SpQR: compress LLM weights to ~3-4 bits (sparse-quantized representation), pack, evaluate and run them.

    Pipeline: calibrate -> quantize -> pack -> eval / run / bench. `spqr demo` runs it offline on a tiny
    embedded model.
    """
    if os.environ.get("SPQR_DEBUG") != "1":  # keep library chatter (load bars, advisories) off the terminal
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Options shared by several commands.
DataDirOpt = Annotated[Path | None, typer.Option(
    "--data-dir", help="Directory with local dataset copies (e.g. wikitext2/wiki.test.raw); read before the hub. "
    "Default: $SPQR_DATA_DIR.", show_default=False)]
DatasetHelp = ("wikitext2, ptb, c4, redpajama (calibration only) or file:PATH (a text file, one row per line). "
               "Hub first via `datasets`; offline, local copies from --data-dir / $SPQR_DATA_DIR.")


# ----------------------------------------------------------------------------------------------- commands

@app.command()
def calibrate(
    model: Annotated[str, typer.Argument(help="Model directory or hub id (its tokenizer is used).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors file.")],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help=DatasetHelp)] = "wikitext2",
    nsamples: Annotated[int, typer.Option("--nsamples", "-n", min=1, help="Number of windows.")] = 128,
    seqlen: Annotated[int, typer.Option("--seqlen", "-l", min=2, help="Tokens per window.")] = 2048,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the window positions.")] = 0,
    data_dir: DataDirOpt = None,
) -> None:
    """Draw NSAMPLES random windows of SEQLEN tokens from the calibration split of a dataset.

    Writes input_ids [nsamples, seqlen] to a safetensors file with a manifest (model, tokenizer hash, dataset,
    seed, sha256). Calibration splits: wikitext2 -> wiki.train.raw, ptb -> ptb.train.txt, c4 -> train shard 0,
    redpajama -> the 1T sample, file:PATH -> that file.
    """
    with user_errors():
        from spqr_cli.data import settle_hub_mode

        settle_hub_mode(model)
        from spqr_cli.calibrate import build_calibration_set, save_calibration
        from spqr_cli.evaluate import default_seqlen
        from spqr_cli.models import load_config, load_tokenizer

        default_seqlen(load_config(model), seqlen)
        tokenizer = load_tokenizer(model)
        calib = build_calibration_set(tokenizer, dataset, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                      data_dir=data_dir, model=model)
        path = save_calibration(calib, out)
        typer.echo(f"wrote {path}: {nsamples} x {seqlen} tokens from {calib.manifest['source']} "
                   f"(seed {seed}, sha256 {calib.sha256[:16]})")


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Argument(help="Model directory or hub id.")],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help=DatasetHelp)] = "wikitext2",
    data_dir: DataDirOpt = None,
    seqlen: Annotated[int | None, typer.Option(
        "--seqlen", "-l", min=2, help="Window length in tokens. Default: 2048 capped by the model's context.",
        show_default=False)] = None,
    max_windows: Annotated[int | None, typer.Option(
        "--max-windows", min=1, help="Evaluate only the first N windows (quick looks). Default: all.",
        show_default=False)] = None,
    dtype: Annotated[DType, typer.Option(
        "--dtype", help="Weight dtype. On CPU, fp16 weights are computed in fp32 (same values; CPU fp16 "
        "matmuls are slow).")] = DType.fp16,
    device: Annotated[Device, typer.Option("--device", help="auto = cuda if available, else cpu.")] = Device.auto,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Windows per forward pass.")] = 1,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the result as JSON here.",
                                                   show_default=False)] = None,
) -> None:
    """Perplexity on a dataset's test text: rows joined with blank lines, tokenized once, non-overlapping
    SEQLEN windows, exp(mean token NLL)."""
    with user_errors():
        from spqr_cli.data import settle_hub_mode

        settle_hub_mode(model)
        from rich.table import Table

        from spqr_cli.evaluate import evaluate_path, write_json

        result = evaluate_path(model, dataset, dtype=dtype.value, device=device.value, seqlen=seqlen,
                               max_windows=max_windows, batch_size=batch_size, data_dir=data_dir, progress=True)
        table = Table(title=f"perplexity of {model}")
        for col in ("dataset", "windows x seqlen", "dtype", "device", "time", "perplexity"):
            table.add_column(col, justify="right" if col in ("perplexity", "time") else "left", overflow="fold")
        table.add_row(dataset, f"{result.windows} x {result.seqlen}", dtype.value, result.device,
                      f"{result.seconds:.1f}s", f"[bold]{result.perplexity:.3f}[/]")
        console().print(table)
        if json_path is not None:
            write_json({"model": model, "requested_dtype": dtype.value, **result.to_dict()}, json_path)
            typer.echo(f"wrote {json_path}")


@app.command()
def demo(
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Keep the demo's artifacts in this directory. Default: a temporary directory.",
        show_default=False)] = None,
) -> None:
    """Run the available pipeline offline on the embedded docs-llama-3m model (about a minute on a CPU)."""
    with user_errors():
        from spqr_cli.demo import run_demo

        run_demo(out, console=console())


@app.command()
def presets() -> None:
    """List the method presets (configs/*.yaml) with their descriptions."""
    with user_errors():
        import yaml
        from rich.table import Table

        from spqr_cli.config import CONFIG_DIR, list_presets

        table = Table(title=f"presets ({CONFIG_DIR})")
        table.add_column("name")
        table.add_column("description")
        for name in list_presets():
            data = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text()) or {}
            table.add_row(name, str(data.get("description", "")))
        console().print(table)


def main() -> None:
    """Console-script entry point (``spqr``)."""
    sys.exit(app())


if __name__ == "__main__":
    main()
