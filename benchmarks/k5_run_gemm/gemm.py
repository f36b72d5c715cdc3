"""Kernels II, fifth attempt (not shipped; README.md): ``Y = X W^T`` for a few tokens, the weight decoded in
registers and fed to tensor cores.

Between the decode kernel (``matvec.py``, one token per program) and the dense path (``dequantize.py``: write the
fp16 weight, then cuBLAS), a handful of tokens is the worst case of both: the decode kernel decodes every weight
once per token, and the dense path writes and re-reads ~2.5 bytes per weight whatever the token count. Here each
weight is decoded once per call and used by every token of the call through ``tl.dot``.

- Tiles. A program owns ``BN`` output rows, ``BM`` tokens and a ``1 / SPLIT`` share of the k-tiles. Per step it
  decodes one ``[BK, BN]`` tile of permuted columns (``dequant.decode_tile``, the dense path's decode, as
  ``[groups, columns, BN]`` so that each group's statistics are decoded once) and multiplies the matching
  ``[BM, BK]`` activations into an fp32 accumulator. The activations are permuted once per call
  (``index_select``, ``BM x K`` elements) so that the loads of a step depend on nothing but the step and can be
  pipelined: gathering them in the loop through the permutation made every step wait for two dependent loads.
- Outliers (row-wise CSR, fp16 residuals from ``outliers.prepare``): each program walks the outliers of a slice of
  its block's rows in ``[R, L, BM]`` tiles (rows x consecutive entries x tokens) and adds ``delta * x[:, col]``.
- Split-K reduction as in the decode kernel: fp32 atomics into a scratch, an atomic ticket per (row block, token
  block), and the last program reads the sum back while zeroing it, adds the bias and stores ``y``. The scratch is
  shared by all layers of a device (``_scratch``), sized at load time for ``MAX_TOKENS`` tokens of the widest
  layer, and back at zero after every call; concurrent calls from two streams would race, as in the decode kernel.

Precision: the decoded weight is rounded to the activations' dtype (fp16: exactly the dense path's copy; bf16:
8 mantissa bits) and the products accumulate in fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from spqr_kernels.dequant import decode_tile, layout_args, run_stats, stat_args, tile_k
from spqr_kernels.layout import PackedWeight
from spqr_kernels.matvec import _finish as finish
from spqr_kernels.matvec import _num_sms as num_sms
from spqr_kernels.outliers import prepare

MAX_TOKENS = 64


@triton.jit
def _outliers(x_ptr, rp_ptr, oc_ptr, od_ptr, acc_ptr, tok, M, row0, row_end, rows_per, N, stride_x,
              R: tl.constexpr, L: tl.constexpr):
    """``acc[m, n] += sum_i delta_i * x[m, col_i]`` for rows ``[row0, min(row0 + rows_per, row_end))`` and the
    tokens ``tok`` ``[BM]``: a ``[R, L, BM]`` tile is ``L`` consecutive entries of ``R`` rows, for every token."""
    t3 = tok[None, None, :]
    t_ok = tok[None, :] < M
    for r0 in range(0, rows_per, R):
        rows = row0 + r0 + tl.arange(0, R)
        r_ok = (r0 + tl.arange(0, R) < rows_per) & (rows < row_end)
        start = tl.load(rp_ptr + rows, mask=r_ok, other=0)
        cnt = tl.load(rp_ptr + rows + 1, mask=r_ok, other=0) - start
        total = tl.zeros([R, tok.shape[0]], dtype=tl.float32)
        for e0 in range(0, tl.max(cnt, axis=0), L):
            e = e0 + tl.arange(0, L)[None, :]
            live = e < cnt[:, None]  # [R, L]
            idx = start[:, None] + e
            col = tl.load(oc_ptr + idx, mask=live, other=0).to(tl.int32) & 0xFFFF  # int16 read as unsigned
            d = tl.load(od_ptr + idx, mask=live, other=0.0).to(tl.float32)
            xv = tl.load(x_ptr + t3 * stride_x + col[:, :, None], mask=live[:, :, None] & (t3 < M), other=0.0)
            total += tl.sum(d[:, :, None] * xv.to(tl.float32), axis=1)
        tl.atomic_add(acc_ptr + tok[None, :] * N + rows[:, None], total,
                      mask=(r_ok & (cnt > 0))[:, None] & t_ok, sem="relaxed")


@triton.jit
def _gemm_kernel(
    x_ptr, xp_ptr, qw_ptr, sc_ptr, zr_ptr, qs_ptr, qz_ptr, ss_ptr, zs_ptr,
    rp_ptr, oc_ptr, od_ptr, bias_ptr, acc_ptr, cnt_ptr, out_ptr,
    M, N, K, W, WS, G, NB, tiles_per_split, SPLIT, rows_per_split, stride_x, stride_y,
    WBITS: tl.constexpr, CPW: tl.constexpr, GS: tl.constexpr, STAT_BITS: tl.constexpr, BETA2: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, R: tl.constexpr, L: tl.constexpr,
    HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    GT: tl.constexpr = BK // GS if BK > GS else 1  # groups per k-tile
    RT: tl.constexpr = BK // GT  # columns of each
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    m = pid_m * BM + tl.arange(0, BM)[:, None]  # [BM, 1] tokens
    m_ok = m < M
    n = pid_n * BN + tl.arange(0, BN)[None, :]  # [1, BN] output rows
    n_ok = n < N
    # the decode works on [GT, RT, BN / 8, 8]: statistics [GT, 1, BN / 8, 8] broadcast over their columns
    n0 = pid_n * BN + 8 * tl.arange(0, BN // 8)[None, None, :, None]
    col4 = tl.arange(0, GT)[:, None, None, None] * RT + tl.arange(0, RT)[None, :, None, None]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    t0 = pid_k * tiles_per_split
    for t in range(t0, tl.minimum(t0 + tiles_per_split, tl.cdiv(K, BK))):
        j4 = t * BK + col4  # [GT, RT, 1, 1] permuted columns
        g4 = tl.minimum((t * BK + tl.arange(0, GT)[:, None, None, None] * RT) // GS, G - 1)
        s, zs = run_stats(g4, n0, n0 < N, N, G, WS, NB, sc_ptr, zr_ptr, qs_ptr, qz_ptr, ss_ptr, zs_ptr,
                          STAT_BITS, BETA2)
        w = tl.reshape(decode_tile(qw_ptr, j4, n0, (j4 < K) & (n0 < N), s, zs, W, WBITS, CPW), (BK, BN))
        j = t * BK + tl.arange(0, BK)[None, :]
        a = tl.load(xp_ptr + m * K + j, mask=m_ok & (j < K), other=0.0)  # (columns past K: a = 0)
        acc = tl.dot(a, w.to(a.dtype), acc)

    if HAS_OUTLIERS:
        block0 = pid_n * BN
        _outliers(x_ptr, rp_ptr, oc_ptr, od_ptr, acc_ptr, pid_m * BM + tl.arange(0, BM), M,
                  block0 + pid_k * rows_per_split, tl.minimum(block0 + BN, N), rows_per_split, N, stride_x, R, L)
    ok = m_ok & n_ok
    tl.atomic_add(acc_ptr + m * N + n, acc, mask=ok, sem="relaxed")
    tl.debug_barrier()  # every thread's partial sums are in before this program takes its ticket
    ticket_ptr = cnt_ptr + pid_m * tl.num_programs(0) + pid_n + tl.zeros((1,), tl.int32)
    is_last = tl.atomic_add(ticket_ptr, 1) == SPLIT - 1
    finish(n + m * 0, ok & is_last, acc_ptr + m * N, out_ptr + m * stride_y, bias_ptr, HAS_BIAS)
    tl.store(ticket_ptr, 0, mask=is_last)  # the scratch is clean for the next call


class Config(NamedTuple):
    """A launch configuration: tile sides, k-splits, warps and software-pipeline stages."""

    bm: int
    bn: int
    bk: int
    split: int
    warps: int = 4
    stages: int = 1


def pick_config(m: int, n: int, k: int, pw: PackedWeight) -> Config:
    """Tokens padded to a power of two >= 16 (the smallest ``tl.dot``), 64 output rows per program, 64-column
    k-tiles where the group size allows (else the largest that divides it), and k-splits up to ~2 programs per SM."""
    bm = max(16, triton.next_power_of_2(m))
    bn = 64
    bk = 64 if 64 % pw.groupsize == 0 or pw.groupsize % 64 == 0 else tile_k(pw.groupsize)
    tiles = triton.cdiv(k, bk)
    blocks = triton.cdiv(n, bn) * triton.cdiv(m, bm)
    split = max(1, min(triton.cdiv(2 * num_sms(), blocks), tiles // 4 or 1))
    return Config(bm, bn, bk, split)


_SCRATCH: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_RETIRED: list[tuple[torch.Tensor, torch.Tensor]] = []  # outgrown scratch that a captured CUDA graph may still use


def _scratch(device: torch.device, floats: int, tickets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The device's fp32 scratch and tickets, at least ``floats`` / ``tickets`` long (zero at rest).

    Shared by every layer of the device (calls on one stream run one after the other and leave it at zero), so its
    size is one layer's, not the model's. ``prepare`` sizes it at load time for ``MAX_TOKENS`` tokens, outside any
    CUDA graph capture; a later, larger need replaces it and keeps the old pair alive for graphs that captured it.
    """
    acc, cnt = _SCRATCH.get(device, (None, None))
    if acc is None or acc.numel() < floats or cnt.numel() < tickets:
        if acc is not None:
            _RETIRED.append((acc, cnt))
            floats, tickets = max(floats, acc.numel()), max(tickets, cnt.numel())
        acc = torch.zeros(floats, device=device, dtype=torch.float32)
        cnt = torch.zeros(tickets, device=device, dtype=torch.int32)
        _SCRATCH[device] = (acc, cnt)
    return acc, cnt


def _needs(m: int, n: int, cfg: Config) -> tuple[int, int]:
    """Scratch floats and tickets a call of ``m`` tokens uses."""
    blocks_m = triton.cdiv(m, cfg.bm)
    return blocks_m * cfg.bm * n, blocks_m * triton.cdiv(n, cfg.bn)


def prepare_gemm(pw: PackedWeight) -> None:
    """Size the shared scratch for ``MAX_TOKENS`` tokens of this layer now (see ``_scratch``)."""
    prepare(pw)
    n, k = pw.out_features, pw.in_features
    _scratch(pw.tensors["qweight"].device, *_needs(MAX_TOKENS, n, pick_config(MAX_TOKENS, n, k, pw)))


class _Launch(NamedTuple):
    """The kernel's arguments apart from ``x``, ``bias`` and ``out``, in kernel order (kept per layer, token count
    and bias presence, like the decode kernel's)."""

    grid: tuple[int, int, int]
    weights: tuple[torch.Tensor, ...]  # codes, six statistics, CSR row pointers, columns, residuals
    scratch: tuple[torch.Tensor, torch.Tensor]
    ints: tuple[int, ...]
    meta: dict[str, int | bool]


def _launch(pw: PackedWeight, m: int, has_bias: bool, config: Config | None) -> _Launch:
    rt = prepare(pw)
    key = f"gemm_launch_{m}_{int(has_bias)}"
    if config is None and key in rt:
        return rt[key]
    n, k = pw.out_features, pw.in_features
    t = pw.tensors
    cfg = config or pick_config(m, n, k, pw)
    pow2 = all(v >= 16 and v & (v - 1) == 0 for v in (cfg.bm, cfg.bn, cfg.bk))
    if not pow2 or (pw.groupsize % cfg.bk if cfg.bk <= pw.groupsize else cfg.bk % pw.groupsize):
        raise ValueError(f"bad gemm config {cfg}: BM, BN, BK powers of two >= 16, BK dividing the group size "
                         f"{pw.groupsize} or a multiple of it")
    sizes, meta = layout_args(pw)
    tiles = triton.cdiv(k, cfg.bk)
    per_split = triton.cdiv(tiles, cfg.split)
    split = triton.cdiv(tiles, per_split)
    rows_per_split = triton.cdiv(cfg.bn, split)
    r = min(16, triton.next_power_of_2(rows_per_split))
    dummy = t["qweight"]
    plan = _Launch(
        grid=(triton.cdiv(n, cfg.bn), split, triton.cdiv(m, cfg.bm)),
        weights=(dummy, *stat_args(pw, dummy), rt["row_ptr"], t.get("outlier_col", dummy),
                 rt.get("outlier_delta", dummy)),
        scratch=_scratch(dummy.device, *_needs(m, n, cfg)),
        ints=(m, n, k, *sizes, per_split, split, rows_per_split, k, n),
        meta=dict(WBITS=pw.wbits, CPW=meta["CPW"], GS=pw.groupsize, STAT_BITS=pw.stat_bits, BETA2=meta["BETA2"],
                  BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, R=r, L=max(1, min(16, 2048 // (r * cfg.bm))),
                  HAS_OUTLIERS=pw.nnz > 0, num_warps=cfg.warps, num_stages=cfg.stages),
    )
    if config is None:
        rt[key] = plan
    return plan


def spqr_gemm(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None,
              config: Config | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for 1 to ``MAX_TOKENS`` tokens: ``x`` of shape ``[..., K]`` (fp16/bf16); returns
    ``[..., N]``.

    ``config`` overrides ``pick_config`` (for tuning).
    """
    n, k = pw.out_features, pw.in_features
    m = x.numel() // k if x.shape[-1] == k else 0
    if not 1 <= m <= MAX_TOKENS:
        raise ValueError(f"spqr_gemm expects 1 to {MAX_TOKENS} tokens of {k} features, got shape {tuple(x.shape)}")
    if x.device != pw.tensors["qweight"].device:
        raise ValueError(f"x is on {x.device} but the weight is on {pw.tensors['qweight'].device}")
    if k % 16:
        raise ValueError(f"spqr_gemm needs K a multiple of 16, got {k}")
    xc = x.contiguous()
    p = _launch(pw, m, bias is not None, config)
    out = torch.empty(x.shape[:-1] + (n,), device=x.device, dtype=x.dtype)
    perm = pw.tensors.get("perm")
    xp = xc if perm is None else xc.reshape(m, k).index_select(1, perm)
    args = (xc, xp, *p.weights, bias if bias is not None else p.weights[0], *p.scratch, out, *p.ints)
    constexprs = dict(p.meta, HAS_BIAS=bias is not None)
    warps, stages = constexprs.pop("num_warps"), constexprs.pop("num_stages")
    _gemm_kernel[p.grid](*args, **constexprs, num_warps=warps, num_stages=stages)
    return out
