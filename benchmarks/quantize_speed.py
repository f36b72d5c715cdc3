"""Per-layer quantization speed on one GPU: ours (the column loop replayed as CUDA graphs, and eager) vs the SpQR
authors' engine, on the seven linear layers of one LLaMA-shaped block with the same weights and Hessians.

    python benchmarks/quantize_speed.py --shape 7b --authors DIR --out results.json

``DIR`` holds ``spqr_engine.py``, ``quant_groups.py`` and ``weight_permutation.py`` of github.com/Vahe1994/SpQR
(not part of this repository); without it only our two paths run. Weights are random N(0, 0.02); each input
kind (q/k/v, o, gate/up, down) gets a Hessian ``2/n Σ x xᵀ`` of ``--tokens`` random activations with per-feature
scales spread over ~2 decades (so act-order and outliers have work to do), accumulated with our
``HessianAccumulator`` (its time is reported: the part of a block's quantization that is not the column loop,
besides the forwards). The preset's parameters are mapped onto the authors' ``SPQRUtil.quantize`` arguments.

Checks, per layer: our graph-replayed record equals the eager one bit for bit; the Hessian-weighted relative
error ``tr(E H Eᵀ) / tr(W H Wᵀ)`` (``E = W - Q``) of ours and of theirs, to show both solve the same problem.
Speed and memory figures are for a random-weight model: never an accuracy claim.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_random_llama import SHAPES  # noqa: E402

from spqr_cli.core.config import load_preset  # noqa: E402
from spqr_cli.quant.hessian import HessianAccumulator  # noqa: E402
from spqr_cli.quant.methods.spqr import quantize_obs  # noqa: E402


# (layer, input kind, rows, columns) of a LLaMA block, in the driver's order
def block_layers(hidden: int, inter: int, kv: int) -> list[tuple[str, str, int, int]]:
    return [("q_proj", "attn_in", hidden, hidden), ("k_proj", "attn_in", kv, hidden),
            ("v_proj", "attn_in", kv, hidden), ("o_proj", "attn_out", hidden, hidden),
            ("gate_proj", "mlp_in", inter, hidden), ("up_proj", "mlp_in", inter, hidden),
            ("down_proj", "mlp_out", hidden, inter)]


def timed(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` and its wall seconds, the GPU synchronized before and after."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def random_hessian(k: int, tokens: int, gen: torch.Generator, chunk: int = 8192) -> tuple[torch.Tensor, float]:
    """A Hessian of ``tokens`` random activations with per-feature scales; and the seconds accumulating it."""
    scale = torch.exp(torch.randn(k, generator=gen, device="cuda"))
    acc = HessianAccumulator(k, "cuda")
    seconds = 0.0
    for t0 in range(0, tokens, chunk):
        x = (torch.randn(min(chunk, tokens - t0), k, generator=gen, device="cuda") * scale).half()
        seconds += timed(acc.add_batch, x)[1]
    return acc.hessian, seconds


def relative_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    e = (w.float() - q.float())
    return float(((e @ h) * e).sum() / ((w.float() @ h) * w.float()).sum())


def authors_quantize(engine, w: torch.Tensor, h: torch.Tensor, tokens: int, cfg) -> torch.Tensor:
    """The authors' ``SPQRUtil.quantize`` with ``cfg``'s parameters; returns its dequantized weight."""
    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="cuda", dtype=w.dtype)
    layer.weight.data.copy_(w)
    util = engine.SPQRUtil(layer)
    util.H, util.nsamples = h.clone(), tokens
    res = util.quantize(bits=cfg.wbits, blocksize=cfg.blocksize, percdamp=cfg.percdamp, groupsize=cfg.groupsize,
                        outlier_relative_threshold=cfg.outlier_threshold, permutation_order=cfg.perm,
                        simplified_outliers=False, verbose=False, perchannel=True, sym=cfg.sym,
                        qq_scale_bits=cfg.stat_bits, qq_zero_bits=cfg.stat_bits, qq_groupsize=cfg.beta2,
                        round_zero=False, qq_zero_sym=False, keep_H=False)
    return res.weight


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--tokens", type=int, default=128 * 2048, help="calibration tokens per Hessian")
    ap.add_argument("--preset", default="spqr-3.9bit")
    ap.add_argument("--layers", default="", help="comma-separated subset of the block's layers (default: all)")
    ap.add_argument("--authors", type=Path, help="directory with the authors' spqr_engine.py and its modules")
    ap.add_argument("--no-eager", action="store_true", help="skip our eager path (slow)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    cfg = load_preset(args.preset)
    hidden, inter, heads, kv_heads = SHAPES[args.shape]
    kv = hidden // heads * kv_heads
    engine = None
    if args.authors:
        sys.path.insert(0, str(args.authors))
        import spqr_engine as engine  # noqa: PLC0415
    gen = torch.Generator("cuda").manual_seed(0)
    wanted = set(filter(None, args.layers.split(",")))
    hessians: dict[str, tuple[torch.Tensor, float]] = {}
    rows = []
    print(f"{torch.cuda.get_device_name()} · {args.shape} block · {args.preset} · {args.tokens} tokens per Hessian")
    for name, kind, n, k in block_layers(hidden, inter, kv):
        if wanted and name not in wanted:
            continue
        if kind not in hessians:
            hessians[kind] = random_hessian(k, args.tokens, gen)
        h, h_seconds = hessians[kind]
        w = (torch.randn(n, k, generator=gen, device="cuda") * 0.02).half()
        row = {"layer": name, "shape": [n, k], "hessian_s": h_seconds}
        rec, row["ours_graph_s"] = timed(quantize_obs, w, h, cfg, outliers=cfg.has_outliers,
                                         holds_zero=False)
        row["ours_err"] = relative_error(w, rec.dequantize().cuda(), h)
        row["outlier_pct"] = 100 * rec.outlier_fraction
        if not args.no_eager:
            eager, row["ours_eager_s"] = timed(quantize_obs, w, h, cfg, outliers=cfg.has_outliers,
                                                   holds_zero=False, graphs=False)
            row["graph_equals_eager"] = all(
                torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                for a, b in ((getattr(rec, f.name), getattr(eager, f.name)) for f in dataclasses.fields(rec)))
        if engine is not None:
            q, row["authors_s"] = timed(authors_quantize, engine, w, h, args.tokens, cfg)
            row["authors_err"] = relative_error(w, q, h)
        rows.append(row)
        print(json.dumps(row), flush=True)

    total = {key: sum(r.get(key, 0.0) for r in rows) for key in ("ours_graph_s", "ours_eager_s", "authors_s")}
    total["hessian_s"] = sum(s for _, s in hessians.values())
    summary = {"device": torch.cuda.get_device_name(), "shape": args.shape, "preset": args.preset,
               "tokens": args.tokens, "layers": rows, "total": total, "torch": torch.__version__}
    if total["authors_s"]:
        summary["speedup_vs_authors"] = total["authors_s"] / total["ours_graph_s"]
    print(json.dumps(total), flush=True)
    if "speedup_vs_authors" in summary:
        print(f"column loop, all layers: ours {total['ours_graph_s']:.1f} s vs authors {total['authors_s']:.1f} s "
              f"= {summary['speedup_vs_authors']:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
