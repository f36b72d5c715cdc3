"""spqr: SpQR quantization of LLMs, a packed 3-4 bit format and Triton kernels.

The Python API mirrors the CLI; names are imported lazily so that ``spqr --help`` and ``import spqr_cli`` stay
fast (no transformers/triton/datasets at import time).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "QuantConfig": "spqr_cli.config",
    "load_preset": "spqr_cli.config",
    "load_model": "spqr_cli.models",
    "load_tokenizer": "spqr_cli.models",
    "SpQRError": "spqr_cli.errors",
    "evaluate_perplexity": "spqr_cli.evaluate",
    "load_any_model": "spqr_cli.evaluate",
    "build_calibration_set": "spqr_cli.calibrate",
    "save_calibration": "spqr_cli.calibrate",
    "load_calibration": "spqr_cli.calibrate",
    "run_demo": "spqr_cli.demo",
    "build_config": "spqr_cli.config",
    "quantize_model": "spqr_cli.quantize",
    "QuantizedLayer": "spqr_cli.record",
    "pack_model": "spqr_cli.pack",
    "unpack_model": "spqr_cli.pack",
    "inspect_packed": "spqr_cli.pack",
    "load_packed": "spqr_cli.runtime",
    "SpQRLinear": "spqr_cli.runtime",
    "generate": "spqr_cli.generation",
    "run_model": "spqr_cli.generation",
}


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'spqr_cli' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = sorted(_API)
