"""CUDA-graph replay of the column loop's block step (``methods/spqr.py``), so quantizing on a GPU is not bound
by the host.

The loop quantizes one column at a time with ~50 small kernels per column (fits, rounding, outlier tests, the
error update). On a GPU each of them takes a few microseconds to run but ~10 us of Python and launch time to
issue, so an eager run spends most of its time on the host. Every full block of ``blocksize`` columns that
starts on a group boundary runs the same kernels on tensors of the same shapes, so the block step is captured
once as a CUDA graph over static buffers and replayed for every later block: one launch per block instead of
thousands. The replayed kernels are the eager ones, so the results are bit-identical to the eager loop (tested
on the GPU).

A captured step is kept per (device, rows, configuration) in a small cache, so the layers of a model that share a
row count share one capture (LLaMA needs two: ``hidden`` and ``intermediate`` rows; three with grouped-query
attention, whose k/v projections have fewer). The driver drops them at the end of a run (``clear``).

The replayed step leaves the caller's block untouched (it works on a copy in the static buffer); the eager step
rewrites it in place. Nothing reads a block's columns after its step, so both serve the loop.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, fields

import torch

MAX_CACHED = 4  # captured steps kept (a LLaMA block needs two or three row counts)


@dataclass
class BlockOutputs:
    """What the block step writes for ``size`` columns of an ``n``-row layer: codes, the scaled errors that
    update the columns after the block, and the outlier mask and values (``None`` without outliers)."""

    codes: torch.Tensor  # [n, size] uint8
    err: torch.Tensor  # [n, size] fp32: (w - q) / U[i, i]
    outlier: torch.Tensor | None = None  # [n, size] bool
    outlier_val: torch.Tensor | None = None  # [n, size] fp16

    @classmethod
    def empty(cls, n: int, size: int, device: torch.device, outliers: bool) -> BlockOutputs:
        return cls(
            torch.empty(n, size, dtype=torch.uint8, device=device),
            torch.empty(n, size, dtype=torch.float32, device=device),
            torch.empty(n, size, dtype=torch.bool, device=device) if outliers else None,
            torch.empty(n, size, dtype=torch.float16, device=device) if outliers else None,
        )

    def copy_(self, other: BlockOutputs) -> None:
        for f in fields(self):
            dst = getattr(self, f.name)
            if dst is not None:
                dst.copy_(getattr(other, f.name))


BlockStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | float", BlockOutputs],
                     list[dict[str, torch.Tensor]]]
"""``step(w [n, size], d [size], u [size, size], threshold, out) -> stored statistics of each group``: quantizes
the block in place (``w`` ends as the decoded weights) and writes ``out``."""


class ReplayedStep:
    """One block step captured over static buffers; ``__call__`` copies a block in, replays, copies it out."""

    def __init__(self, step: BlockStep, n: int, size: int, device: torch.device, outliers: bool) -> None:
        self.step = step
        self.w = torch.empty(n, size, dtype=torch.float32, device=device)
        self.d = torch.empty(size, dtype=torch.float32, device=device)
        self.u = torch.empty(size, size, dtype=torch.float32, device=device)
        self.threshold = torch.empty((), dtype=torch.float32, device=device)
        self.out = BlockOutputs.empty(n, size, device, outliers)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager = False  # the capture failed: the step runs eagerly on the static buffers
        self.groups: list[dict[str, torch.Tensor]] = []

    def __call__(self, w: torch.Tensor, d: torch.Tensor, u: torch.Tensor, threshold: float,
                 dest: BlockOutputs) -> list[dict[str, torch.Tensor]]:
        """Quantize the block ``w`` ``[n, size]`` (not modified) into ``dest``; returns each group's stored
        statistics (fresh tensors)."""
        self.w.copy_(w)
        self.d.copy_(d)
        self.u.copy_(u)
        self.threshold.fill_(threshold)
        if self.eager:
            with torch.cuda.device(self.w.device):
                groups = self.step(self.w, self.d, self.u, self.threshold, self.out)
        elif self.graph is None:
            with torch.cuda.device(self.w.device):
                groups = self._first_call()
        else:
            self.graph.replay()
            groups = self.groups
        dest.copy_(self.out)
        return [{name: t.clone() for name, t in g.items()} for g in groups]

    def _first_call(self) -> list[dict[str, torch.Tensor]]:
        """Run the step eagerly on a side stream (CUDA's warm-up before capture; its result is this block's),
        then capture it for the next blocks (capturing records the kernels without running them)."""
        side = torch.cuda.Stream(device=self.w.device)
        side.wait_stream(torch.cuda.current_stream(self.w.device))
        with torch.cuda.stream(side):
            groups = self.step(self.w, self.d, self.u, self.threshold, self.out)
        torch.cuda.current_stream(self.w.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.groups = self.step(self.w, self.d, self.u, self.threshold, self.out)
        except RuntimeError as e:  # an op this torch build cannot capture: same kernels, run eagerly
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            warnings.warn(f"the column loop could not be captured as a CUDA graph ({reason}); it runs eagerly "
                          "(slower, same records)", stacklevel=3)
            self.eager = True
            return groups
        self.graph = graph
        return groups


_CACHE: OrderedDict[Hashable, ReplayedStep] = OrderedDict()


def replayed_step(key: Hashable, factory: Callable[[], ReplayedStep]) -> ReplayedStep:
    """The cached step for ``key`` (which must name everything the step's kernels depend on), else a new one."""
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    step = _CACHE[key] = factory()
    while len(_CACHE) > MAX_CACHED:
        _CACHE.popitem(last=False)
    return step


def clear() -> None:
    """Drop every captured step (and the GPU memory its graph pool holds)."""
    _CACHE.clear()
