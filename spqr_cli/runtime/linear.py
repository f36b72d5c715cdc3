"""``SpQRLinear``: a linear layer whose weight lives only in SpQR's packed form.

Memory is the point of the format, so the module owns only the packed buffers and never keeps a dense weight:
every call goes through ``spqr_kernels.ops.spqr_linear``, which picks the Triton kernels on CUDA and the torch path
elsewhere. On CPU that path keeps the decoded weight of each layer in a cache beside the module
(``spqr_kernels.decode.cpu_weight``, bounded by ``$SPQR_CPU_CACHE_GB``, default half the available RAM), because
decoding on every call is 100x slower than the multiply; beyond the budget layers are decoded per call.

``torch.compile``: inside a compiled region the layer calls the custom op ``torch.ops.spqr.linear`` instead, so
dynamo sees one opaque node with a known output shape (it cannot trace the Triton launcher's Python) and inductor
fuses the norms, rotary and activations around it; that is how ``spqr run`` and transformers' ``generate`` compile
a packed model (CUDA graphs + fused non-linear ops). Eager calls skip the op's dispatch cost.
"""

from __future__ import annotations

import torch
from torch import nn

from spqr_kernels.decode import dequantize_fp16
from spqr_kernels.layout import PACKED_TENSORS, PackedWeight
from spqr_kernels.ops import META_FIELDS, packed_view, spqr_linear


class SpQRLinear(nn.Module):
    """A linear layer whose weight lives only in SpQR's packed form (``spqr_kernels.layout``).

    The packed tensors are registered buffers (so ``.to(device)`` and ``state_dict`` see them); their names are
    the layout's tensor names. ``weight`` is deliberately absent: nothing should silently materialize it.
    """

    def __init__(self, pw: PackedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        for name in META_FIELDS:
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

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._rebuild_view()  # a copy (deepcopy, pickle) gets a view of its own buffers, registered for the op

    def _rebuild_view(self) -> None:
        """Drop the view and the kernels' per-layer tensors and build them again now, not in the first forward,
        which may run inside a compiled CUDA graph. (Only when the buffers changed: a CUDA graph recorded earlier
        reads the old view's scratch, which must stay alive while the buffers it was recorded with do.)"""
        self._packed = None
        _ = self.packed

    @property
    def packed(self) -> PackedWeight:
        """The layer's ``PackedWeight`` view of the current buffers (``spqr_kernels.ops.packed_view``).

        Built once and kept: the kernels cache per-layer runtime tensors (outlier residuals, split-K scratch) on
        this object, so a new view per forward would rebuild them on every call."""
        if self._packed is None:
            self._packed = packed_view({n: getattr(self, n) for n in self._tensor_names}, self._meta())
        return self._packed

    def _meta(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in META_FIELDS}

    def dequantize(self) -> torch.Tensor:
        """The fp16 dense weight ``[out, in]`` (bit-exact with the quantizer's), on the buffers' device."""
        return dequantize_fp16(self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            tensors = [self._buffers.get(n) for n in PACKED_TENSORS]
            return torch.ops.spqr.linear(x, tensors, list(self._meta().values()), self.bias)
        return spqr_linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, wbits={self.wbits}, "
                f"groupsize={self.groupsize}, beta2={self.beta2}, stat_bits={self.stat_bits}, "
                f"bias={self.bias is not None}")
