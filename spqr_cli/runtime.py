"""Running a packed model: ``SpQRLinear`` (packed buffers + matmul) and ``load_packed`` (packed dir -> model).

Memory is the point of the format, so nothing here materializes a dense weight for longer than one layer's
matmul: the model skeleton is built with empty (meta) parameters, each quantized linear becomes an
``SpQRLinear`` that owns only the packed buffers, and the non-quantized tensors are assigned as they are read.

Compute paths:
- CUDA: ``spqr_kernels.ops.spqr_linear`` (Triton), imported on first use; if it cannot be imported the torch path
  below is used, with one warning.
- CPU (and the fallback): decode the layer with the record's own decoder (``QuantizedLayer.from_packed(...)
  .dequantize()``, the bit-exact contract), then ``F.linear``. On CPU the matmul runs in fp32 even for fp16
  activations and is rounded to the activation dtype once: CPU fp16 GEMM is slow and, where it exists,
  accumulates in fp32 anyway, so the result equals the dense fp16 model up to summation order.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spqr_cli.errors import SpQRError
from spqr_cli.pack import PackedCheckpoint
from spqr_cli.record import QuantizedLayer
from spqr_kernels.layout import PackedWeight

_META_FIELDS = ("out_features", "in_features", "wbits", "groupsize", "beta2", "stat_bits")
_kernel_warned = False


class SpQRLinear(nn.Module):
    """A linear layer whose weight lives only in SpQR's packed form (``spqr_kernels.layout``).

    The packed tensors are registered buffers (so ``.to(device)`` and ``state_dict`` see them); their names are
    the layout's tensor names. ``weight`` is deliberately absent: nothing should silently materialize it.
    """

    def __init__(self, pw: PackedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        for name in _META_FIELDS:
            setattr(self, name, int(getattr(pw, name)))
        self._tensor_names = tuple(pw.tensors)
        for name, t in pw.tensors.items():
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._packed: PackedWeight | None = None

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        self._packed = None  # buffers moved or cast: rebuild the view (and the kernels' runtime caches) lazily
        return super()._apply(fn, recurse)

    @property
    def packed(self) -> PackedWeight:
        """The layer's ``PackedWeight`` view of the current buffers (fp16 fields re-cast if a ``.to(dtype)``
        changed them, so the layout stays exactly what the kernels expect).

        Built once and kept: the kernels cache per-layer runtime tensors (outlier residuals, split-K scratch) on
        this object, so a new view per forward would rebuild them on every call."""
        if self._packed is None:
            tensors = {}
            for name in self._tensor_names:
                t = getattr(self, name)
                tensors[name] = t.to(torch.float16) if t.is_floating_point() else t
            self._packed = PackedWeight(**{k: getattr(self, k) for k in _META_FIELDS}, tensors=tensors)
        return self._packed

    def dequantize(self) -> torch.Tensor:
        """The fp16 dense weight ``[out, in]`` (bit-exact with the quantizer's), on the buffers' device."""
        device = getattr(self, self._tensor_names[0]).device
        return QuantizedLayer.from_packed(self.packed).dequantize().to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            out = _kernel_linear(x, self.packed, self.bias)
            if out is not None:
                return out
        w = self.dequantize()
        compute = torch.float32 if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        bias = None if self.bias is None else self.bias.to(compute)
        return F.linear(x.to(compute), w.to(compute), bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, wbits={self.wbits}, "
                f"groupsize={self.groupsize}, beta2={self.beta2}, stat_bits={self.stat_bits}, "
                f"bias={self.bias is not None}")


def _kernel_linear(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The Triton path, or ``None`` (after one warning) when the kernels cannot be imported."""
    global _kernel_warned
    try:
        from spqr_kernels.ops import spqr_linear
    except ImportError as e:
        if not _kernel_warned:
            warnings.warn(f"SpQR GPU kernels unavailable ({e}); using the slower torch path", stacklevel=3)
            _kernel_warned = True
        return None
    xk = x if x.dtype in (torch.float16, torch.bfloat16) else x.to(torch.float16)  # kernels take fp16/bf16
    out = spqr_linear(xk, pw, None if bias is None else bias.to(xk.dtype))
    return out.to(x.dtype)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def load_packed(packed_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16,
                verify: bool = True) -> Any:
    """A transformers causal LM whose quantized linears are ``SpQRLinear`` modules; eval mode, on ``device``.

    ``dtype`` is the dtype of the non-quantized tensors and the activations (the packed buffers keep the
    layout's dtypes). Peak host memory is about the packed size plus one dense layer.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from spqr_cli.models import adapter_for, resolve_device

    device = resolve_device(device) if isinstance(device, str) else device
    ckpt = PackedCheckpoint(packed_dir, verify=verify)
    try:
        config = AutoConfig.from_pretrained(str(ckpt.path))
    except (OSError, ValueError) as e:
        raise SpQRError(f"cannot read {ckpt.path}/config.json: {str(e).splitlines()[0] if str(e) else e}") from None
    adapter_for(config)
    with init_empty_weights():  # parameters on meta, buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    try:  # the shards' file handles are closed on every error below too
        for name in ckpt.layers:
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise SpQRError(f"packed layer {name} does not exist in the model of config.json; "
                                "the packed dir is from another model") from None
            pw = ckpt.load_layer(name)
            if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != (pw.out_features,
                                                                                           pw.in_features):
                raise SpQRError(f"packed layer {name} has shape {(pw.out_features, pw.in_features)} but the model "
                                f"expects {tuple(getattr(old, 'weight', torch.empty(0)).shape)}; shape mismatch")
            bias_name = f"{name}.bias"
            bias = ckpt.load_dense(bias_name).to(dtype) if bias_name in ckpt.dense else None
            if (bias is None) != (old.bias is None):
                raise SpQRError(f"layer {name}: bias presence differs from the model config; the packed dir is "
                                "from another model")
            _set_module(model, name, SpQRLinear(pw, bias))

        expected = dict(model.state_dict(keep_vars=True))
        state = {}
        for name in ckpt.dense:
            if name.endswith(".bias") and name[: -len(".bias")] in ckpt.layers:
                continue  # already inside its SpQRLinear
            if name not in expected:
                raise SpQRError(f"packed tensor {name} has no place in the model of config.json; "
                                "the packed dir is from another model")
            t = ckpt.load_dense(name)
            if tuple(t.shape) != tuple(expected[name].shape):
                raise SpQRError(f"tensor {name} has shape {tuple(t.shape)} but the model expects "
                                f"{tuple(expected[name].shape)}; shape mismatch")
            state[name] = t.to(dtype) if t.is_floating_point() else t
        model.load_state_dict(state, strict=False, assign=True)
    finally:
        ckpt.close()
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    still_empty = [n for n, p in model.named_parameters() if p.is_meta]
    if still_empty:
        raise SpQRError(f"the packed checkpoint lacks {len(still_empty)} tensors (first: {still_empty[0]}); "
                        "re-pack the model")
    if (ckpt.path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(ckpt.path))
    model.eval()
    return model.to(device)
