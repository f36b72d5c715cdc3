"""The k5 sweep on a GPU: the fused few-token kernel (default and 11 launch configs at the SWEEP token counts), the
decode kernel (1-8 tokens) and the shipped dense path (dequantize + cuBLAS), each against fp16 cuBLAS in the same
process (CUDA graphs, L2 flushed: ``spqr_cli.bench.layers.time_cuda``); random 3-bit beta16 layers, 1% outliers,
act-order. Writes ``$OUT/k5.jsonl`` (default: the current directory). Run from the repository root with
``kernels/`` importable as ``spqr_kernels`` and this folder on ``PYTHONPATH``; ``SHAPES``, ``TOKENS`` and ``SWEEP``
(comma-separated) narrow it."""

import json
import os
import time
from functools import partial

import gemm
import torch
import torch.nn.functional as F

from spqr_cli.bench.layers import time_cuda
from spqr_kernels import dequantize, matvec, reference
from spqr_kernels.synthetic import random_packed

SHAPES = [("7B qkvo", 4096, 4096), ("7B up", 11008, 4096), ("7B down", 4096, 11008), ("7B qkv", 12288, 4096),
          ("65B qkvo", 8192, 8192), ("65B up", 22016, 8192)]
# (BN, BK, stages, warps, programs per SM / 2): the configs timed besides the default
CONFIGS = [(64, 64, 1, 4, 1), (64, 64, 3, 4, 1), (32, 64, 3, 4, 1), (128, 64, 3, 4, 1), (64, 128, 3, 4, 1),
           (64, 128, 2, 8, 1), (32, 128, 3, 4, 2), (64, 64, 3, 4, 2), (128, 128, 3, 8, 1), (64, 16, 3, 4, 2),
           (32, 32, 3, 4, 2)]


def dense_path(x: torch.Tensor, pw: object) -> torch.Tensor:
    """The shipped many-token path: dequantize + cuBLAS."""
    return torch.matmul(x, dequantize.dequantize_t(pw))


def _ints(name: str, default: str) -> list[int]:
    return [int(t) for t in os.environ.get(name, default).split(",") if t]


def main() -> None:
    out = open(os.path.join(os.environ.get("OUT", "."), "k5.jsonl"), "w")

    def emit(**kw: object) -> None:
        print(json.dumps(kw), flush=True)
        out.write(json.dumps(kw) + "\n")
        out.flush()

    only = os.environ.get("SHAPES")
    shapes = [s for s in SHAPES if not only or s[0] in only.split(",")]
    tokens, sweep = _ints("TOKENS", "1,2,4,8,16,32,64,128,256,2048,4096"), _ints("SWEEP", "4,16,64")
    t_start = time.time()
    for name, n, k in shapes:
        pw = random_packed(n, k, device="cuda")
        gemm.prepare_gemm(pw)
        matvec.prepare_decode(pw)
        dense = reference.dequantize(pw)
        w16 = dense.half()
        emit(shape=name, n=n, k=k, dequant_us=1e3 * time_cuda(partial(dequantize.dequantize_t, pw), reps=20))
        for m in tokens:
            x = torch.randn(m, k, dtype=torch.float16, device="cuda")
            ref = x.float() @ dense.t() if m <= 256 else None
            row = dict(shape=name, tokens=m, fp16_us=1e3 * time_cuda(partial(F.linear, x, w16), reps=20))
            cands = {}
            if m <= 8:
                cands["matvec"] = partial(matvec.spqr_matvec, x, pw)
            if m <= gemm.MAX_TOKENS:
                cands["gemm"] = partial(gemm.spqr_gemm, x, pw)
            cands["dense_new"] = partial(dense_path, x, pw)
            for c, fn in cands.items():
                y = fn()
                if ref is not None:
                    row[c + "_rel"] = round(((y.float() - ref).norm() / ref.norm()).item(), 6)
                row[c + "_us"] = round(1e3 * time_cuda(fn, reps=20), 2)
                row[c + "_x"] = round(row["fp16_us"] / row[c + "_us"], 3) if row[c + "_us"] > 0 else None
            if m in sweep and m <= gemm.MAX_TOKENS:
                base = gemm.pick_config(m, n, k, pw)
                best = None
                for bn, bk, stages, warps, per_sm in CONFIGS:
                    blocks = -(-n // bn) * -(-m // base.bm)
                    split = max(1, min(-(-int(2 * 132 * per_sm) // blocks), -(-k // bk) // 2 or 1))
                    cfg = gemm.Config(base.bm, bn, bk, split, warps, stages)
                    try:
                        y = gemm.spqr_gemm(x, pw, config=cfg)
                        rel = ((y.float() - ref).norm() / ref.norm()).item()
                        us = 1e3 * time_cuda(partial(gemm.spqr_gemm, x, pw, config=cfg), reps=20)
                    except Exception as e:  # noqa: BLE001 (a config the GPU cannot run is reported, not fatal)
                        emit(shape=name, tokens=m, cfg=list(cfg), err=str(e)[:200])
                        continue
                    emit(shape=name, tokens=m, cfg=list(cfg), us=round(us, 2), x=round(row["fp16_us"] / us, 3),
                         rel=round(rel, 6))
                    if best is None or us < best[0]:
                        best = (us, list(cfg))
                if best is not None:
                    row["gemm_best_us"], row["gemm_best_cfg"] = round(best[0], 2), best[1]
                    row["gemm_best_x"] = round(row["fp16_us"] / best[0], 3)
            row["default_cfg"] = list(gemm.pick_config(m, n, k, pw)) if m <= gemm.MAX_TOKENS else None
            emit(**row)
        torch.cuda.empty_cache()
    emit(done=True, seconds=round(time.time() - t_start, 1))


if __name__ == "__main__":
    main()
