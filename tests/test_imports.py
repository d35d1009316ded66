"""The import structure of the four process packages, read from their source with ast: no import
cycle among the modules of coordinator/, gpu_worker/, cpu_worker/ and shared/, and shared/ importing
none of the other three (it is the code every process loads; a CPU pool must not pull in a GPU
worker's modules, nor the coordinator a worker's).

Every import statement counts, the ones inside functions (and under `if TYPE_CHECKING`) too: an
import moved into a function still makes the module depend on the other, it only hides the cycle
until the order of first imports changes."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGES = ("coordinator", "gpu_worker", "cpu_worker", "shared")
PROCESS_PACKAGES = ("coordinator", "gpu_worker", "cpu_worker")


def modules(roots: dict[str, Path]) -> dict[str, Path]:
    """Dotted name without the `krasis.` prefix ("gpu_worker.dma", "shared.models" for its
    __init__.py) -> source file, for every module under the package roots."""
    out = {}
    for pkg, root in roots.items():
        for f in sorted(root.rglob("*.py")):
            parts = (pkg, *f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def imports(mods: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {module it imports: line of the first such import}, among `mods` only."""
    graph: dict[str, dict[str, int]] = {}
    for name, f in mods.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        found: dict[str, int] = {}
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name.removeprefix("krasis.") for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                else:
                    base = (node.module or "").removeprefix("krasis.")
                # `from pkg import x` imports the module pkg.x when there is one, else a name of pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                if t in mods and t != name:
                    found.setdefault(t, node.lineno)
        graph[name] = found
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.add(w)
                if w == v:
                    break
            if len(scc) > 1:
                found.append(frozenset(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def where(name: str, mods: dict[str, Path]) -> str:
    return name.replace(".", "/") + ("/__init__.py" if mods[name].name == "__init__.py" else ".py")


def describe(scc: frozenset[str], graph: dict[str, dict[str, int]], mods: dict[str, Path]) -> str:
    edges = [f"    {a} -> {b}  ({where(a, mods)}:{line})" for a in sorted(scc) for b, line in sorted(graph[a].items()) if b in scc]
    return "\n".join([" <-> ".join(sorted(scc)), *edges])


@pytest.fixture(scope="module")
def package():
    roots = {p: Path(importlib.import_module(f"krasis.{p}").__path__[0]) for p in PACKAGES}
    mods = modules(roots)
    return mods, imports(mods)


def test_no_import_cycles(package):
    mods, graph = package
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(describe(c, graph, mods) for c in found)


def test_shared_imports_no_process_package(package):
    mods, graph = package
    bad = [f"{m} -> {t}  ({where(m, mods)}:{line})" for m in sorted(graph) if m.split(".")[0] == "shared"
           for t, line in sorted(graph[m].items()) if t.split(".")[0] in PROCESS_PACKAGES]
    assert not bad, "shared/ imports a process's package:\n" + "\n".join(bad)


def test_the_reader_sees_hidden_imports(tmp_path):
    """The checks above are only as good as the reader: a cycle closed by an import inside a
    function, one under TYPE_CHECKING, relative and `krasis.`-absolute imports, and `from pkg import
    module` must all be edges."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "sub").mkdir()
    files = {
        "a/__init__.py": "",
        "a/x.py": "from .y import f\n",
        "a/y.py": "def f():\n    from . import x\n",
        "a/z.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from krasis.b.sub.w import W\n",
        "b/__init__.py": "",
        "b/sub/__init__.py": "",
        "b/sub/w.py": "import krasis.a.z\nfrom ...a import y\n",
        "b/v.py": "import os\nfrom .sub import w as _\n",
    }
    for path, text in files.items():
        (tmp_path / path).write_text(text)
    mods = modules({"a": tmp_path / "a", "b": tmp_path / "b"})
    graph = imports(mods)
    assert {m: sorted(g) for m, g in graph.items()} == {
        "a": [], "a.x": ["a.y"], "a.y": ["a.x"], "a.z": ["b.sub.w"],
        "b": [], "b.sub": [], "b.sub.w": ["a.y", "a.z"], "b.v": ["b.sub.w"],
    }
    assert sorted(sorted(c) for c in cycles(graph)) == [["a.x", "a.y"], ["a.z", "b.sub.w"]]
