"""The per-layer algorithm: SpQR, with GPTQ and round-to-nearest (RTN) as its special cases.

For one linear layer ``W`` (``N = out_features`` rows, ``K = in_features`` columns) and calibration inputs ``X``:

1. ``H = 2/n · Σ x xᵀ`` in fp32 (:class:`HessianAccumulator`).
2. Act-order permutation (columns by descending ``diag H``) or identity.
3. Dead columns (``diag H == 0``: the input is always zero) get zero weights; damping
   ``H += percdamp · mean(diag H) · I``; their diagonal is then set to 1.
4. ``U = upper Cholesky factor of H⁻¹``: quantizing column ``i`` with error ``e`` is compensated by
   ``W[:, i+1:] -= (e / U[i, i]) ⊗ U[i, i+1:]`` (the OBS update in GPTQ's form), applied inside blocks of
   ``blocksize`` columns and to the columns after a block with one matmul.
5. At the start of every group of ``β1`` columns the group's *current* (error-updated) weights get per-row min/max
   statistics (scale, zero) at ``wbits``.  SpQR quantizes these statistics again, to ``stat_bits`` in groups of
   ``β2`` rows, with an fp16 (scale, zero) pair per row group; GPTQ and RTN keep them in fp16.
6. SpQR outliers, with ``threshold = τ · mean_j(var(W[:, j]) / U[j, j]²)``:
   - before fitting a group's statistics, every weight whose removal from its row's group lowers the row's
     Hessian-weighted error ``Σ_j ((w_j - q(w_j)) / U[j, j])²`` by more than ``threshold`` (leave-one-out) is
     set aside, and the statistics are fitted on the remaining weights;
   - when a column is quantized, a weight whose own Hessian-weighted error ``((w - q(w)) / U[i, i])²`` exceeds
     ``threshold`` becomes an outlier: it is kept in fp16, its error (only the fp16 rounding) is propagated.
7. Codes, statistics, outliers (CSR, original column order) and the permutation form a :class:`QuantizedLayer`.

Every value the loop writes back into ``W`` (and so every error it propagates) is exactly what
``QuantizedLayer.dequantize`` decodes from the stored tensors: the statistics are rounded to their stored form
(fp16, or codes plus fp16 second-level pairs) before use, and a dequantized weight is rounded to fp16 once.

``method="gptq"`` is the same loop without outliers; ``method="rtn"`` fits each group on the original weights and
rounds, without a Hessian.
"""

from __future__ import annotations

import math

import torch

from .config import QuantConfig
from .errors import SpQRError
from .record import QuantizedLayer

_FP16_TINY = 2.0**-24  # smallest positive fp16 value: stored scales never round to zero


class HessianAccumulator:
    """Accumulates H = 2/n * sum x x^T in fp32 over calibration tokens for one linear layer."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.in_features = in_features
        self._xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self._n = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """Add the inputs ``x`` (``[..., in_features]``, any float dtype); every row is one token."""
        if x.shape[-1] != self.in_features:
            raise SpQRError(
                f"calibration input has {x.shape[-1]} features, but this layer has {self.in_features} inputs"
            )
        x = x.reshape(-1, self.in_features).to(device=self._xtx.device, dtype=torch.float32)
        self._xtx.addmm_(x.T, x)
        self._n += x.shape[0]

    @property
    def nsamples(self) -> int:
        return self._n

    @property
    def hessian(self) -> torch.Tensor:
        if self._n == 0:
            raise SpQRError("no calibration inputs reached this layer; the Hessian is undefined")
        h = self._xtx * (2.0 / self._n)
        if not torch.isfinite(h).all():
            raise SpQRError("the calibration inputs of this layer contain inf/nan (check the model's dtype)")
        return h


# --------------------------------------------------------------------------------------------------------------
# min/max quantizers


def _minmax_params(
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


def _quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes (as fp32) of ``x`` on the grid ``scale * (q - zero)``."""
    return torch.clamp(torch.round(x / scale.clamp_min(1e-9) + zero), 0, maxq)


def _decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``fp16(scale * (codes - zero))`` back in fp32: the exact arithmetic of ``QuantizedLayer.dequantize``."""
    return (scale * (codes - zero)).to(torch.float16).float()


def _quantize_stat(v: torch.Tensor, beta2: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


class _GroupStats:
    """First-level statistics of one group of columns: fp32 values used by the loop plus their stored form."""

    def __init__(self, w: torch.Tensor, cfg: QuantConfig) -> None:
        """Fit on ``w`` ``[N, gs]`` (rows independent), then round to the stored form."""
        maxq = 2**cfg.wbits - 1
        xmin, xmax = w.amin(dim=1), w.amax(dim=1)
        if cfg.method != "spqr":  # GPTQ's quantizer: the range always holds 0, integer zero point
            xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
        scale, zero = _minmax_params(xmin, xmax, maxq, sym=cfg.sym, round_zero=cfg.method != "spqr")
        self.maxq = maxq
        if cfg.stat_bits == 16:
            s16 = scale.to(torch.float16)
            self.stored = {
                "scale": torch.where(s16 == 0, _FP16_TINY, s16.float()).to(torch.float16),
                "zero": zero.to(torch.float16),
            }
            self.scale, self.zero = self.stored["scale"].float(), self.stored["zero"].float()
        else:  # bilevel: the zero was computed against the unquantized scale (as in the reference)
            sc, sst, self.scale = _quantize_stat(scale, cfg.beta2, cfg.stat_bits)
            zc, zst, self.zero = _quantize_stat(zero, cfg.beta2, cfg.stat_bits)
            self.stored = {"scale_codes": sc, "scale_stats": sst, "zero_codes": zc, "zero_stats": zst}
        self.code_of_zero = _quantize(torch.zeros_like(self.scale), self.scale, self.zero, maxq)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        s, z = (self.scale, self.zero) if x.ndim == 1 else (self.scale[:, None], self.zero[:, None])
        return _quantize(x, s, z, self.maxq)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        s, z = (self.scale, self.zero) if codes.ndim == 1 else (self.scale[:, None], self.zero[:, None])
        return _decode(codes, s, z)


# --------------------------------------------------------------------------------------------------------------
# outliers


def _loo_error_reduction(w: torch.Tensor, d: torch.Tensor, maxq: int, sym: bool) -> torch.Tensor:
    """For each weight of ``w`` ``[N, gs]``: how much the row's Hessian-weighted squared quantization error
    ``Σ_j ((w_j - q(w_j)) / d_j)²`` drops if that weight is left out (not quantized) and the row's min/max
    quantizer is refitted on the others.  Same quantity as the reference's ``get_leave_one_out_error``.

    Leaving a weight out changes the fit only when it is the row's minimum or maximum, so three fits per row
    (all weights; without the argmin; without the argmax) give every leave-one-out error in O(N * gs).
    """
    n, gs = w.shape
    inv_d2 = d.reshape(1, gs).reciprocal().square()

    def sq_errors(xmin: torch.Tensor, xmax: torch.Tensor) -> torch.Tensor:
        s, z = _minmax_params(xmin, xmax, maxq, sym=sym, round_zero=False)
        s, z = s[:, None], z[:, None]
        return (s * (_quantize(w, s, z, maxq) - z) - w).square() * inv_d2  # fp32, as in the reference

    err_all = sq_errors(w.amin(1), w.amax(1))
    if gs < 2:
        return err_all  # nothing left to fit: leaving the weight out removes its whole error
    lows, arg_lo = w.topk(2, dim=1, largest=False)
    highs, arg_hi = w.topk(2, dim=1, largest=True)
    err_no_lo = sq_errors(lows[:, 1], highs[:, 0])
    err_no_hi = sq_errors(lows[:, 0], highs[:, 1])
    loo = err_all.sum(1, keepdim=True) - err_all  # refit unchanged
    rows = torch.arange(n, device=w.device)
    loo[rows, arg_lo[:, 0]] = err_no_lo.sum(1) - err_no_lo[rows, arg_lo[:, 0]]
    loo[rows, arg_hi[:, 0]] = err_no_hi.sum(1) - err_no_hi[rows, arg_hi[:, 0]]
    return err_all.sum(1, keepdim=True) - loo


def _without_outliers(w: torch.Tensor, outlier: torch.Tensor) -> torch.Tensor:
    """``w`` with the likely outliers replaced by their row's mean over the other weights (they then do not
    widen the min/max range)."""
    keep = (~outlier).float()
    mean = (w * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
    return torch.where(outlier, mean, w)


# --------------------------------------------------------------------------------------------------------------
# the layer


def _validate(weight: torch.Tensor, hessian: torch.Tensor | None, cfg: QuantConfig) -> None:
    if weight.ndim != 2 or not weight.is_floating_point():
        raise SpQRError(f"expected a 2-D float weight [out_features, in_features], got {tuple(weight.shape)}")
    n, k = weight.shape
    if cfg.groupsize and k % cfg.groupsize:
        raise SpQRError(
            f"groupsize {cfg.groupsize} does not divide in_features {k} of this layer; "
            "choose a divisor or 0 for per-channel"
        )
    if cfg.sym and cfg.stat_bits != 16:
        raise SpQRError("symmetric quantization (--sym) is supported only with fp16 statistics (--stat-bits 16)")
    if cfg.stat_bits != 16 and cfg.beta2 < 1:
        raise SpQRError("quantized statistics (stat_bits < 16) need --beta2 >= 1")
    if not torch.isfinite(weight).all():
        raise SpQRError(f"the weight [{n}, {k}] contains inf/nan; refusing to quantize it")
    if cfg.method == "rtn":
        return
    if hessian is None:
        raise SpQRError(f"method {cfg.method} needs a Hessian (calibration data); only rtn works without one")
    if tuple(hessian.shape) != (k, k):
        raise SpQRError(f"Hessian shape {tuple(hessian.shape)} does not match in_features {k} (expected [{k}, {k}])")
    if not torch.isfinite(hessian).all():
        raise SpQRError("the Hessian contains inf/nan (calibration inputs overflowed?)")


def _inverse_cholesky(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Damp ``h`` (dead diagonal already 0) in place and return the upper Cholesky factor of its inverse."""
    dead = torch.diag(h) == 0
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += percdamp * torch.diag(h).abs().mean()
    h[idx[dead], idx[dead]] = 1.0
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item() == 0:
        u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if info.item() != 0:
        raise SpQRError(
            f"the damped Hessian is not positive definite (percdamp {percdamp}); "
            "raise --percdamp or use more calibration data"
        )
    return u


def quantize_layer(weight: torch.Tensor, hessian: torch.Tensor | None, cfg: QuantConfig) -> QuantizedLayer:
    """Quantize one linear layer's ``weight`` ``[N, K]`` with ``cfg`` (SpQR, GPTQ or RTN).

    ``hessian`` is the fp32 ``[K, K]`` matrix of :class:`HessianAccumulator` (``None`` only for RTN). The work runs
    on ``weight.device`` in fp32; the result's tensors are on the CPU. Deterministic: the same inputs give
    bit-identical outputs. The inputs are not modified.
    """
    _validate(weight, hessian, cfg)
    n, k = weight.shape
    gs = cfg.group_size_for(k)
    dev = weight.device
    w = weight.detach().to(dtype=torch.float32, copy=True)
    codes = torch.empty(n, k, dtype=torch.uint8, device=dev)  # permuted column order
    groups: list[_GroupStats] = []

    if cfg.method == "rtn":  # no Hessian, no permutation, no error feedback
        for g0 in range(0, k, gs):
            stats = _GroupStats(w[:, g0 : g0 + gs], cfg)
            codes[:, g0 : g0 + gs] = stats.quantize(w[:, g0 : g0 + gs])
            groups.append(stats)
        return _record(cfg, n, k, gs, codes, groups, None, None, None)

    h = hessian.detach().to(device=dev, dtype=torch.float32, copy=True)
    perm = None
    if cfg.perm == "act_order":
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        w, h = w[:, perm], h[perm][:, perm]
    dead = torch.diag(h) == 0
    w[:, dead] = 0
    u = _inverse_cholesky(h, cfg.percdamp)
    del h
    d = torch.diag(u).clone()

    use_outliers = cfg.has_outliers
    threshold = math.inf
    if use_outliers:
        col_var = w.var(dim=0, correction=1 if n > 1 else 0)
        threshold = cfg.outlier_threshold * (col_var / d.square()).mean().item()
        outlier = torch.zeros(n, k, dtype=torch.bool, device=dev)
        outlier_val = torch.zeros(n, k, dtype=torch.float16, device=dev)

    err = torch.empty(n, cfg.blocksize, dtype=torch.float32, device=dev)  # (w - q) / U[i, i] of this block
    stats: _GroupStats | None = None
    for b0 in range(0, k, cfg.blocksize):
        b1 = min(b0 + cfg.blocksize, k)
        for i in range(b0, b1):
            e = err[:, i - b0]
            if i % gs == 0:
                group = w[:, i : i + gs]
                if use_outliers:
                    likely = _loo_error_reduction(group, d[i : i + gs], 2**cfg.wbits - 1, cfg.sym) > threshold
                    group = _without_outliers(group, likely)
                stats = _GroupStats(group, cfg)
                groups.append(stats)
            col = w[:, i]
            q = stats.quantize(col)
            deq = stats.decode(q)
            if use_outliers:
                is_out = ((col - deq) / d[i]).square() > threshold
                kept = col.to(torch.float16)
                deq = torch.where(is_out, kept.float(), deq)
                q = torch.where(is_out, stats.code_of_zero, q)  # a valid code; dequantize() overwrites it
                outlier[:, i] = is_out
                outlier_val[:, i] = torch.where(is_out, kept, 0)
            codes[:, i] = q
            torch.div(col - deq, d[i], out=e)
            w[:, i] = deq
            w[:, i + 1 : b1].addr_(e, u[i, i + 1 : b1], alpha=-1)
        w[:, b1:].addmm_(err[:, : b1 - b0], u[b0:b1, b1:], alpha=-1)

    if not use_outliers:
        return _record(cfg, n, k, gs, codes, groups, perm, None, None)
    return _record(cfg, n, k, gs, codes, groups, perm, outlier, outlier_val)


def _record(
    cfg: QuantConfig,
    n: int,
    k: int,
    gs: int,
    codes: torch.Tensor,
    groups: list[_GroupStats],
    perm: torch.Tensor | None,
    outlier: torch.Tensor | None,
    outlier_val: torch.Tensor | None,
) -> QuantizedLayer:
    """Assemble the CPU record: stats stacked over groups, outliers as CSR in original column order."""
    stored = {name: torch.stack([g.stored[name] for g in groups], dim=1).cpu() for name in groups[0].stored}
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
