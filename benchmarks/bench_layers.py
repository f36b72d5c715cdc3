"""Layer bench from the command line: fp16 cuBLAS vs SpQR kernels on the LLaMA-7B..65B linear shapes.

    python benchmarks/bench_layers.py --json out.json               # the table (spqr_cli.bench.bench_layers)
    python benchmarks/bench_layers.py --sweep decode --json s.json  # tune the decode kernel's launch config
"""

from __future__ import annotations

import argparse
import itertools

import torch
from rich.console import Console

from spqr_cli.bench.layers import bench_layers, llama_shapes, random_packed, render_table, time_cuda
from spqr_cli.bench.peers import parse_peers
from spqr_cli.core.io import write_json


def sweep_decode(shapes, batches, reps: int) -> list[dict]:
    """Time (BW, KW, SPLIT, num_warps) configs of the one-token decode kernel; one row per shape and config."""
    from spqr_kernels.matvec import pick_config, spqr_matvec

    rows = []
    for name, n, k in shapes:
        pw = random_packed(n, k, device="cuda")
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        auto = pick_config(n, k, pw)
        splits = (max(1, auto[2] // 2), auto[2], 2 * auto[2])
        configs = {auto, (64, 8, auto[2], 8)} | {(32, kw, sp, kw) for kw, sp in itertools.product((4, 8, 16), splits)}
        for cfg in sorted(configs):
            ms = time_cuda(lambda x=x, cfg=cfg, pw=pw: spqr_matvec(x, pw, config=cfg), 3, reps)
            rows.append({"name": name, "N": n, "K": k, "batch": 1, "config": cfg, "ms": ms, "auto": cfg == auto,
                         "gbps": pw.nbytes() / ms / 1e6})
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
    p.add_argument("--sweep", choices=("decode",))
    p.add_argument("--peers", default="", help="comma-separated: spqr-quant, gemlite (see spqr_cli.bench.peers)")
    p.add_argument("--json")
    a = p.parse_args()
    shapes = llama_shapes(a.models.split(","))
    batches = [int(b) for b in a.batches.split(",")]
    console = Console(width=160)
    if a.sweep:
        rows = sweep_decode(shapes, batches, a.reps)
        for r in best_per_case(rows):
            auto = next(x for x in rows if x["auto"] and x["name"] == r["name"] and x["batch"] == r["batch"])
            console.print(f"{r['name']:>14} b={r['batch']:<4} best {r['config']} {r['ms']:.4f} ms; "
                          f"auto {auto['config']} {auto['ms']:.4f} ms")
    else:
        rows = bench_layers(shapes, batches, warmup=a.warmup, reps=a.reps, peers=parse_peers(a.peers))
        console.print(render_table(rows))
    if a.json:
        write_json({"sweep": a.sweep, "rows": rows}, a.json)


if __name__ == "__main__":
    main()
