"""CPU correctness of the k5 fused kernel under TRITON_INTERPRET=1 against the fp32 reference: every layout of
the kernel tests (2/3/4/5/8-bit codes, fp16 and 3-bit statistics, groups of 16-128, outlier corner rows), default
and split-K configs, fp16 and bf16, twice per shape (the shared scratch must return to zero).

Run from the repository root: ``TRITON_INTERPRET=1 PYTHONPATH=.:benchmarks/k5_run_gemm:tests python
benchmarks/k5_run_gemm/check_cpu.py`` (``kernels/`` importable as ``spqr_kernels``)."""
import gemm
import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter

from spqr_kernels import reference
from spqr_kernels.synthetic import random_packed

# Triton 3.9's interpreter multiplies bf16 tl.dot operands as raw 16-bit patterns (numpy has no bf16): widen them
_dot = interpreter.InterpreterBuilder.create_dot


def _wide(h):
    if h.dtype.scalar != tl.bfloat16:
        return h
    return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)


interpreter.InterpreterBuilder.create_dot = lambda self, a, b, d, *r: _dot(self, _wide(a), _wide(b), d, *r)

CASES = [(40, 48, 3, 16, 3, True, "edge"), (40, 48, 3, 16, 3, False, "random"), (33, 96, 4, 16, 3, True, "edge"),
         (24, 64, 2, 16, 3, False, "edge"), (40, 64, 4, 16, 16, True, "random"), (30, 64, 5, 16, 16, True, "edge"),
         (20, 48, 8, 16, 3, False, "random"), (40, 256, 3, 128, 16, True, "random"), (40, 48, 4, 48, 16, True, "edge"),
         (24, 256, 2, 32, 3, False, "random")]
worst = 0.0
for n, k, wb, gs, sb, ao, rows in CASES:
    pw = random_packed(n, k, wbits=wb, groupsize=gs, stat_bits=sb, act_order=ao, outlier_rows=rows, seed=11)
    bk = 128 if 128 % gs == 0 or gs % 128 == 0 else 16
    for cfg in (None, gemm.Config(16, 32, 16, 3), gemm.Config(32, 16, bk, 1, 2, 2)):
        for m, dt in ((1, torch.float16), (9, torch.float16), (33, torch.bfloat16)):
            x = torch.randn(m, k, dtype=dt)
            bias = torch.randn(n, dtype=dt)
            ref = reference.linear_reference(x.float(), pw, bias.float())
            for _ in range(2):
                rel = ((gemm.spqr_gemm(x, pw, bias, config=cfg).float() - ref).norm() / ref.norm()).item()
                assert rel < (8e-3 if dt == torch.bfloat16 else 2e-3), (n, k, wb, gs, cfg, m, dt, rel)
                worst = max(worst, rel) if dt == torch.float16 else worst
    acc, cnt = gemm._SCRATCH[torch.device("cpu")]
    assert not acc.any() and not cnt.any()
print(f"all {len(CASES)} layouts x 3 configs x 3 token counts correct; worst fp16 relative error {worst:.1e}")
