"""`b2p deploy`: the model b2p ships, chosen on calib among every student alone.

Candidates: every member of the given pools (the distilled students first, then the round-1 candidates),
each as `b2p finalize --student-out` left it: DIR/<name>/alone/threshold.json holds its decision rule
(argmax, a p(defect) threshold, per-class offsets or a snap to the image) chosen on calib and that rule's
calib scores. The one with the best binary IoU + anomaly mIoU on calib (the criterion its rule was chosen
by) is shipped, so the shipped model is never worse on calib than a model it could have been; a tie goes
to the earlier pool member. Without calib masks the first member of the first pool is shipped (the
distilled student), with the plain argmax.

OUT (replaced whole once complete):
  model.pt       the chosen student (`b2p predict --model OUT` applies rule.json)
  metrics.json   its training record (train seconds, parameter counts, backbone)
  rule.json      its decision rule and the prediction settings it was chosen with (RULE_FORMAT)
  choice.json    every candidate's calib scores and the choice
  masks/<batch>/labelmaps/<key>.png   its masks of every image (the rule applied; no box used)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from b2p.errors import B2PError

RULE_FILE = "rule.json"
RULE_FORMAT = 1
ALONE = "alone"  # a model folder's calibrated student alone: DIR/<name>/alone (finalize --student-out)


def rule_kind(threshold: dict) -> dict:
    """finalize's student-alone record -> the `rule` of rule.json."""
    if threshold.get("snap_sure") is not None:
        kind = "snap"
    elif threshold.get("offsets") is not None:
        kind = "offsets"
    elif threshold.get("t") is not None:
        kind = "threshold"
    else:
        kind = "argmax"
    return {"kind": kind, "t": threshold.get("t"), "offsets": threshold.get("offsets"), "snap_sure": threshold.get("snap_sure")}


def _score(threshold: dict) -> float | None:
    calib = threshold.get("calib")
    if not calib:
        return None
    return (calib.get("binary_iou") or 0.0) + (calib.get("anomaly_miou") or 0.0)


def read_candidate(name: str, folder: Path) -> dict:
    """What the choice needs of one model folder (DIR/<name>/{model, predict, alone}), checked."""
    from b2p.fileio import read_json

    model = folder / "model" / "model.pt"
    threshold = folder / ALONE / "threshold.json"
    predict = folder / "predict" / "predict.json"
    for p, what in ((model, "model.pt (b2p train)"), (threshold, "threshold.json (b2p finalize --student-out)"), (predict, "predict.json (b2p predict)")):
        if not p.is_file():
            raise B2PError(f"student {name!r} has no {what}: run its stages first", p)
    th = read_json(threshold, "student-alone rule")
    runs = read_json(predict, "prediction manifest").get("runs") or [{}]
    return {"name": name, "folder": folder, "threshold": th, "settings": runs[-1].get("settings", {}), "score": _score(th)}


def choose(candidates: list[dict]) -> tuple[dict, str]:
    """(the shipped candidate, why): the best calib score, the first candidate without calib."""
    scored = [c for c in candidates if c["score"] is not None]
    if not scored:
        return candidates[0], "no calib masks: the first distilled student, plain argmax"
    best = max(scored, key=lambda c: c["score"])  # max keeps the first of equals
    return best, "best binary IoU + anomaly mIoU of the student alone on calib"


def deploy(sources: dict[str, Path], out: str | Path, class_names: list[str]) -> dict:
    """Choose among `sources` {name: model folder} and write OUT (module docstring); returns choice.json."""
    from b2p.fileio import staged_dirs, write_json_atomic

    if not sources:
        raise B2PError("no student to choose from: give at least one --pool")
    out = Path(out)
    candidates = [read_candidate(n, Path(f)) for n, f in sources.items()]
    best, why = choose(candidates)
    rule = rule_kind(best["threshold"]) if best["score"] is not None else rule_kind({})
    settings = best["settings"]
    record = {
        "chosen": best["name"],
        "reason": why,
        "candidates": {c["name"]: {"rule": c["threshold"].get("rule"), "calib": c["threshold"].get("calib"),
                                   "score": c["score"]} for c in candidates},
    }
    rule_json = {"format": RULE_FORMAT, "rule": rule, "tta": settings.get("tta", "none"), "window": settings.get("window"),
                 "overlap": settings.get("overlap", 0.25), "class_names": class_names, "source": best["name"]}
    with staged_dirs([out]) as (stage,):
        shutil.copyfile(best["folder"] / "model" / "model.pt", stage / "model.pt")
        metrics = best["folder"] / "model" / "metrics.json"
        if metrics.is_file():
            shutil.copyfile(metrics, stage / "metrics.json")
        masks = best["folder"] / ALONE
        for batch_dir in sorted(p for p in masks.iterdir() if p.is_dir()):
            shutil.copytree(batch_dir / "labelmaps", stage / "masks" / batch_dir.name / "labelmaps")
        write_json_atomic(stage / RULE_FILE, rule_json)
        write_json_atomic(stage / "choice.json", record)
    return record
