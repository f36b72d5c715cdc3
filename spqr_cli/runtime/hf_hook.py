"""Registering the ``spqr-cli`` quantizer with transformers without importing transformers.

``import spqr_cli`` must stay cheap (tens of milliseconds: ``spqr --help`` pays it), while importing transformers'
quantizer registry costs seconds. So ``install()`` (called by ``spqr_cli/__init__.py``) registers at once only if
the registry is already imported; otherwise it puts a one-shot finder on ``sys.meta_path`` that lets the registry
module ``transformers.quantizers.auto`` import normally and then runs ``hf_quantizer.register()``. That module is
imported by ``transformers.modeling_utils``, i.e. before any ``from_pretrained`` can look a quantizer up, so
``import spqr_cli`` then ``AutoModelForCausalLM.from_pretrained(PACKED_DIR)`` works in either order of imports.

Only the standard library is imported here.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

REGISTRY_MODULE = "transformers.quantizers.auto"


def register_now() -> None:
    """Import the plugin and register it; a failure is a warning, never a broken transformers import.

    When the plugin module is itself being imported (it imports the registry, which brings us here), it is left
    alone: it registers itself when its import finishes."""
    plugin = sys.modules.get("spqr_cli.runtime.hf_quantizer")
    if plugin is not None and not hasattr(plugin, "register"):
        return
    try:
        from spqr_cli.runtime.hf_quantizer import register

        register()
    except Exception as e:  # noqa: BLE001 (an incompatible transformers must not break its own import)
        warnings.warn(f"spqr: could not register the spqr-cli quantizer with transformers ({e})", stacklevel=2)


class _RegistryFinder:
    """One-shot ``sys.meta_path`` entry: finds the registry module with the other finders and wraps its loader's
    ``exec_module`` so that registration runs right after the module has executed."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != REGISTRY_MODULE:
            return None
        self.remove()
        spec = None
        for finder in sys.meta_path:  # the finders after this one, in order (an editable install has its own)
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            register_now()

        loader.exec_module = exec_then_register  # this loader instance serves this one module only
        return spec

    def remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def install() -> None:
    """Register now if transformers' registry is loaded, otherwise as soon as it is (idempotent)."""
    if REGISTRY_MODULE in sys.modules:
        register_now()
    elif not any(isinstance(f, _RegistryFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryFinder())
