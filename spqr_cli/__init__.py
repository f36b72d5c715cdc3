"""spqr: SpQR quantization of LLMs, a packed 3-4 bit format and Triton kernels.

The Python API mirrors the CLI; names are imported lazily so that ``spqr --help`` and ``import spqr_cli`` stay
fast (no transformers/triton/datasets at import time).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "QuantConfig": "spqr_cli.core.config",
    "QuantMethod": "spqr_cli.quant.methods",
    "get_method": "spqr_cli.quant.methods",
    "method_names": "spqr_cli.quant.methods",
    "quantize_layer": "spqr_cli.quant.methods",
    "load_preset": "spqr_cli.core.config",
    "load_model": "spqr_cli.core.models",
    "load_tokenizer": "spqr_cli.core.models",
    "SpQRError": "spqr_cli.core.errors",
    "ConfigError": "spqr_cli.core.errors",
    "evaluate_perplexity": "spqr_cli.core.evaluate",
    "load_any_model": "spqr_cli.runtime.loader",
    "build_calibration_set": "spqr_cli.core.calibrate",
    "save_calibration": "spqr_cli.core.calibrate",
    "load_calibration": "spqr_cli.core.calibrate",
    "run_demo": "spqr_cli.demo",
    "build_config": "spqr_cli.core.config",
    "quantize_model": "spqr_cli.quant.driver",
    "QuantizedLayer": "spqr_cli.quant.record",
    "pack_model": "spqr_cli.format.pack",
    "unpack_model": "spqr_cli.format.pack",
    "inspect_packed": "spqr_cli.format.inspect",
    "load_packed": "spqr_cli.runtime.loader",
    "SpQRLinear": "spqr_cli.runtime.linear",
    "export_hf_spqr": "spqr_cli.format.hf_spqr",
    "import_hf_spqr": "spqr_cli.format.hf_spqr",
    "generate": "spqr_cli.runtime.generation",
    "run_model": "spqr_cli.runtime.generation",
}


def _register_with_transformers() -> None:
    """Make ``AutoModelForCausalLM.from_pretrained(PACKED_DIR)`` work after ``import spqr_cli``, lazily: the
    ``spqr-cli`` quantizer is registered when transformers' quantizer registry is imported (``runtime/hf_hook``)."""
    from spqr_cli.runtime.hf_hook import install

    install()


_register_with_transformers()


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'spqr_cli' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = sorted(_API)
