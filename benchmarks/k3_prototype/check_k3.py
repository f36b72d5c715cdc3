"""CPU (TRITON_INTERPRET=1) or GPU correctness check of k3_decode against the fp32 dense reference."""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import k3_decode as k3  # noqa: E402

from spqr_kernels.reference import dequantize  # noqa: E402
from spqr_kernels.synthetic import random_packed  # noqa: E402

dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
worst = 0.0
cases = [  # n, k, act_order, outlier_rows, batch, cfg
    (48, 64, True, "random", 1, dict(TB=1, PF=False, KW=1, SPLIT=1)),
    (48, 64, True, "random", 1, dict(TB=1, PF=True, KW=2, SPLIT=2)),
    (40, 96, False, "edge", 3, dict(TB=2, PF=True, KW=2, SPLIT=2)),
    (40, 96, True, "edge", 3, dict(TB=4, PF=False, KW=2, SPLIT=1)),
    (600, 160, True, "random", 2, dict(TB=2, PF=False, KW=1, SPLIT=3)),
    (600, 160, True, "random", 5, dict(TB=4, PF=True, KW=2, SPLIT=3)),
    (64, 48, True, "edge", 1, dict(TB=1, PF=True, KW=4, SPLIT=1)),
    (1040, 64, True, "edge", 1, dict(TB=1, PF=True, KW=2)),
    (48, 80, True, "random", 3, dict(TB=2, PF=False, KW=1, UPT=1)),
]
if len(sys.argv) > 1:
    cases = cases[: int(sys.argv[1])]
for n, kk, ao, orows, b, cfg in cases:
    t0 = time.time()
    pw = random_packed(n, kk, act_order=ao, outlier_rows=orows, seed=n + kk + b, device=dev)
    rp = k3.repack(pw)
    w = dequantize(pw)
    for has_bias in (False, True):
        x = torch.randn(b, kk, device=dev).half()
        bias = torch.randn(n, device=dev).half() if has_bias else None
        ref = x.float() @ w.t()
        if has_bias:
            ref += bias.float()
        out = torch.full((b, n), float("nan"), device=dev, dtype=torch.float16)
        for rep in range(2):  # twice: the scratch must be back at zero
            out.fill_(float("nan"))
            y = k3.k3_matvec(x, rp, bias, cfg, out=out)
            err = ((y.float() - ref).norm() / ref.norm()).item()
            ok = bool(torch.isfinite(y).all()) and err < 2e-3
            worst = max(worst, err if ok else float("inf"))
            print(f"n={n} k={kk} perm={ao} {orows} b={b} bias={has_bias} cfg={cfg} rep={rep}: "
                  f"rel_err={err:.2e} {'OK' if ok else 'FAIL'} ({time.time() - t0:.1f}s)", flush=True)
print("bits/weight of runtime layout (last):", round(k3.runtime_bits(rp), 3))
print("WORST", worst)
