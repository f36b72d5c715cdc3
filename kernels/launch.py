"""``Replay``: launch a kernel that Triton has already compiled, without ``JITFunction.run``.

Eager decode is host-bound. On the H200 machine's CPU, ``kernel[grid](...)`` with the decode kernel's 47
parameters costs ~30-48 us of host time per call (binding and specializing every argument, the cache key, the
launch-metadata hooks), while the compiled kernel's own C launcher takes ~8 us for the same launch
(``docs/benchmarks.md``, "Eager host time"). A layer's launch is the same on every call but for a few tensors (the
activations, the output, the bias), so after one ordinary launch has compiled and returned the kernel, ``Replay``
keeps the full argument list and calls the launcher directly, swapping in those tensors.

That is only exact for calls that Triton would have specialized the same way. The fixed arguments are fixed; the
swapped tensors must have the dtype, device and 16-byte alignment that they had at the first launch (Triton
specializes pointers on alignment), which the callers check before replaying. The compiled kernel is loaded in
the context of the device that was current at the first launch, so a replay runs only while that device is
current and is the tensors' device (otherwise the caller takes the ordinary path). Triton's launch hooks
(profilers such as proton) are not called on a replay, so there is none while a hook is set. Under the CPU
interpreter there is no compiled kernel and no ``Replay``: the ordinary launch is all there is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton

_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_current_device = getattr(torch._C, "_cuda_getDevice", None)


_runtime_knobs = getattr(getattr(triton, "knobs", None), "runtime", None)


def _hooks_set() -> bool:
    """Whether Triton would call a launch hook (a plain callable, or a ``HookChain`` with calls in it)."""
    if _runtime_knobs is None:  # a Triton without knobs: don't guess how it launches
        return True
    hooks = (_runtime_knobs.launch_enter_hook, _runtime_knobs.launch_exit_hook)
    return any(h is not None and getattr(h, "calls", True) for h in hooks)


class Replay:
    """One compiled launch of a kernel, replayed with new tensors at the positions ``swap`` names.

    Build it with ``Replay.of`` from what an ordinary launch returned; ``None`` when the launch cannot be replayed
    (interpreter, an unknown Triton launcher, a launch hook set, the tensors not on the current device).
    """

    __slots__ = ("_launcher", "_head", "_args", "_swap", "_device")

    def __init__(self, kernel: Any, grid: tuple[int, int, int], args: list[Any], swap: tuple[int, ...],
                 device: int) -> None:
        self._launcher = kernel.run  # the compiled C launcher (a property that loads the module on first use)
        self._head = (*grid, kernel.function, kernel.packed_metadata)
        self._args = args
        self._swap = swap
        self._device = device

    @classmethod
    def of(cls, fn: Any, kernel: Any, grid: Sequence[int], args: Sequence[Any], constexprs: dict[str, Any],
           swap: tuple[int, ...], device: int) -> Replay | None:
        """A replay of ``fn[grid](*args, **constexprs)``, which returned ``kernel``, with tensors on CUDA device
        ``device``.

        ``args`` are the positional arguments (run-time parameters), ``constexprs`` the keyword ones; launch
        options (``num_warps``...) are not parameters and must not be in it. Triton's launcher takes every
        parameter in order, constexprs included (it skips them itself).
        """
        if _current_stream is None or _current_device is None or _hooks_set() or _current_device() != device:
            return None
        if not all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata")):
            return None
        names = list(getattr(fn, "arg_names", ()))
        rest = names[len(args):]
        if len(names) < len(args) or set(rest) != set(constexprs):
            return None
        full = [*args, *(constexprs[n] for n in rest)]
        for i in swap:  # keep no reference to the first call's own tensors (they may live in a CUDA graph's pool)
            full[i] = None
        grid3 = (*grid, 1, 1)[:3]
        return cls(kernel, (int(grid3[0]), int(grid3[1]), int(grid3[2])), full, swap, device)

    def __call__(self, *tensors: torch.Tensor) -> bool:
        """Launch on the current stream with ``tensors`` at the ``swap`` positions (same dtypes, device and
        16-byte alignment as at the first launch: the caller checks); ``False`` (nothing launched) while another
        device is current or a launch hook is set."""
        if _current_device() != self._device or _hooks_set():
            return False
        args = self._args.copy()
        for i, t in zip(self._swap, tensors, strict=True):
            args[i] = t
        g0, g1, g2, function, metadata = self._head
        self._launcher(g0, g1, g2, _current_stream(self._device), function, metadata, None, None, None, *args)
        return True
