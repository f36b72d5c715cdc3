"""A toy quantization method, kept outside the package: round-to-nearest on a symmetric grid.

It is the whole of what a new method needs (one file defining ``METHOD``); ``tests/test_layout.py`` puts this
directory on ``$SPQR_METHOD_PATH`` and runs it through the CLI, the driver and the packer.
"""

from __future__ import annotations

import torch

from spqr_cli.core.config import QuantConfig
from spqr_cli.quant.methods import QuantMethod
from spqr_cli.quant.methods.rtn import quantize_rtn
from spqr_cli.quant.record import QuantizedLayer


def quantize(weight: torch.Tensor, hessian: None, cfg: QuantConfig) -> QuantizedLayer:
    """Each group of columns on the grid ``s * (q - (maxq + 1) / 2)``, ``s`` spanning the group's absolute max:
    RTN's loop with the symmetric grid of ``quant/grid.py``."""
    return quantize_rtn(weight, hessian, cfg.replace(sym=True))


METHOD = QuantMethod(
    name="rtn_sym",
    summary="toy: round-to-nearest on a symmetric grid",
    quantize=quantize,
    needs_hessian=False,
    permutes=False,
    outliers=False,
    defaults={"wbits": 4, "groupsize": 32, "stat_bits": 16, "perm": "identity", "outlier_threshold": float("inf")},
)
