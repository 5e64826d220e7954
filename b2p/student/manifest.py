"""Which model wrote a prediction root: `b2p predict` leaves MANIFEST in each root it writes (the model's path
and sha256, the settings, the maps of each run), only once every file of the run is in place. The stages
that read predictions (finalize, evaluate, export) check it here, so a root mixed by a killed or partial
re-run, or holding maps of two models, is refused instead of read as one student's. Kept apart from
predict.py so those readers need none of the model code.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from b2p.errors import B2PError
from b2p.fileio import read_json

MANIFEST = "predict.json"
PREDICT_FORMAT = 1


def merged_manifest(root: Path, kind: str, run: dict) -> dict:
    """The root's manifest with `run` added: earlier runs keep only the maps this run did not replace."""
    old = []
    with contextlib.suppress(B2PError, AttributeError, TypeError):  # unreadable: its maps count as unrecorded
        old = [r for r in read_json(root / MANIFEST, "prediction manifest").get("runs", []) if isinstance(r, dict)]
    new = set(run["maps"])
    runs = []
    for r in old:
        kept = [m for m in r.get("maps", []) if m not in new]
        if kept:
            runs.append({**r, "maps": kept})
    return {"b2p_predict": PREDICT_FORMAT, "maps": kind, "runs": [*runs, run]}


def run_key(run: dict) -> str:
    return json.dumps([run["model"]["sha256"], run["settings"]], sort_keys=True)


def read_prediction_manifest(root: str | Path, maps: Iterable[str | Path] | None = None, probs: bool = False) -> dict:
    """The manifest of a finished prediction root (MANIFEST), for stages that read its maps.

    Refused (B2PError naming the file) when there is none (predict did not finish writing the root, or an
    older b2p wrote it), when its maps come from runs with different models or settings, or when one of
    `maps` (label-map paths under `root`) was not written by a recorded run (with `probs`: or was written
    without its probabilities). Returns the manifest with the one `model` ({path, sha256}) and `settings`.
    """
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise B2PError(
            f"no {MANIFEST}: `b2p predict` did not finish writing this root (or an older b2p wrote it); run `b2p predict` again", root
        )
    m = read_json(path, "prediction manifest")
    try:
        runs = m["runs"]
        keys = {run_key(r) for r in runs}
        recorded = {mp: r for r in runs for mp in r["maps"]}
        ok = m["b2p_predict"] == PREDICT_FORMAT and len(runs) > 0
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise B2PError(f"not a b2p prediction manifest of format {PREDICT_FORMAT}; run `b2p predict` again", path)
    if len(keys) > 1:
        models = sorted({r["model"]["path"] for r in runs})
        raise B2PError(
            f"the maps here come from {len(runs)} predict runs with different models or settings ({', '.join(models)}): "
            "predict every split again with one model", path,
        )
    for mp in maps or ():
        r = recorded.get(Path(os.path.relpath(Path(mp).absolute(), root.absolute())).as_posix())
        if r is None:
            raise B2PError(f"label map not written by the predict run recorded in {path} (left from an earlier run?): predict its split again", mp)
        if probs and not r.get("probs"):
            raise B2PError(f"predicted without --probs (run recorded in {path}): predict its split again with --probs", mp)
    return {**m, "model": runs[0]["model"], "settings": runs[0]["settings"]}


def prediction_model(root: str | Path, maps: Iterable[str | Path] | None = None, probs: bool = False) -> dict | None:
    """The model ({path, sha256}) behind a prediction root's `maps`, checked by `read_prediction_manifest`
    when `b2p predict` wrote the root (its MANIFEST is there); None for a root without one: label maps of
    another tool, written by hand, or by a b2p from before manifests, which readers still accept."""
    if not (Path(root) / MANIFEST).is_file():
        return None
    return read_prediction_manifest(root, maps, probs)["model"]
