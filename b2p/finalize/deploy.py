"""`b2p deploy`: the model b2p ships, chosen on calib among every student alone.

Candidates: every member of the given pools (the distilled students first, then the round-1 candidates),
each as `b2p finalize --student-out` left it: DIR/<name>/alone/threshold.json holds its decision rule
(argmax, a p(defect) threshold, per-class offsets or a snap to the image) chosen on calib and that rule's
calib scores. The one with the best binary IoU + anomaly mIoU on calib (the criterion its rule was chosen
by) is shipped, so the shipped model is never worse on calib than a model it could have been; a tie goes
to the earlier pool member. Without calib masks the first member of the first pool is shipped (the
distilled student), with the plain argmax.

OUT (each entry replaced whole, built first; model.onnx beside them is `b2p export-onnx`'s):
  model.pt       the chosen student (`b2p predict --model OUT` applies rule.json)
  metrics.json   its training record (train seconds, parameter counts, backbone)
  rule.json      its decision rule and the prediction settings it was chosen with (b2p/student/rules.py)
  choice.json    every candidate's calib scores and the choice
  masks/<batch>/labelmaps/<key>.png   its masks of every image (the rule applied; no box used)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from b2p.errors import B2PError

from b2p.recipe import ALONE, MODEL, PREDICT


def rule_of(threshold: dict):
    """finalize's student-alone record -> its DecisionRule (b2p/student/rules.py)."""
    from b2p.student.rules import DecisionRule

    return DecisionRule.of_choice(threshold.get("t"), threshold.get("snap_sure"), threshold.get("offsets"))


def _score(threshold: dict) -> float | None:
    calib = threshold.get("calib")
    if not calib:
        return None
    return (calib.get("binary_iou") or 0.0) + (calib.get("anomaly_miou") or 0.0)


def read_candidate(name: str, folder: Path) -> dict:
    """What the choice needs of one model folder (DIR/<name>/{model, predict, alone}), checked."""
    from b2p.fileio import read_json

    model = folder / MODEL / "model.pt"
    threshold = folder / ALONE / "threshold.json"
    predict = folder / PREDICT / "predict.json"
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
    """Choose among `sources` {name: model folder} and write OUT (module docstring); returns choice.json.
    The shipped masks are the chosen model's calibrated ones; `b2p predict --model OUT` applies the same rule
    (rule.json) to any image."""
    from b2p.fileio import staged_dirs, write_json_atomic
    from b2p.student.rules import RULE_FILE, DecisionRule, DeploySettings, write_deploy_settings

    if not sources:
        raise B2PError("no student to choose from: give at least one --pool")
    out = Path(out)
    candidates = [read_candidate(n, Path(f)) for n, f in sources.items()]
    best, why = choose(candidates)
    rule = rule_of(best["threshold"]) if best["score"] is not None else DecisionRule()
    settings = best["settings"]
    record = {
        "chosen": best["name"],
        "reason": why,
        "candidates": {c["name"]: {"rule": c["threshold"].get("rule"), "calib": c["threshold"].get("calib"),
                                   "score": c["score"]} for c in candidates},
    }
    shipped = DeploySettings(rule, settings.get("tta", "none"), settings.get("window"), settings.get("overlap", 0.25), tuple(class_names), best["name"])
    # built in a hidden folder, then each entry renamed into OUT: OUT also holds what other stages write
    # there (model.onnx, `b2p export-onnx`), which must stay
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".deploy.", suffix=".building", dir=out))
    try:
        shutil.copyfile(best["folder"] / MODEL / "model.pt", stage / "model.pt")
        metrics = best["folder"] / MODEL / "metrics.json"
        if metrics.is_file():
            shutil.copyfile(metrics, stage / "metrics.json")
        curves = best["folder"] / MODEL / "curves.csv"
        if curves.is_file():
            shutil.copyfile(curves, stage / "curves.csv")
        for batch_dir in sorted(p for p in (best["folder"] / ALONE).iterdir() if p.is_dir()):
            shutil.copytree(batch_dir / "labelmaps", stage / "masks" / batch_dir.name / "labelmaps")
        write_deploy_settings(stage / RULE_FILE, shipped)
        write_json_atomic(stage / "choice.json", record)
        with staged_dirs([out / "masks"]) as (masks,):
            shutil.rmtree(masks)
            os.replace(stage / "masks", masks)
        for name in ("metrics.json", "curves.csv", RULE_FILE, "choice.json", "model.pt"):  # model.pt last: it names the model
            if (stage / name).exists():
                os.replace(stage / name, out / name)
            else:
                (out / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return record
