"""The project's one YAML reader, and the params-file section reader every `--params` option uses.

YAML is read as DVC reads params.yaml: YAML 1.2 (ruamel.yaml, which ships with DVC), so b2p and DVC agree on
what a file says (`yes` is the string "yes", `5e-4` a float), and a key given twice in one mapping is
refused (YAML parsers differ on it; PyYAML silently keeps the last). Every YAML file b2p reads (params files,
YOLO data.yaml, `--set` values) goes through `parse_yaml`; `add-batch` edits params.yaml through
`read_yaml_for_editing`, the same parser in round-trip mode (comments kept).

Types, ranges, the known top-level sections and the precedence (defaults < files < options < --set) live in
`b2p.schema`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from b2p.errors import B2PError


def _parser(round_trip: bool = False):
    from ruamel.yaml import YAML

    if round_trip:
        y = YAML()  # round-trip mode: CommentedMap / CommentedSeq, comments and layout kept
        y.preserve_quotes = True
        y.indent(mapping=2, sequence=4, offset=2)
        y.width = 4096  # never re-wrap long lines
        return y
    return YAML(typ="safe", pure=True)  # plain dicts and lists; pure: the same results with or without ruamel's C part


def _yaml_problem(e: Exception) -> str:
    """A parser error as one line: what is wrong, and where (line, column; 1-based)."""
    from ruamel.yaml.constructor import DuplicateKeyError

    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    if isinstance(e, DuplicateKeyError):
        first = getattr(e, "context_mark", None)
        key = str(getattr(e, "problem", "")).split('"')[1] if '"' in str(getattr(e, "problem", "")) else "?"
        also = f" (the mapping starts at line {first.line + 1})" if first is not None else ""
        return f"key {key!r} is given twice in one mapping{where}{also}; keep one (which one wins differs between YAML readers)"
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{problem}{where}"


def parse_yaml(text: str, source: str | Path | None = None, what: str = "YAML file", round_trip: bool = False) -> Any:
    """Parse YAML text; a syntax error or a duplicate key becomes one B2PError naming `source`."""
    try:
        return _parser(round_trip).load(text)
    except Exception as e:  # ruamel raises YAMLError subclasses, and ValueError / TypeError on odd scalars
        raise B2PError(f"{what} is not valid YAML: {_yaml_problem(e)}", source) from None


# parsed texts by content: one command reads params.yaml once per section it checks, and the pure-Python
# parser is slow; keyed by the text itself, so a file rewritten on disk is never served stale
_PARSED: dict[bytes, Any] = {}


def read_yaml(path: str | Path, what: str = "YAML file", round_trip: bool = False) -> Any:
    """Read and parse a YAML file (None when it is empty); B2PError names the file on any problem."""
    import copy
    import hashlib

    path = Path(path)
    if not path.is_file():
        raise B2PError(f"{what} not found", path)
    raw = path.read_bytes()
    key = hashlib.sha256(raw).digest()
    if not round_trip and key in _PARSED:
        return copy.deepcopy(_PARSED[key])  # a copy: callers may change what they get
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark (Windows editors) is not content
    except UnicodeDecodeError:
        raise B2PError(f"{what} is not UTF-8 text", path) from None
    data = parse_yaml(text, path, what, round_trip)
    if not round_trip:
        _PARSED[key] = copy.deepcopy(data)
    return data


def read_yaml_for_editing(path: str | Path, what: str = "params file") -> Any:
    """A YAML file as ruamel round-trip objects (edit them, then `dump_yaml_for_editing`)."""
    return read_yaml(path, what, round_trip=True)


def dump_yaml_for_editing(data: Any) -> str:
    import io

    buf = io.StringIO()
    _parser(round_trip=True).dump(data, buf)
    return buf.getvalue()


# Every top-level section a b2p params file may hold (params.yaml, pipelines/suite/params.yaml), with the name
# of its model in b2p.schema (a class, or a function that builds it): a section not listed here is refused,
# naming the closest known one, so `trian:` is never silently ignored. None: a section whose contents the
# pipeline's own code reads and checks (dvc.yaml interpolation, `b2p.schema.check_recipe`, the suite).
SECTIONS: dict[str, str | None] = {
    "masks_to_boxes": "MasksToBoxesParams",
    "import": "ImportParams",
    "teach": "_teach_model",
    "train": "_train_model",
    "predict": "PredictParams",
    "evaluate": "EvaluateParams",
    "finalize": "FinalizeParams",
    "export": "ExportParams",
    "engine": "_engine_model",
    # read by dvc.yaml's interpolation and checked as a whole by `check_recipe` (b2p import runs it first):
    "base": None, "demos": None, "batches": None, "students": None, "candidates": None, "distill": None, "oracle": None,
    # pipelines/suite/params.yaml (b2p/pipeline/suite.py `suite_settings`)
    "seeds": None, "oracle_seeds": None, "recipe": None,
}


def check_section_names(data: Mapping[str, Any], path: str | Path | None = None) -> None:
    """Refuse top-level keys of a params file that are not sections b2p knows (all of them in one error)."""
    unknown = [str(k) for k in data if str(k) not in SECTIONS]
    if not unknown:
        return
    named = []
    for k in unknown:
        close = difflib.get_close_matches(k, list(SECTIONS), n=1)
        named.append(f"`{k}:`" + (f" (did you mean `{close[0]}:`?)" if close else ""))
    raise B2PError(
        f"unknown top-level section{'s' if len(unknown) > 1 else ''} {', '.join(named)}: b2p would ignore it; "
        f"known sections: {', '.join(sorted(SECTIONS))} (b2p/params.py SECTIONS)",
        path,
    )



def read_params_file(path: str | Path) -> dict[str, Any]:
    """Every section of a params file, after checking that each top-level key is a known section
    (`SECTIONS`): a misspelt section (`trian:`) must not be silently ignored."""
    path = Path(path)
    data = read_yaml(path, "params file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise B2PError(f"params file must be a mapping of sections (train:, teach:, ...), got {type(data).__name__}", path)
    check_section_names(data, path)
    return data


def read_params_section(path: str | Path | None, section: str, known: Iterable[str] | None = None) -> dict[str, Any]:
    """The `section` mapping of a params YAML file ({} when no file is given or the section is absent).

    The whole file is checked for unknown top-level sections first. With `known`, a key of the section
    outside it is an error (a misspelt parameter must not be silently ignored).
    """
    if path is None:
        return {}
    path = Path(path)
    data = read_params_file(path)
    sec = data.get(section)
    if sec is None:
        return {}
    if not isinstance(sec, dict):
        raise B2PError(f"params section `{section}` must be a mapping", path)
    sec = {str(k).replace("-", "_"): v for k, v in sec.items()}  # keys may be spelt like options
    if known is not None:
        known = set(known)
        unknown = sorted(set(sec) - known)
        if unknown:
            raise B2PError(f"unknown keys in params section `{section}`: {unknown}; known: {sorted(known)}", path)
    return dict(sec)
