"""fp16 cuBLAS vs the shipped decode path (``spqr_kernels.ops.spqr_linear``) vs k3, in one process, on the same
random weights (3-bit, beta1 = beta2 = 16, 3-bit statistics, 1% outliers, act-order), batch 1 and 2, the LLaMA
7B/33B/65B shapes with the fused ones; CUDA graphs with an L2 flush (``spqr_cli.bench.layers.time_cuda``).
Writes ``$OUT/k3_side.json``. On a CPU (``TRITON_INTERPRET=1``) it checks both kernels on one tiny shape instead.

Run from the repository root with ``kernels/`` importable as ``spqr_kernels``:
``python benchmarks/k3_prototype/side_by_side.py``; the H200 result is ``h200_side_by_side.json`` beside it.
"""

import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import k3_decode as k3  # noqa: E402

from spqr_cli.bench.layers import llama_shapes, time_cuda  # noqa: E402
from spqr_kernels.ops import spqr_linear  # noqa: E402
from spqr_kernels.reference import dequantize  # noqa: E402
from spqr_kernels.synthetic import random_packed  # noqa: E402

dev = "cuda" if torch.cuda.is_available() else "cpu"
shapes = llama_shapes(("7B", "33B", "65B"), fused=True) if dev == "cuda" else [("tiny", 48, 64)]
rows = []
for name, n, k in shapes:
    pw = random_packed(n, k, 3, 16, 16, 3, 0.01, device=dev)
    w32 = dequantize(pw).float()
    w16 = w32.half()
    rp = k3.repack(pw)
    for b in (1, 2):
        x = torch.randn(b, k, device=dev, dtype=torch.float16)
        ref = x.float() @ w32.t()
        out = torch.empty(b, n, device=dev, dtype=torch.float16).fill_(float("nan"))

        def err(y: torch.Tensor) -> float:
            return float((y.float() - ref).norm() / ref.norm())

        e_k3, e_ours = err(k3.k3_matvec(x, rp, None, None, out=out)), err(spqr_linear(x, pw))
        if dev == "cpu":
            print(f"{name} B={b}: rel err shipped {e_ours:.1e}, k3 {e_k3:.1e}")
            continue
        t16 = time_cuda(lambda: F.linear(x, w16), 10, 20)
        tq = time_cuda(lambda: spqr_linear(x, pw), 10, 20)
        tk = time_cuda(lambda: k3.k3_matvec(x, rp, None, None, out=out), 10, 20)
        r = dict(name=name, N=n, K=k, batch=b, fp16_us=t16 * 1e3, ours_us=tq * 1e3, k3_us=tk * 1e3,
                 ours_x=t16 / tq, k3_x=t16 / tk, k3_tbs=pw.nbytes() / tk / 1e9, err_ours=e_ours, err_k3=e_k3)
        rows.append(r)
        print(f"{name:22s} B={b} fp16 {r['fp16_us']:6.1f} us, shipped {r['ours_us']:6.1f} ({r['ours_x']:.2f}x), "
              f"k3 {r['k3_us']:6.1f} ({r['k3_x']:.2f}x, {r['k3_tbs']:.2f} TB/s)", flush=True)
    del pw, w32, w16, rp
if rows:
    with open(os.path.join(os.environ.get("OUT", "."), "k3_side.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
