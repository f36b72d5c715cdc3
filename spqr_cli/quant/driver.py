"""The block-by-block driver: calibration activations, Hessians, per-layer SpQR, checkpoints, resume, report.

Weights are streamed: the model is a skeleton on the meta device, and a decoder block's weights are read from the
checkpoint's safetensors shards only when that block is processed, moved to the compute device, and dropped once
its records are committed and its dequantized weights written to ``dense/`` (``core.streaming``). The embeddings
are read for the first forward only, the final norm and head only when ``dense/`` is completed. Host and
accelerator memory are bounded by one block plus the calibration activations, whatever the depth. Inside a block,
linear sub-layers are quantized group by group in the adapter's "true sequential" order: each group's Hessian is
collected from inputs produced by the already-quantized groups before it. The outputs of the quantized block
feed the next.

Resume: every finished block's records are committed atomically to ``records/block_XXXX.safetensors`` and the
progress counter in ``quant_config.json`` is updated after it. A restarted run replays the calibration set
through the committed (dequantized) prefix, which reproduces the exact activations of an uninterrupted run, so
the results are bit-identical without storing activations on disk.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spqr_cli.core.config import QuantConfig
from spqr_cli.core.errors import SpQRError
from spqr_cli.core.io import write_json
from spqr_cli.core.models import (
    FamilyAdapter,
    adapter_for,
    check_checkpoint,
    check_weight_files,
    empty_model,
    load_tokenizer,
    resolve_device,
    tied_weight_names,
)
from spqr_cli.core.streaming import (
    CheckpointWeights,
    StreamedCheckpointWriter,
    available_host_bytes,
    disk_empty,
    host_rss_mb,
    local_model_dir,
    pinned_empty,
    release,
    replace_dir,
    trim_host_memory,
)
from spqr_cli.quant import column_graphs
from spqr_cli.quant.hessian import HessianAccumulator, asym_target
from spqr_cli.quant.methods import get_method, quantize_layer
from spqr_cli.quant.ranks import (
    Ranks,
    chain_hessians,
    current_ranks,
    init_from_env,
    lead_step,
    owner,
    share_record,
    window_share,
)
from spqr_cli.quant.record import QuantizedLayer, load_records, read_record_file, save_records
from spqr_cli.quant.tune import TuneResult, tune_block

FORMAT = "spqr-quant"
VERSION = 1


@dataclass
class LayerReport:
    """What one linear layer's quantization cost and achieved."""

    name: str
    shape: tuple[int, int]
    rel_error: float
    outlier_pct: float
    bits: float  # by the format's formula
    seconds: float
    bits_measured: float = math.nan  # of the packed tensors (reports saved before this field: nan)
    rank: int = 0  # the rank that quantized it (quant.ranks.owner)


@dataclass
class QuantReport:
    """The whole run: per-layer rows plus totals; saved as ``report.json``."""

    layers: list[LayerReport] = field(default_factory=list)
    wall_seconds: float = 0.0
    peak_device_mb: float = 0.0
    peak_host_mb: float = 0.0
    device: str = "cpu"
    resumed_from_block: int = 0
    activations: str = ""  # where the calibration activations lived (``place_activations``)
    tuning: list[TuneResult] = field(default_factory=list)  # the block fine-tune's result per block (if on)
    # True when a finished run was found in the output directory and this is its saved report (nothing ran); not
    # saved, so that the CLI can say the run was already done instead of showing a 0-second quantization.
    from_saved: bool = field(default=False, compare=False)

    @property
    def avg_bits(self) -> float:
        params = sum(r.shape[0] * r.shape[1] for r in self.layers)
        return sum(r.bits * r.shape[0] * r.shape[1] for r in self.layers) / max(params, 1)

    @property
    def avg_bits_measured(self) -> float:
        """Parameter-weighted packed bits (what ``spqr inspect`` reports for the quantized layers once packed)."""
        params = sum(r.shape[0] * r.shape[1] for r in self.layers)
        return sum(r.bits_measured * r.shape[0] * r.shape[1] for r in self.layers) / max(params, 1)

    @property
    def outlier_pct(self) -> float:
        params = sum(r.shape[0] * r.shape[1] for r in self.layers)
        return sum(r.outlier_pct * r.shape[0] * r.shape[1] for r in self.layers) / max(params, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "avg_bits": self.avg_bits,
            "avg_bits_measured": self.avg_bits_measured,
            "outlier_pct": self.outlier_pct,
            "wall_seconds": self.wall_seconds,
            "peak_device_mb": self.peak_device_mb,
            "peak_host_mb": self.peak_host_mb,
            "device": self.device,
            "resumed_from_block": self.resumed_from_block,
            "activations": self.activations,
            "tuning": [t.to_dict() for t in self.tuning],
            "layers": [
                {"name": r.name, "shape": list(r.shape), "rel_error": r.rel_error, "outlier_pct": r.outlier_pct,
                 "bits": r.bits, "bits_measured": r.bits_measured, "seconds": r.seconds, "rank": r.rank}
                for r in self.layers
            ],
        }


def calibration_fingerprint(input_ids: torch.Tensor) -> str:
    """sha256 of the calibration token ids: a changed calibration set must not resume an old run."""
    return hashlib.sha256(input_ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _read_state(state_path: Path) -> dict[str, Any]:
    try:
        old = json.loads(state_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise SpQRError(f"{state_path} is corrupted; pass --restart to discard the run or choose a new "
                        "--out directory") from None
    if not isinstance(old, dict) or old.get("format") != FORMAT:
        raise SpQRError(f"{state_path} is not an spqr quantization state; choose a new --out directory")
    return old


def _finished_report(out_dir: Path, model_path: str, cfg: QuantConfig, calib_ids: torch.Tensor,
                     restart: bool, dense: bool) -> QuantReport | None:
    """The saved report of a finished run of the same model, config and calibration in ``out_dir`` (so that
    re-running a finished command returns at once, without loading the model), else ``None``."""
    state_path = out_dir / "quant_config.json"
    if restart or not state_path.is_file():
        return None
    old = _read_state(state_path)
    same = (old.get("model") == str(model_path) and old.get("config") == cfg.to_dict()
            and (old.get("calibration") or {}).get("sha256") == calibration_fingerprint(calib_ids))
    done = old.get("complete") and (out_dir / model_dir_name(old.get("dense", True)) / "config.json").is_file()
    if not (same and done and old.get("dense", True) == dense):
        return None
    try:
        saved = json.loads((out_dir / "report.json").read_text())
        report = QuantReport(
            layers=[LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in saved["layers"]],
            wall_seconds=float(saved["wall_seconds"]), peak_device_mb=float(saved["peak_device_mb"]),
            peak_host_mb=float(saved["peak_host_mb"]), device=str(saved["device"]),
            activations=str(saved.get("activations", "")),
            tuning=[TuneResult(**t) for t in saved.get("tuning", [])],
            resumed_from_block=int(old["num_blocks"]), from_saved=True)
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None  # no usable report: re-run (the records are replayed, nothing is quantized again)
    return report


def _prepare_out_dir(out_dir: Path, state: dict[str, Any], restart: bool) -> int:
    """Create or validate the output directory; return the number of blocks already committed."""
    state_path = out_dir / "quant_config.json"
    if out_dir.exists() and not out_dir.is_dir():
        raise SpQRError(f"--out {out_dir} is a file; choose a directory path")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not state_path.is_file():
            raise SpQRError(f"output directory {out_dir} is not empty and holds no spqr run; "
                            "choose a new --out directory")
        old = _read_state(state_path)
        if restart:
            shutil.rmtree(out_dir)
        else:
            for key in ("model", "config", "calibration"):
                if old.get(key) != state[key]:
                    raise SpQRError(f"{out_dir} holds a run with a different {key}{_config_change(old, state, key)}; "
                                    "pass --restart to discard it or choose a new --out directory")
            if old.get("dense", True) != state["dense"]:
                was, now = ("with", "without") if old.get("dense", True) else ("without", "with")
                raise SpQRError(f"{out_dir} holds a run {was} a dense copy and this one is {now}; resume it with "
                                "its own choice (leave out --dense/--no-dense: the run's is kept), or choose a new "
                                "--out directory")
            return int(old.get("completed_blocks", 0))
    (out_dir / "records").mkdir(parents=True, exist_ok=True)
    write_json({**state, "completed_blocks": 0, "complete": False}, state_path)
    return 0


def check_ranks(cfg: QuantConfig, world: int) -> None:
    """Refuse what cannot run in ``world`` processes: the block fine-tune and asymmetric calibration run in one
    (checked by ``--ranks`` before it spawns them, and by every rank a launcher started)."""
    if cfg.tune_steps and world > 1:
        raise SpQRError(f"the block fine-tune (--tune-steps) runs in one process, not {world}; drop the fine-tune, "
                        "or --ranks / the launcher")
    if cfg.asym_calib and world > 1:
        raise SpQRError(f"asymmetric calibration (--asym-calib, on in the spqr-4.7bit preset) runs in one process, "
                        f"not {world}; pass --no-asym-calib, or drop --ranks / the launcher")


def _config_change(old: dict[str, Any], new: dict[str, Any], key: str) -> str:
    """For a changed config: which fields differ and the flags that resume the saved run with its own values."""
    if key != "config":
        return ""
    try:  # fields a saved config leaves out take their defaults (that is what the run used)
        was, now = QuantConfig.from_dict(old[key]), QuantConfig.from_dict(new[key])
    except Exception:  # a damaged or foreign saved config: the plain message
        return ""
    fields = [f.name for f in dataclasses.fields(QuantConfig)
              if f.name != "extra" and getattr(was, f.name) != getattr(now, f.name)]
    if not fields:
        return ""
    changes = ", ".join(f"{f} {getattr(was, f)} there, {getattr(now, f)} here" for f in fields)
    def flag(name: str) -> str:
        value, opt = getattr(was, name), name.replace("_", "-")
        if isinstance(value, bool):  # on/off flags take no value
            return f"--{opt}" if value else f"--no-{opt}"
        return f"--{opt} {value}"

    flags = " ".join(flag(f) for f in fields if getattr(was, f) is not None)
    return f" ({changes}; to resume it, give its values: {flags})" if flags else f" ({changes})"


class _StopForward(Exception):
    """Raised by the catcher after block 0's inputs are recorded (no need to run the rest of the model)."""


@torch.no_grad()
def _block_inputs(model: nn.Module, adapter: FamilyAdapter, input_ids: torch.Tensor, device: torch.device,
                  dtype: torch.dtype, allocate: Callable[[torch.Size, torch.dtype], torch.Tensor] | None = None,
                  ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Inputs of block 0 for every calibration sample and the block's extra kwargs.

    ``allocate(shape, dtype)`` makes the buffer they are written into, one sample at a time as the embeddings
    produce them (``place_activations``: on the GPU, in host memory or on disk), so the host never holds them twice;
    default: host memory."""
    blocks = adapter.get_blocks(model)
    first = blocks[0]
    buffer: torch.Tensor | None = None
    block_kwargs: dict[str, Any] = {}
    sample = 0

    class Catcher(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention_type = getattr(first, "attention_type", "full_attention")

        def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            nonlocal buffer
            if buffer is None:
                shape = torch.Size((input_ids.shape[0], *hidden.shape[1:]))
                buffer = allocate(shape, hidden.dtype) if allocate else torch.empty(shape, dtype=hidden.dtype)
                block_kwargs.update(kwargs)
            buffer[sample].copy_(hidden[0])
            raise _StopForward

    pre = adapter.pre_modules(model)
    for m in pre:
        m.to(device=device, dtype=dtype)
    blocks[0] = Catcher()
    try:
        for sample in range(input_ids.shape[0]):  # the catcher writes window `sample`
            try:
                model(input_ids[sample : sample + 1].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        blocks[0] = first
        for m in pre:
            m.to("cpu")
    kwargs = {k: v for k, v in block_kwargs.items() if k not in ("cache", "past_key_values", "use_cache")}
    return buffer, kwargs


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    return obj


@torch.no_grad()
def _run_block(block: nn.Module, inps: torch.Tensor, kwargs: dict[str, Any], device: torch.device,
               dtype: torch.dtype, batch: int, outs: torch.Tensor | None = None) -> torch.Tensor:
    """Forward every calibration sample through one block into ``outs``, by default ``inps`` itself: each forward
    batch is read before its outputs overwrite it and the samples do not interact (no cache; the masks are per
    sample), so one buffer carries the activations through the whole run, half the memory of an input and an
    output buffer. A separate ``outs`` is for outputs that must not replace the inputs (the fine-tune's targets)."""
    outs = inps if outs is None else outs
    for i in range(0, inps.shape[0], batch):
        out = block(inps[i : i + batch].to(device=device, dtype=dtype), **kwargs)
        outs[i : i + batch].copy_(out[0] if isinstance(out, tuple) else out)
    return outs


ACTIVATION_PLACES = ("auto", "device", "host", "disk")


def check_activations(where: str, device: torch.device) -> None:
    """A one-line error for an ``activations`` choice this run cannot take (before any work)."""
    if where not in ACTIVATION_PLACES:
        raise SpQRError(f"activations must be one of {', '.join(ACTIVATION_PLACES)}, got {where!r}")
    if where == "device" and device.type != "cuda":
        raise SpQRError("--activations device needs a GPU run (--device cuda); a CPU run keeps them in host memory "
                        "or on disk (--activations host / disk)")


def place_activations(shape: torch.Size, dtype: torch.dtype, device: torch.device, where: str = "auto",
                      offload_dir: str | Path | None = None, copies: int = 1, stored: float = 0.0,
                      processes: int = 1) -> tuple[torch.Tensor, str, str]:
    """An empty buffer for the calibration activations where they live between blocks, that place ("device",
    "host" or "disk") and a line saying where and why.

    "auto" counts ``copies`` buffers of this size (the run's other streams go where this one goes): on a GPU run
    they stay on the GPU when they, plus ``stored`` times their size (the layer inputs a rank keeps there for its
    Hessians, ``_stored_inputs``), fit in half of its free memory, so no block copies them across PCIe; otherwise
    in host memory (pinned on a GPU run: the per-batch copies run at full bus speed; pageable if pinning fails)
    when the ``processes`` of this host (ranks) together fit in half of the memory available to them; otherwise on
    disk, in a file under ``offload_dir`` that the kernel pages (``disk_empty``). "device", "host" and "disk" force
    one. The values are the same wherever they live.
    """
    check_activations(where, device)
    cuda = device.type == "cuda"
    nbytes = shape.numel() * dtype.itemsize
    size = f"{nbytes / 2**30:.2f} GB"
    if where == "device" or where == "auto" and cuda and (copies + stored) * nbytes <= torch.cuda.mem_get_info(
            device)[0] // 2:
        return torch.empty(shape, dtype=dtype, device=device), "device", f"activations ({size}) on the GPU"
    why = f"--activations {where}" if where != "auto" else "too large for the GPU" if cuda else ""
    avail = available_host_bytes() if where == "auto" else None
    if avail is not None and copies * processes * nbytes > avail // 2:
        where = "disk"
        why = f"too large for {'the GPU and ' if cuda else ''}host memory ({avail / 2**30:.1f} GB available)"
    if where == "disk":
        if offload_dir is None:
            raise SpQRError("activations on disk need a directory: pass --offload-dir DIR")
        return disk_empty(shape, dtype, offload_dir), "disk", f"activations ({size}) on disk in {offload_dir} ({why})"
    if not cuda:
        line = f"activations ({size}) in host memory" + (f" ({why})" if why else "")
        return torch.empty(shape, dtype=dtype), "host", line
    try:
        return pinned_empty(shape, dtype), "host", f"activations ({size}) in pinned host memory ({why})"
    except RuntimeError:  # no page-locked memory to be had
        return torch.empty(shape, dtype=dtype), "host", f"activations ({size}) in host memory ({why}; pinning failed)"


def _feed_layers(module: nn.Module, names: Iterable[str], x: torch.Tensor, kwargs: dict[str, Any],
                 device: torch.device, dtype: torch.dtype, take: Callable[[str, torch.Tensor], None]) -> None:
    """Run ``module`` on ``x`` and hand each of its submodules ``names`` input to ``take(name, input)``; the forward
    stops as soon as every one has been fed (the rest of the block is not needed for their statistics)."""
    names = list(names)
    seen: set[str] = set()

    def hook(name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            take(name, args[0].detach())
            seen.add(name)
            if len(seen) == len(names):
                raise _StopForward
        return fn

    handles = [module.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    try:
        module(x.to(device=device, dtype=dtype), **kwargs)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _collect_hessians(block: nn.Module, layers: dict[str, nn.Linear], inps: torch.Tensor, kwargs: dict[str, Any],
                      device: torch.device, dtype: torch.dtype, batch: int,
                      ranks: Ranks = Ranks()) -> dict[str, torch.Tensor]:
    """H = 2/n X X^T of each layer's inputs. Under several ranks, this rank's inputs are kept and the sums completed
    in window order (``ranks.chain_hessians``)."""
    accs = {name: HessianAccumulator(lin.in_features, device=device) for name, lin in layers.items()}
    stored: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def take(name: str, x: torch.Tensor) -> None:
        if ranks.distributed:
            stored[name].append(x)
        else:
            accs[name].add_batch(x)

    for i in range(0, inps.shape[0], batch):
        _feed_layers(block, layers, inps[i : i + batch], kwargs, device, dtype, take)
    if ranks.distributed:
        chain_hessians(accs, stored, ranks)
    return {name: acc.hessian for name, acc in accs.items()}


@torch.no_grad()
def _collect_asym(block: nn.Module, orig: nn.Module, layers: dict[str, nn.Linear], inps: torch.Tensor,
                  inps_fp: torch.Tensor, kwargs: dict[str, Any], device: torch.device, dtype: torch.dtype,
                  batch: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Asymmetric calibration's statistics of one group of layers: ``H`` as ``_collect_hessians`` (the inputs ``x``
    the partly quantized ``block`` gives them) and ``D = 2/n Σ (x_fp - x) xᵀ``, with ``x_fp`` the inputs the
    original block ``orig`` gives the same layers on the fp16 model's activations ``inps_fp`` (same tokens)."""
    accs = {name: HessianAccumulator(lin.in_features, device=device) for name, lin in layers.items()}
    deltas = {name: torch.zeros_like(acc._xtx) for name, acc in accs.items()}
    fp_inputs: dict[str, torch.Tensor] = {}

    def keep_fp(name: str, x: torch.Tensor) -> None:
        fp_inputs[name] = x.reshape(-1, x.shape[-1]).to(torch.float32)

    def add(name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        accs[name].add_batch(x)
        deltas[name].addmm_((fp_inputs.pop(name) - x).T, x)

    for i in range(0, inps.shape[0], batch):
        _feed_layers(orig, layers, inps_fp[i : i + batch], kwargs, device, dtype, keep_fp)
        _feed_layers(block, layers, inps[i : i + batch], kwargs, device, dtype, add)
    return ({name: acc.hessian for name, acc in accs.items()},
            {name: d * (2.0 / accs[name].nsamples) for name, d in deltas.items()})


def _relative_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """||(W - Q) X|| / ||W X|| over the calibration inputs, computed from H = 2/n X X^T (no activations kept)."""
    d = (w - q).float()
    num = torch.einsum("ij,jk,ik->", d, h, d)
    den = torch.einsum("ij,jk,ik->", w.float(), h, w.float())
    return float((num / den.clamp_min(1e-30)).clamp_min(0).sqrt())


def _peak_host_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


ProgressFn = Callable[[str, int, int, str], None]


def quantize_model(
    model_path: str,
    cfg: QuantConfig,
    out_dir: str | Path,
    calib_ids: torch.Tensor,
    calib_manifest: dict[str, Any] | None = None,
    device: str = "auto",
    restart: bool = False,
    forward_batch: int = 8,
    progress: ProgressFn | None = None,
    dense: bool = True,
    activations: str = "auto",
    offload_dir: str | Path | None = None,
) -> QuantReport:
    """Quantize every linear layer of every decoder block of ``model_path`` into ``out_dir``.

    ``out_dir`` gets the layer records (``records/``, what ``spqr pack`` packs), ``report.json`` and, with
    ``dense``, ``dense/``: the whole model with its quantized layers dequantized, an fp16 checkpoint the size of the
    original. Without ``dense`` only the tensors that are not quantized (embeddings, norms, head) and the model
    files go to ``unquantized/``, which is all ``pack_model`` needs besides the records: for a large model, no
    dense copy is ever written. ``activations``: where the calibration activations live between blocks
    (``place_activations``: "auto", "device" or "host").

    ``calib_ids`` is an int64 ``[nsamples, seqlen]`` tensor of calibration tokens (``spqr calibrate`` output or
    built on the fly). ``progress(stage, done, total, detail)`` is called as work advances (the CLI draws a
    rich progress bar with it). Returns the report that is also written to ``out_dir/report.json``.

    Under ``torch.distributed`` (a launcher's environment, or a process group the caller initialized), the ranks
    split the calibration windows by whole forward batches and complete the Hessians together in window order
    (``quant.ranks``): the records are bit-identical to one process with the same ``forward_batch``. Rank 0
    writes everything and shows progress.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    device = init_from_env(device)
    ranks = current_ranks()
    check_ranks(cfg, ranks.world)
    dev = resolve_device(device)
    check_activations(activations, dev)
    compute_dtype = torch.float16 if dev.type == "cuda" else torch.float32
    if calib_ids.dim() != 2 or calib_ids.dtype not in (torch.int64, torch.int32):
        raise SpQRError("calibration ids must be an integer [nsamples, seqlen] tensor; use `spqr calibrate`")
    calib_ids = calib_ids.to(torch.int64)
    if calib_ids.numel() == 0 or calib_ids.shape[1] < 2:
        raise SpQRError(f"the calibration set is empty or too short ({list(calib_ids.shape)}); use at least one "
                        "window of 2 tokens (`spqr calibrate --nsamples N --seqlen L`)")
    if int(calib_ids.min()) < 0:
        raise SpQRError("the calibration set holds negative token ids; it is damaged: rebuild it with `spqr calibrate`")
    check_weight_files(model_path)
    finished = _finished_report(out, model_path, cfg, calib_ids, restart, dense)
    if finished is not None:
        return finished

    tokenizer = load_tokenizer(model_path)
    model = empty_model(model_path, dtype="fp16")  # the skeleton: no weight is read yet
    source_dir = local_model_dir(model_path)  # a hub id: its local snapshot
    weights = CheckpointWeights(source_dir, name=str(model_path))
    check_checkpoint(model, weights, str(model_path))  # from the headers: nothing is quantized with random layers
    adapter = adapter_for(model)
    if int(calib_ids.max()) >= model.config.vocab_size:
        raise SpQRError("the calibration set holds token ids outside this model's vocabulary: it was made for "
                        "another tokenizer; rebuild it with `spqr calibrate` for this model")
    blocks = adapter.get_blocks(model)
    state = {
        "format": FORMAT,
        "version": VERSION,
        "model": str(model_path),
        "family": adapter.name,
        "config": cfg.to_dict(),
        "calibration": {"sha256": calibration_fingerprint(calib_ids), "nsamples": calib_ids.shape[0],
                        "seqlen": calib_ids.shape[1], **(calib_manifest or {})},
        "num_blocks": len(blocks),
        "dense": dense,
        "layers": [f"{adapter.blocks}.{i}.{name}" for i in range(len(blocks)) for name in adapter.linear_names()],
    }
    start_block = lead_step(ranks, lambda: _prepare_out_dir(out, state, restart)) or 0
    report = QuantReport(device=str(dev), resumed_from_block=start_block)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    n = len(blocks)

    def block_note(i: int, detail: str) -> None:
        notify("quantize", i, f"block {i}: {detail}")

    def notify(stage: str, done: int, detail: str) -> None:
        if progress is not None and ranks.lead:
            ranks_note = f" · {ranks.world} ranks" if ranks.distributed else ""
            gpu = f" · GPU {torch.cuda.memory_allocated(dev) / 2**20:,.0f} MB" if dev.type == "cuda" else ""
            progress(stage, done, n, f"{detail} · host {host_rss_mb():,.0f} MB{gpu}{ranks_note}")

    share = window_share(calib_ids.shape[0], forward_batch, ranks) if ranks.distributed else slice(None)
    notify("quantize", 0, "reading the embeddings")
    pre = _pre_module_paths(model, adapter)
    for path, module in pre.items():
        weights.materialize(module, path, torch.float16)
    # One buffer carries the activations from block to block (``_run_block``); the fine-tune keeps the original
    # block's outputs in a second, asymmetric calibration the fp16 model's activations in one more. The first
    # buffer's place (``activations``: "auto" decides there, counting them all) is every buffer's place.
    beside = [what for what, on in (("the fp16 model's activations", cfg.asym_calib),
                                    ("the fine-tune's targets", cfg.tune_steps)) if on]
    stored = _stored_inputs(model, adapter, ranks)
    place, placed = activations, ""

    def allocate(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        nonlocal place, placed
        buffer, where, line = place_activations(shape, dtype, dev, place, offload_dir or out, 1 + len(beside),
                                                stored, ranks.world)
        place, placed = where, placed or line
        return buffer

    inps, kwargs = _block_inputs(model, adapter, calib_ids[share], dev, compute_dtype, allocate)
    # asymmetric calibration: the fp16 model's activations (the same as the quantized model's at block 0)
    inps_fp = allocate(inps.shape, inps.dtype).copy_(inps) if cfg.asym_calib else None
    targets_buf = allocate(inps.shape, inps.dtype) if cfg.tune_steps else None  # the fine-tune's targets
    if beside:
        placed += f"; {' and '.join(beside)} beside them"
    notify("quantize", 0, placed)
    report.activations = placed
    kwargs = _to_device(kwargs, dev)
    for module in pre.values():
        release(module)
    trim_host_memory()

    dense_name = model_dir_name(dense)
    dense_tmp = out / f"{dense_name}.tmp"
    writers: list[StreamedCheckpointWriter] = []
    linear_weights = [f"{name}.weight" for name in adapter.linear_names()]
    quantized = {f"{adapter.blocks}.{i}.{w}" for i in range(len(blocks)) for w in linear_weights}
    layout = {k: v for k, v in _dense_layout(model).items() if dense or k not in quantized}

    def start_dense() -> None:  # an empty temporary dense/ (unquantized/), every tensor's place fixed up front
        shutil.rmtree(dense_tmp, ignore_errors=True)
        dense_tmp.mkdir(parents=True)
        writers.append(StreamedCheckpointWriter(dense_tmp, layout))

    try:
        lead_step(ranks, start_dense)
        writer = writers[0] if writers else None
        for i, block in enumerate(blocks):
            prefix = f"{adapter.blocks}.{i}"
            record_path = out / "records" / f"block_{i:04d}.safetensors"
            if i < start_block:
                notify("replay", i, f"block {i}: reading weights")
                records, rows, trained, tuning = _load_block(record_path, prefix, adapter)
                if inps_fp is not None:  # the fp16 model's stream goes through the original block
                    weights.materialize(block, prefix, torch.float16)
                    block.to(device=dev, dtype=compute_dtype)
                    _run_block(block, inps_fp, kwargs, dev, compute_dtype, forward_batch)
                report.layers.extend(rows)
                report.tuning.extend(tuning)
                weights.materialize(block, prefix, torch.float16, skip=linear_weights)  # the linears: records
                for name in adapter.linear_names():
                    lin = block.get_submodule(name)
                    lin.weight = nn.Parameter(records[f"{prefix}.{name}"].dequantize(), requires_grad=False)
                _apply_block_tensors(block, prefix, trained)
                block.to(device=dev, dtype=compute_dtype)
                notify("replay", i + 1, f"block {i} (resumed)")
            else:
                notify("quantize", i, f"block {i}: reading weights")
                weights.materialize(block, prefix, torch.float16)
                block.to(device=dev, dtype=compute_dtype)
                say = functools.partial(block_note, i)
                targets = None
                if cfg.tune_steps:  # the original block's outputs, what the fine-tune matches
                    say("original outputs for the fine-tune")
                    targets = _run_block(block, inps, kwargs, dev, compute_dtype, forward_batch, targets_buf)
                orig = copy.deepcopy(block) if inps_fp is not None else None
                records = _quantize_block(block, prefix, adapter, inps, kwargs, cfg, dev, compute_dtype,
                                          forward_batch, report, say, ranks,
                                          None if orig is None else (orig, inps_fp))
                if orig is not None:  # the fp16 model's stream, through the original block
                    _run_block(orig, inps_fp, kwargs, dev, compute_dtype, forward_batch)
                    del orig
                rows = report.to_dict()["layers"][-len(records):]
                trained: dict[str, torch.Tensor] = {}
                result = None
                if targets is not None:
                    records, result = tune_block(block, prefix, records, inps, targets, kwargs, dev, cfg.tune_steps,
                                                 cfg.tune_lr, forward_batch, seed=i, notify=say)
                    report.tuning.append(result)
                    trained = _block_tensors(block, prefix, adapter)
                lead_step(ranks, lambda _i=i, _r=records, _rows=rows, _p=record_path, _t=trained, _x=result:
                          _commit_block(out, state, _i, _p, _r, _rows, _t, _x))
                notify("quantize", i + 1, f"block {i} done")
            _run_block(block, inps, kwargs, dev, compute_dtype, forward_batch)  # in place: the next block's inputs
            lead_step(ranks, lambda _b=block, _p=prefix: _write_block(writer, _b, _p))
            release(block)
            del records
            trim_host_memory()  # the freed block goes back to the system: host memory stays flat over depth

        notify("quantize", n, f"writing the embeddings, final norm and head to {dense_name}/")

        def finish() -> None:
            assert writer is not None
            for name in writer.shapes:
                if not name.startswith(f"{adapter.blocks}."):
                    t = weights.read([name])[name]
                    writer.write(name, t.to(torch.float16) if t.is_floating_point() else t)
            writer.close()
            _finish_dense(model, tokenizer, source_dir, dense_tmp, out / dense_name)
            report.wall_seconds = time.perf_counter() - t0
            report.peak_host_mb = _peak_host_mb()
            if dev.type == "cuda":
                report.peak_device_mb = torch.cuda.max_memory_allocated(dev) / 2**20
            write_json({"config": cfg.to_dict(), **report.to_dict()}, out / "report.json")
            write_json({**state, "completed_blocks": len(blocks), "complete": True}, out / "quant_config.json")

        lead_step(ranks, finish)
    except BaseException:
        if ranks.lead:  # rebuilt from the blocks by the next run: never left behind half-written
            shutil.rmtree(dense_tmp, ignore_errors=True)
        raise
    finally:
        column_graphs.clear()  # the column loop's CUDA graphs and their memory
    report.wall_seconds = report.wall_seconds or time.perf_counter() - t0
    return report


def _write_block(writer: StreamedCheckpointWriter | None, block: nn.Module, prefix: str) -> None:
    """A finished block's tensors into dense/ (unquantized/: those the writer has a place for). Its linears hold
    their dequantized fp16 weights in the compute dtype: back to fp16 is exact."""
    assert writer is not None
    for name, t in block.state_dict().items():
        if f"{prefix}.{name}" in writer.shapes:
            writer.write(f"{prefix}.{name}", t.to("cpu", torch.float16) if t.is_floating_point() else t.to("cpu"))


def _stored_inputs(model: nn.Module, adapter: FamilyAdapter, ranks: Ranks) -> float:
    """How many activation-sized tensors a rank keeps on the GPU while it collects a group's Hessians: under
    several ranks the inputs of the widest layer (``in_features / hidden``, e.g. ~2.7 for LLaMA's down
    projection), kept until the sums are chained (``ranks.chain_hessians``); none in one process."""
    if not ranks.distributed:
        return 0.0
    block = adapter.get_blocks(model)[0]
    widths = [block.get_submodule(name).in_features for name in adapter.linear_names()]
    return max(widths) / model.config.hidden_size


def model_dir_name(dense: bool) -> str:
    """The subdirectory of a quantization run that holds its model files and unquantized tensors: ``dense`` (the
    full dequantized checkpoint) or ``unquantized`` (only what is not quantized; ``quantize_model(dense=False)``)."""
    return "dense" if dense else "unquantized"


def _commit_block(out: Path, state: dict[str, Any], i: int, record_path: Path, records: dict[str, QuantizedLayer],
                  rows: list[dict[str, Any]], trained: dict[str, torch.Tensor] | None = None,
                  tuning: TuneResult | None = None) -> None:
    """Block ``i`` is done: its report rows, its records (with the fine-tune's trained block tensors and result),
    then the progress counter (in that order: a counter never points past what is on disk)."""
    write_json(rows, record_path.with_suffix(".json"))
    meta = {"tuning": json.dumps(tuning.to_dict())} if tuning is not None else None
    save_records(str(record_path), records, extra_meta=meta, block_tensors=trained)
    write_json({**state, "completed_blocks": i + 1, "complete": False}, out / "quant_config.json")


def _block_tensors(block: nn.Module, prefix: str, adapter: FamilyAdapter) -> dict[str, torch.Tensor]:
    """The block's parameters other than its quantized linears' weights (what the fine-tune trains), fp16, by their
    names in the model: saved with the records, so that a resumed run replays the trained block."""
    skip = {f"{name}.weight" for name in adapter.linear_names()}
    return {f"{prefix}.{name}": p.detach().to(torch.float16).cpu() for name, p in block.named_parameters()
            if name not in skip}


def _apply_block_tensors(block: nn.Module, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    """Put ``_block_tensors``' saved values back into a freshly read block (nothing to do if it was not tuned)."""
    params = dict(block.named_parameters())
    for key, t in tensors.items():
        name = key[len(prefix) + 1:]
        if not key.startswith(f"{prefix}.") or name not in params or params[name].shape != t.shape:
            raise SpQRError(f"the committed records of {prefix} hold an unexpected tensor {key}; pass --restart to "
                            "quantize again from scratch")
        params[name].data = t.to(dtype=params[name].dtype, device=params[name].device)


def _pre_module_paths(model: nn.Module, adapter: FamilyAdapter) -> dict[str, nn.Module]:
    """The modules that run before block 0 (embeddings, rotary tables), by their path in the model."""
    out: dict[str, nn.Module] = {}
    for path in adapter.pre_block:
        try:
            out[path] = model.get_submodule(path)
        except AttributeError:
            continue
    return out


def _dense_layout(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor of ``dense/``, in the order they are written: the blocks' as they
    finish, then the rest. Floating tensors are fp16; weights tied to another one are not stored (as
    ``save_pretrained`` does)."""
    tied = tied_weight_names(model)
    layout = {name: (tuple(t.shape), torch.float16 if t.is_floating_point() else t.dtype)
              for name, t in model.state_dict(keep_vars=True).items() if name not in tied}
    blocks = adapter_for(model).blocks + "."
    return {**{k: v for k, v in layout.items() if k.startswith(blocks)},
            **{k: v for k, v in layout.items() if not k.startswith(blocks)}}


def _finish_dense(model: nn.Module, tokenizer: Any, source: Path, tmp: Path, path: Path) -> None:
    """Add what ``save_pretrained`` writes beside the weights (config with the saved dtype and architecture,
    generation config, tokenizer) to the temporary ``dense/`` and rename it into place."""
    from transformers import GenerationConfig

    config = model.config
    config.architectures = [type(model).__name__]
    config.dtype = torch.float16
    config.save_pretrained(tmp)
    try:  # what from_pretrained reads: generation_config.json, else the generation keys of config.json
        generation = GenerationConfig.from_pretrained(source)
    except OSError:
        generation = GenerationConfig.from_pretrained(source, config_file_name="config.json", _from_model_config=True)
    generation.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, path)


def _load_block(record_path: Path, prefix: str, adapter: FamilyAdapter) -> tuple[
        dict[str, QuantizedLayer], list[LayerReport], dict[str, torch.Tensor], list[TuneResult]]:
    """A committed block's records, report rows, and the fine-tune's trained block tensors and result (none if it
    was not tuned), for a resumed run; anything damaged or missing is a one-line error that says how to recover
    (the run cannot be resumed bit-identically from it)."""
    expected = {f"{prefix}.{name}" for name in adapter.linear_names()}
    try:
        records, trained, meta = read_record_file(str(record_path))
        rows = [LayerReport(**{**r, "shape": tuple(r["shape"])})
                for r in json.loads(record_path.with_suffix(".json").read_text())]
        tuning = [TuneResult(**json.loads(meta["tuning"]))] if "tuning" in meta else []
    except Exception as e:  # safetensors, JSON and field errors of a damaged or truncated file
        raise SpQRError(f"the committed records of {prefix} ({record_path.name}) are damaged or missing "
                        f"({type(e).__name__}); pass --restart to quantize again from scratch") from None
    if set(records) != expected:
        raise SpQRError(f"{record_path.name} does not hold the layers of {prefix}; pass --restart to quantize "
                        "again from scratch")
    for row in rows:  # rows saved before the field existed: the records give it
        if math.isnan(row.bits_measured) and row.name in records:
            row.bits_measured = records[row.name].packed_bits()
    return records, rows, trained, tuning


def _quantize_block(block: nn.Module, prefix: str, adapter: FamilyAdapter, inps: torch.Tensor,
                    kwargs: dict[str, Any], cfg: QuantConfig, dev: torch.device, dtype: torch.dtype,
                    batch: int, report: QuantReport, notify: Callable[[str], None],
                    ranks: Ranks = Ranks(), fp: tuple[nn.Module, torch.Tensor] | None = None,
                    ) -> dict[str, QuantizedLayer]:
    """Quantize one block's linears group by group (true sequential); weights are replaced in place. ``fp``:
    the original block and the fp16 model's activations, for asymmetric calibration (``cfg.asym_calib``)."""
    records: dict[str, QuantizedLayer] = {}
    method = get_method(cfg.method)
    turn = 0  # round robin over the block's layers, so that single-layer groups alternate ranks too
    for group in adapter.sequential:
        layers = {name: block.get_submodule(name) for name in group}
        deltas: dict[str, torch.Tensor] = {}
        if not method.needs_hessian:
            hessians = {name: None for name in group}
        elif fp is not None:
            hessians, deltas = _collect_asym(block, fp[0], layers, inps, fp[1], kwargs, dev, dtype, batch)
        else:
            hessians = _collect_hessians(block, layers, inps, kwargs, dev, dtype, batch, ranks)
        owners = {name: owner(turn + j, ranks) for j, name in enumerate(group)}
        turn += len(group)
        made: dict[str, tuple[QuantizedLayer, float]] = {}
        for name, lin in layers.items():  # this rank's share of the group
            if owners[name] == ranks.rank:
                notify(name)
                t = time.perf_counter()
                target = lin.weight.data
                if name in deltas:
                    target = asym_target(target, hessians[name], deltas.pop(name), cfg.percdamp)
                made[name] = quantize_layer(target, hessians[name], cfg), time.perf_counter() - t
        for name, lin in layers.items():  # every layer's record on every rank, in order
            rec, seconds = made.pop(name, (None, 0.0))
            if ranks.distributed:
                rec, seconds = share_record(rec, seconds, owners[name], dev)
            assert rec is not None
            w = lin.weight.data
            q = rec.dequantize().to(dev)
            h = hessians[name]
            err = _relative_error(w, q, h) if h is not None else float(
                (w.float() - q.float()).norm() / w.float().norm().clamp_min(1e-30))
            lin.weight.data = q.to(dtype)
            records[f"{prefix}.{name}"] = rec
            report.layers.append(LayerReport(
                name=f"{prefix}.{name}", shape=(rec.out_features, rec.in_features), rel_error=err,
                outlier_pct=100.0 * rec.outlier_fraction, bits=rec.formula_bits(), seconds=seconds,
                bits_measured=rec.packed_bits(), rank=owners[name],
            ))
            del w, q, rec
            trim_host_memory()  # the layer's temporaries: without this the heap ratchets up within a block
    return records


def iter_records(quant_dir: str | Path) -> Iterator[tuple[str, QuantizedLayer]]:
    """All layer records of a finished run, in quantization order."""
    qd = Path(quant_dir)
    state_path = qd / "quant_config.json"
    if not state_path.is_file():
        raise SpQRError(f"{qd} is not an spqr quantization directory (no quant_config.json); run `spqr quantize`")
    state = json.loads(state_path.read_text())
    if not state.get("complete"):
        raise SpQRError(f"quantization in {qd} is not finished ({state.get('completed_blocks', 0)}/"
                        f"{state.get('num_blocks')} blocks); re-run the same `spqr quantize` command to resume")
    for i in range(state["num_blocks"]):
        records = load_records(str(qd / "records" / f"block_{i:04d}.safetensors"))
        for name in state["layers"]:
            if name in records:
                yield name, records[name]
