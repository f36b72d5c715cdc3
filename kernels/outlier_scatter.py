"""Write a layer's outliers into its dense fp16 copy ``W^T[col, row]`` in one launch.

The multi-token path (``dequantize.py``) first writes the dense decode, then this kernel overwrites the outlier
positions with the stored outlier weights. Done with torch indexing this took ~8 small kernels (expanding the CSR
rows, mapping columns through the inverse permutation, the scatter itself), more time than the dequantize kernel
and the matmul together; this one launch takes about half of that (``docs/benchmarks.md``). Here a
program takes ``R`` rows and walks their CSR entries in ``[R, L]`` tiles (``L`` consecutive entries of each row),
so the column and value loads are contiguous within a row and nothing is allocated per call. The copy is in the
input's own column order, so the stored columns are the row addresses as they are.

(Adding the outliers to the product instead, as a sparse ``X @ D^T`` after cuBLAS, measured slower at every batch
size on the same layers: gathering ``X[:, col]`` for each outlier and token costs more than one scattered store
per outlier.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode import outlier_cols, outlier_rows
from .launch import Replay
from .layout import PackedWeight
from .outliers import prepare


@triton.jit
def _scatter_kernel(out_ptr, rp_ptr, oc_ptr, val_ptr, N, R: tl.constexpr, L: tl.constexpr):
    rows = tl.program_id(0) * R + tl.arange(0, R)
    r_ok = rows < N
    start = tl.load(rp_ptr + rows, mask=r_ok, other=0)
    cnt = tl.load(rp_ptr + rows + 1, mask=r_ok, other=0) - start
    for j0 in range(0, tl.max(cnt, axis=0), L):
        j = j0 + tl.arange(0, L)[None, :]
        live = j < cnt[:, None]
        idx = start[:, None] + j
        col = tl.load(oc_ptr + idx, mask=live, other=0).to(tl.int32) & 0xFFFF  # int16 read as unsigned
        val = tl.load(val_ptr + idx, mask=live, other=0.0)
        tl.store(out_ptr + col.to(tl.int64) * N + rows[:, None], val, mask=live)


def write_outliers(out: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """Set ``out[col, row] = outlier_val`` for every outlier of ``pw``; ``out`` is fp16 ``[K, N]`` (``W^T``)."""
    n, k = pw.out_features, pw.in_features
    if out.shape != (k, n) or out.dtype != torch.float16 or not out.is_contiguous():
        raise ValueError(f"write_outliers needs a contiguous fp16 [{k}, {n}] tensor, got {out.dtype} "
                         f"{tuple(out.shape)}")
    if out.device != pw.tensors["qweight"].device:
        raise ValueError(f"write_outliers: out is on {out.device} but the layer on {pw.tensors['qweight'].device}")
    if not pw.nnz:
        return out
    replay = pw.launches.get("write_outliers")  # see dequantize_t: replayed after the first launch
    if replay is not None and out.data_ptr() % 16 == 0 and replay(out):  # (the first launch may assume alignment)
        return out
    r = 32
    grid = (triton.cdiv(n, r),)
    args = (out, prepare(pw)["row_ptr"], pw.tensors["outlier_col"], pw.tensors["outlier_val"], n)
    kernel = _scatter_kernel[grid](*args, R=r, L=16, num_warps=4)
    if out.is_cuda and (replay := Replay.of(_scatter_kernel, kernel, grid, args, {"R": r, "L": 16}, (0,),
                                            out.get_device())):
        pw.launches["write_outliers"] = replay
    return out


def write_outliers_reference(out: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """The same write with torch indexing (for tests)."""
    if pw.nnz:
        out[outlier_cols(pw), outlier_rows(pw)] = pw.tensors["outlier_val"].to(out.dtype)
    return out
