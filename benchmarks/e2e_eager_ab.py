"""Eager decode (no CUDA graph, no compile: plain ``model(...)`` per token, as ``model.generate`` and lm-eval run)
of a packed and an fp16 random-weight LLaMA-shaped model, interleaved in one process.

The host of the GPU machine is noisy (the same loop differs ~2x between runs), so ``spqr bench --part e2e``, which
builds and times one model after the other, cannot settle a ratio near 1. Here both models stay on the GPU and
are timed in alternating rounds; the ratio is the median of the per-round ratios.

    python benchmarks/e2e_eager_ab.py --model 7B --rounds 5 --json eager_ab.json
"""

from __future__ import annotations

import argparse
import statistics

import torch

from spqr_cli.bench.e2e import decode_speed, random_model
from spqr_cli.core.io import write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="7B", help="LLaMA size (3B, 7B, 13B, 33B, 65B)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=32, help="new tokens per timing")
    p.add_argument("--json")
    a = p.parse_args()
    models = {"fp16": random_model(a.model, packed=False), "spqr": random_model(a.model, packed=True)}
    for m in models.values():
        decode_speed(m, 4, graph=False)  # warm-up: kernels compiled, per-layer launches kept
    rows = []
    for r in range(a.rounds):
        for name, m in models.items():
            rows.append({"round": r, "model": name, "tok_s": decode_speed(m, a.tokens, graph=False)})
            print(f"round {r} {name}: {rows[-1]['tok_s']:.1f} tok/s", flush=True)
    speed = {name: statistics.median(x["tok_s"] for x in rows if x["model"] == name) for name in models}
    ratios = [rows[2 * r + 1]["tok_s"] / rows[2 * r]["tok_s"] for r in range(a.rounds)]
    print(f"{a.model} eager decode: fp16 {speed['fp16']:.1f} tok/s, spqr {speed['spqr']:.1f} tok/s; spqr/fp16 per "
          f"round {', '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.2f}x)")
    if a.json:
        write_json({"env": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}, "model": a.model,
                    "rows": rows, "median_tok_s": speed, "ratio_median": statistics.median(ratios)}, a.json)


if __name__ == "__main__":
    main()
