"""CPU correctness of the k4 fused GEMM under TRITON_INTERPRET=1 against the fp32 reference (and of the tile layout
against the on-disk decode): fp16 and bf16, 2/3/4/8-bit codes, fp16 and 3-bit statistics, outlier corner rows."""
import time

import gemm
import tiles
import torch

from spqr_kernels import decode, reference
from spqr_kernels.synthetic import random_packed

torch.manual_seed(0)
for (n,k,wb,gs,sb,m) in [(96,128,3,16,3,5),(64,256,4,32,16,19),(40,512,3,16,3,9),(50,128,2,16,3,3),(64,128,8,16,3,7)]:
    pw = random_packed(n,k,wbits=wb,groupsize=gs,stat_bits=sb,seed=1, outlier_rows="edge")
    t = tiles.build_tiles(pw)
    a = tiles.dequantize_tiles(t); b = decode.dequantize_permuted(pw).t()
    print("tiles rel", ((a-b).norm()/b.norm()).item())
    for dt in (torch.float16, torch.bfloat16):
        x = torch.randn(m,k,dtype=dt); bias=torch.randn(n,dtype=dt)
        ref = reference.linear_reference(x.float(), pw, bias.float())
        for cfg in (None, gemm.GemmConfig(16,32,128,1,4,2), gemm.GemmConfig(32,16,128,1,4,2)):
          for gb in (0, 64):
            t0=time.time(); y = gemm.spqr_gemm(x, pw, bias, config=cfg, gather_below=gb)
            print(n,k,wb,gs,sb,m,dt,cfg, f"rel {((y.float()-ref).norm()/ref.norm()).item():.2e}", "%.1fs"%(time.time()-t0))
