"""The package's shape: no import cycles, the library never imports the command line or the benchmarks, and a
quantization method is one file (a toy method outside the package runs through the whole pipeline)."""

from __future__ import annotations

import ast
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PLUGINS = Path(__file__).resolve().parent / "plugins"
ROOTS = {"spqr_cli": REPO / "spqr_cli", "spqr_kernels": REPO / "kernels"}
CLI_SIDE = {"spqr_cli.cli", "spqr_cli.console", "spqr_cli.demo", "spqr_cli.__main__"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = [pkg, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Internal modules that ``name`` imports anywhere (functions included; ``if TYPE_CHECKING`` blocks not)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            targets = []
        found.update(t for t in targets if t in modules)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node)


def test_layering(graph: dict[str, set[str]]) -> None:
    """The library imports neither the command line nor the benchmarks; the kernels import nothing of spqr_cli."""
    bad = []
    for mod, deps in graph.items():
        library = mod not in CLI_SIDE and not mod.startswith("spqr_cli.bench")
        for dep in deps:
            if library and (dep in CLI_SIDE or dep.startswith("spqr_cli.bench")):
                bad.append(f"{mod} -> {dep}")
            if mod.startswith("spqr_kernels") and dep.startswith("spqr_cli"):
                bad.append(f"{mod} -> {dep}")
    assert not bad, bad


# ------------------------------------------------------------------------------------------ methods as one file


@pytest.fixture
def toy_method(monkeypatch: pytest.MonkeyPatch):
    """``tests/plugins/rtn_sym.py`` registered the way ``$SPQR_METHOD_PATH`` registers it at start-up."""
    from spqr_cli.quant import methods

    monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(PLUGINS)])
    methods.get_method.cache_clear()
    yield methods.get_method("rtn_sym")
    methods.get_method.cache_clear()


def test_toy_method_is_registered_by_its_file_alone(toy_method) -> None:
    from spqr_cli.core.config import build_config
    from spqr_cli.quant.methods import method_names, quantize_layer

    assert "rtn_sym" in method_names() and {"spqr", "gptq", "rtn"} <= set(method_names())
    cfg = build_config(method="rtn_sym", wbits=3)  # the method's own defaults, a flag on top
    assert (cfg.method, cfg.wbits, cfg.groupsize, cfg.stat_bits) == ("rtn_sym", 3, 32, 16)
    assert not cfg.has_outliers and not cfg.has_perm
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    rec = quantize_layer(w, None, cfg)
    # an independent symmetric round-to-nearest: s = absmax / ((maxq) / 2) per row and group, zero (maxq + 1) / 2
    g = w.view(24, 2, 32)
    maxq, z = 7, 4.0
    s = (2 * g.abs().amax(-1, keepdim=True) / maxq).half().float()
    q = torch.clamp(torch.round(g / s + z), 0, maxq)
    expected = (s * (q - z)).half().view(24, 64)
    assert torch.equal(rec.dequantize(), expected)


def test_toy_method_runs_through_the_cli(tmp_path: Path, demo_model_path: Path) -> None:
    """``SPQR_METHOD_PATH=tests/plugins spqr quantize --method rtn_sym``, then pack and inspect: no other file knows
    the method."""
    env = {**os.environ, "SPQR_METHOD_PATH": str(PLUGINS)}
    spqr = [sys.executable, "-m", "spqr_cli"]
    helped = subprocess.run([*spqr, "quantize", "--help"], env=env, capture_output=True, text=True)
    assert "rtn_sym" in helped.stdout
    out, packed = tmp_path / "q", tmp_path / "p"
    from spqr_cli.demo import DEMO_CALIB

    run = subprocess.run([*spqr, "quantize", str(demo_model_path), "--method", "rtn_sym", "--out", str(out),
                          "--dataset", f"file:{DEMO_CALIB}", "--nsamples", "2", "--seqlen", "32", "--device", "cpu"],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "rtn_sym" in run.stdout
    from spqr_cli.format.inspect import inspect_packed
    from spqr_cli.format.pack import pack_model

    pack_model(out, packed)  # in this process, where the method is not registered: the records need no method

    info = inspect_packed(packed)
    assert info["quant_config"]["method"] == "rtn_sym" and info["checksums"] == "ok"
    assert info["totals"]["quantized_bits_formula"] == pytest.approx(4 + 32 / 32)
    assert math.isinf(float(info["quant_config"]["outlier_threshold"]))
