"""Where one eager batch-1 call of a packed layer spends its host time (needs a CUDA GPU).

Times, each on its own, the pieces of a call: fp16 ``F.linear`` and ``torch.empty`` for scale, an ``SpQRLinear``
module call (which replays its compiled launch after the first call, ``kernels/launch.py``), ``spqr_matvec`` (the
ordinary path the replay skips: checks, a Triton launch, and a fresh replay recorded on every call), the ordinary
Triton launch ``_matvec_kernel[grid](...)`` with the layer's cached arguments, and the same launch
through the compiled kernel's own C launcher. Host time = CPU time of ``--calls`` back-to-back calls after a
synchronize, median of ``--rounds`` (the GPU queue absorbs the launches, so this is what the Python thread pays).
The figures in docs/benchmarks.md section 8 ("Where an eager call's host time went") are this probe's rows, run on
the H200 machine before the replay existed (the module and ``spqr_matvec`` rows then took the ordinary launch).

    python benchmarks/eager_host_probe.py --shape 4096x4096
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from spqr_cli.runtime.linear import SpQRLinear
from spqr_kernels import matvec
from spqr_kernels.dequant import ONE_BITS
from spqr_kernels.synthetic import random_packed


def host_us(fn: Callable[[], object], calls: int, rounds: int) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4096x4096", help="N x K of the layer")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args()
    n, k = (int(v) for v in a.shape.split("x"))
    dev = "cuda"
    layer = SpQRLinear(random_packed(n, k, device=dev))
    x = torch.randn(1, k, device=dev, dtype=torch.float16)
    w = torch.randn(n, k, device=dev, dtype=torch.float16)
    out = torch.empty(1, n, device=dev, dtype=torch.float16)
    plan = matvec._launch(layer.packed, 1, False, None)
    args = [x, *plan.weights, plan.weights[1], *plan.scratch, out, *plan.ints, ONE_BITS]
    constexprs = dict(plan.meta, HAS_BIAS=False)
    warps = constexprs.pop("num_warps")

    def jit_launch() -> object:
        return matvec._matvec_kernel[plan.grid](*args, **constexprs, num_warps=warps)

    compiled = jit_launch()
    names = matvec._matvec_kernel.arg_names
    every = args + [constexprs[name] for name in names[len(args):]]  # the launcher takes constexprs too
    stream = torch._C._cuda_getCurrentRawStream

    def launcher() -> None:
        compiled.run(*plan.grid, stream(0), compiled.function, compiled.packed_metadata, None, None, None, *every)

    rows = {
        "F.linear (fp16)": lambda: F.linear(x, w),
        "torch.empty": lambda: torch.empty(1, n, device=dev, dtype=torch.float16),
        "SpQRLinear": lambda: layer(x),
        "spqr_matvec": lambda: matvec.spqr_matvec(x, layer.packed),
        "kernel[grid](...)": jit_launch,
        "compiled launcher": launcher,
    }
    print(f"{torch.cuda.get_device_name()}, {n}x{k}, batch 1, host us per call (median of {a.rounds} x {a.calls})")
    for name, fn in rows.items():
        print(f"  {name:18s} {host_us(fn, a.calls, a.rounds):7.1f}")


if __name__ == "__main__":
    main()
