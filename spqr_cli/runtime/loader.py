"""Turning a path into a runnable model: ``load_packed`` (a ``spqr pack`` directory) and ``load_any_model`` (any
path the commands accept: hub id, HF directory, ``spqr quantize`` output, packed directory).

Memory is the point of the format, so ``load_packed`` never materializes a dense weight: transformers builds the
model skeleton with empty (meta) parameters, the ``spqr-cli`` quantizer (``hf_quantizer``) turns each quantized
linear into an ``SpQRLinear`` that owns only the packed buffers, and transformers assigns the tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from spqr_cli.core.errors import SpQRError
from spqr_cli.core.io import read_json
from spqr_cli.core.models import adapter_for, load_model, load_tokenizer, resolve_device, resolve_dtype
from spqr_cli.format.checkpoint import PackedCheckpoint, layer_scalars
from spqr_cli.format.pack import HF_QUANT_METHOD
from spqr_cli.runtime.siblings import fuse_siblings


def load_packed(packed_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16,
                verify: bool = True, fuse: bool | None = None) -> Any:
    """A transformers causal LM whose quantized linears are ``SpQRLinear`` modules; eval mode, on ``device``.

    A thin call of transformers' ``from_pretrained`` through the ``spqr-cli`` quantizer (``hf_quantizer``), the
    path ``AutoModelForCausalLM.from_pretrained(packed_dir)`` takes too, with one difference: the tensors are read
    and verified once here by ``PackedCheckpoint`` and handed over as ``state_dict`` (the quantizer gets their
    layer metadata in the config), so nothing is read twice and checkpoints packed before ``pack`` added the
    ``quantization_config`` and the shard index (older multi-shard packs) load as before.

    ``dtype`` is the dtype of the non-quantized tensors and the activations (the packed buffers keep the
    layout's dtypes). Peak host memory is about the packed size plus the non-quantized tensors in ``dtype``.
    ``fuse`` (default: on CUDA) runs layers that share an input (q/k/v, gate/up) as one kernel launch
    (``siblings.fuse_siblings``); on CPU it would only cost load time, the torch path decodes each layer per call
    either way.
    """
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, GenerationConfig

    from spqr_cli.runtime.hf_quantizer import SpQRCliConfig, register

    register()
    device = resolve_device(device) if isinstance(device, str) else device
    ckpt = PackedCheckpoint(packed_dir, verify=verify)
    try:
        try:
            config = AutoConfig.from_pretrained(str(ckpt.path))
        except (OSError, ValueError) as e:
            raise SpQRError(f"cannot read {ckpt.path}/config.json: {str(e).splitlines()[0] if str(e) else e}") from None
        adapter_for(config)
        state = {f"{name}.{t}": v for name, pw in ckpt.iter_layers() for t, v in pw.tensors.items()}
        state.update({name: ckpt.load_dense(name) for name in ckpt.dense})
        layers = {name: layer_scalars(meta) for name, meta in ckpt.layers.items()}
    finally:
        ckpt.close()
    config.quantization_config = SpQRCliConfig(verify=verify, layers=layers).to_dict()
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # (the Auto class insists on a path)
    model, info = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                              output_loading_info=True)
    _check_loading_info(info, getattr(config, "tie_word_embeddings", False))
    if (ckpt.path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(ckpt.path))
    model.eval()
    if fuse if fuse is not None else device.type == "cuda":
        fuse_siblings(model, device)
    return model.to(device)


def _check_loading_info(info: dict[str, Any], tied: bool) -> None:
    """transformers reports what did not fit instead of failing; a packed checkpoint must fit exactly."""
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        raise SpQRError(f"packed tensor {unexpected[0]} has no place in the model of config.json; "
                        "the packed dir is from another model")
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        name, got, want = mismatched[0]
        raise SpQRError(f"tensor {name} has shape {tuple(got)} but the model expects {tuple(want)}; shape mismatch")
    missing = sorted(k for k in info.get("missing_keys") or () if not (tied and k == "lm_head.weight"))
    if missing:
        raise SpQRError(f"the packed checkpoint lacks {len(missing)} tensors (first: {missing[0]}); "
                        "re-pack the model")


def model_kind(path: str) -> tuple[str, str]:
    """What ``path`` holds and where its HF files are: ``("packed", path)`` for a ``spqr pack`` directory,
    ``("quant", path/dense)`` for a ``spqr quantize`` output (its dequantized checkpoint), ``("saved", path)`` for a
    ``save_pretrained`` copy of a loaded packed model (``quantization_config`` with per-layer metadata), else
    ``("dense", path)``.
    """
    p = Path(path)
    if (p / "spqr_config.json").is_file():
        return "packed", path
    if (p / "quant_config.json").is_file():
        if not read_json(p / "quant_config.json", "quantization run").get("dense", True):
            raise SpQRError(f"{path} is a quantization run without a dense copy (--no-dense / --pack); load its "
                            f"packed checkpoint (the run's --pack directory, or `spqr pack {path} --out PACKED` once "
                            "the run is finished)")
        if not (p / "dense" / "config.json").is_file():
            raise SpQRError(f"{path} is an unfinished quantization run (no dense/ checkpoint yet); "
                            "re-run the same `spqr quantize` command to resume it")
        return "quant", str(p / "dense")
    if p.is_dir() and _is_saved_packed(p):
        return "saved", path
    if p.is_dir() and _holds_packed_tensors(p):
        raise SpQRError(f"{path} holds packed SpQR tensors but no spqr_config.json; it cannot be loaded as a plain "
                        "model (its layers would be random): restore spqr_config.json or re-pack the model")
    return "dense", path


def _is_saved_packed(directory: Path) -> bool:
    """A ``save_pretrained`` copy of a packed model: its config.json names the ``spqr-cli`` quantizer and carries
    the per-layer metadata (a ``spqr pack`` directory without spqr_config.json has none: it stays an error)."""
    import json

    try:
        qc = json.loads((directory / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError, RecursionError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == HF_QUANT_METHOD and isinstance(qc.get("layers"), dict)


# Names only a packed checkpoint's shards hold (``spqr_kernels.layout``); a plain HF checkpoint has none.
_PACKED_SUFFIXES = (".qweight", ".outlier_row_ptr", ".outlier_col", ".scale_stats", ".qscale")


def _holds_packed_tensors(directory: Path) -> bool:
    """Whether any safetensors file in ``directory`` names a packed tensor (header only; unreadable files are left
    to the regular loader, which reports them)."""
    for f in directory.glob("*.safetensors"):
        try:
            names = _safetensors_names(f)
        except (OSError, ValueError, RecursionError):
            continue
        if any(n.endswith(_PACKED_SUFFIXES) for n in names):
            return True
    return False


def _safetensors_names(path: Path) -> list[str]:
    """Tensor names from a safetensors header (8-byte little-endian length, then JSON), without loading data."""
    import json

    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= 100 * 2**20:
            raise ValueError("bad safetensors header size")
        header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise ValueError("bad safetensors header")
    return [k for k in header if k != "__metadata__"]


def _load_saved(path: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A ``save_pretrained`` copy of a packed model, through transformers and the ``spqr-cli`` quantizer (there is
    no spqr_config.json, hence no checksums), fused on CUDA as ``load_packed`` does."""
    from transformers import AutoModelForCausalLM

    from spqr_cli.runtime.hf_quantizer import register

    register()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if device.type == "cuda":
        fuse_siblings(model, device)
    return model.to(device)


def memory_limits(device: torch.device, max_gpu_memory: str | int | None = None,
                  max_cpu_memory: str | int | None = None) -> dict[int | str, int] | None:
    """accelerate's ``max_memory`` for ``device`` from the user's caps (``8GiB``, ``500MB``, bytes), or ``None``
    when neither is given (the model is loaded whole on the device). A device without a cap gets its free memory
    now; on a GPU the order is GPU, then host, then disk (``--offload-dir``). Only ``device`` is used, never the
    other GPUs of the host."""
    if max_gpu_memory is None and max_cpu_memory is None:
        return None
    if max_gpu_memory is not None and device.type != "cuda":
        raise SpQRError(f"--max-gpu-memory caps a CUDA GPU but the device is {device.type}; use --max-cpu-memory "
                        "(weights beyond it are offloaded to --offload-dir) or --device cuda")
    limits: dict[int | str, int] = {}
    if device.type == "cuda":  # (free memory asked of this GPU only: no context is created on the others)
        index = device.index if device.index is not None else torch.cuda.current_device()
        limits[index] = (_size(max_gpu_memory, "--max-gpu-memory") if max_gpu_memory is not None
                         else torch.cuda.mem_get_info(index)[0])
    if max_cpu_memory is not None:
        limits["cpu"] = _size(max_cpu_memory, "--max-cpu-memory")
    else:
        import psutil

        limits["cpu"] = psutil.virtual_memory().available
    return limits


def _size(value: str | int, flag: str) -> int:
    from accelerate.utils import convert_file_size_to_int

    try:
        size = int(value) if isinstance(value, str) and value.strip().isdigit() else convert_file_size_to_int(value)
    except (ValueError, TypeError):
        size = -1
    if size < 0:
        raise SpQRError(f"{flag} {value!r} is not a size; use e.g. 8GiB, 500MB or a number of bytes (0 offloads "
                        "everything)")
    return size


def _offload_folder(model_dir: str | Path | None) -> tuple[str, bool]:
    """The disk-offload directory: the user's (created), else a new temporary one (``True``: remove it with the
    model)."""
    import tempfile

    if model_dir is not None:
        Path(model_dir).mkdir(parents=True, exist_ok=True)
        return str(model_dir), False
    return tempfile.mkdtemp(prefix="spqr-offload-"), True


def _remove_with(model: nn.Module, folder: str) -> None:
    import shutil
    import weakref

    weakref.finalize(model, shutil.rmtree, folder, True)


def _dispatch(model: nn.Module, limits: dict[int | str, int], device: torch.device,
              offload_dir: str | Path | None) -> nn.Module:
    """Place an already loaded (packed) model with accelerate: blocks on ``device`` up to its cap, the rest on the
    host, then disk; hooks bring each block's tensors (buffers included: SpQRLinear keeps its packed codes in
    buffers) to ``device`` when it runs."""
    from accelerate import dispatch_model, infer_auto_device_map

    device_map = infer_auto_device_map(model, max_memory=limits,
                                       no_split_module_classes=list(getattr(model, "_no_split_modules", None) or []))
    folder, temporary = (None, False)
    disk = [name for name, where in device_map.items() if where == "disk"]
    if disk:  # dispatch_model reads disk-placed tensors from the folder: write them there first
        from accelerate.utils import offload_state_dict

        folder, temporary = _offload_folder(offload_dir)
        offload_state_dict(folder, {k: v for k, v in model.state_dict().items()
                                    if any(not n or k == n or k.startswith(n + ".") for n in disk)})
    main = device.index if device.type == "cuda" and device.index is not None else (
        torch.cuda.current_device() if device.type == "cuda" else "cpu")
    model = dispatch_model(model, device_map=device_map, main_device=main, offload_dir=folder, offload_buffers=True,
                           force_hooks=True)
    model.hf_device_map = device_map
    if temporary:
        _remove_with(model, folder)
    return model


def load_any_model(path: str, dtype: str = "fp16", device: str = "auto", verify: bool = True,
                   max_gpu_memory: str | int | None = None, max_cpu_memory: str | int | None = None,
                   offload_dir: str | Path | None = None) -> tuple[nn.Module, Any]:
    """Load the model and tokenizer at ``path`` for evaluation or generation.

    ``path`` is a hub id, a local HF directory, a ``spqr quantize`` output directory (its ``dense/``
    checkpoint), a ``spqr pack`` directory (loaded with ``load_packed``; ``verify`` checks its tensors'
    checksums) or a ``save_pretrained`` copy of a loaded packed model. On CPU, fp16 weights are computed in fp32:
    the values are exactly the fp16 ones, but CPU fp16 matmuls are slow or missing. bf16 and fp32 run as asked.

    ``max_gpu_memory`` / ``max_cpu_memory`` (``memory_limits``) run a model larger than the GPU or the host: the
    weights are placed with accelerate (``device_map="auto"``) on the device up to its cap, then the host, then
    ``offload_dir`` (default: a temporary directory removed with the model); the outputs are those of the plain
    load, only slower.
    """
    dev = resolve_device(device)
    limits = memory_limits(dev, max_gpu_memory, max_cpu_memory)
    kind, hf_path = model_kind(path)
    tokenizer = load_tokenizer(hf_path)
    if limits is not None:
        return _load_capped(kind, hf_path, dtype, dev, limits, offload_dir, verify), tokenizer
    if kind in ("packed", "saved"):
        torch_dtype = resolve_dtype(dtype)
        if dev.type == "cpu" and torch_dtype == torch.float16:
            torch_dtype = torch.float32
        if kind == "packed":
            return load_packed(hf_path, device=dev, dtype=torch_dtype, verify=verify), tokenizer
        return _load_saved(hf_path, dev, torch_dtype), tokenizer
    model = load_model(hf_path, dtype=dtype, device="cpu")
    if dev.type == "cpu" and next(model.parameters()).dtype == torch.float16:
        model = model.float()
    return model.to(dev), tokenizer


def _load_capped(kind: str, hf_path: str, dtype: str, dev: torch.device, limits: dict[int | str, int],
                 offload_dir: str | Path | None, verify: bool) -> nn.Module:
    """``load_any_model`` under memory caps: a dense model is placed by transformers while it loads (weights that go
    to disk are read from the checkpoint's own safetensors shards when needed, never all in memory); a packed one
    is loaded on the host (it is the small form) and then dispatched."""
    torch_dtype = resolve_dtype(dtype)
    if dev.type == "cpu" and torch_dtype == torch.float16:
        torch_dtype = torch.float32  # as the plain load: fp16 values, computed in fp32 on the CPU
    if kind in ("packed", "saved"):
        model = (load_packed(hf_path, device="cpu", dtype=torch_dtype, verify=verify, fuse=False) if kind == "packed"
                 else _load_saved(hf_path, torch.device("cpu"), torch_dtype))
        return _dispatch(model, limits, dev, offload_dir)
    folder, temporary = _offload_folder(offload_dir)
    model = load_model(hf_path, dtype=torch_dtype, max_memory=limits, offload_folder=folder)
    if temporary:
        _remove_with(model, folder)
    return model
