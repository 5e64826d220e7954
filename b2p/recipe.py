"""The recipe's model folders (dvc.yaml): where each student's outputs lie, and the pools of students.

A group of students (dvc.yaml's `students`, `distilled`, `oracle`) keeps each student in DIR/<name>/:
model/ (`b2p train`), predict/ (`b2p predict --probs`), final/ and alone/ (`b2p finalize`: the final masks
and the student alone with its rule chosen on calib). A pool is such a group named by the params list of
its students: `candidates=data/students`. Its members are called `<DIR's name>.<name>` (students.bitfit)
wherever they are compared (combine, deploy, evaluate, browse).
"""

from __future__ import annotations

from pathlib import Path

from b2p.errors import B2PError

MODEL, PREDICT, FINAL, ALONE = "model", "predict", "final", "alone"  # the folders of DIR/<name>/


def pool_members(params: str | Path, key: str) -> list[str]:
    """The student names of params list `key` (dotted: `oracle.students`), checked to be a list of names."""
    from b2p.params import read_params_file

    node = read_params_file(params)
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, list) or not all(isinstance(n, str) and n for n in node):
        raise B2PError(f"`{key}` must be a list of student names, got {node!r}", params)
    return list(node)


def parse_pool(spec: str) -> tuple[str, Path]:
    """`candidates=data/students` -> ("candidates", Path("data/students"))."""
    key, sep, root = spec.partition("=")
    if not sep or not key.strip() or not root.strip():
        raise B2PError(f"a pool must be KEY=DIR (a params list and the folder of its models), got {spec!r}")
    return key.strip(), Path(root.strip())


def pool_sources(params: str | Path, pools: list[str], leaf: str = FINAL) -> dict[str, Path]:
    """{"<DIR's name>.<member>": DIR/member/leaf} of every pool, in list order (`students.bitfit`)."""
    out: dict[str, Path] = {}
    for spec in pools:
        key, root = parse_pool(spec)
        for name in pool_members(params, key):
            label = f"{root.name}.{name}"
            if label in out:
                raise B2PError(f"{label} is given twice (--pool {spec})", params)
            out[label] = root / name / leaf
    return out
