import os
import sys
import time

os.environ["TRITON_INTERPRET"]="1"
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gemm

from spqr_kernels import reference
from spqr_kernels.synthetic import random_packed

cases = [(40, 48, 3, 16, 3, True, "edge"), (40, 48, 3, 16, 3, False, "random"), (33, 96, 4, 16, 3, True, "edge"),
 (24, 64, 2, 16, 3, False, "edge"), (30, 64, 5, 16, 16, True, "edge"), (20, 48, 8, 16, 3, False, "random"),
 (40, 256, 3, 128, 16, True, "random"), (40, 48, 4, 48, 16, True, "edge"), (24, 256, 2, 32, 3, False, "random"), (200, 128, 3, 16, 3, True, "random")]
for case in cases:
    n,k,wb,gs,sb,ao,rows = case
    pw = random_packed(n,k,wbits=wb,groupsize=gs,stat_bits=sb,act_order=ao,outlier_rows=rows,seed=1)
    for m, cfg in [(9, None), (33, None), (20, gemm.GemmConfig(16, 8, 2, 1, 4, 1)), (20, gemm.GemmConfig(32, 8, 1, 2, 4, 1))]:
        for dt in (torch.float16,):
            x = torch.randn(m, k, dtype=dt)
            b = torch.randn(n, dtype=dt)
            t=time.time()
            y = gemm.spqr_gemm(x, pw, b, config=cfg)
            ref = reference.linear_reference(x.float(), pw, b.float())
            rel = ((y.float()-ref).norm()/ref.norm()).item()
            print(case, m, cfg, dt, f"rel {rel:.2e}", f"{time.time()-t:.1f}s", flush=True)
            assert rel < (8e-3 if dt==torch.bfloat16 else 2e-3)
