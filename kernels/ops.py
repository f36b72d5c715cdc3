"""``spqr_linear``: the one place that chooses how a packed layer is multiplied, and the ``spqr::linear`` op.

Dispatch, by device, token count and layer config:

- CUDA tensors (or CPU tensors when ``TRITON_INTERPRET=1`` is set: that is how CI runs the kernels without a GPU),
  group sizes that are a multiple of 16: 1 to ``matvec.MAX_DECODE_TOKENS`` (8) tokens go to the decode kernel
  (``matvec.py``), more to dequantize-to-fp16 + cuBLAS (``dequantize.py``). The kernels take fp16/bf16; other
  float inputs are cast to fp16 and the result back.
- Everything else (CPU, other group sizes, or Triton that cannot be imported, after one warning): the torch path
  ``decode.linear_torch``, bit-exact with the record's decoder. On CPU it decodes each layer once and keeps the
  dense weight while the layer's view lives (``decode.cpu_weight``, within ``$SPQR_CPU_CACHE_GB``).

``packed_view`` builds the ``PackedWeight`` a module hands in (its buffers, fp16 floating fields) and remembers it
by its code buffer, so that the custom op ``torch.ops.spqr.linear`` (what ``torch.compile`` sees in place of a
packed layer: one opaque node with a known output shape) finds the layer's kernel caches again; on CUDA it also
builds the decode kernel's per-layer tensors there and then, outside any CUDA graph capture.
"""

from __future__ import annotations

import os
import warnings
import weakref
from types import ModuleType

import torch

from .decode import linear_torch
from .layout import PACKED_TENSORS, PackedWeight

META_FIELDS = ("out_features", "in_features", "wbits", "groupsize", "beta2", "stat_bits")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
# the live view of each packed layer, by (qweight address, device), for the custom op (see the module docstring)
_VIEWS: weakref.WeakValueDictionary[tuple[int, str], PackedWeight] = weakref.WeakValueDictionary()
_kernel_modules: tuple[ModuleType, ModuleType] | None = None
_kernels_failed = False


def _use_triton(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _kernels() -> tuple[ModuleType, ModuleType] | None:
    """The Triton kernel modules (decode, dequantize), imported on first use; ``None`` after one warning when they
    cannot be imported (e.g. no triton), so that the torch path takes over."""
    global _kernel_modules, _kernels_failed
    if _kernel_modules is None and not _kernels_failed:
        try:
            from . import dequantize, matvec
        except ImportError as e:
            warnings.warn(f"SpQR GPU kernels unavailable ({e}); using the slower torch path", stacklevel=3)
            _kernels_failed = True
            return None
        _kernel_modules = (matvec, dequantize)
    return _kernel_modules


def check_inputs(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None) -> None:
    """Raise a ValueError/TypeError that says what is wrong with the arguments of ``spqr_linear``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"spqr_linear expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != pw.in_features:
        raise ValueError(f"spqr_linear: x has shape {tuple(x.shape)} but the layer takes {pw.in_features} "
                         f"input features (its weight is {pw.out_features}x{pw.in_features})")
    if not x.is_floating_point():
        raise TypeError(f"spqr_linear: x must be a floating-point tensor (float16 or bfloat16 on the kernels), "
                        f"got {x.dtype}")
    wdev = pw.tensors["qweight"].device
    if x.device != wdev:
        raise ValueError(f"spqr_linear: x is on {x.device} but the packed weight is on {wdev}; move one of them")
    if bias is not None and (bias.shape != (pw.out_features,) or bias.device != wdev):
        raise ValueError(f"spqr_linear: bias must have shape ({pw.out_features},) on {wdev}, "
                         f"got {tuple(bias.shape)} on {bias.device}")


def spqr_linear(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for ``x`` of shape ``[..., K]`` and a packed ``W`` of shape ``[N, K]``.

    Returns ``[..., N]`` in ``x``'s dtype. The Triton kernels accumulate in fp32; the many-token path is cuBLAS fp16.
    A decode call like an earlier one (same input shape and dtype, bias or not) replays that call's compiled
    launch (``matvec.DecodeReplay``): eager decode is bound by host time, and this skips the checks below and
    Triton's argument binding.
    """
    if isinstance(x, torch.Tensor):
        replay = pw.launches.get((x.shape, x.dtype, bias is None))
        if replay is not None and (y := replay(x, bias)) is not None:
            return y
    check_inputs(x, pw, bias)
    if x.is_cuda and torch.cuda.current_device() != x.get_device():  # Triton launches on the current device
        with torch.cuda.device(x.device):
            return spqr_linear(x, pw, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, pw.in_features)
    tokens = x2.shape[0]
    if tokens == 0:
        return x.new_empty(*lead, pw.out_features)
    kernels = _kernels() if _use_triton(x.device) and pw.groupsize % 16 == 0 else None
    if kernels is None:
        y = linear_torch(x2, pw, bias)
    else:
        matvec, dequantize = kernels
        cast = x.dtype not in _KERNEL_DTYPES
        xk = x2.to(torch.float16) if cast else x2
        bk = None if bias is None else bias.to(xk.dtype)
        if tokens <= matvec.MAX_DECODE_TOKENS:
            y = matvec.spqr_matvec(xk if cast else x, pw, bk)  # x as given, so its shape keys the replay
        else:
            y = dequantize.spqr_dense_matmul(xk, pw, bk)
        y = y.to(x.dtype)
    return y.reshape(*lead, pw.out_features)


def _view_key(qweight: torch.Tensor) -> tuple[int, str]:
    return qweight.data_ptr(), str(qweight.device)


def packed_view(tensors: dict[str, torch.Tensor], meta: dict[str, int]) -> PackedWeight:
    """A ``PackedWeight`` over a module's buffers, registered for the custom op (see the module docstring).

    Floating fields are cast to fp16 (a ``.to(dtype)`` of the module may have cast them), so the layout stays
    exactly what the kernels expect. Keep the returned object: the kernels cache per-layer tensors on it.
    """
    cast = {n: t.to(torch.float16) if t.is_floating_point() else t for n, t in tensors.items()}
    pw = PackedWeight(**meta, tensors=cast)
    _VIEWS[_view_key(pw.tensors["qweight"])] = pw
    if pw.tensors["qweight"].is_cuda and pw.groupsize % 16 == 0:
        kernels = _kernels()
        if kernels is not None:
            kernels[0].prepare_decode(pw)
    return pw


@torch.library.custom_op("spqr::linear", mutates_args=())
def linear_op(x: torch.Tensor, tensors: list[torch.Tensor | None], meta: list[int],
              bias: torch.Tensor | None) -> torch.Tensor:
    """``spqr_linear`` as a custom op: ``tensors`` are the layer's buffers in ``layout.PACKED_TENSORS`` order
    (``None`` where absent), ``meta`` the ``PackedWeight`` shape fields in ``META_FIELDS`` order. The layer's live
    view is looked up by its code buffer so the kernels' per-layer caches are reused; unknown tensors get a view."""
    qweight = tensors[PACKED_TENSORS.index("qweight")]
    named_meta = dict(zip(META_FIELDS, meta, strict=True))
    pw = _VIEWS.get(_view_key(qweight)) if qweight is not None else None
    if pw is None or pw.meta() != named_meta:
        pw = packed_view({n: t for n, t in zip(PACKED_TENSORS, tensors, strict=True) if t is not None}, named_meta)
    return spqr_linear(x, pw, bias)


@linear_op.register_fake
def _linear_op_shape(x: torch.Tensor, tensors: list[torch.Tensor | None], meta: list[int],
                     bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], meta[0])
