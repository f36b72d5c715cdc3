"""Perplexity table: fp16 vs RTN / GPTQ / SpQR presets on one model, same calibration and test text.

    python benchmarks/accuracy.py ../shared/models/docs-llama-17m --data-dir ../shared/data \
        --presets rtn-4bit-g128 gptq-4bit-perchannel gptq-4bit-g128 gptq-3bit-g128 spqr-3.9bit spqr-4.6bit \
        --json runs/acc17m.json

Calibration: ``--nsamples`` x ``--seqlen`` windows of ``--calib`` (default: the models' own calibration text,
``docs/calib.txt``); test: the first ``--max-windows`` windows of each dataset (the reference tool's protocol).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from spqr_cli.core.calibrate import build_calibration_set
from spqr_cli.core.config import load_preset
from spqr_cli.core.evaluate import evaluate_perplexity, load_any_model
from spqr_cli.format.checkpoint import inspect_packed, pack_model
from spqr_cli.quant.driver import quantize_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--calib", default=None, help="calibration dataset (default file:<data-dir>/docs/calib.txt)")
    ap.add_argument("--datasets", nargs="+", default=None,
                    help="test datasets (default file:<data-dir>/docs/valid.txt and wikitext2)")
    ap.add_argument("--presets", nargs="+", default=["spqr-3.9bit", "spqr-4.6bit"])
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None)
    ap.add_argument("--pack", action="store_true", help="also pack each result and report bits measured on disk")
    args = ap.parse_args()

    calib_name = args.calib or f"file:{args.data_dir}/docs/calib.txt"
    datasets = args.datasets or [f"file:{args.data_dir}/docs/valid.txt", "wikitext2"]

    def ppl(path: str) -> dict[str, float]:
        model, tok = load_any_model(path, "fp16", args.device)
        return {d: evaluate_perplexity(model, tok, d, seqlen=args.seqlen, max_windows=args.max_windows,
                                       data_dir=args.data_dir).perplexity for d in datasets}

    model, tok = load_any_model(args.model, "fp16", "cpu")
    calib = build_calibration_set(tok, calib_name, args.nsamples, args.seqlen, seed=0, data_dir=args.data_dir)
    del model
    rows = [{"method": "fp16", "bits": 16.0, "seconds": 0.0, **ppl(args.model)}]
    print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            out = Path(tmp) / preset
            t = time.perf_counter()
            report = quantize_model(args.model, load_preset(preset), out, calib.input_ids, calib.manifest,
                                    device=args.device)
            row = {"method": preset, "bits": report.avg_bits, "outlier_pct": report.outlier_pct,
                   "seconds": time.perf_counter() - t, **ppl(str(out / "dense"))}
            if args.pack:
                pack_model(out, Path(tmp) / f"{preset}-packed")
                totals = inspect_packed(Path(tmp) / f"{preset}-packed")["totals"]
                row.update(measured_bits=totals["quantized_bits_measured"], packed_mb=totals["disk_bytes"] / 2**20,
                           fp16_mb=totals["fp16_bytes"] / 2**20, checkpoint_bits=totals["bits_per_param"])
            rows.append(row)
            print(rows[-1], flush=True)
    base = rows[0]
    print(f"\n| method | avg bits (formula) | bits on disk | {' | '.join(datasets)} | quantize s |")
    print("|---|---|---|" + "---|" * len(datasets) + "---|")
    for r in rows:
        cells = [f"{r[d]:.3f} ({100 * (r[d] / base[d] - 1):+.2f}%)" for d in datasets]
        disk = f"{r['measured_bits']:.3f}" if "measured_bits" in r else ""
        print(f"| {r['method']} | {r['bits']:.3f} | {disk} | {' | '.join(cells)} | {r['seconds']:.1f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": args.model, "device": args.device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
