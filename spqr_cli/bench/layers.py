"""Layer speed benchmark: fp16 ``F.linear`` (cuBLAS) vs the SpQR Triton kernels, side by side in one process.

Timing method (``time_cuda``): ``reps`` calls, each after an L2 flush (so weights come from device memory as in
a real model), captured in a CUDA graph and replayed, minus the same graph without the calls: GPU time per call,
with the Python launch overhead of both cuBLAS and Triton removed.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from spqr_kernels.synthetic import random_packed

# (hidden, intermediate) of the LLaMA sizes; 3B is OpenLLaMA-3B (the LLaMA architecture at 3B, multi-head attention)
LLAMA_DIMS = {"3B": (3200, 8640), "7B": (4096, 11008), "13B": (5120, 13824), "33B": (6656, 17920), "65B": (8192, 22016)}


def llama_shapes(models: Iterable[str] = ("3B", "7B", "13B", "33B", "65B"),
                 fused: bool = False) -> list[tuple[str, int, int]]:
    """``(name, N, K)`` of the distinct linear shapes per model: q/k/v/o (h->h), up/gate (h->i), down (i->h);
    with ``fused`` also q+k+v and gate+up as one layer (3h x h, 2i x h: what ``siblings.fuse_siblings`` runs)."""
    out = []
    for m in models:
        h, i = LLAMA_DIMS[m]
        out += [(f"{m} qkvo", h, h), (f"{m} up/gate", i, h), (f"{m} down", h, i)]
        if fused:
            out += [(f"{m} qkv fused", 3 * h, h), (f"{m} gate+up fused", 2 * i, h)]
    return out


def time_cuda(fn: Callable[[], object], warmup: int = 10, reps: int = 50) -> float:
    """Milliseconds of GPU time per call of ``fn``, weights coming from device memory (not L2).

    ``reps`` calls, each preceded by an L2 flush (a 256 MB buffer is zeroed), are captured in one CUDA graph and
    replayed; a graph of the flushes alone is timed the same way and subtracted. Graph replay removes the
    Python/launch overhead from both sides (cuBLAS and Triton alike), so the ratio compares GPU work only.
    """
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()

    def graph_ms(with_fn: bool) -> float:
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # allocations made inside the capture come from the graph's pool
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(g):
            for _ in range(reps):
                flush.zero_()
                if with_fn:
                    fn()
        times = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    return max(graph_ms(True) - graph_ms(False), 0.0) / reps


def time_eager(fn: Callable[[], object]) -> tuple[float, float]:
    """``(ms, host_us)`` of ``fn`` run eagerly, as plain user code runs it (no CUDA graph).

    ``ms``: median time per call with Triton's ``do_bench`` (L2 cleared before each call), launch overhead
    included. ``host_us``: CPU time to issue one call, from 100 back-to-back calls after a synchronize (the GPU
    queue absorbs them, so this is the Python + launch cost alone; when it exceeds the GPU time, the layer is
    host-bound in eager mode); the median of 5 such rounds, since a shared host's timings vary between rounds.
    """
    import time

    import triton.testing

    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    calls, rounds = 100, []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
    torch.cuda.synchronize()
    return ms, statistics.median(rounds)


def bench_layers(
    shapes: Sequence[tuple[str, int, int]] | None = None,
    batches: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048, 4096),
    wbits: int = 3, groupsize: int = 16, beta2: int = 16, stat_bits: int = 3, outlier_fraction: float = 0.01,
    warmup: int = 10, reps: int = 50, dtype: torch.dtype = torch.float16, peers: Sequence[str] = (),
) -> list[dict]:
    """Time fp16 cuBLAS and ``spqr_linear`` (and the ``peers``, see ``bench_peers``) per shape and batch.

    One dict per (shape, batch). Keys: name, N, K, batch, fp16_ms, spqr_ms, speedup (CUDA-graph GPU time),
    fp16_gbps (fp16 weight bytes / time), spqr_gbps (packed bytes / time), packed_mb, bits_per_param (packed
    bytes * 8 / N*K), rel_err (vs fp32 on the same inputs), the eager columns of ``time_eager`` (fp16 ``F.linear``
    vs an ``SpQRLinear`` module, the path plain ``model.generate`` takes): fp16_eager_ms, spqr_eager_ms,
    eager_speedup, fp16_host_us, spqr_host_us; and ``peers``: ``{name: {ms, speedup, gbps, bits_per_param,
    rel_err}}`` for each peer that runs this batch as one call.
    """
    from spqr_cli.bench.peers import build_peer, runs_batch
    from spqr_cli.runtime.linear import SpQRLinear
    from spqr_kernels.ops import spqr_linear
    from spqr_kernels.reference import dequantize

    if not torch.cuda.is_available():
        raise RuntimeError("bench_layers needs a CUDA GPU")
    rows = []
    for name, n, k in shapes or llama_shapes():
        pw = random_packed(n, k, wbits, groupsize, beta2, stat_bits, outlier_fraction, device="cuda")
        w16 = dequantize(pw).to(dtype)
        packed = pw.nbytes()
        built = [build_peer(p, pw) for p in peers if any(runs_batch(p, b) for b in batches)]
        layer = SpQRLinear(pw)
        for b in batches:
            x = torch.randn(b, k, device="cuda", dtype=dtype)
            t16 = _resolved(time_cuda(lambda x=x, w=w16: F.linear(x, w), warmup, reps))
            tq = _resolved(time_cuda(lambda x=x, pw=pw: spqr_linear(x, pw), warmup, reps))
            row = {
                "name": name, "N": n, "K": k, "batch": b, "fp16_ms": t16, "spqr_ms": tq, "speedup": t16 / tq,
                "fp16_gbps": n * k * 2 / t16 / 1e6, "spqr_gbps": packed / tq / 1e6, "packed_mb": packed / 1e6,
                "bits_per_param": packed * 8 / (n * k), "rel_err": _rel_err(spqr_linear(x, pw), x, w16), "peers": {},
            }
            e16, h16 = time_eager(lambda x=x, w=w16: F.linear(x, w))
            eq, hq = time_eager(lambda x=x, m=layer: m(x))
            row.update(fp16_eager_ms=e16, spqr_eager_ms=eq, eager_speedup=e16 / eq, fp16_host_us=h16,
                       spqr_host_us=hq)
            for peer in built:
                if not runs_batch(peer.name, b):
                    continue
                tp = _resolved(time_cuda(lambda x=x, f=peer.fn: f(x), warmup, reps))
                row["peers"][peer.name] = {"ms": tp, "speedup": t16 / tp, "gbps": peer.nbytes / tp / 1e6,
                                           "bits_per_param": peer.nbytes * 8 / (n * k),
                                           "rel_err": _rel_err(peer.fn(x), x, peer.dense)}
            rows.append(row)
        del w16, pw, built, layer
        torch.cuda.empty_cache()
    return rows


def _resolved(ms: float) -> float:
    """``ms``, or NaN when it is below what the graph timing resolves (it reads 0): ratios then show ``nan``
    instead of a division by zero or an absurd speedup (use more ``--reps`` or a larger shape)."""
    return ms if ms > 0 else float("nan")


def _rel_err(y: torch.Tensor, x: torch.Tensor, dense: torch.Tensor) -> float:
    """Relative error of ``y`` against ``x @ dense^T`` computed in fp32 (the dequantize-then-matmul reference)."""
    ref = x.float() @ dense.float().t()
    return ((y.float().reshape(ref.shape) - ref).norm() / ref.norm()).item()


def render_table(rows: Sequence[dict], title: str = "SpQR layer bench") -> object:
    """A rich ``Table`` of ``bench_layers`` rows."""
    from rich.table import Table

    table = Table(title=title)
    peers = list(dict.fromkeys(p for r in rows for p in r.get("peers", {})))
    eager = any("spqr_eager_ms" in r for r in rows)
    cols = ["layer", "N x K", "batch", "fp16 ms", "spqr ms", "speedup", "fp16 GB/s", "spqr GB/s", "bits", "err"]
    if eager:
        cols += ["eager fp16 ms", "eager spqr ms", "eager speedup", "host us fp16/spqr"]
    for col in cols:
        table.add_column(col, justify="right")
    for p in peers:
        table.add_column(f"{p} ms", justify="right")
        table.add_column(f"{p} vs fp16", justify="right")
    for r in rows:
        cells = [r["name"], f"{r['N']}x{r['K']}", str(r["batch"]), f"{r['fp16_ms']:.4f}", f"{r['spqr_ms']:.4f}",
                 f"{r['speedup']:.2f}x", f"{r['fp16_gbps']:.0f}", f"{r['spqr_gbps']:.0f}",
                 f"{r['bits_per_param']:.2f}", f"{r['rel_err']:.1e}"]
        if eager:
            cells += [f"{r['fp16_eager_ms']:.4f}", f"{r['spqr_eager_ms']:.4f}", f"{r['eager_speedup']:.2f}x",
                      f"{r['fp16_host_us']:.0f}/{r['spqr_host_us']:.0f}"] if "spqr_eager_ms" in r else ["-"] * 4
        for p in peers:
            got = r.get("peers", {}).get(p)
            cells += [f"{got['ms']:.4f}", f"{got['speedup']:.2f}x"] if got else ["-", "-"]
        table.add_row(*cells)
    return table


def write_bench_json(rows: Sequence[dict], path: str, extra: dict | None = None) -> None:
    """Rows plus the environment (GPU, torch, triton versions) as JSON, written atomically."""
    import triton

    from spqr_cli.core.io import write_json as write_json_atomic

    env = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "torch": torch.__version__, "triton": triton.__version__}
    write_json_atomic({"env": env, **(extra or {}), "rows": list(rows)}, path)
