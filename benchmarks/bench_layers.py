"""Layer bench from the command line: fp16 cuBLAS vs SpQR kernels on the LLaMA-7B..65B linear shapes.

    python benchmarks/bench_layers.py --json out.json               # the table (spqr_cli.bench.bench_layers)
    python benchmarks/bench_layers.py --sweep decode --json s.json  # tune the decode kernel's launch config
    python benchmarks/bench_layers.py --sweep prefill --json s.json # tune the tensor-core kernel's tiles
"""

from __future__ import annotations

import argparse
import itertools

import torch
from rich.console import Console

from spqr_cli.bench import bench_layers, llama_shapes, random_packed, render_table, time_cuda, write_json


def sweep_decode(shapes, batches, reps: int) -> list[dict]:
    """Time every (BLOCK_N, num_warps, split) of the decode kernel; one row per shape, batch and config."""
    from spqr_kernels.matvec import spqr_matvec

    rows = []
    for name, n, k in shapes:
        pw = random_packed(n, k)
        for b in batches:
            x = torch.randn(b, k, device="cuda", dtype=torch.float16)
            for block_n, warps, split in itertools.product((128, 256, 512), (2, 4, 8), (1, 2, 4, 8, 16, 32)):
                if block_n // (32 * warps) < 1 or block_n // (32 * warps) > 8:
                    continue
                cfg = (block_n, warps, split)
                ms = time_cuda(lambda x=x, cfg=cfg, pw=pw: spqr_matvec(x, pw, config=cfg), 3, reps)
                rows.append({"name": name, "N": n, "K": k, "batch": b, "config": cfg, "ms": ms,
                             "gbps": pw.nbytes() / ms / 1e6})
        del pw
    return rows


def sweep_prefill(shapes, batches, reps: int) -> list[dict]:
    """Time (BLOCK_M, BLOCK_N, num_warps, num_stages) of the tensor-core kernel."""
    from spqr_kernels.matmul import spqr_matmul

    configs = [(128, 128, 8, 3), (128, 128, 4, 3), (64, 128, 4, 4), (128, 64, 4, 4), (128, 256, 8, 3),
               (64, 64, 4, 4), (16, 64, 4, 3), (16, 128, 4, 3), (32, 128, 4, 3)]
    rows = []
    for name, n, k in shapes:
        pw = random_packed(n, k)
        for b in batches:
            x = torch.randn(b, k, device="cuda", dtype=torch.float16)
            for cfg in configs:
                if cfg[0] > 2 * max(b, 16) or (b > 64 and cfg[0] < 64):
                    continue
                ms = time_cuda(lambda x=x, cfg=cfg, pw=pw: spqr_matmul(x, pw, config=cfg), 3, reps)
                rows.append({"name": name, "N": n, "K": k, "batch": b, "config": cfg, "ms": ms})
        del pw
    return rows


def best_per_case(rows: list[dict]) -> list[dict]:
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["name"], r["batch"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    return list(best.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="7B,13B,33B,65B")
    p.add_argument("--batches", default="1,4,16,256")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--sweep", choices=("decode", "prefill"))
    p.add_argument("--json")
    a = p.parse_args()
    shapes = llama_shapes(a.models.split(","))
    batches = [int(b) for b in a.batches.split(",")]
    console = Console(width=160)
    if a.sweep:
        fn = sweep_decode if a.sweep == "decode" else sweep_prefill
        rows = fn(shapes, batches, a.reps)
        for r in best_per_case(rows):
            console.print(f"{r['name']:>14} b={r['batch']:<4} best {r['config']} {r['ms']:.4f} ms")
    else:
        rows = bench_layers(shapes, batches, warmup=a.warmup, reps=a.reps)
        console.print(render_table(rows))
    if a.json:
        write_json(rows, a.json, {"sweep": a.sweep})


if __name__ == "__main__":
    main()
