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

``torch.compile``: inside a compiled region the layer calls the custom op ``torch.ops.spqr.linear`` instead,
so dynamo sees one opaque node with a known output shape (it cannot trace the Triton launcher's Python) and
inductor fuses the norms, rotary and activations around it; that is how ``spqr run`` and transformers'
``generate`` compile a packed model (CUDA graphs + fused non-linear ops). Eager calls skip the op's dispatch cost.
"""

from __future__ import annotations

import warnings
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spqr_cli.errors import SpQRError
from spqr_cli.pack import PackedCheckpoint
from spqr_cli.record import QuantizedLayer
from spqr_kernels.layout import PACKED_TENSORS, PackedWeight

_META_FIELDS = ("out_features", "in_features", "wbits", "groupsize", "beta2", "stat_bits")
_kernel_warned = False
# the live view of each SpQRLinear, by (qweight address, device): the custom op finds the view, and with it the
# kernels' per-layer caches (outlier residuals, decode scratch), from the tensors it is given
_VIEWS: weakref.WeakValueDictionary[tuple[int, str], PackedWeight] = weakref.WeakValueDictionary()


def _view(tensors: dict[str, torch.Tensor], meta: dict[str, int]) -> PackedWeight:
    """A ``PackedWeight`` over ``tensors`` with fp16 floating fields (a ``.to(dtype)`` may have cast the buffers),
    so the layout stays exactly what the kernels expect."""
    cast = {n: t.to(torch.float16) if t.is_floating_point() else t for n, t in tensors.items()}
    return PackedWeight(**meta, tensors=cast)


def _view_key(qweight: torch.Tensor) -> tuple[int, str]:
    return qweight.data_ptr(), str(qweight.device)


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
        before = {n: getattr(self, n) for n in self._tensor_names}
        out = super()._apply(fn, recurse)
        if any(getattr(self, n) is not t for n, t in before.items()):  # moved or cast (a no-op .to() keeps all)
            self._rebuild_view()
        return out

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 (nn.Module's signature)
        super()._load_from_state_dict(*args, **kwargs)
        self._rebuild_view()  # assign=True replaces the buffers; copying into them changes the values

    def _rebuild_view(self) -> None:
        """Drop the view and the kernels' per-layer tensors and build them again now, not in the first forward,
        which may run inside a compiled CUDA graph. (Only when the buffers changed: a CUDA graph recorded earlier
        reads the old view's scratch, which must stay alive while the buffers it was recorded with do.)"""
        self._packed = None
        _ = self.packed

    @property
    def packed(self) -> PackedWeight:
        """The layer's ``PackedWeight`` view of the current buffers (see ``_view``).

        Built once and kept: the kernels cache per-layer runtime tensors (outlier residuals, split-K scratch) on
        this object, so a new view per forward would rebuild them on every call."""
        if self._packed is None:
            self._packed = _view({n: getattr(self, n) for n in self._tensor_names}, self._meta())
            _VIEWS[_view_key(self._packed.tensors["qweight"])] = self._packed
            if self._packed.tensors["qweight"].is_cuda:
                _prepare_kernels(self._packed)
        return self._packed

    def _meta(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in _META_FIELDS}

    def dequantize(self) -> torch.Tensor:
        """The fp16 dense weight ``[out, in]`` (bit-exact with the quantizer's), on the buffers' device."""
        return QuantizedLayer.from_packed(self.packed).dequantize().to(self.packed.tensors["qweight"].device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            tensors = [self._buffers.get(n) for n in PACKED_TENSORS]
            return torch.ops.spqr.linear(x, tensors, list(self._meta().values()), self.bias)
        return _linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, wbits={self.wbits}, "
                f"groupsize={self.groupsize}, beta2={self.beta2}, stat_bits={self.stat_bits}, "
                f"bias={self.bias is not None}")


def _linear(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """The Triton kernels on CUDA; elsewhere (or without them) the record's decoder + ``F.linear``."""
    if x.is_cuda:
        out = _kernel_linear(x, pw, bias)
        if out is not None:
            return out
    w = QuantizedLayer.from_packed(pw).dequantize().to(x.device)
    compute = torch.float32 if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    bias = None if bias is None else bias.to(compute)
    return F.linear(x.to(compute), w.to(compute), bias).to(x.dtype)


def _prepare_kernels(pw: PackedWeight) -> None:
    """The decode kernel's per-layer tensors, built when the view is (eagerly, before any compiled CUDA graph)."""
    try:
        from spqr_kernels.matvec import prepare_decode
    except ImportError:
        return  # _kernel_linear warns and falls back on the first call
    if pw.groupsize % 16 == 0:
        prepare_decode(pw)


@torch.library.custom_op("spqr::linear", mutates_args=())
def packed_linear(x: torch.Tensor, tensors: list[torch.Tensor | None], meta: list[int],
                  bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` for a packed ``W``: the op ``torch.compile`` sees in place of ``SpQRLinear.forward``.

    ``tensors``: the layer's buffers in ``layout.PACKED_TENSORS`` order (``None`` where absent); ``meta``: the
    ``PackedWeight`` shape fields in ``_META_FIELDS`` order. The layer's live view is looked up by its code
    buffer so the kernels' per-layer caches are reused; unknown tensors get a fresh view.
    """
    qweight = tensors[PACKED_TENSORS.index("qweight")]
    pw = _VIEWS.get(_view_key(qweight)) if qweight is not None else None
    if pw is None or pw.meta() != dict(zip(_META_FIELDS, meta, strict=True)):
        named = {n: t for n, t in zip(PACKED_TENSORS, tensors, strict=True) if t is not None}
        pw = _view(named, dict(zip(_META_FIELDS, meta, strict=True)))
    return _linear(x, pw, bias)


@packed_linear.register_fake
def _packed_linear_shape(x: torch.Tensor, tensors: list[torch.Tensor | None], meta: list[int],
                         bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], meta[0])


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
                verify: bool = True, fuse: bool | None = None) -> Any:
    """A transformers causal LM whose quantized linears are ``SpQRLinear`` modules; eval mode, on ``device``.

    ``dtype`` is the dtype of the non-quantized tensors and the activations (the packed buffers keep the
    layout's dtypes). Peak host memory is about the packed size plus one dense layer. ``fuse`` (default: on CUDA)
    runs layers that share an input (q/k/v, gate/up) as one kernel launch (``siblings.fuse_siblings``); on CPU it
    would only cost load time, the torch path decodes each layer per call either way.
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
    if fuse if fuse is not None else device.type == "cuda":
        from spqr_cli.siblings import fuse_siblings

        fuse_siblings(model, device)
    return model.to(device)
