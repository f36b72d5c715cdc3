"""Quantization methods as a registry: one module per method in this package, each defining ``METHOD``.

A method is a ``QuantMethod``: its name (the module's name, what ``--method`` takes), what it needs and produces
(the capabilities the driver, the config and the CLI read instead of testing method names) and the function that
quantizes one layer. Adding a method is adding one module here; nothing else changes: the CLI's ``--method``
choices, ``QuantConfig`` validation and ``quantize_model`` all look methods up by name.

Method modules are found with ``pkgutil`` without importing them (``spqr --help`` stays fast); a module is
imported, with torch, when its method is first used. A method can also live outside the source tree: the
directories named in ``$SPQR_METHOD_PATH`` (``os.pathsep``-separated) are searched after this one, so
``<dir>/<name>.py`` defining ``METHOD`` is method ``<name>``.
"""

from __future__ import annotations

import functools
import importlib
import os
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from spqr_cli.core.errors import ConfigError, SpQRError

__path__ += [d for d in os.environ.get("SPQR_METHOD_PATH", "").split(os.pathsep) if d]

if TYPE_CHECKING:
    import torch

    from spqr_cli.core.config import QuantConfig
    from spqr_cli.quant.record import QuantizedLayer

LayerQuantizer = Callable[["torch.Tensor", "torch.Tensor | None", "QuantConfig"], "QuantizedLayer"]


@dataclass(frozen=True)
class QuantMethod:
    """One quantization method: its capabilities and its per-layer function.

    - ``quantize(weight, hessian, cfg)``: the fp16/fp32 ``[N, K]`` weight (not modified) and, when
      ``needs_hessian``, the layer's fp32 ``[K, K]`` calibration Hessian (else ``None``) -> ``QuantizedLayer``
      whose tensors are on the CPU. Inputs arrive validated (shapes, finiteness, groupsize).
    - ``needs_hessian``: the driver collects calibration Hessians for it (and the method accepts ``percdamp``,
      ``blocksize``).
    - ``permutes``: it honours ``perm: act_order`` (the layer stores a permutation).
    - ``outliers``: it keeps fp16 outliers selected by ``outlier_threshold``.
    - ``default_preset``: the preset (``configs/<name>.yaml``) that ``--method NAME`` starts from without
      ``--preset``; or ``defaults``: the ``QuantConfig`` values to start from (for methods that ship no preset
      file).
    """

    name: str
    summary: str
    quantize: LayerQuantizer
    needs_hessian: bool
    permutes: bool
    outliers: bool
    default_preset: str | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)


def method_names() -> list[str]:
    """Names of every registered method (module names in this package), without importing them."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


@functools.cache
def get_method(name: str) -> QuantMethod:
    """The ``QuantMethod`` called ``name`` (its module is imported on first use)."""
    if name not in method_names():
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(method_names())}")
    method = getattr(importlib.import_module(f"{__name__}.{name}"), "METHOD", None)
    if not isinstance(method, QuantMethod) or method.name != name:
        raise ConfigError(f"method module {name!r} defines no METHOD = QuantMethod(name={name!r}, ...)")
    return method


def quantize_layer(weight: torch.Tensor, hessian: torch.Tensor | None, cfg: QuantConfig) -> QuantizedLayer:
    """Quantize one linear layer's ``weight`` ``[N, K]`` with ``cfg``'s method, after checking the inputs.

    Deterministic: the same inputs give bit-identical outputs. The inputs are not modified.
    """
    method = get_method(cfg.method)
    _validate(weight, hessian, cfg, method)
    return method.quantize(weight, hessian if method.needs_hessian else None, cfg)


def _validate(weight: torch.Tensor, hessian: torch.Tensor | None, cfg: QuantConfig, method: QuantMethod) -> None:
    import torch

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
    if not method.needs_hessian:
        return
    if hessian is None:
        raise SpQRError(f"method {cfg.method} needs a Hessian (calibration data); "
                        f"{', '.join(n for n in method_names() if not get_method(n).needs_hessian)} work without one")
    if tuple(hessian.shape) != (k, k):
        raise SpQRError(f"Hessian shape {tuple(hessian.shape)} does not match in_features {k} (expected [{k}, {k}])")
    if not torch.isfinite(hessian).all():
        raise SpQRError("the Hessian contains inf/nan (calibration inputs overflowed?)")
