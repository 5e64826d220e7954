"""Every stage of every dvc.yaml lists, among its deps, every b2p module its command imports.

A stage whose code is not a dependency is reported "up to date" after that code changed: stale results.
The import closure is computed statically (ast) from the module that defines the command (b2p/cli.py's
table), following every `import b2p...` / `from b2p... import ...`, including the ones inside functions
(the commands import their heavy modules lazily). A folder dependency covers the files under it.
Package `__init__.py` files are left out: they hold only docstrings and the version (checked below).
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "b2p"


def _module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


@functools.cache
def _direct_imports(path: Path, nodes: tuple | None = None) -> frozenset[str]:
    names: set[str] = set()
    for node in nodes if nodes is not None else ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "b2p"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "b2p":
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}")}
    return frozenset(names)


def _command_imports(module: str, function: str) -> set[str]:
    """What running one command imports first: its module's top-level imports and its function's own."""
    path = _module_file(module)
    tree = ast.parse(path.read_text(), str(path))
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    nodes = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)] + [n for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom)]
    return set(_direct_imports(path, tuple(nodes)))


def import_closure(module: str, function: str | None = None) -> set[Path]:
    """Files of every b2p module `module` imports, directly or not (itself included). With `function`,
    the module's other functions are left out (a module may hold several commands)."""
    seen: set[str] = {module} if function else set()
    todo = sorted(_command_imports(module, function)) if function else [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        if path is not None:
            todo += sorted(_direct_imports(path))
    files = {_module_file(n) for n in seen}
    return {f for f in files if f is not None and f.name != "__init__.py"}


def _command_modules() -> dict[str, tuple[str, str]]:
    from b2p.cli import COMMANDS

    return {name: (module, function) for name, module, function in COMMANDS}


def _stages():
    from dvc.repo import Repo

    repo = Repo(str(REPO))
    try:
        return [(st.addressing, Path(st.wdir), st.cmd if isinstance(st.cmd, str) else " && ".join(st.cmd),
                 [Path(st.wdir, d.def_path).resolve() for d in st.deps]) for st in repo.index.stages]
    finally:
        repo.close()


def test_package_init_files_hold_no_code() -> None:
    for init in PKG.rglob("__init__.py"):
        for node in ast.parse(init.read_text()).body:
            is_doc = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            is_version = isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["__version__"]
            assert is_doc or is_version, f"{init} holds code; the dvc deps test must then follow it"


def test_closure_follows_lazy_imports() -> None:
    got = {p.relative_to(REPO).as_posix() for p in import_closure("b2p.student.commands", "train")}
    assert {"b2p/student/commands.py", "b2p/student/train.py", "b2p/project.py", "b2p/schema.py", "b2p/errors.py"} <= got
    assert "b2p/student/predict.py" not in got  # imported by `predict`, in the same module, only


def test_every_stage_lists_the_code_it_runs() -> None:
    commands = _command_modules()
    stages = _stages()
    assert len(stages) >= 10
    missing = []
    for address, wdir, cmd, deps in stages:
        used = re.findall(r"(?:^|[\s;&|(])b2p\s+([a-z][a-z-]*)", cmd)
        assert used or "python" in cmd, f"{address}: no `b2p COMMAND` in {cmd!r}"
        for command in used:
            assert command in commands, f"{address}: unknown command b2p {command}"
            for f in sorted(import_closure(*commands[command])):
                if not any(f == d or d in f.parents for d in deps):
                    missing.append(f"{address}: {f.relative_to(REPO).as_posix()} (b2p {command})")
    assert not missing, "stages miss code they run:\n" + "\n".join(missing)


@pytest.mark.parametrize("module", ["b2p.ingest.commands", "b2p.teach.commands", "b2p.evaluate.commands"])
def test_closure_is_inside_the_package(module: str) -> None:
    assert all(PKG in f.parents for f in import_closure(module))
