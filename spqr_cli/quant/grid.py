"""The quantization grid shared by every method: per-row min/max fits of a group of columns, the bilevel
(second-level) quantization of their statistics, and the assembly of a ``QuantizedLayer`` from them.

Every value here is rounded exactly as ``QuantizedLayer.dequantize`` decodes it (fp16 statistics, or codes plus
fp16 second-level pairs; a dequantized weight rounded to fp16 once), so a method that writes these values back
into the weight propagates exactly the error the stored model has.
"""

from __future__ import annotations

import torch

from spqr_cli.core.config import QuantConfig
from spqr_cli.quant.record import QuantizedLayer

_FP16_TINY = 2.0**-24  # smallest positive fp16 value: stored scales never round to zero


def minmax_params(
    xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, *, sym: bool, round_zero: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero (fp32) of an affine grid ``s * (q - z)``, ``q in 0..maxq``, spanning [xmin, xmax]."""
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax.abs())
        xmin = -xmax
    # A constant group keeps its value exactly representable by stretching the range to include 0;
    # an all-zero group gets the range [-1, 1] with an integer zero (GPTQ's rule), so 0 stays exact.
    const = xmin == xmax
    xmin = torch.where(const, xmin.clamp(max=0), xmin)
    xmax = torch.where(const, xmax.clamp(min=0), xmax)
    empty = xmin == xmax
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = -xmin / scale
        zero = torch.where(empty, zero.round(), zero.round() if round_zero else zero)
    return scale, zero


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes (as fp32) of ``x`` on the grid ``scale * (q - zero)``."""
    return torch.clamp(torch.round(x / scale.clamp_min(1e-9) + zero), 0, maxq)


def decode_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``fp16(scale * (codes - zero))`` back in fp32: the exact arithmetic of ``QuantizedLayer.dequantize``."""
    return (scale * (codes - zero)).to(torch.float16).float()


CLIP_MAX_SHRINK = 0.8  # the narrowest range tried is 20% of the min/max range (GPTQ's search)
CLIP_NORM = 2.4  # the error the search minimizes: sum |w - q|^2.4 per row (GPTQ's)
CLIP_CHUNK_ELEMENTS = 2**24  # candidates evaluated at once: at most this many [candidates, rows, group] elements


def clipped_range(w: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, grid: int, *, sym: bool,
                  round_zero: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``w`` ``[N, gs]``, the range ``p * [xmin, xmax]`` (``p = 1 - CLIP_MAX_SHRINK * i / grid``, ``i <
    grid``) whose grid quantizes the row with the smallest ``Σ |w - q|^CLIP_NORM``: clipping the extremes buys a
    finer step for the rest. The error is scored with the unrounded scale and zero (bilevel statistics are rounded
    after the choice, so a row can end slightly worse than with min/max; the layer's error falls). Candidates are
    evaluated in chunks of at most ~16M elements."""
    best_err = torch.full_like(xmin, torch.inf)
    best_p = torch.ones_like(xmin)
    chunk = max(1, CLIP_CHUNK_ELEMENTS // max(1, w.numel()))
    for i0 in range(0, grid, chunk):
        p = 1 - torch.arange(i0, min(grid, i0 + chunk), device=w.device, dtype=torch.float32) * (CLIP_MAX_SHRINK / grid)
        s, z = minmax_params(p[:, None] * xmin, p[:, None] * xmax, maxq, sym=sym, round_zero=round_zero)  # [c, N]
        s, z = s[..., None], z[..., None]
        err = (s * (quantize_codes(w, s, z, maxq) - z) - w).abs().pow(CLIP_NORM).sum(-1)  # [c, N]
        err, idx = err.min(0)  # the first (widest) on ties
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_p = torch.where(better, p[idx], best_p)
    return best_p * xmin, best_p * xmax


def quantize_stat(v: torch.Tensor, beta2: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second level: quantize the statistic ``v`` ``[N]`` to ``bits`` in groups of ``beta2`` rows.

    Returns (codes uint8 [N], fp16 second-level (scale, zero) [ceil(N/beta2), 2], decoded fp32 [N]); the decoded
    values use the fp16-rounded second-level pair, exactly as ``QuantizedLayer.stats_fp32`` does.
    """
    n = v.shape[0]
    nb = -(-n // beta2)
    maxq = 2**bits - 1
    padded = torch.cat([v, v[-1:].expand(nb * beta2 - n)])  # a partial last row group: repeat its last row
    blocks = padded.view(nb, beta2)
    lo, hi = blocks.amin(dim=1), blocks.amax(dim=1)
    const = lo == hi
    # min/max grid (zero not rounded); a constant row group is stored exactly as code 0 of (s=v, z=-1)
    step = torch.where(const, 1.0, (hi - lo) / maxq)
    s2 = torch.where(const, torch.where(lo != 0, lo, 1.0), step)
    z2 = torch.where(const, torch.where(lo != 0, -1.0, 0.0), -lo / step)
    s2 = s2.to(torch.float16)
    s2 = torch.where(s2 == 0, _FP16_TINY, s2.float()).to(torch.float16)  # never a zero step after rounding
    z2 = z2.to(torch.float16)
    st = torch.stack([s2, z2], dim=1)  # [nb, 2] fp16
    s2f, z2f = s2.float()[:, None], z2.float()[:, None]
    codes = torch.clamp(torch.round(blocks / s2f + z2f), 0, maxq)
    decoded = s2f * (codes - z2f)
    return codes.reshape(-1)[:n].to(torch.uint8), st, decoded.reshape(-1)[:n]


class GroupStats:
    """First-level statistics of one group of columns: fp32 values used by the loop plus their stored form."""

    def __init__(self, w: torch.Tensor, cfg: QuantConfig, holds_zero: bool) -> None:
        """Fit on ``w`` ``[N, gs]`` (rows independent), then round to the stored form.

        ``holds_zero``: GPTQ's quantizer (the range always holds 0, the zero point is an integer, so 0 decodes
        exactly); otherwise SpQR's (the min/max range of the group, a fractional zero point).
        """
        maxq = 2**cfg.wbits - 1
        xmin, xmax = w.amin(dim=1), w.amax(dim=1)
        if holds_zero:
            xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
        if cfg.clip_grid:
            xmin, xmax = clipped_range(w, xmin, xmax, maxq, cfg.clip_grid, sym=cfg.sym, round_zero=holds_zero)
        scale, zero = minmax_params(xmin, xmax, maxq, sym=cfg.sym, round_zero=holds_zero)
        self.maxq = maxq
        if cfg.stat_bits == 16:
            s16 = scale.to(torch.float16)
            self.stored = {
                "scale": torch.where(s16 == 0, _FP16_TINY, s16.float()).to(torch.float16),
                "zero": zero.to(torch.float16),
            }
            self.scale, self.zero = self.stored["scale"].float(), self.stored["zero"].float()
        else:  # bilevel: the zero was computed against the unquantized scale (as in the reference)
            sc, sst, self.scale = quantize_stat(scale, cfg.beta2, cfg.stat_bits)
            zc, zst, self.zero = quantize_stat(zero, cfg.beta2, cfg.stat_bits)
            self.stored = {"scale_codes": sc, "scale_stats": sst, "zero_codes": zc, "zero_stats": zst}
        self.code_of_zero = quantize_codes(torch.zeros_like(self.scale), self.scale, self.zero, maxq)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        s, z = (self.scale, self.zero) if x.ndim == 1 else (self.scale[:, None], self.zero[:, None])
        return quantize_codes(x, s, z, self.maxq)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        s, z = (self.scale, self.zero) if codes.ndim == 1 else (self.scale[:, None], self.zero[:, None])
        return decode_codes(codes, s, z)


def make_record(
    cfg: QuantConfig,
    n: int,
    k: int,
    gs: int,
    codes: torch.Tensor,
    groups: list[dict[str, torch.Tensor]],
    perm: torch.Tensor | None,
    outlier: torch.Tensor | None,
    outlier_val: torch.Tensor | None,
) -> QuantizedLayer:
    """Assemble the CPU record: each group's stored statistics (``GroupStats.stored``) stacked over groups,
    outliers as CSR in original column order."""
    stored = {name: torch.stack([g[name] for g in groups], dim=1).cpu() for name in groups[0]}
    if outlier is None:
        row_ptr = torch.zeros(n + 1, dtype=torch.int32)
        cols = torch.zeros(0, dtype=torch.int32)
        vals = torch.zeros(0, dtype=torch.float16)
    else:
        if perm is not None:  # back to original column order, so that nonzero() sorts columns per row
            mask, val = torch.empty_like(outlier), torch.empty_like(outlier_val)
            mask[:, perm], val[:, perm] = outlier, outlier_val
            outlier, outlier_val = mask, val
        rows, cols = outlier.nonzero(as_tuple=True)
        vals = outlier_val[rows, cols].cpu()
        counts = torch.bincount(rows, minlength=n).cpu()
        row_ptr = torch.zeros(n + 1, dtype=torch.int64)
        row_ptr[1:] = torch.cumsum(counts, 0)
        row_ptr, cols = row_ptr.to(torch.int32), cols.to(torch.int32).cpu()
    return QuantizedLayer(
        out_features=n,
        in_features=k,
        wbits=cfg.wbits,
        groupsize=gs,
        beta2=cfg.beta2 if cfg.stat_bits != 16 else 0,
        stat_bits=cfg.stat_bits,
        codes=codes.cpu(),
        outlier_row_ptr=row_ptr,
        outlier_col=cols,
        outlier_val=vals,
        perm=None if perm is None else perm.cpu(),
        **stored,
    )
