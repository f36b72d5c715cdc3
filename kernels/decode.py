"""Plain-torch decoding of the packed layout, and the CPU production path built on it.

``dequantize_fp16`` is exactly ``QuantizedLayer.dequantize`` (the record's decoder, the bit-exact contract) computed
from the packed buffers: statistics decoded in fp32 from their fp16 second-level pairs, ``fp16(s * (q - z))``
rounded once, columns put back in their original order, outliers written over. ``linear_torch`` multiplies by it;
on CPU in fp32 even for fp16 activations (CPU fp16 GEMM is slow and, where it exists, accumulates in fp32 anyway),
rounded to the activation dtype once, so the result equals the dense fp16 model up to summation order.

The helpers here are shared with the kernels' runtime tensors (``outliers.py``) and the test oracle
(``reference.py``); they only read the layout, they choose nothing.
"""

from __future__ import annotations

import os
import warnings
import weakref

import torch
import torch.nn.functional as F

from .layout import PackedWeight, unpack_rows


def decode_stats(pw: PackedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """First-level ``(scale, zero)`` as fp32 ``[G, N]`` (decoded through the second level when quantized)."""
    t = pw.tensors
    if pw.stat_bits == 16:
        return t["scales"].float(), t["zeros"].float()
    n = pw.out_features
    block = torch.arange(n, device=t["qscale"].device) // pw.beta2

    def decode(packed: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        codes = unpack_rows(packed, pw.stat_bits, n).float().t()  # [G, N]
        st = second.float()[:, :, block]  # [2, G, N]
        return st[0] * (codes - st[1])

    return decode(t["qscale"], t["scale_stats"]), decode(t["qzero"], t["zero_stats"])


def dequantize_permuted(pw: PackedWeight) -> torch.Tensor:
    """fp32 ``[N, K]`` dense weight in *permuted* column order, without outliers."""
    codes = unpack_rows(pw.tensors["qweight"], pw.wbits, pw.out_features).float().t()  # [K, N]
    s, z = decode_stats(pw)
    s = s.repeat_interleave(pw.groupsize, dim=0)
    z = z.repeat_interleave(pw.groupsize, dim=0)
    return (s * (codes - z)).t().contiguous()


def inverse_perm(pw: PackedWeight) -> torch.Tensor | None:
    """int64 ``[K]``: the permuted position of each original input column (``None`` for the identity order)."""
    perm = pw.get("perm")
    if perm is None:
        return None
    inv = torch.empty(pw.in_features, dtype=torch.long, device=perm.device)
    inv[perm.long()] = torch.arange(pw.in_features, device=perm.device)
    return inv


def outlier_rows(pw: PackedWeight) -> torch.Tensor:
    """int64 ``[nnz]`` output row of each outlier (expanded from the CSR row pointers)."""
    ptr = pw.tensors["outlier_row_ptr"].long()
    counts = ptr[1:] - ptr[:-1]
    return torch.repeat_interleave(torch.arange(pw.out_features, device=ptr.device), counts)


def outlier_cols(pw: PackedWeight) -> torch.Tensor:
    """int64 ``[nnz]`` original input column of each outlier (the int16 storage is read as unsigned)."""
    return pw.tensors["outlier_col"].long() & 0xFFFF


def dense_weight(pw: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The ``[N, K]`` dense weight in original column order, outliers written in: the fp32 decode rounded to
    ``dtype`` once (fp16: exactly the record's decode; fp32: the exact values, the kernels' test oracle)."""
    w = dequantize_permuted(pw).to(dtype)
    perm = pw.get("perm")
    if perm is not None:
        dense = torch.empty_like(w)
        dense[:, perm.long()] = w
        w = dense
    if pw.nnz:
        w[outlier_rows(pw), outlier_cols(pw)] = pw.tensors["outlier_val"].to(dtype)
    return w


def dequantize_fp16(pw: PackedWeight) -> torch.Tensor:
    """The fp16 ``[N, K]`` dense weight in original column order, outliers included (= the record's decode)."""
    return dense_weight(pw, torch.float16)


def linear_torch(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` through ``dequantize_fp16``; ``x`` of any float dtype, the result in ``x``'s dtype.

    On CPU the decoded weight is cached per layer view (``cpu_weight``), within a memory budget: decoding a layer
    costs 100-150x its one-token multiply, so decoding on every call made packed CPU generation ~15x slower than
    dense. The cached tensor is exactly the one the uncached path builds, so the results are bit-identical."""
    compute = torch.float32 if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    w = cpu_weight(pw, compute) if x.device.type == "cpu" else None
    if w is None:
        w = dequantize_fp16(pw).to(x.device).to(compute)
    bias = None if bias is None else bias.to(compute)
    return F.linear(x.to(compute), w, bias).to(x.dtype)


# ----------------------------------------------------------------------------------------------- CPU weight cache
#
# One decoded weight per live ``PackedWeight`` view, keyed by object identity and dropped with the view (as
# ``outliers.prepare`` caches its residuals): ``SpQRLinear`` keeps its view for as long as its buffers are
# unchanged and builds a new one when they change, so an entry never outlives the bytes it was decoded from.
# Mutating ``pw.tensors`` in place makes the entry stale: build a new ``PackedWeight`` instead.
#
# The entries are stored in the compute dtype (fp32 for fp16/bf16 activations), twice the memory of an fp16
# copy but measured ~9x faster per call at 7B shapes (4096x4096, one token, 2-core CPU: 4.9 ms reading the fp32
# copy vs 43 ms casting an fp16 copy each call); the budget bounds the memory, and a layer beyond it is decoded
# per call as before, with one warning.

CACHE_ENV = "SPQR_CPU_CACHE_GB"
DEFAULT_CACHE_FRACTION = 0.5  # of the RAM available when the first layer is cached
FALLBACK_BUDGET_GB = 4.0  # where the available RAM cannot be read
_WEIGHTS: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
_cached_bytes = 0
_default_budget: int | None = None
_warned_full = False
_warned_env: set[str] = set()


def cpu_weight(pw: PackedWeight, dtype: torch.dtype) -> torch.Tensor | None:
    """The dense ``[N, K]`` weight of a CPU-resident ``pw`` in ``dtype``, decoded once and kept while ``pw`` lives;
    ``None`` (decode per call) when the weights are not on the CPU or caching it would exceed the budget."""
    global _cached_bytes
    if pw.tensors["qweight"].device.type != "cpu":
        return None
    key = id(pw)
    hit = _WEIGHTS.get(key)
    if hit is not None and hit[0]() is pw and hit[1].dtype == dtype:
        return hit[1]
    size = pw.out_features * pw.in_features * torch.empty((), dtype=dtype).element_size()
    if hit is not None:
        _drop(key)
    budget = cache_budget_bytes()
    if _cached_bytes + size > budget:
        if budget > 0:  # 0 = caching switched off on purpose: nothing to warn about
            _warn_full(budget)
        return None
    w = dequantize_fp16(pw).to(dtype)
    _WEIGHTS[key] = (weakref.ref(pw, lambda _ref, key=key: _drop(key)), w)
    _cached_bytes += size
    return w


def _drop(key: int) -> None:
    global _cached_bytes
    entry = _WEIGHTS.pop(key, None)
    if entry is not None:
        _cached_bytes -= entry[1].numel() * entry[1].element_size()


def clear_cpu_cache() -> None:
    """Forget every cached weight (e.g. after changing ``SPQR_CPU_CACHE_GB``); the next calls decode again."""
    global _warned_full
    for key in list(_WEIGHTS):
        _drop(key)
    _warned_full = False


def cpu_cache_bytes() -> int:
    """Bytes of decoded weights the CPU cache holds now."""
    return _cached_bytes


def cache_budget_bytes() -> int:
    """``$SPQR_CPU_CACHE_GB`` (0 disables the cache), else half the RAM available when first asked (read once:
    the cache itself shrinks what is available)."""
    global _default_budget
    raw = os.environ.get(CACHE_ENV, "").strip()
    if raw:
        try:
            gb = float(raw)
            if not gb >= 0 or gb == float("inf"):
                raise ValueError
            return int(gb * 2**30)
        except ValueError:
            if raw not in _warned_env:
                _warned_env.add(raw)
                warnings.warn(f"{CACHE_ENV}={raw!r} is not a number of GB >= 0; using the default budget "
                              f"({DEFAULT_CACHE_FRACTION:.0%} of available RAM)", RuntimeWarning, stacklevel=2)
    if _default_budget is None:
        available = available_ram_bytes()
        _default_budget = int(DEFAULT_CACHE_FRACTION * available) if available else int(FALLBACK_BUDGET_GB * 2**30)
    return _default_budget


def available_ram_bytes() -> int:
    """RAM available to new allocations (psutil when installed, else ``sysconf``; 0 when neither can tell)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0


def _warn_full(budget: int) -> None:
    """Say once per process that layers are being decoded per call, and how to give the cache more room."""
    global _warned_full
    if not _warned_full:
        _warned_full = True
        warnings.warn(f"the CPU cache of decoded SpQR weights is full ({_cached_bytes / 2**30:.2f} of "
                      f"{budget / 2**30:.2f} GB); the remaining packed layers are decoded on every call, which is "
                      f"much slower. Set {CACHE_ENV}=<GB> to a larger budget if the RAM allows", RuntimeWarning,
                      stacklevel=4)
