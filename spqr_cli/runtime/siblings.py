"""Sibling fusion: packed layers that read the same input (q/k/v, gate/up) run as one kernel launch.

At batch 1 a small layer's time is mostly a fixed chain of dependent memory round trips (permutation, statistics,
outliers, the split-K reduction), not its bytes: a LLaMA-7B q/k/v layer (16.8M weights) takes about as long as
a third of the fused q/k/v layer would. So ``fuse_siblings`` concatenates each group of siblings into one
``SpQRLinear`` (``layout.concat_rows``, exact) and puts a ``SiblingSlice`` in each member's place: the first member
called computes the whole group's output, the others return their slice of it. The model's own forward code is
untouched, so this works for every family whose adapter lists the groups (``FamilyAdapter.sequential``: the
layers quantized together are exactly the layers sharing one input).

The memo is strict: a slice reuses the group's output only for the *same* input tensor object (and, outside
``torch.compile`` and inference mode, the same in-place version), only once per member, and it is dropped as soon
as every member has been served, so no activation outlives the forward pass and a compiled graph starts from an
empty memo. Any other call order recomputes, so results never depend on it.
"""

from __future__ import annotations

import torch
from torch import nn

from spqr_cli.runtime.linear import SpQRLinear
from spqr_kernels.layout import concat_rows


class SiblingGroup(nn.Module):
    """One fused ``SpQRLinear`` over the rows of several sibling layers, and the memo of its last output."""

    def __init__(self, fused: SpQRLinear, sizes: list[int]) -> None:
        super().__init__()
        self.fused = fused
        self.bounds = [(sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(len(sizes))]
        self._all = (1 << len(sizes)) - 1
        self._memo: tuple[torch.Tensor, int, torch.Tensor, int] | None = None

    def output(self, x: torch.Tensor, member: int) -> torch.Tensor:
        """Member ``member``'s output for ``x``: a slice of the fused output, computed once per input."""
        memo = self._memo
        # (inference-mode tensors have no version counter; traced code has no in-place writes between siblings)
        version = 0 if torch.compiler.is_compiling() or x.is_inference() else x._version
        if memo is None or memo[0] is not x or memo[1] != version or memo[3] >> member & 1:
            y, served = self.fused(x), 0
        else:
            y, served = memo[2], memo[3]
        served |= 1 << member
        self._memo = None if served == self._all else (x, version, y, served)
        lo, hi = self.bounds[member]
        return y.narrow(-1, lo, hi - lo)  # (a view, like y[..., lo:hi], at a fraction of the eager host time)


class SiblingSlice(nn.Module):
    """Stands in for one member of a ``SiblingGroup``; the group is registered once, on the members' parent."""

    def __init__(self, group: SiblingGroup, member: int) -> None:
        super().__init__()
        self._group = (group,)  # a tuple, not an attribute: the group must not be a submodule of every member
        self.member = member
        lo, hi = group.bounds[member]
        self.in_features, self.out_features = group.fused.in_features, hi - lo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._group[0].output(x, self.member)

    def dequantize(self) -> torch.Tensor:
        """This member's fp16 dense weight ``[out, in]`` (rows of the fused layer's)."""
        lo, hi = self._group[0].bounds[self.member]
        return self._group[0].fused.dequantize()[lo:hi]

    def extra_repr(self) -> str:
        return (f"member {self.member} of a fused group, in_features={self.in_features}, "
                f"out_features={self.out_features}")


def fuse_siblings(model: nn.Module, device: torch.device | None = None) -> int:
    """Fuse every group of sibling ``SpQRLinear`` layers of ``model`` in place; returns how many groups were fused.

    Groups come from the family adapter. A group is left as it is when its members do not fuse (different
    permutations or layouts, bias on some but not all, a member not packed); the layers then run one by one.
    With ``device``, each block is moved there just before it is fused (see ``fuse_block`` on memory); the rest
    of the model is the caller's to move.
    """
    from spqr_cli.core.models import adapter_for

    adapter = adapter_for(model)
    fused = sum(fuse_block(block if device is None else block.to(device), adapter.sequential)
                for block in adapter.get_blocks(model))
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()  # the members' freed blocks and the re-packing temporaries, back to the driver
    return fused


def fuse_block(block: nn.Module, groups: tuple[tuple[str, ...], ...]) -> int:
    """``fuse_siblings`` for one decoder block, ``groups`` its adapter's ``sequential`` groups of module paths.

    On a GPU, fuse each block as soon as it is there (``load_packed`` does): the members' freed buffers are then
    reused by the next block's, instead of leaving holes all over a fully loaded model (a 33B model fused after
    loading ran out of a 24 GB cap with 2.7 GB reserved but unallocated).
    """
    fused = 0
    for names in groups:
        members = [block.get_submodule(n) for n in names] if len(names) > 1 else []
        if not members or not all(isinstance(m, SpQRLinear) for m in members):
            continue
        if len({m.bias is None for m in members}) > 1:
            continue
        try:
            pw = concat_rows([m.packed for m in members])
        except ValueError:
            continue
        bias = None if members[0].bias is None else torch.cat([m.bias.data for m in members])
        group = SiblingGroup(SpQRLinear(pw, bias), [m.out_features for m in members])
        _ = group.fused.packed  # the view and kernel scratch now, not in a first call inside a CUDA graph
        parents = {n.rpartition(".")[0] for n in names}
        parent = block.get_submodule(parents.pop()) if len(parents) == 1 else block
        parent.add_module("fused_" + "_".join(n.rpartition(".")[2] for n in names), group)
        for i, name in enumerate(names):
            owner, _, attr = name.rpartition(".")
            setattr(block.get_submodule(owner) if owner else block, attr, SiblingSlice(group, i))
        fused += 1
    return fused
