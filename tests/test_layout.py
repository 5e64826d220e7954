"""The code's shape: no import circle, no import from a lower package up to a higher one, no long function.

Checked statically (ast) over every `import b2p...` / `from b2p... import ...` in b2p/, the ones inside
functions and under TYPE_CHECKING included (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "b2p"
# packages in pipeline order: a module may import its own package, the ground floor (b2p/*.py) and packages
# of a lower layer, never a higher one. cli.py and reference.py sit on top (they reach every command
# through importlib, which this check does not follow).
LAYERS = {
    "ground": 0,
    "ingest": 1, "scale": 1,
    "teach": 2,
    "student": 3,
    "finalize": 4, "evaluate": 4,
    "export": 5, "deploy": 5, "browse": 5,
    "pipeline": 6,
}
TOP = {"b2p.cli", "b2p.reference", "b2p.__main__"}
MAX_FUNCTION_LINES = 100


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = collections.defaultdict(set)
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "b2p":
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.split(".")[0] == "b2p"]
            for n in names:
                target = resolve(n)
                if target and target != mod:
                    graph[mod].add(target)
    return graph


def _package(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PKG / parts[1]).is_dir()) else "ground"


def test_no_import_circle() -> None:
    modules = _modules()
    graph = _imports(modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for m in sorted(modules):
        if m not in index:
            visit(m)
    assert circles == [], f"modules importing each other: {circles}"


def test_no_import_from_a_lower_package_up() -> None:
    modules = _modules()
    assert {_package(m) for m in modules} <= set(LAYERS), "a new package needs its layer in LAYERS"
    upward = []
    for mod, targets in _imports(modules).items():
        if mod in TOP:
            continue
        for t in targets:
            a, b = _package(mod), _package(t)
            if a != b and (t in TOP or LAYERS[b] > LAYERS[a]):
                upward.append(f"{mod} ({a}) imports {t} ({b})")
    assert upward == []


def test_no_function_is_longer_than_the_limit() -> None:
    long = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines: split them (setup / loop / selection and saving): {long}"


def test_no_private_name_is_imported_across_packages() -> None:
    modules = _modules()
    crossing = []
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "b2p":
                for a in node.names:
                    private = a.name.startswith("_") and not a.name.endswith("__")
                    if private and _package(node.module) != _package(mod):
                        crossing.append(f"{mod} imports {node.module}.{a.name}")
    assert crossing == []
