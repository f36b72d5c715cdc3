"""Random but well-formed ``QuantizedLayer`` records, for tests and speed benchmarks (never for accuracy)."""

from __future__ import annotations

import torch

from spqr_cli.record import QuantizedLayer


def random_record(
    out_features: int,
    in_features: int,
    wbits: int = 3,
    groupsize: int = 16,
    beta2: int = 16,
    stat_bits: int = 3,
    outlier_fraction: float = 0.01,
    act_order: bool = True,
    seed: int = 0,
    outlier_rows: str = "random",
) -> QuantizedLayer:
    """A record with random codes/stats whose dequantized weights have LLaMA-like magnitudes (~0.02).

    ``outlier_rows``: "random" spreads outliers uniformly; "edge" also makes row 0 all-outlier and leaves the
    last row empty, to exercise kernel corner cases.
    """
    g = torch.Generator().manual_seed(seed)
    n, k = out_features, in_features
    gs = k if groupsize == 0 else groupsize
    if k % gs:
        raise ValueError(f"groupsize {gs} does not divide {k}")
    ng = k // gs
    codes = torch.randint(0, 2**wbits, (n, k), generator=g, dtype=torch.uint8)
    perm = torch.randperm(k, generator=g) if act_order else None
    fields: dict[str, torch.Tensor] = {}
    mid = (2**wbits - 1) / 2
    if stat_bits == 16:
        fields["scale"] = (0.01 + 0.01 * torch.rand(n, ng, generator=g)).half()
        fields["zero"] = (mid + torch.randn(n, ng, generator=g)).half()
    else:
        nb = -(-n // beta2)
        smax = 2**stat_bits - 1
        fields["scale_codes"] = torch.randint(0, smax + 1, (n, ng), generator=g, dtype=torch.uint8)
        fields["zero_codes"] = torch.randint(0, smax + 1, (n, ng), generator=g, dtype=torch.uint8)
        ss = torch.stack([0.002 + 0.002 * torch.rand(nb, ng, generator=g), -2 - torch.rand(nb, ng, generator=g)], -1)
        zs = torch.stack([mid / smax * (1 + 0.1 * torch.rand(nb, ng, generator=g)),
                          torch.rand(nb, ng, generator=g) - 0.5], -1)
        fields["scale_stats"], fields["zero_stats"] = ss.half(), zs.half()
    mask = torch.rand(n, k, generator=g) < outlier_fraction
    if outlier_rows == "edge" and n > 1:
        mask[0] = True
        mask[-1] = False
    rows, cols = mask.nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=n)
    row_ptr = torch.zeros(n + 1, dtype=torch.int32)
    row_ptr[1:] = torch.cumsum(counts, 0)
    vals = (0.1 * torch.randn(rows.numel(), generator=g)).half()
    return QuantizedLayer(
        out_features=n, in_features=k, wbits=wbits, groupsize=gs, beta2=beta2 if stat_bits != 16 else 0,
        stat_bits=stat_bits, codes=codes, perm=perm, outlier_row_ptr=row_ptr,
        outlier_col=cols.to(torch.int32), outlier_val=vals, **fields,
    )
