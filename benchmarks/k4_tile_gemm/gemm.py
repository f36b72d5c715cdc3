"""Fused dequantize + tensor-core GEMM for many tokens over the tile layout (``tiles.py``); a measured prototype.

A program owns a ``[BM, BN]`` block of ``X @ W^T`` and walks K (the permuted column order) in steps of ``BK``:
per step it loads ``BK / EPW`` rows of code words ``[R, BN]`` (contiguous along N) and the statistics of their
groups, decodes the ``EPW`` slots of every word at once into ``[EPW, R, BN]`` (a code goes under the exponent of
fp16 1024.0: no int->float conversion; ``w = q s - zs`` in fp16), reshapes that to the ``[BK, BN]`` dot operand
and multiplies it with ``BK`` activations read in the matching order (``step_perm``: slot-major within a step, the
layer's permutation on top; gathered in the kernel up to ``gather_below`` tokens, else permuted once per call).
fp32 accumulation; ``SPLIT_K`` programs share a block's K range through fp32 atomics. The outliers and the bias
are added by the epilogue (``outlier_epilogue.py``), which also casts to the activations' dtype.

Precision: each weight rounded to fp16 once from fp16 statistics (``tiles.py``), bf16 activations converted to
fp16 (as the dense path), fp32 accumulation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from outlier_epilogue import add_outliers
from tiles import tiles_for

from spqr_kernels.layout import PackedWeight
from spqr_kernels.outliers import prepare


class GemmConfig(NamedTuple):
    bm: int
    bn: int
    bk: int
    split_k: int
    warps: int
    stages: int


@triton.jit
def _gemm_kernel(x_ptr, perm_ptr, qw_ptr, s_ptr, zs_ptr, acc_ptr, M, N, K, stride_xm,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
                 GS: tl.constexpr, SLOT: tl.constexpr, GATHER: tl.constexpr):
    EPW: tl.constexpr = 32 // SLOT
    MASK: tl.constexpr = (1 << SLOT) - 1
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    per_group = GROUP_M * grid_n  # programs in a band of GROUP_M block rows (they share x tiles and weight tiles)
    first_m = (pid // per_group) * GROUP_M
    rows_here = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_here
    pid_n = (pid % per_group) // rows_here
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_ok = offs_m < M
    n_ok = offs_n < N
    span = K // SPLIT_K
    k_start = tl.program_id(1) * span
    R: tl.constexpr = BK // EPW  # word rows per step; slot c of word row i is permuted column k0 + EPW * i + c
    shifts = (tl.arange(0, EPW) * SLOT)[:, None, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_start, k_start + span, BK):
        wrow = k0 // EPW + tl.arange(0, R)
        words = tl.load(qw_ptr + wrow[:, None] * N + offs_n[None, :], mask=n_ok[None, :], other=0)
        st = ((wrow * EPW) // GS)[:, None] * N + offs_n[None, :]
        s = tl.load(s_ptr + st, mask=n_ok[None, :], other=0.0)
        zs = tl.load(zs_ptr + st, mask=n_ok[None, :], other=0.0)
        # [EPW, R, BN] -> [BK, BN]: row c * R + i is slot c of word row i, the order ``step_perm`` reads x in.
        # The code goes under the exponent of fp16 1024.0 (0x6400): 1024 + q exactly, no int->float conversion.
        q = (((words[None, :, :] >> shifts) & MASK) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
        w = tl.reshape(q * s[None, :, :] - zs[None, :, :], (BK, BN))
        kx = k0 + tl.arange(0, BK)
        cols = tl.load(perm_ptr + kx) if GATHER else kx
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :], mask=m_ok[:, None], other=0.0)
        acc = tl.dot(a, w, acc)
    ptrs = acc_ptr + offs_m[:, None] * N + offs_n[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc, mask=ok)
    else:
        tl.atomic_add(ptrs, acc, mask=ok, sem="relaxed")


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick_config(m: int, n: int, k: int, slot: int, device: torch.device) -> GemmConfig:
    """Tile sizes by token count; split-K until the grid covers the GPU's SMs (K stays a multiple of the step).
    A step is at least 16 word rows (the dot's smallest K), so 128 columns for 4-bit slots."""
    min_bk = 16 * (32 // slot)
    if m <= 16:
        cfg = GemmConfig(16, 64, 128, 1, 4, 4)
    elif m <= 64:
        cfg = GemmConfig(32 if m <= 32 else 64, 64, 128, 1, 4, 3)
    elif m <= 256:
        cfg = GemmConfig(64, 128, 128, 1, 4, 3)
    else:
        cfg = GemmConfig(128, 128, 128, 1, 8, 3)
    cfg = cfg._replace(bk=max(cfg.bk, min_bk))
    blocks = triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn)
    split = 1
    while blocks * split * 2 <= _num_sms(device) * 2 and k % (split * 2 * cfg.bk) == 0:
        split *= 2
    return cfg._replace(split_k=split)


def step_perm(pw: PackedWeight, bk: int, per_word: int) -> torch.Tensor:
    """int32 ``[K]``: the input feature the kernel reads at each position of a ``bk`` step (cached per layer).

    Within a step, the columns of code slot ``c`` come together (``R = bk / per_word`` of them: position
    ``k0 + c R + i`` is permuted column ``k0 + per_word i + c``), so each slot's dot reads ``R`` consecutive
    activations; the layer's own permutation is applied on top.
    """
    rt = prepare(pw)
    key = ("step_perm", bk)
    hit = rt.get(key)
    if hit is None:
        k = pw.in_features
        dev = pw.tensors["qweight"].device
        order = torch.arange(k, device=dev).view(k // bk, bk // per_word, per_word).transpose(1, 2).reshape(k)
        perm = pw.tensors.get("perm")
        rt[key] = hit = (perm.long()[order] if perm is not None else order).to(torch.int32).contiguous()
    return hit


def spqr_gemm(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None,
              config: GemmConfig | None = None, gather_below: int = 32) -> torch.Tensor:
    """``x @ W.T + bias`` for ``x`` ``[M, K]`` (fp16/bf16) through the fused kernel; returns ``[M, N]`` in x's dtype.

    ``config`` overrides ``pick_config`` (for tuning); its ``bk`` must divide ``K / split_k`` and hold at least 16
    word rows. Up to ``gather_below`` tokens the kernel gathers ``x`` through ``step_perm`` itself; from there on
    ``x`` is permuted once per call (``index_select``) and read in plain tiles.
    """
    n, k = pw.out_features, pw.in_features
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"spqr_gemm expects x of shape [M, {k}], got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"spqr_gemm takes float16 or bfloat16 activations, got {x.dtype}")
    m = x.shape[0]
    tiles = tiles_for(pw)
    cfg = config or pick_config(m, n, k, tiles.slot, x.device)
    if cfg.bk < 16 * tiles.per_word or k % (cfg.split_k * cfg.bk):
        raise ValueError(f"spqr_gemm: a step of {cfg.bk} with split-K {cfg.split_k} does not fit K={k} "
                         f"({tiles.per_word} codes per word)")
    xc = x if x.stride(1) == 1 else x.contiguous()
    xh = xc.to(torch.float16)  # bf16 activations go through fp16, as on the dense path
    perm = step_perm(pw, cfg.bk, tiles.per_word)
    gather = m <= gather_below
    xk = xh if gather else xh.index_select(1, perm)
    acc = (torch.zeros if cfg.split_k > 1 else torch.empty)(m, n, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn), cfg.split_k)
    _gemm_kernel[grid](
        xk, perm, tiles.codes, tiles.scale, tiles.zs, acc, m, n, k, xk.stride(0),
        BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, SPLIT_K=cfg.split_k, GROUP_M=8, GS=tiles.groupsize,
        SLOT=tiles.slot, GATHER=gather, num_warps=cfg.warps, num_stages=cfg.stages,
    )
    return add_outliers(acc, xh, pw, bias, x.dtype)
