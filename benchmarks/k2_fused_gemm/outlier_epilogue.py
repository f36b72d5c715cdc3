"""The fused GEMM's epilogue: add each row's outliers (and the bias) to ``X W^T``, one launch.

An outlier replaces the dense decode at its position, so the GEMM multiplies by the dense decode everywhere and
this kernel adds ``delta * x[:, col]`` per outlier, with ``delta = val - dense`` (``outliers.prepare``'s fp16
residuals). The columns are mapped into the permuted order once per layer (``permuted_outliers``), because the
GEMM's launcher already holds the activations permuted and transposed, ``[K, M]``: the ``x[:, col]`` an outlier
needs is then one contiguous run over the tokens.

A program takes ``R`` output rows and ``BM`` tokens and walks the rows' CSR entries in lockstep (entry ``j`` of
each row per iteration, as many iterations as the longest row has entries), with the tokens along the lanes so
that each gathered ``x[col, m0 : m0 + BM]`` load is coalesced. The partial product comes from ``acc`` (the
GEMM's output, or its fp32 split-K scratch) and the result goes to ``y``, which may be the same tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spqr_kernels.decode import inverse_perm
from spqr_kernels.layout import PackedWeight
from spqr_kernels.outliers import prepare


@triton.jit
def _epilogue_kernel(acc_ptr, y_ptr, x_ptr, rp_ptr, oc_ptr, od_ptr, bias_ptr, M, N, stride_xk,
                     R: tl.constexpr, BM: tl.constexpr, HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr):
    rows = tl.program_id(0) * R + tl.arange(0, R)
    m = tl.program_id(1) * BM + tl.arange(0, BM)
    r_ok = rows < N
    m_ok = m < M
    ok = r_ok[:, None] & m_ok[None, :]
    offs = m[None, :] * N + rows[:, None]  # [R, BM]: tokens along the lanes
    total = tl.load(acc_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_OUTLIERS:
        start = tl.load(rp_ptr + rows, mask=r_ok, other=0)
        cnt = tl.load(rp_ptr + rows + 1, mask=r_ok, other=0) - start
        for j in range(0, tl.max(cnt, axis=0)):
            live = j < cnt
            col = tl.load(oc_ptr + start + j, mask=live, other=0).to(tl.int32) & 0xFFFF  # int16 read as unsigned
            d = tl.load(od_ptr + start + j, mask=live, other=0.0).to(tl.float32)
            xv = tl.load(x_ptr + col[:, None] * stride_xk + m[None, :], mask=live[:, None] & m_ok[None, :],
                         other=0.0)
            total += d[:, None] * xv.to(tl.float32)
    if HAS_BIAS:
        total += tl.load(bias_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + offs, total.to(y_ptr.dtype.element_ty), mask=ok)


def permuted_outliers(pw: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(row_ptr, columns in permuted order, fp16 residuals)`` of ``pw``'s outliers, built once per layer; ``None``
    when it has none. Columns are int16, read as unsigned (K <= 65536, as the stored ones)."""
    if not pw.nnz:
        return None
    rt = prepare(pw)
    pcol = rt.get("outlier_pcol")
    if pcol is None:
        inv = inverse_perm(pw)
        col = pw.tensors["outlier_col"]
        if inv is not None:
            col = inv[col.to(torch.int64) & 0xFFFF].to(torch.int32).to(torch.int16)
        rt["outlier_pcol"] = pcol = col.contiguous()
    return rt["row_ptr"], pcol, rt["outlier_delta"]


def run_epilogue(acc: torch.Tensor, y: torch.Tensor, xp: torch.Tensor,
                 outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """``y = acc + outliers(xp) + bias``; ``acc`` and ``y`` are ``[M, N]`` (may be one tensor), ``xp`` the permuted
    activations ``[K, M]``."""
    m, n = y.shape
    if acc.shape != (m, n) or xp.dim() != 2 or xp.shape[1] != m or not (acc.is_contiguous() and y.is_contiguous()):
        raise ValueError(f"run_epilogue: acc {tuple(acc.shape)}, y {tuple(y.shape)}, x {tuple(xp.shape)} do not fit")
    r, bm = 16, min(64, triton.next_power_of_2(m))
    dummy = acc
    rp, oc, od = outliers if outliers is not None else (dummy, dummy, dummy)
    _epilogue_kernel[(triton.cdiv(n, r), triton.cdiv(m, bm))](
        acc, y, xp, rp, oc, od, bias if bias is not None else dummy, m, n, xp.stride(0),
        R=r, BM=bm, HAS_OUTLIERS=outliers is not None, HAS_BIAS=bias is not None, num_warps=4,
    )
    return y
