"""Random but well-formed packed weights, for kernel tests and speed benchmarks (never for accuracy claims).

One generator for both, built directly on the target device so that 65B-sized layers take milliseconds. The
dequantized weights have LLaMA-like magnitudes (~0.02); outliers are distinct positions in CSR order.
"""

from __future__ import annotations

import torch

from .layout import PackedWeight, pack_rows


def random_packed(
    n: int, k: int, wbits: int = 3, groupsize: int = 16, beta2: int = 16, stat_bits: int = 3,
    outlier_fraction: float = 0.01, act_order: bool = True, device: str | torch.device = "cpu", seed: int = 0,
    outlier_rows: str = "random",
) -> PackedWeight:
    """A ``PackedWeight`` of shape ``(n, k)`` with random codes, statistics, permutation and outliers.

    ``groupsize`` 0 means one group per row (per-channel). ``outlier_rows``: "random" draws each row's outlier
    count from Binomial(k, outlier_fraction); "edge" also makes row 0 all-outlier and leaves the last row empty,
    to exercise kernel corner cases. Deterministic for a given ``seed`` and device.
    """
    if outlier_rows not in ("random", "edge"):
        raise ValueError(f"outlier_rows must be 'random' or 'edge', got {outlier_rows!r}")
    gs = k if groupsize == 0 else groupsize
    if k % gs:
        raise ValueError(f"groupsize {gs} does not divide {k}")
    gen = torch.Generator(device=device).manual_seed(seed)
    g = k // gs

    def codes(rows: int, bits: int) -> torch.Tensor:
        c = torch.randint(0, 2**bits, (n, rows), generator=gen, device=device, dtype=torch.int32)
        return pack_rows(c, bits)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, device=device)

    t: dict[str, torch.Tensor] = {"qweight": codes(k, wbits)}
    mid = (2**wbits - 1) / 2
    if stat_bits == 16:
        t["scales"] = (0.01 + 0.01 * rand(g, n)).half()
        t["zeros"] = (mid + torch.randn(g, n, generator=gen, device=device)).half()
    else:
        nb = -(-n // beta2)
        t["qscale"], t["qzero"] = codes(g, stat_bits), codes(g, stat_bits)
        smax = 2**stat_bits - 1
        t["scale_stats"] = torch.stack([0.002 + 0.002 * rand(g, nb), -2 - rand(g, nb)]).half()
        t["zero_stats"] = torch.stack([mid / smax * (1 + 0.1 * rand(g, nb)), rand(g, nb) - 0.5]).half()
    if act_order:
        t["perm"] = torch.randperm(k, generator=gen, device=device).to(torch.int32)
    probs = torch.full((n,), float(outlier_fraction), device=device)
    counts = torch.binomial(torch.full_like(probs, float(k)), probs, generator=gen).long()
    rows = torch.repeat_interleave(torch.arange(n, device=device), counts)
    cols = torch.randint(0, k, (rows.numel(),), generator=gen, device=device)
    keys = rows * k + cols
    if outlier_rows == "edge" and n > 1:
        keys = torch.cat([keys[rows != n - 1], torch.arange(k, device=device)])  # row 0 full, last row empty
    keys = torch.unique(keys)  # distinct positions, sorted by row then column (CSR order)
    rows, cols = keys // k, keys % k
    row_ptr = torch.zeros(n + 1, dtype=torch.int32, device=device)
    row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    t["outlier_row_ptr"] = row_ptr
    t["outlier_col"] = cols.to(torch.int32).to(torch.int16)
    t["outlier_val"] = (0.1 * torch.randn(int(keys.numel()), generator=gen, device=device)).half()
    return PackedWeight(out_features=n, in_features=k, wbits=wbits, groupsize=gs,
                        beta2=beta2 if stat_bits != 16 else 0, stat_bits=stat_bits, tensors=t)
