"""Stage parameters from a params.yaml section: the one reader every `--params` option uses.

Types, ranges and the precedence (defaults < files < options < --set) live in `b2p.schema`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from b2p.errors import B2PError


def read_params_file(path: str | Path) -> dict[str, Any]:
    """The whole params YAML file as a mapping ({} for an empty file); a missing or broken file is one error."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise B2PError("params file not found", path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise B2PError(f"params file is not valid YAML: {e}", path) from None
    if not isinstance(data, dict):
        raise B2PError("params file must hold a mapping of sections", path)
    return data


def read_params_section(path: str | Path | None, section: str, known: Iterable[str] | None = None) -> dict[str, Any]:
    """The `section` mapping of a params YAML file ({} when no file is given or the section is absent).

    With `known`, a key outside it is an error (a misspelt parameter must not be silently ignored).
    """
    if path is None:
        return {}
    path = Path(path)
    sec = read_params_file(path).get(section)
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
