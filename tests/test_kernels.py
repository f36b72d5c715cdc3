"""Kernels vs the torch reference (fp32 dequantize-then-matmul), and the reference vs the record's decode.

On a machine without CUDA the Triton kernels run under ``TRITON_INTERPRET=1`` (``conftest.py`` imports the kernel
modules in interpreter mode; ``_interpret`` below sets the variable around each test so that ``ops`` dispatches CPU
tensors to them) on small shapes; the ``gpu`` tests repeat the checks on large shapes on a GPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from spqr_cli.quant.record import QuantizedLayer
from spqr_kernels import decode, dequantize, launch, matvec, ops, outlier_scatter, reference
from spqr_kernels.outliers import prepare
from spqr_kernels.synthetic import random_packed

CUDA = torch.cuda.is_available()
INTERPRETED = type(matvec._matvec_kernel).__name__ == "InterpretedFunction"
needs_triton = pytest.mark.skipif(not CUDA and not INTERPRETED,
                                  reason="kernels were imported without TRITON_INTERPRET=1 and there is no GPU")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    if INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")

# (N, K, wbits, groupsize, stat_bits, act_order, outlier_rows)
DECODE_CASES = [
    (40, 48, 3, 16, 3, True, "edge"),     # K shorter than one 80-code superblock, partial last word
    (40, 48, 3, 16, 3, False, "random"),  # identity permutation
    (33, 96, 4, 16, 3, True, "edge"),     # N not a multiple of any tile
    (24, 64, 2, 16, 3, False, "edge"),
    (40, 64, 4, 16, 16, True, "random"),  # fp16 stats
    (30, 64, 5, 16, 16, True, "edge"),    # 5-bit codes: no 12-bit decode window (mantissa_codes' fallback)
    (20, 48, 8, 16, 3, False, "random"),  # 8-bit codes (4 per word) with 3-bit stats (per-row stats path)
]
PREFILL_CASES = DECODE_CASES[:4] + DECODE_CASES[5:] + [
    (40, 256, 3, 128, 16, True, "random"),  # GPTQ-style g128
    (40, 48, 4, 48, 16, True, "edge"),      # per-channel stats (one group of K columns)
    (24, 256, 2, 32, 3, False, "random"),
]


def make(case, seed: int = 0, device: str = "cpu"):
    n, k, wbits, gs, sb, ao, rows = case
    pw = random_packed(n, k, wbits=wbits, groupsize=gs, stat_bits=sb, act_order=ao, outlier_rows=rows, seed=seed)
    return QuantizedLayer.from_packed(pw), pw.to(device)


def check_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    """fp16-output tolerance: relative norm error and worst element, against an fp32 reference."""
    assert y.shape == ref.shape
    tol = 8e-3 if y.dtype == torch.bfloat16 else 2e-3  # bf16 outputs keep 8 mantissa bits, fp16 11
    y = y.float()
    assert torch.isfinite(y).all()
    rel = ((y - ref).norm() / ref.norm()).item()
    worst = (y - ref).abs().max().item()
    assert rel < tol, f"relative error {rel:.2e}"
    assert worst <= 2 * tol * ref.abs().max().item() + 1e-3, f"max abs error {worst:.2e}"


@pytest.mark.parametrize("case", DECODE_CASES + PREFILL_CASES[4:])
def test_reference_matches_record(case):
    rec, pw = make(case)
    ours = reference.dequantize(pw)
    record = QuantizedLayer.from_packed(pw).dequantize().float()
    # the record rounds the final weight to fp16 once; outliers are exact in both
    assert torch.allclose(ours, record, rtol=2**-10, atol=1e-7)
    rows, cols = decode.outlier_rows(pw), decode.outlier_cols(pw)
    assert torch.equal(ours[rows, cols], rec.outlier_val.float())


def test_edge_rows_are_exercised():
    rec, pw = make(DECODE_CASES[0])
    counts = rec.outlier_row_ptr[1:] - rec.outlier_row_ptr[:-1]
    assert counts[0] == rec.in_features and counts[-1] == 0


@needs_triton
@pytest.mark.parametrize("config", [None, (16, 1, 1, 4), (32, 2, 3, 2), (8, 4, 2, 1)])  # (BW, KW, SPLIT, warps)
@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_kernel(case, config):
    _, pw = make(case, seed=3)
    bias = torch.randn(pw.out_features, dtype=torch.float16) if config else None
    runs = [(1, torch.float16), (3, torch.float16)] if config else [(1, torch.float16), (8, torch.bfloat16)]
    for tokens, dtype in runs:  # one program per token on the third grid axis; 8 = ops.MAX_DECODE_TOKENS
        x = torch.randn(tokens, pw.in_features, dtype=dtype)
        ref = reference.linear_reference(x.float(), pw, None if bias is None else bias.float())
        for _ in range(2):  # the split-K scratch must be back at zero after a call
            check_close(matvec.spqr_matvec(x, pw, bias, config=config), ref)
    x = torch.randn(pw.in_features, dtype=torch.float16)  # a bare vector keeps its rank
    assert matvec.spqr_matvec(x, pw).shape == (pw.out_features,)


@needs_triton
def test_decode_kernel_launch_is_kept_per_tokens_and_bias():
    """The cached launch arguments are per token count and bias presence: alternating calls stay correct."""
    _, pw = make(DECODE_CASES[0], seed=7)
    bias = torch.randn(pw.out_features, dtype=torch.float16)
    for tokens, b in ((1, None), (1, bias), (3, None), (1, None), (3, bias)):
        x = torch.randn(tokens, pw.in_features, dtype=torch.float16)
        check_close(matvec.spqr_matvec(x, pw, b), reference.linear_reference(x.float(), pw, None if b is None
                                                                              else b.float()))
    assert {k for k in prepare(pw) if k.startswith("matvec_launch")} == {
        "matvec_launch_1_0", "matvec_launch_1_1", "matvec_launch_3_0", "matvec_launch_3_1"}


@needs_triton
def test_decode_kernel_scratch_follows_config():
    """A launch config with more row blocks than the first call's gets tickets for all of them."""
    _, pw = make(DECODE_CASES[2], seed=4)
    x = torch.randn(2, pw.in_features, dtype=torch.float16)
    ref = reference.linear_reference(x.float(), pw)
    words = pw.tensors["qweight"].shape[1]
    for config in (None, (4, 4, 2, 1), None):  # auto uses BW = 8 here: 1 row block, then 2
        check_close(matvec.spqr_matvec(x, pw, config=config), ref)
        bw = (config or matvec.pick_config(pw.out_features, pw.in_features, pw))[0]
        assert prepare(pw)["matvec_cnt_2"].numel() >= 2 * -(-words // bw)  # one ticket per token and row block


@needs_triton
@pytest.mark.parametrize("case", PREFILL_CASES)
def test_dequantize_kernel(case):
    """The dense copy equals the reference decode (fp16-rounded) in the input's own column order (the kernel undoes
    the permutation), outliers included."""
    _, pw = make(case, seed=5)
    ref_w = reference.dequantize(pw)  # fp32, original column order
    assert torch.allclose(dequantize.dequantize_t(pw).float().t(), ref_w, rtol=2**-10, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("n, beta2", [(45, 5), (33, 3), (41, 12)])
def test_dequantize_kernel_second_level_blocks_off_the_runs(n, beta2):
    """Second-level blocks that do not line up with the kernel's runs of 8 rows (and rows past N in the last run:
    their blocks would lie past the statistics' end, so the loads are masked per row)."""
    pw = random_packed(n, 64, beta2=beta2, seed=n)
    assert torch.allclose(dequantize.dequantize_t(pw).float().t(), reference.dequantize(pw), rtol=2**-10, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("case", DECODE_CASES[:4])
def test_outlier_scatter_kernel(case):
    """The one-launch outlier write equals torch indexing (identity and act-order perms, empty and full rows)."""
    _, pw = make(case, seed=7)
    base = torch.randn(pw.in_features, pw.out_features).half()
    got = outlier_scatter.write_outliers(base.clone(), pw)
    assert pw.nnz and torch.equal(got, outlier_scatter.write_outliers_reference(base.clone(), pw))
    with pytest.raises(ValueError, match="contiguous fp16"):
        outlier_scatter.write_outliers(base.t(), pw)


@needs_triton
@pytest.mark.parametrize("batch", [9, 33])  # the dequantize + cuBLAS path (1-8 tokens take the decode kernel)
@pytest.mark.parametrize("case", PREFILL_CASES[:5])
def test_multi_token_path(case, batch):
    _, pw = make(case, seed=batch)
    x = torch.randn(batch, pw.in_features, dtype=torch.bfloat16 if batch == 33 else torch.float16)
    bias = torch.randn(pw.out_features, dtype=x.dtype)
    check_close(ops.spqr_linear(x, pw, bias), reference.linear_reference(x.float(), pw, bias.float()))


@needs_triton
def test_spqr_linear_dispatch_and_shapes(monkeypatch):
    _, pw = make((40, 96, 3, 16, 3, True, "edge"))
    calls = []
    for mod, name in ((matvec, "spqr_matvec"), (dequantize, "spqr_dense_matmul")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    for shape, dtype, path in [((1, 1, 96), torch.float16, "spqr_matvec"),  # one token
                               ((2, 4, 96), torch.float16, "spqr_matvec"),  # 8 tokens: still the decode kernel
                               ((3, 3, 96), torch.float16, "spqr_dense_matmul"),  # 9 tokens: dense path
                               ((17, 96), torch.bfloat16, "spqr_dense_matmul")]:
        x = torch.randn(*shape, dtype=dtype)
        check_close(ops.spqr_linear(x, pw), reference.linear_reference(x.float(), pw))
        assert calls.pop() == path
    assert ops.spqr_linear(torch.randn(0, 96, dtype=torch.float16), pw).shape == (0, 40)


def test_spqr_linear_reference_path(monkeypatch):
    """Without a GPU and without the interpreter, spqr_linear must not touch the Triton kernels."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if CUDA:
        pytest.skip("on a GPU the kernels are the path")

    def no_kernel(*args, **kwargs):
        raise AssertionError("a Triton kernel was called on the CPU path")

    monkeypatch.setattr(matvec, "spqr_matvec", no_kernel)
    monkeypatch.setattr(dequantize, "dequantize_t", no_kernel)
    rec, pw = make(DECODE_CASES[2])
    x = torch.randn(5, pw.in_features, dtype=torch.float16)
    expected = (x.float() @ rec.dequantize().float().t()).half()  # the record's decode, not the layout's
    assert torch.allclose(ops.spqr_linear(x, pw).float(), expected.float(), rtol=2e-3, atol=2e-3)


def test_spqr_linear_rejects_bad_inputs():
    _, pw = make(DECODE_CASES[0])
    with pytest.raises(ValueError, match="48 input features"):
        ops.spqr_linear(torch.randn(2, 47, dtype=torch.float16), pw)
    with pytest.raises(TypeError, match="floating-point"):
        ops.spqr_linear(torch.ones(2, 48, dtype=torch.int32), pw)
    with pytest.raises(ValueError, match="bias"):
        ops.spqr_linear(torch.randn(2, 48, dtype=torch.float16), pw, torch.zeros(41, dtype=torch.float16))
    with pytest.raises(ValueError, match="1 to 8 tokens"):
        matvec.spqr_matvec(torch.randn(9, 48, dtype=torch.float16), pw)


# ---- the same checks on a GPU, on LLaMA-sized shapes ----

GPU_CASES = [
    (4096, 4096, 3, 16, 3, True, "edge"),
    (1000, 4000, 3, 16, 3, True, "edge"),    # nothing a multiple of the tiles
    (11008, 4096, 4, 16, 3, False, "random"),
    (4096, 11008, 2, 16, 3, True, "random"),
    (512, 1024, 4, 128, 16, True, "random"),  # GPTQ g128
    (512, 1024, 4, 1024, 16, False, "edge"),  # per-channel
    (512, 1024, 3, 128, 16, True, "edge"),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("batch", [1, 3, 8, 9, 16, 33, 256])
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_kernels(case, batch):
    _, pw = make(case, seed=batch, device="cuda")
    x = torch.randn(batch, pw.in_features, dtype=torch.float16, device="cuda")
    bias = torch.randn(pw.out_features, dtype=torch.float16, device="cuda")
    ref = reference.linear_reference(x.float(), pw, bias.float())
    check_close(ops.spqr_linear(x, pw, bias), ref)


def _wide_layer(device: str):
    """A 16 x 32784 layer with 5% outliers: columns >= 32768 are stored as negative int16."""
    pw = random_packed(16, 32784, device=device, outlier_fraction=0.05)
    assert int(pw.tensors["outlier_col"].min()) < 0
    return pw


@needs_triton
def test_outlier_write_columns_past_int16():
    """The outlier write reads the stored int16 columns as unsigned."""
    pw = _wide_layer("cpu")
    dense = torch.zeros(pw.in_features, pw.out_features, dtype=torch.float16)
    expected = outlier_scatter.write_outliers_reference(dense.clone(), pw)
    assert torch.equal(outlier_scatter.write_outliers(dense, pw), expected)


@gpu
@needs_cuda
def test_gpu_decode_columns_past_int16():
    """The decode kernel's outlier walk reads them as unsigned too (GPU only: a 32K-column K loop takes minutes
    in the interpreter)."""
    pw = _wide_layer("cuda")
    x = torch.randn(2, pw.in_features, dtype=torch.float16, device="cuda")
    check_close(matvec.spqr_matvec(x, pw), reference.linear_reference(x.float(), pw))


def test_replay_passes_the_launchers_arguments(monkeypatch):
    """``launch.Replay`` hands Triton's compiled launcher the grid, the current stream, the kernel handle and every
    parameter in order (constexprs too), with the swapped tensors in place; it declines when it cannot be exact."""
    calls = []

    class Compiled:  # what kernel[grid](...) returns, as far as Replay uses it
        function, packed_metadata = "function", "metadata"

        @staticmethod
        def run(*args):
            calls.append(args)

    fn = SimpleNamespace(arg_names=["x", "w", "n", "out", "A", "B"])
    current = [1]
    hooks = [False]
    monkeypatch.setattr(launch, "_current_stream", lambda index: 100 + index)
    monkeypatch.setattr(launch, "_current_device", lambda: current[0])
    monkeypatch.setattr(launch, "_hooks_set", lambda: hooks[0])
    args = ["x0", "w", 7, "out0"]
    replay = launch.Replay.of(fn, Compiled(), (5, 2), args, {"B": 2, "A": 1}, (0, 3), device=1)
    assert replay._args[0] is None and replay._args[3] is None  # the first call's tensors are not kept
    assert replay("x1", "out1")
    assert calls == [(5, 2, 1, 101, "function", "metadata", None, None, None, "x1", "w", 7, "out1", 1, 2)]
    current[0] = 0  # another device current: the handle belongs to device 1's context
    hooks[0] = True
    assert not replay("x2", "out2")
    current[0] = 1  # a profiler's launch hook must see every launch
    assert not replay("x2", "out2") and len(calls) == 1
    assert launch.Replay.of(fn, Compiled(), (5,), args, {"A": 1, "B": 2}, (0,), device=1) is None  # hook set
    hooks[0] = False
    assert launch.Replay.of(fn, Compiled(), (5,), args, {"A": 1}, (0,), device=1) is None  # a constexpr missing
    assert launch.Replay.of(fn, object(), (5,), args, {"A": 1, "B": 2}, (0,), device=1) is None  # not compiled
    assert launch.Replay.of(fn, Compiled(), (5,), args, {"A": 1, "B": 2}, (0,), device=0) is None  # not current


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_decode_replay(dtype, monkeypatch):
    """A decode call like an earlier one replays its compiled launch (``matvec.DecodeReplay``) with the new
    tensors; tensors the compiled launch does not fit take the ordinary path; both are right."""
    _, pw = make(GPU_CASES[1], device="cuda")
    n, k = pw.out_features, pw.in_features
    bias = torch.randn(n, dtype=dtype, device="cuda")

    def ref(x: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        y = reference.linear_reference(x.float().reshape(-1, k), pw, None if b is None else b.float())
        return y.reshape(*x.shape[:-1], n)

    for shape in [(1, k), (3, k), (2, 1, k), (k,)]:
        for b in (None, bias):
            ops.spqr_linear(torch.randn(shape, dtype=dtype, device="cuda"), pw, b)  # compiles, leaves a replay
            assert (torch.Size(shape), dtype, b is None) in pw.launches
            with monkeypatch.context() as m:  # the second call must not reach the ordinary launch
                m.setattr(matvec, "spqr_matvec", lambda *a, **kw: pytest.fail("replay not taken"))
                x = torch.randn(shape, dtype=dtype, device="cuda")
                check_close(ops.spqr_linear(x, pw, b), ref(x, b))

    # misaligned activations (a 2-byte offset), a bias of another dtype: the ordinary path, still right
    x = torch.randn(k + 1, dtype=dtype, device="cuda")[1:].reshape(1, k)
    assert pw.launches[(x.shape, dtype, False)](x, bias) is None
    check_close(ops.spqr_linear(x, pw, bias), ref(x, bias))
    x = torch.randn(1, k, dtype=dtype, device="cuda")
    assert pw.launches[(x.shape, dtype, False)](x, bias.float()) is None
    check_close(ops.spqr_linear(x, pw, bias.float()), ref(x, bias))

    # a replay recorded in a CUDA graph reads the captured input at every replay
    xs = torch.randn(1, k, dtype=dtype, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ys = ops.spqr_linear(xs, pw, bias)
    xs.copy_(torch.randn(1, k, dtype=dtype, device="cuda"))
    graph.replay()
    check_close(ys, ref(xs, bias))


@gpu
@needs_cuda
def test_gpu_dense_path_replay():
    """The many-token path's two launches (dense copy, outlier write) are replayed after the first call."""
    _, pw = make(GPU_CASES[1], device="cuda")
    n, k = pw.out_features, pw.in_features
    for _ in range(3):
        x = torch.randn(16, k, dtype=torch.float16, device="cuda")
        check_close(ops.spqr_linear(x, pw), reference.linear_reference(x.float(), pw))
    assert {"dequantize", "write_outliers"} <= set(pw.launches)
    dense = torch.zeros(k * n + 1, dtype=torch.float16, device="cuda")[1:].view(k, n)  # not 16-byte aligned
    expected = outlier_scatter.write_outliers_reference(dense.clone(), pw)
    assert torch.equal(outlier_scatter.write_outliers(dense, pw), expected)
