"""Short GPU check of k3 v2 (batch 1, a few shapes, a few UPT values): correctness + CUDA-graph time."""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import bench_decode as bd  # noqa: E402
import k3_decode as k3  # noqa: E402

from spqr_kernels.reference import dequantize  # noqa: E402
from spqr_kernels.synthetic import random_packed  # noqa: E402

T0 = time.time()
bd.time_cuda.flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
shapes = [("7B qkvo", 4096, 4096, 0), ("65B up/gate", 22016, 8192, 1), ("65B down", 8192, 22016, 5),
          ("7B gate+up fused", 22016, 4096, 7), ("7B down", 4096, 11008, 3)]
for name, n, k, seed in shapes:
    if time.time() - T0 > float(os.environ.get("K3_BUDGET_S", "18")):
        break
    pw = random_packed(n, k, device="cuda", seed=seed)
    rp = k3.repack(pw)
    w32 = dequantize(pw)
    for b in [int(v) for v in os.environ.get("K3_B", "1").split(",")]:
        x = torch.randn(b, k, device="cuda", dtype=torch.float16)
        ref = x.float() @ w32.t()
        out = torch.empty(b, n, device="cuda", dtype=torch.float16)
        res = []
        for upt in (None, 4, 8):
            cfg = dict(UPT=upt)
            out.fill_(float("nan"))
            err = bd.rel_err(k3.k3_matvec(x, rp, None, cfg, out=out), ref)
            ms = bd.time_cuda(lambda: k3.k3_matvec(x, rp, None, cfg, out=out))
            res.append(f"U{upt or 'auto'} {ms * 1e3:.1f}us {pw.nbytes() / ms / 1e9:.2f}TB/s err {err:.1e}")
        print(f"[{time.time() - T0:5.1f}s] {name} B={b}: " + " | ".join(res), flush=True)
    del w32, rp, pw
