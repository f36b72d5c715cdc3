"""Kernels II sweep: fused GEMM configs vs fp16 cuBLAS vs dequantize+cuBLAS, per LLaMA shape and token count."""
import json
import os
import sys
import time

import gemm
import torch
import torch.nn.functional as F

from spqr_cli.bench.layers import llama_shapes, time_cuda
from spqr_kernels import dequantize, reference
from spqr_kernels.synthetic import random_packed

OUT = os.environ.get("OUT", "/tmp")
T0 = time.time()
BUDGET = float(os.environ.get("BUDGET", "470"))
log = open(f"{OUT}/sweep.jsonl", "a")

def emit(d):
    print(json.dumps(d), flush=True); log.write(json.dumps(d) + "\n"); log.flush()

# 1. correctness on the GPU, fp16 and bf16, several configs
for (n, k) in [(4096, 4096), (1000, 2048), (12288, 4096)]:
    pw = random_packed(n, k, device="cuda", seed=3)
    for m in (9, 16, 33, 200, 1024):
        for dt in (torch.float16, torch.bfloat16):
            x = torch.randn(m, k, device="cuda", dtype=dt)
            b = torch.randn(n, device="cuda", dtype=dt)
            ref = reference.linear_reference(x.float(), pw, b.float())
            for cfg in (None, gemm.GemmConfig(64, 16, 4, 1, 4, 3), gemm.GemmConfig(128, 32, 2, 2, 8, 3), gemm.GemmConfig(16, 16, 4, 3, 4, 3)):
                y = gemm.spqr_gemm(x, pw, b, config=cfg)
                rel = ((y.float() - ref).norm() / ref.norm()).item()
                emit({"check": [n, k, m, str(dt), str(cfg)], "rel": rel, "ok": rel < (8e-3 if dt == torch.bfloat16 else 2e-3)})

def cands(t):
    if t <= 16:
        return [(16, bw, nt, 4, st) for bw in (8, 16, 32) for nt in (2, 4) for st in (3,)] + [(16, 16, 4, 4, 4), (16, 32, 4, 8, 3)]
    if t <= 64:
        return [(t, bw, nt, 4, 3) for bw in (8, 16, 32) for nt in (2, 4)] + [(t, 32, 4, 8, 3)]
    if t <= 512:
        return [(64, 16, 4, 4, 3), (64, 32, 4, 4, 3), (128, 16, 4, 8, 3), (128, 32, 4, 8, 3), (128, 16, 2, 8, 3),
                (128, 8, 4, 4, 3), (64, 32, 2, 8, 3)]
    return [(128, 16, 4, 8, 3), (128, 32, 4, 8, 3), (128, 32, 2, 8, 4), (256, 16, 4, 8, 3), (128, 16, 4, 4, 3),
            (256, 32, 2, 8, 3)]

shapes = [s for s in llama_shapes(("7B", "65B"), fused=True)]
tokens = [int(t) for t in os.environ.get("TOKENS", "16,64,256,2048,32,128,512,4096").split(",")]
reps = 10
for t in tokens:
    for name, n, k in shapes:
        if time.time() - T0 > BUDGET:
            emit({"stopped": "budget", "at": [name, t]}); sys.exit(0)
        pw = random_packed(n, k, device="cuda")
        w16 = reference.dequantize(pw).half()
        x = torch.randn(t, k, device="cuda", dtype=torch.float16)
        r = {"name": name, "N": n, "K": k, "tokens": t}
        r["fp16_us"] = 1e3 * time_cuda(lambda: F.linear(x, w16), reps=reps)
        r["dense_us"] = 1e3 * time_cuda(lambda: dequantize.spqr_dense_matmul(x, pw), reps=reps)
        auto = gemm.pick_config(t, pw, x.device)
        best = None
        res = {}
        for c in cands(t):
            bm, bw, nt, wa, st = c
            base = gemm.GemmConfig(bm, bw, nt, 1, wa, st)
            tiles = -(-pw.tensors["qweight"].shape[1] // bw) * -(-t // bm)
            steps = k // 16 // nt
            splits = sorted({1, max(1, min(-(-264 // tiles), steps // 4 or 1))})
            for sp in splits:
                cfg = base._replace(split=sp)
                try:
                    us = 1e3 * time_cuda(lambda: gemm.spqr_gemm(x, pw, config=cfg), reps=reps)
                except Exception as e:  # noqa
                    res[str(tuple(cfg))] = f"ERR {type(e).__name__}: {str(e)[:120]}"
                    continue
                res[str(tuple(cfg))] = round(us, 2)
                if best is None or us < best[0]:
                    best = (us, tuple(cfg))
        r["auto_cfg"] = tuple(auto)
        r["auto_us"] = 1e3 * time_cuda(lambda: gemm.spqr_gemm(x, pw), reps=reps)
        r["best_us"], r["best_cfg"] = best
        r["best_vs_fp16"] = r["fp16_us"] / best[0]
        r["dense_vs_fp16"] = r["fp16_us"] / r["dense_us"]
        r["all"] = res
        # parts at the best config: the permutation gather and the epilogue alone
        xp = gemm.permuted_activations(x, pw)
        r["perm_us"] = 1e3 * time_cuda(lambda: gemm.permuted_activations(x, pw), reps=reps)
        from outlier_epilogue import permuted_outliers, run_epilogue
        yb = torch.empty(t, n, device="cuda", dtype=torch.float16)
        r["epi_us"] = 1e3 * time_cuda(lambda: run_epilogue(yb, yb, xp, permuted_outliers(pw), None), reps=reps)
        emit(r)
        del pw, w16
        torch.cuda.empty_cache()
