"""The ``spqr`` command line: one thin Typer function per subcommand, each calling a library function.

Keep this module's top-level imports light (no torch/transformers/datasets): ``spqr --help`` must be fast.
Every command body runs inside ``user_errors()``, which turns ``SpQRError``/``ConfigError`` into a one-line
``error: ...`` on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import warnings
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from spqr_cli import __version__
from spqr_cli.console import config_line, console
from spqr_cli.quant.methods import method_names

# typer's usage errors (a bad flag value, a missing option) derive from this class, whichever click it uses
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class _SpQRGroup(TyperGroup):
    """The ``spqr`` command group, with two changes to typer's defaults.

    - Usage errors (bad or missing options) print one ``error: ...`` line and exit with code 2, like every other
      user error, instead of a usage line and a boxed panel.
    - Help shows flags as plain flags (typer prints a ``<bool>`` type after ``--restart``, as if it took a value),
      ranged numbers as ``<int>`` (the range is printed beside them) and arguments by their upper-case name.
    """

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with _one_line_usage_errors():
            return super().invoke(ctx)

    def get_params(self, ctx: Any) -> list[Any]:
        return _tidy_params(super().get_params(ctx))

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None:
            _tidy_params([*cmd.params, cmd.get_help_option(ctx)])
        return cmd


@contextlib.contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    try:
        yield
    except _UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `spqr` alone: typer prints the help
            raise
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        error(e.format_message().rstrip(".") + hint)
        raise typer.Exit(EXIT_USER_ERROR) from None


def _tidy_params(params: list[Any]) -> list[Any]:
    """Set the help metavars described in ``_SpQRGroup`` on ``params`` (in place; explicit metavars are kept)."""
    for p in params:
        if p is None or p.metavar is not None:
            continue
        ranged = getattr(p, "type_descriptor", None)  # typer >= 0.2x; older ones print click's metavars
        if getattr(p, "is_flag", False):
            p.metavar = ""
        elif getattr(ranged, "is_ranged", False):
            p.metavar = f"<{ranged.ranged_type_name}>"
        elif p.param_type_name == "argument":
            p.metavar = p.name.upper()
    return params


app = typer.Typer(
    name="spqr",
    help="SpQR: compress LLM weights to ~3-4 bits (sparse-quantized representation), pack, evaluate and run them.",
    cls=_SpQRGroup,
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
    from spqr_cli.core.errors import ConfigError, SpQRError

    try:
        yield
    except (SpQRError, ConfigError) as e:
        error(str(e))
        raise typer.Exit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        error("interrupted")
        raise typer.Exit(130) from None
    except OSError as e:  # a full disk, a read-only or vanished directory: the system's reason, and the file
        where = f" ({e.filename})" if e.filename else ""
        error(f"file system error: {e.strerror or e}{where}; check free space, permissions and the path")
        raise typer.Exit(EXIT_USER_ERROR) from None


def _command_args(ctx: typer.Context, leave_out: set[str]) -> list[str]:
    """The command line that gives this command's parameters (defaults left out), e.g. for other processes to
    run it again."""
    args: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in leave_out or value is None or value == param.default:
            continue
        value = value.value if isinstance(value, Enum) else value
        if param.param_type_name == "argument":
            args.append(str(value))
        elif getattr(param, "is_flag", False):
            if value or param.secondary_opts:
                args.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            args += [param.opts[0], str(value)]
    return args


# ----------------------------------------------------------------------------------------------- early checks
# Commands check their local paths here, before importing torch/transformers (5-30 s), so a typo fails at once.
# They only read the file system; they raise SpQRError, so call them inside user_errors().

def looks_local(ref: str) -> bool:
    """Whether a MODEL argument names a local path rather than a hub id.

    Local: it exists, starts with '.', '/' or '~', or has more than one '/'. Anything else (a hub id is exactly
    ``org/name``, e.g. ``meta-llama/Llama-2-7b-hf``) is left to the hub, which says itself if it is unknown.
    """
    return Path(ref).expanduser().exists() or ref.startswith((".", "/", "~")) or ref.count("/") > 1


def check_model_arg(ref: str) -> None:
    """A MODEL argument that looks local (``looks_local``) must be an existing directory."""
    from spqr_cli.core.errors import SpQRError

    if not looks_local(ref):
        return
    path = Path(ref).expanduser()
    if not path.exists():
        raise SpQRError(f"model path {ref!r} does not exist; pass a model directory (a local path) or a hub id "
                        "such as org/name")
    if not path.is_dir():
        raise SpQRError(f"model path {ref!r} is a file; pass the model's directory (the one with config.json)")


def check_input_dir(path: Path, what: str, make_it: str) -> None:
    """``path`` must be an existing directory (``what`` it should be, and the command that ``make_it``s)."""
    from spqr_cli.core.errors import SpQRError

    if not path.exists():
        raise SpQRError(f"{what} {str(path)!r} does not exist; {make_it}")
    if not path.is_dir():
        raise SpQRError(f"{what} {str(path)!r} is a file, not a directory; {make_it}")


def check_dataset_arg(dataset: str, data_dir: Path | None = None) -> None:
    """A ``file:PATH`` dataset must be an existing file; an explicit --data-dir an existing directory."""
    from spqr_cli.core.errors import SpQRError

    if dataset.startswith("file:"):
        path = Path(dataset[5:]).expanduser()
        if not path.is_file():
            why = "is a directory" if path.is_dir() else "not found"
            raise SpQRError(f"data file {str(path)!r} {why} (from --dataset {dataset}); pass file:PATH of a text "
                            "file, one row per line")
    if data_dir is not None and not data_dir.expanduser().is_dir():
        raise SpQRError(f"--data-dir {str(data_dir)!r} is not a directory; pass the directory that holds the "
                        "dataset copies (e.g. DIR/wikitext2/wiki.test.raw)")


def check_output_file(path: Path | None, flag: str, dash_is_stdout: bool = False) -> None:
    """Refuse an output file that could not be written, before the work that produces it (an eval may take
    hours): ``path`` must not be a directory, and its nearest existing parent must be a writable directory
    (missing directories below it are created when writing)."""
    from spqr_cli.core.errors import SpQRError

    if path is None or (dash_is_stdout and str(path) == "-"):
        return
    path = path.expanduser()
    if path.is_dir():
        raise SpQRError(f"{flag} {str(path)!r} is a directory; give a file path, e.g. {path / 'result.json'}")
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SpQRError(f"{flag} {str(path)!r} cannot be written: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SpQRError(f"{flag} {str(path)!r} cannot be written: no permission to write in {parent}")


def write_output_json(data: Any, path: Path, flag: str) -> None:
    """``core.io.write_json`` with file-system errors (a full disk, a directory that vanished) as user errors."""
    from spqr_cli.core.errors import SpQRError
    from spqr_cli.core.io import write_json

    try:
        write_json(data, path)
    except OSError as e:
        raise SpQRError(f"cannot write {flag} {str(path)!r}: {e.strerror or e}; the result was not saved") from None


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
        warnings.showwarning = _show_warning


@functools.cache
def _our_package_dirs() -> tuple[str, ...]:
    """Where spqr_cli and spqr_kernels live (found without importing spqr_kernels, which imports torch)."""
    import importlib.util

    specs = (importlib.util.find_spec(name) for name in ("spqr_cli", "spqr_kernels"))
    return tuple(str(Path(d).resolve()) for spec in specs if spec for d in spec.submodule_search_locations or ())


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """Our own warnings (e.g. the CPU weight cache is full) as one ``warning: ...`` line on stderr: they are
    advice to the user, not a source location. Other libraries' warnings print as Python prints them."""
    if str(Path(filename).resolve()).startswith(_our_package_dirs()):
        typer.echo(f"warning: {' '.join(str(message).split())}", err=True)
    else:
        (file or sys.stderr).write(warnings.formatwarning(message, category, filename, lineno, line))


# Options shared by several commands.
DataDirOpt = Annotated[Path | None, typer.Option(
    "--data-dir", help="Directory with local dataset copies (e.g. wikitext2/wiki.test.raw); read before the hub. "
    "Default: $SPQR_DATA_DIR.", show_default=False)]
VerifyOpt = Annotated[bool, typer.Option(
    "--verify/--no-verify", help="Check the sha256 of every tensor of a packed checkpoint while loading it.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="auto = cuda if available, else cpu.")]
ShardSizeOpt = Annotated[int, typer.Option("--shard-size", min=1, help="Maximum shard size in MB.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists and is not empty.")]
MaxGpuOpt = Annotated[str | None, typer.Option(
    "--max-gpu-memory", metavar="<size>", help="Run a model larger than the GPU: weights on the GPU up to this "
    "size (e.g. 8GiB), the rest in host memory, then on disk (accelerate offload; slower, same outputs).",
    show_default=False)]
MaxCpuOpt = Annotated[str | None, typer.Option(
    "--max-cpu-memory", metavar="<size>", help="Weights in host memory up to this size (e.g. 32GiB); the rest "
    "goes to --offload-dir.", show_default=False)]
OffloadDirOpt = Annotated[Path | None, typer.Option(
    "--offload-dir", help="Where weights beyond --max-gpu-memory/--max-cpu-memory go. Default: a temporary "
    "directory (a dense model's safetensors are read in place).", show_default=False)]
DatasetHelp = ("wikitext2, ptb, c4, redpajama (calibration only) or file:PATH (a text file, one row per line). "
               "Hub first via `datasets`; offline, local copies from --data-dir / $SPQR_DATA_DIR.")


# ----------------------------------------------------------------------------------------------- commands

@app.command()
def calibrate(
    model: Annotated[str, typer.Argument(help="Model directory or hub id (its tokenizer is used).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors file.")],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help=DatasetHelp)] = "wikitext2",
    nsamples: Annotated[int, typer.Option("--nsamples", "-n", min=1, help="Number of windows.")] = 128,
    seqlen: Annotated[int | None, typer.Option("--seqlen", "-l", min=2, help="Tokens per window (default: 2048 "
                                               "capped by the model's context).", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the window positions.")] = 0,
    data_dir: DataDirOpt = None,
) -> None:
    """Draw NSAMPLES random windows of SEQLEN tokens from the calibration split of a dataset.

    Writes input_ids [nsamples, seqlen] to a safetensors file with a manifest (model, tokenizer hash, dataset,
    seed, sha256). Calibration splits: wikitext2 -> wiki.train.raw, ptb -> ptb.train.txt, c4 -> train shard 0,
    redpajama -> the 1T sample, file:PATH -> that file.
    """
    with user_errors():
        check_model_arg(model)
        check_dataset_arg(dataset, data_dir)
        check_output_file(out, "--out")
        from spqr_cli.core.data import settle_hub_mode

        settle_hub_mode(model)
        from spqr_cli.core.calibrate import build_calibration_set, save_calibration
        from spqr_cli.core.evaluate import default_seqlen
        from spqr_cli.core.models import load_config, load_tokenizer

        seqlen = default_seqlen(load_config(model), seqlen)
        tokenizer = load_tokenizer(model)
        calib = build_calibration_set(tokenizer, dataset, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                      data_dir=data_dir, model=model)
        path = save_calibration(calib, out)
        typer.echo(f"wrote {path}: {nsamples} x {seqlen} tokens from {calib.manifest['source']} "
                   f"(seed {seed}, sha256 {calib.sha256[:16]})")


# --method choices: the registered methods (spqr_cli.quant.methods), found without importing them
Method = Enum("Method", {name: name for name in method_names()}, type=str)


class ActivationPlace(str, Enum):
    auto = "auto"
    device = "device"
    host = "host"
    disk = "disk"


class Perm(str, Enum):
    act_order = "act_order"
    identity = "identity"


@app.command()
def quantize(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Model directory or hub id (LLaMA, Mistral, Qwen2, OPT, Falcon).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (records/, dense/ or unquantized/, "
                                      "report.json); re-running the same command there resumes an interrupted "
                                      "run.")],
    preset: Annotated[str | None, typer.Option(
        "--preset", "-p", help="Method preset (see `spqr presets`) or a YAML file. Default: the method's default "
        "preset (spqr -> spqr-3.9bit, gptq -> gptq-4bit-g128, rtn -> rtn-4bit-g128; `spqr presets` lists every "
        "method's).", show_default=False)] = None,
    method: Annotated[Method | None, typer.Option("--method", help=f"{', '.join(method_names())}. Default: the "
                                                  "preset's, else spqr.", show_default=False)] = None,
    wbits: Annotated[int | None, typer.Option("--wbits", help="Weight bits (2..8).", show_default=False)] = None,
    groupsize: Annotated[int | None, typer.Option(
        "--groupsize", help="Columns per group (beta1); 0 = per-channel.", show_default=False)] = None,
    beta2: Annotated[int | None, typer.Option(
        "--beta2", help="Rows sharing one second-level statistic.", show_default=False)] = None,
    stat_bits: Annotated[int | None, typer.Option(
        "--stat-bits", help="Bits of the group scales/zeros; 16 = fp16.", show_default=False)] = None,
    outlier_threshold: Annotated[float | None, typer.Option(
        "--outlier-threshold", help="Outlier threshold tau (relative); inf disables outliers.",
        show_default=False)] = None,
    target_bits: Annotated[float | None, typer.Option(
        "--target-bits", help="Bits per weight each layer may take, measured from its packed bytes (what `spqr "
        "inspect` reports): instead of one tau, every layer keeps as many outliers as fit (spqr only; ~10 "
        "quantizations per layer).", show_default=False)] = None,
    perm: Annotated[Perm | None, typer.Option("--perm", help="Column order: act_order or identity.",
                                              show_default=False)] = None,
    percdamp: Annotated[float | None, typer.Option(
        "--percdamp", help="Hessian dampening, relative to its mean diagonal.", show_default=False)] = None,
    blocksize: Annotated[int | None, typer.Option(
        "--blocksize", help="Columns per GPTQ update block.", show_default=False)] = None,
    tune_steps: Annotated[int | None, typer.Option(
        "--tune-steps", help="Block fine-tune: after each block is quantized, this many Adam steps train its "
        "continuous parameters (second-level statistics, outlier values, norms) to match the original block's "
        "outputs; the bits do not change. 0: off (the default).", show_default=False)] = None,
    tune_lr: Annotated[float | None, typer.Option(
        "--tune-lr", help="The fine-tune's learning rate, relative to each tensor's magnitude (default 3e-3).",
        show_default=False)] = None,
    clip_grid: Annotated[int | None, typer.Option(
        "--clip-grid", help="Fit each group's range by trying this many shrunken min/max ranges per row (down to "
        "~20%) and keeping the one with the smallest error (GPTQ's search); 0: plain min/max ranges. Default: the "
        "preset's (spqr-3.9bit: 100, the others: 0).",
        show_default=False)] = None,
    asym_calib: Annotated[bool | None, typer.Option(
        "--asym-calib/--no-asym-calib", help="GPTAQ's asymmetric calibration: fit each layer to the fp16 model's "
        "output on the fp16 model's own inputs (costs a second activation stream and a copy of the block; one "
        "process only). Default: off.", show_default=False)] = None,
    calib: Annotated[Path | None, typer.Option(
        "--calib", help="Calibration file from `spqr calibrate` (must match this model's tokenizer).",
        show_default=False)] = None,
    dataset: Annotated[str | None, typer.Option(
        "--dataset", "-d", help=f"Calibrate on the fly from this dataset when no --calib is given (default: "
        f"wikitext2). {DatasetHelp}", show_default=False)] = None,
    nsamples: Annotated[int, typer.Option("--nsamples", "-n", min=1, help="Calibration windows (on the fly).")] = 128,
    seqlen: Annotated[int | None, typer.Option(
        "--seqlen", "-l", min=2, help="Tokens per calibration window (on the fly). Default: 2048 capped by the "
        "model's context.", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the calibration windows (on the fly).")] = 0,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = Device.auto,
    activations: Annotated[ActivationPlace, typer.Option(
        "--activations", help="Where the calibration activations live between blocks: auto = on the GPU (GPU runs) "
        "when they (with the copies --asym-calib and --tune-steps keep beside them) fit in half of its free memory, "
        "else in host memory when they fit in half of what is available, else on disk under --offload-dir (a file "
        "the kernel pages; removed when the run ends); device / host / disk force one (host: less GPU memory, each "
        "block copies them across PCIe).")] = ActivationPlace.auto,
    offload_dir: Annotated[Path | None, typer.Option(
        "--offload-dir", help="Where activations on disk go (--activations disk, or auto when they fit nowhere "
        "else). Default: OUT.", show_default=False)] = None,
    restart: Annotated[bool, typer.Option("--restart", help="Discard a previous run in OUT and start over.")] = False,
    pack_out: Annotated[Path | None, typer.Option(
        "--pack", help="Also write the packed checkpoint here when the run finishes (as `spqr pack OUT --out "
        "PACK` would). Implies --no-dense unless --dense is given.", show_default=False)] = None,
    dense: Annotated[bool | None, typer.Option(
        "--dense/--no-dense", help="Write OUT/dense/, the whole model with its quantized layers dequantized (an "
        "fp16 checkpoint as large as the original), or only the tensors that are not quantized (OUT/unquantized/, "
        "all `spqr pack` needs). Default: a resumed run's own choice, else --dense, or --no-dense with --pack.",
        show_default=False)] = None,
    ranks: Annotated[int, typer.Option(
        "--ranks", min=1, help="Processes on this host quantizing together: one per GPU (N <= the GPUs), or CPU "
        "processes over gloo with --device cpu. Spawns what `torchrun --nproc-per-node N -m spqr_cli quantize ...` "
        "would; the output is the same as one process's.")] = 1,
) -> None:
    """Quantize every linear layer of MODEL with SpQR (or GPTQ / RTN), block by block, into OUT.

    Flags override the preset's values. Without --calib, a calibration set is drawn on the fly (--dataset,
    --nsamples, --seqlen, --seed) and its manifest is stored with the run. Next: `spqr pack OUT --out PACKED`,
    or pass --pack PACKED to write it at the end of the run (for large models: no dense fp16 copy is written).
    """
    with user_errors():
        from spqr_cli.core.errors import SpQRError

        if calib is not None and dataset is not None:
            raise SpQRError("--calib and --dataset both given; use --calib FILE or build the set on the fly "
                            "with --dataset, not both")
        # Paths first: they need no import of torch (the config below imports the methods, which do).
        check_model_arg(model)
        check_dataset_arg(dataset or "wikitext2", data_dir)
        if calib is not None and not calib.is_file():
            raise SpQRError(f"calibration file {str(calib)!r} not found; make one with `spqr calibrate`")
        if out.exists() and not out.is_dir() or any(p.is_file() for p in out.absolute().parents):
            raise SpQRError(f"--out {out} is a file or lies below one; choose a directory path")
        lead = os.environ.get("RANK", "0") == "0"  # only rank 0 of several prints
        from spqr_cli.core.config import build_config

        cfg = build_config(preset, method.value if method else None, wbits=wbits, groupsize=groupsize, beta2=beta2,
                           stat_bits=stat_bits, outlier_threshold=outlier_threshold,
                           target_bits=target_bits, perm=perm.value if perm else None, percdamp=percdamp,
                           blocksize=blocksize, tune_steps=tune_steps, tune_lr=tune_lr, clip_grid=clip_grid,
                           asym_calib=asym_calib)
        if pack_out is not None:  # before hours of quantization, not after
            _check_pack_target(pack_out, out, model, cfg.to_dict())
        write_dense = dense if dense is not None else _dense_default(out, restart, pack_out is None)
        from spqr_cli.core.data import settle_hub_mode
        from spqr_cli.core.models import check_weight_files

        check_weight_files(model)  # a packed or pickle-only directory: say so before building the calibration set
        settle_hub_mode(model)
        if ranks > 1 and "RANK" not in os.environ:  # the ranks run this same command (without --ranks)
            from spqr_cli.quant.driver import check_ranks
            from spqr_cli.quant.ranks import spawn

            check_ranks(cfg, ranks)
            code = spawn(ranks, ["quantize", *_command_args(ctx, leave_out={"ranks"})], device.value)
            if code:
                raise typer.Exit(code)
            return
        from spqr_cli.core.calibrate import build_calibration_set, load_calibration
        from spqr_cli.core.evaluate import default_seqlen
        from spqr_cli.core.models import load_config, load_tokenizer
        from spqr_cli.quant.driver import quantize_model

        config = load_config(model)
        tokenizer = load_tokenizer(model)
        if calib is not None:
            calib_set = load_calibration(calib, tokenizer)
        else:
            calib_set = build_calibration_set(tokenizer, dataset or "wikitext2", nsamples=nsamples,
                                              seqlen=default_seqlen(config, seqlen), seed=seed, data_dir=data_dir,
                                              model=model)
        ids = calib_set.input_ids
        if lead:
            console().print(f"quantizing [bold]{model}[/] with {cfg.method} ({config_line(cfg)}) on "
                            f"{ids.shape[0]} x {ids.shape[1]} calibration tokens from "
                            f"{calib_set.manifest.get('source', calib)}")
        from spqr_cli.console import print_quant_report, quant_progress

        with quant_progress() as progress:
            report = quantize_model(model, cfg, out, ids, calib_set.manifest, device=device.value, restart=restart,
                                    progress=progress, dense=write_dense, activations=activations.value,
                                    offload_dir=offload_dir)
        if report.from_saved and lead:
            console().print(f"{out} already holds this finished run (same model, config and calibration): showing "
                            "its saved report; pass --restart to quantize again")
        if lead:
            print_quant_report(report, out, next_step=pack_out is None)
        if pack_out is not None:  # an earlier --pack of this run (checked above) is rewritten; rank 0 packs
            from spqr_cli.quant.ranks import current_ranks, lead_step

            lead_step(current_ranks(), lambda: _pack_and_summarize(out, pack_out, 2048, overwrite=True))


@app.command()
def pack(
    quant_dir: Annotated[Path, typer.Argument(help="Output directory of `spqr quantize` (quant_config.json, records/, "
                                              "dense/ or unquantized/).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Packed checkpoint directory to write.")],
    shard_size: ShardSizeOpt = 2048,
    overwrite: OverwriteOpt = False,
) -> None:
    """Pack quantized layers into one checkpoint: bit-packed codes, packed statistics, CSR outliers, fp16 rest.

    The result loads with `spqr run`, `spqr eval` and `spqr_cli.load_packed`; `spqr inspect` shows its sizes.
    """
    with user_errors():
        check_input_dir(quant_dir, "quantization directory", "create it with `spqr quantize MODEL --out DIR`")
        _pack_and_summarize(quant_dir, out, shard_size, overwrite)


def _pack_and_summarize(quant_dir: Path, out: Path, shard_size: int, overwrite: bool) -> None:
    """``pack_model`` and the one-line summary `spqr pack` and `spqr quantize --pack` print."""
    from spqr_cli.format.inspect import inspect_packed
    from spqr_cli.format.pack import pack_model

    summary = pack_model(quant_dir, out, shard_size_mb=shard_size, overwrite=overwrite)
    t = inspect_packed(out, verify=False)["totals"]
    typer.echo(f"wrote {out}: {summary['layers']} quantized layers in {len(summary['shards'])} shard(s), "
               f"{t['disk_bytes'] / 2**20:.2f} MiB ({t['quantized_bits_measured']:.3f} bits/param in quantized "
               f"layers, {t['bits_per_param']:.3f} overall, {t['compression_ratio']:.2f}x smaller than fp16)")


def _check_pack_target(pack_out: Path, out: Path, model: str, cfg: dict) -> None:
    """`spqr quantize --pack`: the packed directory must not overlap the run, and must be new, empty, or a packed
    checkpoint of this very model and config (an earlier --pack of the run, which is then rewritten)."""
    from spqr_cli.core.errors import SpQRError

    p, o = pack_out.resolve(), out.resolve()
    if p == o or o in p.parents or p in o.parents:
        raise SpQRError(f"--pack {pack_out} and --out {out} overlap; choose a --pack directory outside the run")
    if pack_out.exists() and not pack_out.is_dir() or any(q.is_file() for q in p.parents):
        raise SpQRError(f"--pack {pack_out} is a file or lies below one; choose a directory path")
    if not pack_out.is_dir() or not any(pack_out.iterdir()):
        return
    try:
        packed = json.loads((pack_out / "spqr_config.json").read_text())
    except (OSError, ValueError, RecursionError):
        raise SpQRError(f"--pack {pack_out} exists and is not a packed checkpoint; choose another path") from None
    if not isinstance(packed, dict) or packed.get("source_model") != model or packed.get("quant_config") != cfg:
        raise SpQRError(f"--pack {pack_out} holds a packed checkpoint of another model or config; choose another "
                        "path (or remove it)")


def _dense_default(out: Path, restart: bool, no_pack: bool) -> bool:
    """--dense/--no-dense when neither is given: what a run being resumed in ``out`` chose, else dense unless
    --pack is given."""
    if not restart:
        try:
            state = json.loads((out / "quant_config.json").read_text())
            return bool(state.get("dense", True))
        except (OSError, ValueError, AttributeError, RecursionError):
            pass  # no run, or a damaged state file: the driver says so
    return no_pack


@app.command()
def unpack(
    packed_dir: Annotated[Path, typer.Argument(help="Packed checkpoint directory (`spqr pack` output).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dense checkpoint directory to write.")],
    verify: VerifyOpt = True,
    shard_size: ShardSizeOpt = 2048,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write a dense fp16 checkpoint that plain transformers loads, bit-exact with the quantizer's weights."""
    with user_errors():
        check_input_dir(packed_dir, "packed checkpoint", "create it with `spqr pack QUANT_DIR --out DIR`")
        from spqr_cli.format.pack import unpack_model

        summary = unpack_model(packed_dir, out, verify=verify, overwrite=overwrite, shard_size_mb=shard_size)
        typer.echo(f"wrote {out}: {summary['tensors']} tensors in {len(summary['shards'])} shard(s)")


@app.command()
def export(
    packed_dir: Annotated[Path, typer.Argument(help="Packed checkpoint directory (`spqr pack` output).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint directory to write.")],
    to: Annotated[str, typer.Option("--to", help="Target format: hf-spqr (transformers' and the authors' SpQR "
                                    "format, quant_method \"spqr\").")] = "hf-spqr",
    verify: VerifyOpt = True,
    shard_size: ShardSizeOpt = 2048,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write a packed model in another SpQR format (bit-exact; only models that fit it: 3-bit codes and stats,
    16x16 groups, no bias)."""
    with user_errors():
        if to != "hf-spqr":
            raise typer.BadParameter(f"unknown format {to!r}; available: hf-spqr", param_hint="--to")
        check_input_dir(packed_dir, "packed checkpoint", "create it with `spqr pack QUANT_DIR --out DIR`")
        from spqr_cli.format.hf_spqr import export_hf_spqr

        summary = export_hf_spqr(packed_dir, out, verify=verify, overwrite=overwrite, shard_size_mb=shard_size,
                                 progress=True)
        typer.echo(f"wrote {out}: {summary['layers']} SpQR layers in {len(summary['shards'])} shard(s) "
                   f"(transformers: quant_method \"spqr\", needs a CUDA GPU and `pip install spqr_quant[gpu]`; "
                   f"transformers 5.x's SpQR loader fails upstream, README says what to do)")


@app.command("import")
def import_(
    hf_dir: Annotated[Path, typer.Argument(help="transformers SpQR checkpoint (quant_method \"spqr\", e.g. "
                                           "`spqr export --to hf-spqr` output or one the authors published).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Packed checkpoint directory to write.")],
    shard_size: ShardSizeOpt = 2048,
    overwrite: OverwriteOpt = False,
) -> None:
    """Read a transformers SpQR checkpoint into the packed format (`spqr run`, `spqr eval`, `load_packed`)."""
    with user_errors():
        check_input_dir(hf_dir, "transformers SpQR checkpoint", "create it with `spqr export PACKED --to hf-spqr`")
        from spqr_cli.format.hf_spqr import import_hf_spqr

        summary = import_hf_spqr(hf_dir, out, overwrite=overwrite, shard_size_mb=shard_size, progress=True)
        typer.echo(f"wrote {out}: {summary['layers']} quantized layers, {summary['dense_tensors']} dense tensors")


@app.command()
def inspect(
    packed_dir: Annotated[Path, typer.Argument(help="Packed checkpoint directory (`spqr pack` output).")],
    verify: VerifyOpt = True,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the result as JSON here ('-' prints "
                                                   "only the JSON, to stdout).", show_default=False)] = None,
) -> None:
    """Sizes, bits/param and checksums of a packed checkpoint, per layer and in total.

    Per layer: shape, bits/param measured from the bytes on disk and by the formula, outlier %, checksum status.
    Totals: size on disk, compression vs fp16. Exits with code 2 if a checksum fails.
    """
    with user_errors():
        check_input_dir(packed_dir, "packed checkpoint", "create it with `spqr pack QUANT_DIR --out DIR`")
        check_output_file(json_path, "--json", dash_is_stdout=True)
        import json

        from spqr_cli.console import render_inspect
        from spqr_cli.core.errors import SpQRError
        from spqr_cli.format.inspect import inspect_packed

        result = inspect_packed(packed_dir, verify=verify)
        if json_path is not None and str(json_path) == "-":
            typer.echo(json.dumps(result, indent=1))
        else:
            render_inspect(result, console())
            if json_path is not None:
                write_output_json(result, json_path, "--json")
                typer.echo(f"wrote {json_path}")
        if result["failed"]:
            raise SpQRError(f"{len(result['failed'])} tensors fail their checksum (first: {result['failed'][0]}); "
                            "the checkpoint is corrupted: re-pack it or copy it again")


def _eval_tasks(model: str, tasks: str, baseline: str | None, include_path: list[Path] | None,
                num_fewshot: int | None, limit: float | None, batch_size: int, dtype: str, device: str, verify: bool,
                json_path: Path | None) -> None:
    """``spqr eval --tasks``: lm-eval accuracy of MODEL (and --baseline), side by side (``core.tasks``)."""
    from spqr_cli.core.tasks import evaluate_task_paths, require_lm_eval

    require_lm_eval()
    if baseline is not None:
        check_model_arg(baseline)
    from spqr_cli.console import render_task_scores

    result = evaluate_task_paths(model, tasks, baseline=baseline, num_fewshot=num_fewshot, limit=limit,
                                 batch_size=batch_size, include_path=include_path, dtype=dtype, device=device,
                                 verify=verify)
    render_task_scores(result, console())
    for m in result.models:
        typer.echo(f"{m.role}: {m.seconds:.1f} s on {m.device} ({m.compute_dtype})", err=True)
    if json_path is not None:
        write_output_json({"requested_dtype": dtype, **result.to_dict()}, json_path, "--output")
        typer.echo(f"wrote {json_path}")


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Argument(help="Model directory, hub id, `spqr quantize` output directory (its dense/ "
                                         "checkpoint) or `spqr pack` directory.")],
    datasets: Annotated[list[str] | None, typer.Option(
        "--dataset", "-d", metavar="<str>", help=f"{DatasetHelp} Repeat it for several texts: the model loads once, "
        "one row each. Default: wikitext2.", show_default=False)] = None,
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
    device: DeviceOpt = Device.auto,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Windows (perplexity) or requests "
                                            "(--tasks) per forward pass.")] = 1,
    json_path: Annotated[Path | None, typer.Option("--json", "--output", help="Also write the result as JSON here.",
                                                   show_default=False)] = None,
    verify: VerifyOpt = True,
    tasks: Annotated[str | None, typer.Option(
        "--tasks", help="Comma-separated lm-evaluation-harness tasks (e.g. arc_easy,hellaswag) to score instead of "
        "perplexity; needs `pip install -e \".\\[eval]\"`. Offline, only tasks whose data is cached or local "
        "(--include-path) run.", show_default=False)] = None,
    max_gpu_memory: MaxGpuOpt = None,
    max_cpu_memory: MaxCpuOpt = None,
    offload_dir: OffloadDirOpt = None,
    baseline: Annotated[str | None, typer.Option(
        "--baseline", help="--tasks: also score this model (e.g. the fp16 original) and show both side by side.",
        show_default=False)] = None,
    include_path: Annotated[list[Path] | None, typer.Option(
        "--include-path", metavar="<path>", help="--tasks: a directory of lm-eval task YAML files (local tasks); "
        "repeatable.", show_default=False)] = None,
    num_fewshot: Annotated[int | None, typer.Option(
        "--num-fewshot", min=0, help="--tasks: few-shot examples per prompt. Default: the task's (0 if unset).",
        show_default=False)] = None,
    limit: Annotated[float | None, typer.Option(
        "--limit", help="--tasks: score only the first N documents of each task (or a fraction, if < 1).",
        show_default=False)] = None,
) -> None:
    """Perplexity on a dataset's test text: exp(mean token NLL) over non-overlapping SEQLEN windows; with --tasks,
    lm-evaluation-harness task accuracy instead (MODEL and, with --baseline, a second model side by side).

    The rows are joined with blank lines and tokenized once."""
    with user_errors():
        check_model_arg(model)
        if tasks is not None and (max_gpu_memory, max_cpu_memory, offload_dir) != (None, None, None):
            from spqr_cli.core.errors import SpQRError

            raise SpQRError("--max-gpu-memory, --max-cpu-memory and --offload-dir apply to perplexity, not to --tasks")
        from spqr_cli.core.errors import SpQRError

        if tasks is not None:
            if seqlen is not None or max_windows is not None:
                raise SpQRError("--seqlen and --max-windows set perplexity windows; lm-eval tasks choose their own "
                                "(use --limit to score fewer documents)")
            check_output_file(json_path, "--output")
            return _eval_tasks(model, tasks, baseline, include_path, num_fewshot, limit, batch_size, dtype.value,
                               device.value, verify, json_path)
        task_only = [flag for flag, value in (("--baseline", baseline), ("--limit", limit),
                                              ("--num-fewshot", num_fewshot), ("--include-path", include_path))
                     if value is not None]
        if task_only:
            one = len(task_only) == 1
            raise SpQRError(f"{', '.join(task_only)} {'applies' if one else 'apply'} to lm-eval tasks: use "
                            f"{'it' if one else 'them'} with --tasks")
        datasets = datasets or ["wikitext2"]
        for dataset in datasets:  # every text checked before the model loads
            check_dataset_arg(dataset, data_dir)
        check_output_file(json_path, "--json")
        from spqr_cli.core.data import settle_hub_mode

        settle_hub_mode(model)
        from rich.table import Table

        from spqr_cli.core.evaluate import evaluate_datasets

        results = evaluate_datasets(model, datasets, dtype=dtype.value, device=device.value, seqlen=seqlen,
                                    max_windows=max_windows, batch_size=batch_size, data_dir=data_dir,
                                    progress=True, verify=verify, max_gpu_memory=max_gpu_memory,
                                    max_cpu_memory=max_cpu_memory, offload_dir=offload_dir)
        table = Table(title=f"perplexity of {model}")
        for col in ("dataset", "windows x seqlen", "dtype", "device", "time", "perplexity"):
            table.add_column(col, justify="right" if col in ("perplexity", "time") else "left", overflow="fold")
        for dataset, result in zip(datasets, results, strict=True):
            table.add_row(dataset, f"{result.windows} x {result.seqlen}", dtype.value, result.device,
                          f"{result.seconds:.1f}s", f"[bold]{result.perplexity:.3f}[/]")
        console().print(table)
        if json_path is not None:  # one text: its result's fields at the top level; several: a list of them
            body = results[0].to_dict() if len(results) == 1 else {"results": [r.to_dict() for r in results]}
            write_output_json({"model": model, "requested_dtype": dtype.value, **body}, json_path, "--json")
            typer.echo(f"wrote {json_path}")


@app.command()
def run(
    model: Annotated[str, typer.Argument(help="Packed checkpoint (`spqr pack` output), quantization output or "
                                         "dense model directory / hub id.")],
    prompt: Annotated[str, typer.Option("--prompt", help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens to generate at most.")] = 64,
    sample: Annotated[bool, typer.Option("--sample/--greedy", help="Sample (temperature, top-p, top-k) or take the "
                                         "most likely token.")] = False,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature (> 0).")] = 0.8,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass, in (0, 1]; 1 = off.")] = 0.95,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="Sample among the K most likely tokens; 0 = off.")]
    = 50,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="On CUDA: compile the one-token step "
                                          "(torch.compile + CUDA graph; a one-time warm-up of seconds to a minute, "
                                          "then several times more tokens/s). Ignored on CPU.")] = True,
    device: DeviceOpt = Device.auto,
    verify: VerifyOpt = True,
    max_gpu_memory: MaxGpuOpt = None,
    max_cpu_memory: MaxCpuOpt = None,
    offload_dir: OffloadDirOpt = None,
) -> None:
    """Generate text from a prompt, streamed to stdout as it is produced; speed and device go to stderr."""
    with user_errors():
        check_model_arg(model)
        from spqr_cli.runtime.generation import run_model  # checks the sampling settings before loading

        def emit(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        result = run_model(model, prompt, device=device.value, verify=verify, on_text=emit,
                           max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, top_p=top_p,
                           top_k=top_k, seed=seed, compile=compile, on_status=lambda m: typer.echo(m, err=True),
                           max_gpu_memory=max_gpu_memory, max_cpu_memory=max_cpu_memory, offload_dir=offload_dir)
        if not result.text.endswith("\n"):
            emit("\n")
        warm = f", compile warm-up {result.compile_seconds:.1f} s" if result.compile_seconds else ""
        typer.echo(f"{result.new_tokens} tokens, {result.tokens_per_second:.1f} tokens/s, prefill "
                   f"{result.prefill_seconds * 1000:.0f} ms, device {result.device}{warm}", err=True)


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="Packed checkpoint (`spqr pack` output), quantization output or "
                                         "dense model directory / hub id.")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on (127.0.0.1: this machine only).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port (0 = any free port).")] = 8000,
    name: Annotated[str | None, typer.Option("--name", help="Model id clients send as `model`. Default: the "
                                             "directory's name.", show_default=False)] = None,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="On CUDA: compile the one-token step, as "
                                          "`spqr run` does. Ignored on CPU.")] = True,
    device: DeviceOpt = Device.auto,
    verify: VerifyOpt = True,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions,
    streaming or not); requests are answered one generation at a time. Ctrl-C stops."""
    with user_errors():
        check_model_arg(model)
        from spqr_cli.runtime.serve import serve_model

        serve_model(model, host=host, port=port, name=name, device=device.value, verify=verify, compile=compile,
                    on_ready=lambda m: typer.echo(m), log=lambda m: typer.echo(m, err=True))


@app.command()
def bench(
    models: Annotated[str, typer.Option("--models", help="Comma-separated LLaMA sizes whose layer shapes are timed "
                                        "(3b is OpenLLaMA-3B).")] = "3b,7b,13b,33b,65b",
    batches: Annotated[str, typer.Option("--batches", help="Comma-separated batch sizes (tokens per matmul): 1-8 "
                                         "run the decode kernel, more the dense path.")]
    = "1,2,4,8,16,32,64,128,256,512,2048,4096",
    reps: Annotated[int, typer.Option("--reps", min=1, help="Calls per CUDA-graph timing (per-call time = "
                                      "graph time / reps, median of 3 replays).")] = 50,
    part: Annotated[str, typer.Option("--part", help="What to run: layers, e2e or all. e2e builds a random-weight "
                                      "--e2e-model packed and fp16 (decode tokens/s, 2048-token prefill, peak "
                                      "memory) and a packed --cap-model under --cap-gb.")] = "all",
    e2e_model: Annotated[str, typer.Option("--e2e-model", help="LLaMA size for the end-to-end comparison.")] = "7b",
    cap_model: Annotated[str, typer.Option("--cap-model", help="LLaMA size run packed under the memory cap.")]
    = "33b",
    cap_gb: Annotated[float, typer.Option("--cap-gb", min=1.0, help="GPU memory cap for --cap-model, GB.")] = 24.0,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="e2e: also time the decode step through "
                                          "torch.compile (what `spqr run` uses; ~1 min of compiling per model).")]
    = True,
    fused_shapes: Annotated[bool, typer.Option("--fused-shapes", help="layers: also time q+k+v and gate+up as one "
                                               "layer each (3h x h, 2i x h), as `spqr run` runs them; fp16 gets the "
                                               "same fused shape.")] = False,
    fuse: Annotated[bool, typer.Option("--fuse/--no-fuse", help="e2e: run layers that share an input (q/k/v, "
                                       "gate/up) as one kernel launch, as `spqr run` and `spqr eval` do on CUDA.")]
    = True,
    peers: Annotated[str, typer.Option("--peers", help="Comma-separated peer kernels timed beside ours in the layer "
                                       "table: spqr-quant (the SpQR authors' CUDA kernel, 3-bit 16x16, batch 1; "
                                       "`pip install spqr-quant`, builds with nvcc on first use) and gemlite (4-bit, "
                                       "group 128; `pip install gemlite`).", show_default=False)] = "",
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the rows and environment as JSON here.",
                                                   show_default=False)] = None,
) -> None:
    """Speed on GPU (needs CUDA): fp16 cuBLAS vs the SpQR Triton kernels, per layer and end to end.

    Side by side in one process: LLaMA layer shapes (and --peers' kernels), then random-weight LLaMA-shaped
    models."""
    with user_errors():
        check_output_file(json_path, "--json")
        import torch

        from spqr_cli.core.errors import SpQRError

        if not torch.cuda.is_available():
            raise SpQRError("spqr bench needs a CUDA GPU; run it on a machine with one (it times the Triton "
                            "kernels against cuBLAS)")
        from spqr_cli.bench.layers import LLAMA_DIMS, bench_layers, llama_shapes, render_table, write_bench_json
        from spqr_cli.bench.peers import parse_peers

        names = [m.strip().upper() for m in models.split(",") if m.strip()]
        unknown = [m for m in names if m not in LLAMA_DIMS]
        if unknown or not names:
            raise SpQRError(f"unknown model size {', '.join(unknown) or models!r}; choose from "
                            f"{', '.join(k.lower() for k in LLAMA_DIMS)}")
        try:
            batch_list = [int(b) for b in batches.split(",") if b.strip()]
        except ValueError:
            raise SpQRError(f"--batches {batches!r} must be comma-separated integers, e.g. 1,4,16") from None
        if not batch_list or min(batch_list) < 1:
            raise SpQRError("--batches needs positive integers, e.g. 1,4,16")
        if part not in ("all", "layers", "e2e"):
            raise SpQRError(f"--part {part!r} must be layers, e2e or all")
        for size in (e2e_model, cap_model):
            if size.upper() not in LLAMA_DIMS:
                raise SpQRError(f"unknown model size {size!r}; choose from {', '.join(k.lower() for k in LLAMA_DIMS)}")
        peer_list = parse_peers(peers)
        if peer_list and part == "e2e":
            raise SpQRError("--peers adds columns to the layer table; use it with --part layers or all")
        rows, e2e_rows = [], []
        if part in ("all", "layers"):
            rows = bench_layers(llama_shapes(names, fused_shapes), batch_list, reps=reps, peers=peer_list)
            console().print(render_table(rows))
        if part in ("all", "e2e"):
            from spqr_cli.bench.e2e import bench_e2e, render_e2e

            e2e_rows = bench_e2e(e2e_model.upper(), cap_model.upper(), cap_gb, compile=compile, fuse=fuse)
            console().print(render_e2e(e2e_rows))
        if json_path is not None:
            try:
                write_bench_json(rows, str(json_path), {"models": names, "batches": batch_list, "reps": reps,
                                                        "peers": peer_list, "e2e": e2e_rows})
            except OSError as e:
                raise SpQRError(f"cannot write --json {str(json_path)!r}: {e.strerror or e}; the result was not "
                                "saved") from None
            typer.echo(f"wrote {json_path}")


@app.command()
def demo(
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Keep the demo's artifacts in this directory. Default: a temporary directory.",
        show_default=False)] = None,
) -> None:
    """The whole pipeline offline on the embedded docs-llama-3m model, in 10-20 s on a 2-core CPU.

    Calibrate, eval fp16, quantize, pack, eval packed, generate; prints a summary (perplexities, bits, sizes, a
    sample)."""
    with user_errors():
        from spqr_cli.demo import run_demo

        run_demo(out, console=console())


@app.command()
def presets() -> None:
    """List the method presets (configs/*.yaml) with their descriptions."""
    with user_errors():
        import yaml
        from rich.table import Table

        from spqr_cli.core.config import CONFIG_DIR, list_presets, load_preset

        table = Table(title=f"presets ({CONFIG_DIR})", caption="bits per weight of the linear layers of a LLaMA-7B "
                      "block: formula / measured from the packed bytes (what `spqr inspect` reports), without "
                      "outliers and with 1% (SpQR's tau=0.2 keeps ~0.5-2%; --target-bits fixes the total instead)")
        for col in ("name", "bits, no outliers", "bits, 1% outliers", "description"):
            table.add_column(col, justify="right" if col.startswith("bits") else "left")
        for name in list_presets():
            data = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text()) or {}
            cfg = load_preset(name)
            cells = [f"{f:.2f} / {m:.2f}" for f, m in (cfg.model_bits(), cfg.model_bits(outlier_fraction=0.01))]
            table.add_row(name, cells[0], cells[1] if cfg.has_outliers else "-", str(data.get("description", "")))
        console().print(table)


@app.command()
def sweep(
    model: Annotated[str, typer.Argument(help="Model directory or hub id to quantize at every budget.")],
    bits: Annotated[str, typer.Option("--bits", help="Comma-separated budgets in bits per weight, measured from "
                                      "the packed bytes (as `spqr inspect` reports them).")] = "3.5,4,4.5,5",
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated methods: spqr (outliers fill each "
                                         "budget: --target-bits), gptq, rtn (the largest grid size within each "
                                         "budget).")] = "spqr,gptq,rtn",
    datasets: Annotated[str, typer.Option("--datasets", help=f"Comma-separated test sets. {DatasetHelp}")]
    = "wikitext2",
    calib_dataset: Annotated[str, typer.Option("--calib-dataset", help="Calibration text (same windows for every "
                                               "point).")] = "wikitext2",
    nsamples: Annotated[int, typer.Option("--nsamples", "-n", min=1, help="Calibration windows.")] = 128,
    seqlen: Annotated[int | None, typer.Option(
        "--seqlen", "-l", min=2, help="Tokens per calibration and test window. Default: 2048 capped by the model's "
        "context.", show_default=False)] = None,
    max_windows: Annotated[int | None, typer.Option(
        "--max-windows", min=1, help="Test windows per dataset. Default: all.", show_default=False)] = None,
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated calibration seeds: each point is quantized "
                                       "once per seed and reported as the mean and spread (e.g. 0,1,2).")] = "0",
    work_dir: Annotated[Path, typer.Option("--work-dir", help="Where each point's quantization and packed "
                                           "checkpoint are kept (a re-run reuses finished ones).")] = Path("sweep"),
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the table as JSON here.",
                                                   show_default=False)] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write the plot (PNG) here: perplexity increase vs "
                                              "measured bits, a line per method (needs matplotlib: "
                                              "`pip install -e \".\\[plot]\"`).", show_default=False)] = None,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = Device.auto,
) -> None:
    """Quality per bit: quantize MODEL with each method at each bit budget, pack, and measure perplexity; a table,
    JSON and a plot of perplexity increase vs measured bits (the figure to choose a method and a size by)."""
    with user_errors():
        from spqr_cli.core.errors import SpQRError

        check_model_arg(model)
        names = list(dict.fromkeys(d.strip() for d in datasets.split(",") if d.strip()))
        if not names:
            raise SpQRError(f"--datasets {datasets!r} names no test set; e.g. --datasets wikitext2")
        for d in [*names, calib_dataset]:
            check_dataset_arg(d, data_dir)
        check_output_file(json_path, "--json")
        check_output_file(plot, "--plot")
        if plot is not None:
            from spqr_cli.bench.sweep import check_plot_support

            check_plot_support()  # now, not after hours of quantizing
        try:
            budgets = list(dict.fromkeys(float(b) for b in bits.split(",") if b.strip()))
        except ValueError:
            raise SpQRError(f"--bits {bits!r} must be comma-separated numbers, e.g. 3.5,4,4.5") from None
        if not budgets or any(not math.isfinite(b) or b <= 0 for b in budgets):
            raise SpQRError(f"--bits {bits!r} must be comma-separated numbers > 0, e.g. 3.5,4,4.5")
        try:
            seed_list = list(dict.fromkeys(int(x) for x in seeds.split(",") if x.strip()))
        except ValueError:
            raise SpQRError(f"--seeds {seeds!r} must be comma-separated integers, e.g. 0,1,2") from None
        if not seed_list:
            raise SpQRError("--seeds is empty; give at least one seed, e.g. 0")
        from spqr_cli.bench.sweep import SWEEP_METHODS

        chosen = [m.strip() for m in methods.split(",") if m.strip()]
        unknown = [m for m in chosen if m not in SWEEP_METHODS]
        if unknown or not chosen:
            raise SpQRError(f"--methods {methods!r}: choose from {', '.join(SWEEP_METHODS)}")
        from spqr_cli.core.data import settle_hub_mode

        settle_hub_mode(model)
        from rich.table import Table

        from spqr_cli.bench.sweep import run_sweep, sweep_rows, write_sweep
        from spqr_cli.core.calibrate import build_calibration_set
        from spqr_cli.core.evaluate import default_seqlen
        from spqr_cli.core.models import load_config, load_tokenizer

        length = default_seqlen(load_config(model), seqlen)
        tokenizer = load_tokenizer(model)
        calibrations = [build_calibration_set(tokenizer, calib_dataset, nsamples=nsamples, seqlen=length, seed=seed,
                                              data_dir=data_dir, model=model) for seed in seed_list]
        result = run_sweep(model, chosen, budgets, calibrations, names, work_dir,
                           device=device.value, seqlen=length, max_windows=max_windows, data_dir=data_dir,
                           log=lambda m: console().print(m))
        table = Table(title=f"quality per bit: {model}")
        for col in ("method", "budget", "bits (measured)", "outliers", *names):
            table.add_column(col, justify="left" if col == "method" else "right")
        for row in sweep_rows(result):
            table.add_row(*row)
        console().print(table)
        write_sweep(result, json_path, plot)
        for path in (json_path, plot):
            if path is not None:
                typer.echo(f"wrote {path}")


def main() -> None:
    """Console-script entry point (``spqr``)."""
    sys.exit(app())


if __name__ == "__main__":
    main()
