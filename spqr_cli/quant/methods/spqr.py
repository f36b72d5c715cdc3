"""SpQR, the per-layer algorithm (GPTQ's second-order column loop with bilevel statistics and outliers).

For one linear layer ``W`` (``N = out_features`` rows, ``K = in_features`` columns) and calibration inputs ``X``:

1. ``H = 2/n · Σ x xᵀ`` in fp32 (``quant.hessian.HessianAccumulator``).
2. Act-order permutation (columns by descending ``diag H``) or identity.
3. Dead columns (``diag H == 0``: the input is always zero) get zero weights; damping
   ``H += percdamp · mean(diag H) · I``; their diagonal is then set to 1.
4. ``U = upper Cholesky factor of H⁻¹``: quantizing column ``i`` with error ``e`` is compensated by
   ``W[:, i+1:] -= (e / U[i, i]) ⊗ U[i, i+1:]`` (the OBS update in GPTQ's form), applied inside blocks of
   ``blocksize`` columns and to the columns after a block with one matmul.
5. At the start of every group of ``β1`` columns the group's *current* (error-updated) weights get per-row min/max
   statistics (scale, zero) at ``wbits`` (with ``cfg.clip_grid``, the range is the shrunken min/max range that
   quantizes the row best: ``grid.clipped_range``). SpQR quantizes these statistics again, to ``stat_bits`` in
   groups of ``β2`` rows, with an fp16 (scale, zero) pair per row group; GPTQ and RTN keep them in fp16.
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

GPTQ (``methods/gptq.py``) is this loop without outliers and with GPTQ's grid (the range always holds 0);
the shared grid (min/max fits, bilevel statistics) is ``quant/grid.py``; the Hessian is ``quant/hessian.py``.
"""

from __future__ import annotations

import math

import torch

from spqr_cli.core.config import QuantConfig
from spqr_cli.core.errors import SpQRError
from spqr_cli.quant.column_graphs import BlockOutputs, ReplayedStep, replayed_step
from spqr_cli.quant.grid import GroupStats, make_record, minmax_params, quantize_codes
from spqr_cli.quant.hessian import damp_
from spqr_cli.quant.methods import QuantMethod
from spqr_cli.quant.record import QuantizedLayer

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
        s, z = minmax_params(xmin, xmax, maxq, sym=sym, round_zero=False)
        s, z = s[:, None], z[:, None]
        return (s * (quantize_codes(w, s, z, maxq) - z) - w).square() * inv_d2  # fp32, as in the reference

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


def _inverse_cholesky(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Damp ``h`` (dead diagonal already 0) and return the upper Cholesky factor of its inverse. ``h`` is used as
    scratch (it ends holding ``H⁻¹``): each step's result is copied into it and the temporary dropped, so at most
    two ``[K, K]`` matrices are alive (a LLaMA-70B down projection's is 3.3 GB in fp32)."""
    damp_(h, percdamp)
    lower, info = torch.linalg.cholesky_ex(h)
    u = None
    if info.item() == 0:
        h.copy_(lower)
        del lower
        h.copy_(torch.cholesky_inverse(h))
        u, info = torch.linalg.cholesky_ex(h, upper=True)
    if info.item() != 0:
        raise SpQRError(
            f"the damped Hessian is not positive definite (percdamp {percdamp}); "
            "raise --percdamp or use more calibration data"
        )
    return u


def prepare_obs(weight: torch.Tensor, hessian: torch.Tensor,
                cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Steps 2-4 (module docstring), which depend on the weight, the Hessian, ``cfg.perm`` and ``cfg.percdamp``
    only: the fp32 weight in column order with dead columns zeroed, the permutation (or ``None``) and ``U``.
    Computed once per layer when several thresholds are tried (``fit_budget``)."""
    w = weight.detach().to(dtype=torch.float32, copy=True)
    act_order = cfg.perm == "act_order"
    h = hessian.detach().to(device=weight.device, dtype=torch.float32, copy=not act_order)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        w, h = w[:, perm], h.index_select(0, perm)
        h = h.index_select(1, perm)  # (one [K, K] temporary; h[perm[:, None], perm] would build two index tensors)
    dead = torch.diag(h) == 0
    w[:, dead] = 0
    return w, perm, _inverse_cholesky(h, cfg.percdamp)


def _quantize_columns(w: torch.Tensor, d: torch.Tensor, u: torch.Tensor, threshold: torch.Tensor | float,
                      out: BlockOutputs, *, cfg: QuantConfig, gs: int, holds_zero: bool, first: int = 0,
                      stats: GroupStats | None = None) -> tuple[list[GroupStats], GroupStats | None]:
    """Steps 5-6 for one block of ``B = len(u)`` columns: quantize ``w[:, :B]`` in place (each column becomes its
    decoded value; the later columns of the block take its error update) and write ``out``.

    ``w`` ``[N, >= B]`` and ``d`` (``diag(U)``, ``>= B``) start at the block's first column, which is column
    ``first`` of the layer (a group fitted inside the block may reach past it); ``u`` is ``U[block, block]``;
    ``threshold`` the outlier threshold (``math.inf``: none; a 0-d tensor when replayed as a CUDA graph); ``gs``
    the layer's group size; ``stats`` the statistics of a group begun in an earlier block. Returns the groups
    begun here and the statistics in use at the end.
    """
    size = u.shape[0]
    begun = []
    for j in range(size):
        if (first + j) % gs == 0:
            group = w[:, j : j + gs]
            if out.outlier is not None:
                likely = _loo_error_reduction(group, d[j : j + gs], 2**cfg.wbits - 1, cfg.sym) > threshold
                group = _without_outliers(group, likely)
            stats = GroupStats(group, cfg, holds_zero)
            begun.append(stats)
        col = w[:, j]
        q = stats.quantize(col)
        deq = stats.decode(q)
        if out.outlier is not None:
            is_out = ((col - deq) / d[j]).square() > threshold
            kept = col.to(torch.float16)
            deq = torch.where(is_out, kept.float(), deq)
            q = torch.where(is_out, stats.code_of_zero, q)  # a valid code; dequantize() overwrites it
            out.outlier[:, j] = is_out
            out.outlier_val[:, j] = torch.where(is_out, kept, 0)
        out.codes[:, j] = q
        e = out.err[:, j]
        torch.div(col - deq, d[j], out=e)
        w[:, j] = deq
        w[:, j + 1 : size].addr_(e, u[j, j + 1 :], alpha=-1)
    return begun, stats


def quantize_obs(weight: torch.Tensor, hessian: torch.Tensor, cfg: QuantConfig, *, outliers: bool,
                 holds_zero: bool,
                 prepared: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None,
                 graphs: bool = True) -> QuantizedLayer:
    """Quantize one layer's ``weight`` ``[N, K]`` column by column with error feedback through ``hessian``.

    ``outliers``: select fp16 outliers with ``cfg.outlier_threshold`` (SpQR; off for GPTQ). ``holds_zero``: the
    grid of ``grid.GroupStats``. ``prepared``: ``prepare_obs``'s result for this weight, Hessian and config, reused
    (not modified). The work runs on ``weight.device`` in fp32; the result's tensors are on the CPU. On a GPU the
    full blocks that start on a group boundary are replayed as one CUDA graph each (``quant.column_graphs``; same
    kernels, same result; ``graphs=False`` runs every block eagerly).
    """
    n, k = weight.shape
    gs = cfg.group_size_for(k)
    dev = weight.device
    w, perm, u = prepared if prepared is not None else prepare_obs(weight, hessian, cfg)
    if prepared is not None:
        w = w.clone()  # the column loop updates it in place
    d = torch.diag(u).clone()

    use_outliers = outliers and math.isfinite(cfg.outlier_threshold)
    threshold = math.inf
    if use_outliers:
        col_var = w.var(dim=0, correction=1 if n > 1 else 0)
        threshold = cfg.outlier_threshold * (col_var / d.square()).mean().item()
    codes = torch.empty(n, k, dtype=torch.uint8, device=dev)  # permuted column order
    outlier = torch.empty(n, k, dtype=torch.bool, device=dev) if use_outliers else None
    outlier_val = torch.empty(n, k, dtype=torch.float16, device=dev) if use_outliers else None
    err = torch.empty(n, cfg.blocksize, dtype=torch.float32, device=dev)  # one block's (w - q) / U[i, i]

    size = cfg.blocksize
    replay = None
    if graphs and dev.type == "cuda" and size % gs == 0 and k >= 3 * size:  # capture pays off from ~3 blocks

        def step(w: torch.Tensor, d: torch.Tensor, u: torch.Tensor, threshold: torch.Tensor,
                 out: BlockOutputs) -> list[dict[str, torch.Tensor]]:
            begun, _ = _quantize_columns(w, d, u, threshold, out, cfg=cfg, gs=gs, holds_zero=holds_zero)
            return [g.stored for g in begun]

        # everything the step's kernels depend on: the threshold is an input, so it is left out
        key = (dev, n, size, holds_zero, use_outliers, repr(cfg.replace(outlier_threshold=math.inf, target_bits=None)))
        replay = replayed_step(key, lambda: ReplayedStep(step, n, size, dev, use_outliers))
    stored: list[dict[str, torch.Tensor]] = []
    stats: GroupStats | None = None
    for b0 in range(0, k, size):
        b1 = min(b0 + size, k)
        out = BlockOutputs(codes[:, b0:b1], err[:, : b1 - b0])
        if use_outliers:
            out.outlier, out.outlier_val = outlier[:, b0:b1], outlier_val[:, b0:b1]
        if replay is not None and b1 - b0 == size:
            stored += replay(w[:, b0:b1], d[b0:b1], u[b0:b1, b0:b1], threshold, out)
        else:
            begun, stats = _quantize_columns(w[:, b0:], d[b0:], u[b0:b1, b0:b1], threshold, out, cfg=cfg, gs=gs,
                                             holds_zero=holds_zero, first=b0, stats=stats)
            stored += [g.stored for g in begun]
        w[:, b1:].addmm_(out.err, u[b0:b1, b1:], alpha=-1)
    return make_record(cfg, n, k, gs, codes, stored, perm, outlier, outlier_val)


# --------------------------------------------------------------------------------------------------------------
# a bit budget instead of a fixed threshold

BUDGET_PROBES = 10  # quantizations per layer under --target-bits: tau within ~2% of the budget's (see fit_budget)
TAU_RANGE = (1e-4, 1e3)  # thresholds searched: from nearly every weight an outlier to none


def outlier_budget(cfg: QuantConfig, n: int, k: int) -> int:
    """Outliers an ``[n, k]`` layer can keep within ``cfg.target_bits`` measured bits per weight (packed bytes,
    ``spqr_kernels.layout.packed_nbytes``: 4 bytes each, a 16-bit column and an fp16 value).

    Raises ``SpQRError`` when the layer does not fit the budget even without outliers."""
    from spqr_kernels.layout import packed_nbytes

    base = packed_nbytes(cfg.wbits, cfg.group_size_for(k), cfg.beta2, cfg.stat_bits, n, k, 0, cfg.has_perm)
    budget = cfg.target_bits * n * k / 8
    if base > budget:
        raise SpQRError(f"--target-bits {cfg.target_bits:g} is below what a {n}x{k} layer takes without any outlier "
                        f"({8 * base / (n * k):.3f} bits measured with {cfg.wbits}-bit codes, groups of "
                        f"{cfg.group_size_for(k)}, {cfg.stat_bits}-bit statistics); raise it, or lower --wbits / "
                        f"--stat-bits or raise --groupsize")
    return int((budget - base) // 4)


def fit_budget(weight: torch.Tensor, hessian: torch.Tensor, cfg: QuantConfig) -> QuantizedLayer:
    """SpQR with the layer's own threshold: the smallest τ whose outliers fit ``outlier_budget``.

    Each outlier removes one weight's quantization error, so under a budget the layer keeps as many as fit (the
    layer's error falls; the model's perplexity need not, see docs/benchmarks.md section 7). The outlier count
    falls as τ rises (not strictly: error feedback moves the weights), so this bisects log τ over
    ``TAU_RANGE`` (the config's own τ is not used: the budget replaces it) with ``BUDGET_PROBES`` full
    quantizations and keeps the last record that fits; if none does (a budget with room for almost no outlier),
    the layer gets none. Each probe is the whole column loop, so a budgeted run costs ~10x a fixed-τ one in the
    loop (the Hessians, the permutation and ``U`` are computed once).
    """
    n, k = weight.shape
    allowed = outlier_budget(cfg, n, k)
    prepared = prepare_obs(weight, hessian, cfg)  # the same for every probe: only the threshold changes
    lo, hi = math.log(TAU_RANGE[0]), math.log(TAU_RANGE[1])
    best = None
    for _ in range(BUDGET_PROBES):
        mid = (lo + hi) / 2
        rec = quantize_obs(weight, hessian, cfg.replace(outlier_threshold=math.exp(mid)), outliers=True,
                           holds_zero=False, prepared=prepared)
        if rec.nnz <= allowed:
            best, hi = rec, mid  # fits: try a lower threshold (more outliers)
        else:
            lo = mid
    if best is None:
        best = quantize_obs(weight, hessian, cfg, outliers=False, holds_zero=False, prepared=prepared)
    return best


def quantize_spqr(weight: torch.Tensor, hessian: torch.Tensor, cfg: QuantConfig) -> QuantizedLayer:
    """The method's entry point: a fixed τ, or the layer's own τ under ``cfg.target_bits``."""
    if cfg.target_bits is not None:
        return fit_budget(weight, hessian, cfg)
    return quantize_obs(weight, hessian, cfg, outliers=True, holds_zero=False)


METHOD = QuantMethod(
    name="spqr",
    summary="SpQR: GPTQ column updates, 3-bit bilevel group statistics, fp16 outliers",
    quantize=quantize_spqr,
    needs_hessian=True,
    permutes=True,
    outliers=True,
    default_preset="spqr-3.9bit",
)
