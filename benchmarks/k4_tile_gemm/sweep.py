"""Kernels II, fourth attempt ("k4"): the tile-layout fused GEMM vs fp16 cuBLAS vs dequantize+cuBLAS, per LLaMA shape and
token count, plus a GPU correctness check (fp16, bf16). Writes $OUT/g1.jsonl; stops at $BUDGET seconds."""
import json
import os
import sys
import time

import gemm
import torch
import torch.nn.functional as F
from outlier_epilogue import add_outliers

from spqr_cli.bench.layers import time_cuda
from spqr_kernels import dequantize, reference
from spqr_kernels.synthetic import random_packed

OUT = os.environ["OUT"]; T0 = time.time(); BUDGET = float(os.environ.get("BUDGET", "300"))
log = open(f"{OUT}/g1.jsonl", "a")
def emit(d):
    print(json.dumps(d), flush=True); log.write(json.dumps(d) + "\n"); log.flush()
C = gemm.GemmConfig
for (n, k) in [(4096, 4096), (1000, 2048)]:
    pw = random_packed(n, k, device="cuda", seed=3)
    for m in (2, 16, 200, 1024):
        for dt in (torch.float16, torch.bfloat16):
            x = torch.randn(m, k, device="cuda", dtype=dt); b = torch.randn(n, device="cuda", dtype=dt)
            ref = reference.linear_reference(x.float(), pw, b.float())
            for cfg in (None, C(64, 128, 128, 1, 4, 3), C(128, 128, 128, 2, 8, 3), C(16, 64, 256, 4, 4, 4)):
                y = gemm.spqr_gemm(x, pw, b, config=cfg)
                rel = ((y.float() - ref).norm() / ref.norm()).item()
                emit({"check": [n, k, m, str(dt)[6:], cfg and list(cfg)], "rel": round(rel, 6), "ok": rel < (8e-3 if dt == torch.bfloat16 else 2e-3)})
def cands(t, k):
    if t <= 16:
        return [C(16, bn, bk, 0, 4, st) for bn in (32, 64, 128) for bk in (128, 256) for st in (3, 4)]
    if t <= 64:
        return [C(bm, bn, 128, 0, 4, 3) for bm in (32, 64) for bn in (64, 128)]
    if t <= 512:
        return [C(64, 128, 128, 0, 4, 3), C(128, 128, 128, 0, 8, 3), C(128, 128, 128, 0, 4, 3), C(64, 256, 128, 0, 8, 3)]
    return [C(128, 128, 128, 0, 8, 3), C(128, 256, 128, 0, 8, 3), C(256, 128, 128, 0, 8, 3), C(128, 128, 128, 0, 4, 4)]
def autosplit(cfg, m, n, k):
    s = 1; blocks = -(-m // cfg.bm) * -(-n // cfg.bn)
    while blocks * s * 2 <= 264 and k % (s * 2 * cfg.bk) == 0: s *= 2
    return cfg._replace(split_k=s)
shapes = [("7B qkvo", 4096, 4096), ("7B up", 11008, 4096), ("7B down", 4096, 11008), ("65B qkvo", 8192, 8192), ("7B qkv", 12288, 4096)]
tokens = [int(t) for t in os.environ.get("TOKENS", "16,2,256,2048,64").split(",")]
for t in tokens:
    for name, n, k in shapes:
        if time.time() - T0 > BUDGET:
            emit({"stopped": "budget", "at": [name, t]}); sys.exit(0)
        pw = random_packed(n, k, device="cuda")
        w16 = reference.dequantize(pw).half()
        x = torch.randn(t, k, device="cuda", dtype=torch.float16)
        r = {"name": name, "tokens": t}
        r["fp16"] = 1e3 * time_cuda(lambda: F.linear(x, w16), reps=10)
        r["dense"] = 1e3 * time_cuda(lambda: dequantize.spqr_dense_matmul(x, pw), reps=10)
        r["auto"] = 1e3 * time_cuda(lambda: gemm.spqr_gemm(x, pw), reps=10)
        pw0 = random_packed(n, k, device="cuda", outlier_fraction=0.0)
        r["noout"] = 1e3 * time_cuda(lambda: gemm.spqr_gemm(x, pw0), reps=10)
        acc = torch.zeros(t, n, device="cuda")
        r["epi"] = 1e3 * time_cuda(lambda: add_outliers(acc, x, pw, None, torch.float16), reps=10)
        best = None
        for cfg in cands(t, k):
            cfg = autosplit(cfg, t, n, k)
            try:
                us = 1e3 * time_cuda(lambda: gemm.spqr_gemm(x, pw, config=cfg), reps=10)
            except Exception as e:
                emit({"err": str(e)[:200], "cfg": list(cfg)}); continue
            if best is None or us < best[0]: best = (us, list(cfg))
        r["best"], r["best_cfg"] = best
        r = {kk: (round(v, 1) if isinstance(v, float) else v) for kk, v in r.items()}
        r["x_auto"] = round(r["fp16"] / r["auto"], 2); r["x_best"] = round(r["fp16"] / r["best"], 2); r["x_dense"] = round(r["fp16"] / r["dense"], 2); r["x_noout"] = round(r["fp16"] / r["noout"], 2)
        emit(r)
