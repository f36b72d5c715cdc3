"""The fused GEMM's epilogue: ``y = acc + outliers(x) + bias`` in one launch, cast to the output dtype.

An outlier replaces the dense decode at its position, so the GEMM multiplies by the dense decode everywhere and
this kernel adds ``delta * x[:, col]`` per outlier, ``delta = val - dense`` (``outliers.prepare``'s fp16
residuals), at the stored (original) column, so ``x`` is read as given. A program takes ``R`` output rows and
``BM`` tokens and walks the rows' CSR entries in lockstep (entry ``j`` of each row per iteration, as many
iterations as its longest row has entries). ``acc`` is the GEMM's fp32 product (the split-K sum).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spqr_kernels.layout import PackedWeight
from spqr_kernels.outliers import prepare


@triton.jit
def _epilogue_kernel(acc_ptr, y_ptr, x_ptr, rp_ptr, oc_ptr, od_ptr, bias_ptr, M, N, stride_xm,
                     R: tl.constexpr, BM: tl.constexpr, HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr):
    rows = tl.program_id(0) * R + tl.arange(0, R)
    m = tl.program_id(1) * BM + tl.arange(0, BM)
    r_ok = rows < N
    m_ok = m < M
    ok = m_ok[:, None] & r_ok[None, :]
    offs = m[:, None] * N + rows[None, :]  # [BM, R]: rows along the lanes, stores coalesced
    total = tl.load(acc_ptr + offs, mask=ok, other=0.0)
    if HAS_OUTLIERS:
        start = tl.load(rp_ptr + rows, mask=r_ok, other=0)
        cnt = tl.load(rp_ptr + rows + 1, mask=r_ok, other=0) - start
        for j in range(0, tl.max(cnt, axis=0)):
            live = j < cnt
            col = tl.load(oc_ptr + start + j, mask=live, other=0).to(tl.int32) & 0xFFFF  # int16 read as unsigned
            d = tl.load(od_ptr + start + j, mask=live, other=0.0).to(tl.float32)
            xv = tl.load(x_ptr + m[:, None] * stride_xm + col[None, :], mask=m_ok[:, None] & live[None, :],
                         other=0.0)
            total += xv.to(tl.float32) * d[None, :]
    if HAS_BIAS:
        total += tl.load(bias_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs, total.to(y_ptr.dtype.element_ty), mask=ok)


def add_outliers(acc: torch.Tensor, x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """``acc + X @ D^T + bias`` as a new ``[M, N]`` tensor of ``out_dtype``; ``acc`` fp32 ``[M, N]``, ``x`` ``[M, K]``
    in the input's own column order, ``D`` the outlier residuals of ``pw``."""
    m, n = acc.shape
    if acc.dtype != torch.float32 or not acc.is_contiguous() or x.shape != (m, pw.in_features) or x.stride(1) != 1:
        raise ValueError(f"add_outliers: acc {acc.dtype} {tuple(acc.shape)} and x {tuple(x.shape)} do not fit a "
                         f"{pw.out_features}x{pw.in_features} layer")
    y = torch.empty(m, n, device=acc.device, dtype=out_dtype)
    r, bm = 64, min(16, triton.next_power_of_2(m))
    rt = prepare(pw)
    has = pw.nnz > 0
    rp = rt["row_ptr"]
    oc, od = (pw.tensors["outlier_col"], rt["outlier_delta"]) if has else (rp, rp)
    _epilogue_kernel[(triton.cdiv(n, r), triton.cdiv(m, bm))](
        acc, y, x, rp, oc, od, bias if bias is not None else acc, m, n, x.stride(0),
        R=r, BM=bm, HAS_OUTLIERS=has, HAS_BIAS=bias is not None, num_warps=4,
    )
    return y
