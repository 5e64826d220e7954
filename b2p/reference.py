"""The parameter reference (docs/reference/params.md), generated from the schema (b2p/schema.py).

Every key is documented once, where it is declared: the comment on its line in its dataclass or pydantic
model (or the comment block right above it). `python -m b2p.reference` prints the page; a test keeps the
committed page equal to it (`b2p.reference.check`).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any

PAGE = Path("docs/reference/params.md")
# (params.yaml section, what reads it, the class that declares its keys)
SECTIONS = (
    ("import", "`b2p import` (the split rule)", "b2p.schema.ImportParams"),
    ("teach", "`b2p choose-teacher`, `b2p teach`", "b2p.teach.config.TeachConfig"),
    ("teach.grabcut", "the GrabCut teacher", "b2p.teach.grabcut.GrabCutSettings"),
    ("train", "`b2p train` (and every `students.<name>.train`)", "b2p.student.train.TrainParams"),
    ("predict", "`b2p predict` (and every `students.<name>.predict`)", "b2p.schema.PredictParams"),
    ("finalize", "`b2p finalize`", "b2p.schema.FinalizeParams"),
    ("export", "`b2p export`", "b2p.schema.ExportParams"),
    ("evaluate", "`b2p evaluate`", "b2p.schema.EvaluateParams"),
    ("the recipe's lists", "dvc.yaml (which students are trained in which group)", "b2p.schema.RecipeParams"),
    ("oracle", "dvc.yaml's oracle group (benchmarks)", "b2p.schema.OracleParams"),
    ("demos.<name>", "`b2p demo-data`", "b2p.schema.DemoParams"),
    ("masks_to_boxes", "`b2p masks-to-boxes` (the suite's simulated boxes)", "b2p.schema.MasksToBoxesParams"),
)


def _attr(dotted: str) -> Any:
    import importlib

    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def field_comments(cls: type) -> dict[str, str]:
    """{field: its comment}: the trailing comment of its line, else the comment block right above it (the
    class's own declaration wins over a base class's)."""
    out: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if base.__module__.startswith("b2p"):
            out.update(_own_comments(base))
    return out


def _own_comments(cls: type) -> dict[str, str]:
    out: dict[str, str] = {}
    block: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            block.append(text.lstrip("#").strip())
            continue
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:[^#]*?(?:#\s*(.*))?$", text)
        if m and line.startswith(" " * 4) and not line.startswith(" " * 8):
            out[m.group(1)] = (m.group(2) or " ".join(block)).strip()
        block = []
    return out


def fields_of(cls: type) -> list[tuple[str, str, str]]:
    """(key, type, default) of a dataclass or a pydantic model, in declaration order."""
    rows = []
    if dataclasses.is_dataclass(cls):
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
            rows.append((f.name, _type_name(f.type), default))
    else:
        for name, f in cls.model_fields.items():
            rows.append((name, _type_name(f.annotation), f.default if not f.is_required() else "required"))
    return rows


def _type_name(t: Any) -> str:
    text = t if isinstance(t, str) else getattr(t, "__name__", None) or str(t)
    text = re.sub(r"typing\.|Annotated\[([^,\]]+)[^\]]*\]", lambda m: m.group(1) or "", str(text))
    return text.replace("NoneType", "None")


def _fmt_default(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v or '""'
    if hasattr(v, "model_dump"):
        return "see below"
    return str(v)


def page() -> str:
    lines = ["# Parameter reference", "",
             "Every key of `params.yaml`, by section: its type, its default and what it does. Generated from the schema "
             "(`python -m b2p.reference > docs/reference/params.md`; a test keeps this page equal to it). Why a value "
             "was chosen is in the report that measured it (`reports/`), never here.", ""]
    for section, reader, dotted in SECTIONS:
        cls = _attr(dotted)
        comments = field_comments(cls)
        lines += [f"## `{section}`", "", f"Read by {reader}.", "", "| key | type | default | what it does |", "| --- | --- | --- | --- |"]
        for key, typ, default in fields_of(cls):
            doc = comments.get(key, "").replace("|", "\\|")
            lines.append(f"| `{key}` | {typ.replace('|', chr(92) + '|')} | `{_fmt_default(default)}` | {doc} |")
        lines.append("")
    return "\n".join(lines)


def check(root: Path) -> list[str]:
    """Problems: the committed page differs from the generated one."""
    p = root / PAGE
    if not p.is_file() or p.read_text() != page():
        return [f"{p} is not the generated reference: run `python -m b2p.reference > {PAGE}`"]
    return []


if __name__ == "__main__":
    print(page(), end="")
