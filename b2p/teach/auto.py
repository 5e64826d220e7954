"""`b2p teach --teacher auto`: the teacher chosen per class by measurement on the calib split.

Every available teacher ("candidate") pseudo-labels the calib images (manually masked images that
`b2p import --calib` set aside: never trained on, never tested); each candidate's label maps are scored
against the manual masks with ONE confusion matrix over all calib images (b2p/metrics.py), and
every class takes the candidate with the highest IoU on that class. Each box is then taught by its
class's candidate.

Candidates, in this order (a tie goes to the earlier one, the simpler teacher):
  box                      the filled box;
  grabcut                  GrabCut with the configured settings (params `teach.grabcut`), and the small grid
  grabcut+...              GRABCUT_GRID on top of them: +ctx1 context_frac 1 (more context: a better
                           background model for elongated boxes), +fill0.2 min_fill 0.2 (a GrabCut mask
                           under 20 % of its box counts as collapsed and the box is used), and both;
                           +rim0.2 / +rim0.5: GrabCut decides only a rim of the box (20 % / 50 % of its
                           shorter half-side), its inside is foreground;
                           grid entries equal to the configured settings are dropped;
  sam                      box-prompted SAM, only when its weights are already on disk (never downloaded
                           here; a missing checkpoint or package is recorded as the reason it is absent);
  NAME                     `--candidate NAME=ROOT`: masks of an earlier round (e.g. `b2p finalize`'s final
                           masks) in the teacher layout ROOT/<batch>/labelmaps/<key>.png; a box's mask is
                           its class's pixels inside the box.
A class without any calib pixel (in truth or in any candidate's prediction) has no IoU: it takes the
candidate with the best anomaly mIoU (the mean over the classes that have calib pixels: every class
counts alike, where the binary IoU would follow the classes with the largest defects), and the reason
says so. No calib image with a
manual mask at all is an error (there is nothing to measure on); import with `--calib F` first.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from b2p.dataset import Batch, ImageRecord
from b2p.errors import B2PError
from b2p.labels import label_map_path, read_label_map
from b2p.boxes import box_pixel_bounds
from b2p.teach.base import Teacher, TeacherOutput, check_inputs

# GrabCut settings tried besides the configured ones: name suffix -> overrides
GRABCUT_GRID: dict[str, dict[str, Any]] = {
    "ctx1": {"context_frac": 1.0},
    "fill0.2": {"min_fill": 0.2},
    "ctx1+fill0.2": {"context_frac": 1.0, "min_fill": 0.2},
    # only a rim of each box decided by GrabCut (GrabCutSettings.rim); the context-ratio guard is off: with
    # the box's inside fixed, a thin context can no longer make GrabCut cut a large box along its texture
    "rim0.2": {"rim": 0.2, "min_context_ratio": 0.0},
    "rim0.5": {"rim": 0.5, "min_context_ratio": 0.0},
}


class LabelMapTeacher(Teacher):
    """Masks from an earlier round's label maps (ROOT/<batch>/labelmaps/<key>.png): per box, the pixels of
    its class inside the box."""

    def __init__(self, name: str, root: str | Path):
        self.name = name
        self.root = Path(root)
        if not self.root.is_dir():
            raise B2PError(f"candidate {name!r}: mask root not found", self.root)
        self._digest: str | None = None

    def predict(self, image: np.ndarray, boxes: np.ndarray) -> TeacherOutput:
        raise B2PError(f"candidate {self.name!r} reads label maps by image: it needs the image record (predict_for)")

    def predict_for(self, record: ImageRecord, image: np.ndarray, boxes: np.ndarray, class_ids: np.ndarray) -> TeacherOutput:
        image, boxes = check_inputs(image, boxes)
        shape = image.shape[:2]
        lm = read_label_map(label_map_path(self.root, record.batch, record.file_name), shape)
        masks = np.zeros((len(boxes), *shape), bool)
        for i, (b, c) in enumerate(zip(boxes, class_ids)):
            x0, y0, x1, y1 = box_pixel_bounds(b, shape)
            masks[i, y0:y1, x0:x1] = lm[y0:y1, x0:x1] == int(c)
        return TeacherOutput(masks, np.ones(len(boxes), np.float32), [None] * len(boxes))

    def settings(self) -> dict[str, Any]:
        # the masks' content decides the output, so their digest goes into the resume hash
        if self._digest is None:
            h = hashlib.sha256()
            for f in sorted(self.root.glob("*/labelmaps/*.png")):
                h.update(f.relative_to(self.root).as_posix().encode() + b"\0" + f.read_bytes())
            self._digest = h.hexdigest()[:16]
        return {"root": str(self.root), "digest": self._digest}


@dataclass
class Candidate:
    name: str
    teacher: Teacher


@dataclass
class AutoChoice:
    """The measurement and the decision: scores[candidate] = metrics.scores dict on the calib split."""

    class_names: list[str]
    calib_images: int
    scores: dict[str, dict]
    choice: dict[str, str]  # class name -> candidate name
    reason: dict[str, str]  # class name -> why
    skipped: dict[str, str] = field(default_factory=dict)  # candidate -> why it is not in the race

    def to_json(self) -> dict:
        per_class = {
            cand: {
                **{n: s["per_class"][n]["iou"] for n in self.class_names},
                "binary_iou": s["binary_iou"],
                "anomaly_miou": s["anomaly_miou"],
            }
            for cand, s in self.scores.items()
        }
        return {
            "calib_images": self.calib_images,
            "choice": self.choice,
            "reason": self.reason,
            "iou_on_calib": per_class,
            "skipped": self.skipped,
        }


class AutoTeacher(Teacher):
    """Teaches each box with the candidate chosen for its class."""

    name = "auto"

    def __init__(self, candidates: list[Candidate], choice: AutoChoice, class_ids: dict[str, int]):
        self.by_name = {c.name: c for c in candidates}
        self.decision = choice
        # class id -> candidate
        self.for_class = {class_ids[n]: self.by_name[choice.choice[n]] for n in choice.choice}

    def predict(self, image: np.ndarray, boxes: np.ndarray) -> TeacherOutput:
        raise B2PError("teacher 'auto' needs the boxes' classes (predict_for)")

    def setup(self) -> None:
        for cand in {c.name: c for c in self.for_class.values()}.values():  # the chosen ones teach
            cand.teacher.setup()

    def predict_for(self, record: ImageRecord, image: np.ndarray, boxes: np.ndarray, class_ids: np.ndarray) -> TeacherOutput:
        image, boxes = check_inputs(image, boxes)
        n = len(boxes)
        masks = np.zeros((n, *image.shape[:2]), bool)
        scores = np.zeros(n, np.float32)
        notes: list[str | None] = [None] * n
        class_ids = np.asarray(class_ids)
        groups: dict[str, list[int]] = {}
        for i, c in enumerate(class_ids):
            cand = self.for_class.get(int(c))
            if cand is None:
                raise B2PError(f"teacher 'auto' has no choice for class id {int(c)} (classes changed since the choice?)")
            groups.setdefault(cand.name, []).append(i)
        for name, idx in groups.items():
            out = self.by_name[name].teacher.predict_for(record, image, boxes[idx], class_ids[idx])
            masks[idx], scores[idx] = out.masks, out.scores
            for j, note in zip(idx, out.notes):
                notes[j] = note
        return TeacherOutput(masks, scores, notes)

    def settings(self) -> dict[str, Any]:
        return {
            "choice": {
                cls: {"teacher": name, "kind": self.by_name[name].teacher.name, "settings": self.by_name[name].teacher.settings()}
                for cls, name in sorted(self.decision.choice.items())
            }
        }

    def provenance(self) -> dict[str, Any]:
        return {"auto": self.decision.to_json()}


def calib_images(batches: list[Batch]) -> list[ImageRecord]:
    return [im for b in batches for im in b.split("calib") if im.has_manual_mask]


def build_candidates(cfg, extra: dict[str, str] | None = None, progress: bool = True) -> tuple[list[Candidate], dict[str, str]]:
    """The candidates for `cfg` (a TeachConfig) and `extra` {name: mask root}; returns (candidates, skipped)."""
    from b2p.teach.box import BoxTeacher
    from b2p.teach.config import make_teacher

    cands = [Candidate("box", BoxTeacher())]
    base = replace(cfg, teacher="grabcut")
    gc = make_teacher(base, progress)
    cands.append(Candidate("grabcut", gc))
    seen = [gc.settings()]
    for suffix, over in GRABCUT_GRID.items():
        t = make_teacher(replace(base, grabcut={**cfg.grabcut, **over}), progress)
        if t.settings() not in seen:
            seen.append(t.settings())
            cands.append(Candidate(f"grabcut+{suffix}", t))
    skipped: dict[str, str] = {}
    try:
        cands.append(Candidate("sam", make_teacher(replace(cfg, teacher="sam", download=False), progress)))
    except B2PError as e:
        skipped["sam"] = f"not available without a download: {e}"
    except ImportError as e:
        skipped["sam"] = f"segment_anything not installed ({e})"
    for name, root in (extra or {}).items():
        if name in {c.name for c in cands}:
            raise B2PError(f"candidate name {name!r} is taken by a built-in teacher; pick another")
        cands.append(Candidate(name, LabelMapTeacher(name, root)))
    return cands, skipped


def score_candidates(batches: list[Batch], candidates: list[Candidate], progress: bool = True) -> tuple[dict[str, dict], int]:
    """metrics.scores of each candidate's painted label maps against the calib images' manual masks."""
    from b2p.dataset import class_list_of
    from b2p.metrics import ConfusionMatrix
    from b2p.teach.base import Progress, teach_image

    images = calib_images(batches)
    if not images:
        names = [b.name for b in batches]
        raise B2PError(
            f"teacher 'auto' chooses on the calib split, but batches {names} hold no calib image with a manual "
            "mask; import with --calib F (params import.calib, or masks-to-boxes --calib) or name a teacher"
        )
    classes = class_list_of(batches)
    out: dict[str, dict] = {}
    with Progress(progress, "scoring teachers on calib", len(images) * len(candidates)) as advance:
        for cand in candidates:
            cm = ConfusionMatrix(classes.num_classes + 1)
            for im in images:
                _, lm = teach_image(cand.teacher, im)
                cm.update(lm, im.manual_label_map())
                advance(1)
            out[cand.name] = cm.scores(list(classes.names))
    return out, len(images)


def choose(scores: dict[str, dict], class_names: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Per class the candidate with the best IoU (ties: the earlier candidate); see the module docstring."""
    choice, reason = {}, {}
    order = list(scores)
    for n in class_names:
        defined = [(s["per_class"][n]["iou"], -i, c) for i, (c, s) in enumerate(scores.items()) if s["per_class"][n]["iou"] is not None]
        if defined:
            iou, _, best = max(defined)
            choice[n], reason[n] = best, f"best IoU on calib ({iou:.4f})"
        else:
            ranked = [((scores[c]["anomaly_miou"] or 0.0), -i, c) for i, c in enumerate(order)]
            miou, _, best = max(ranked)
            choice[n], reason[n] = best, f"no calib pixels of this class: best anomaly mIoU ({miou:.4f})"
    return choice, reason


def candidate_names(candidates: list[Candidate]) -> list[str]:
    return [c.name for c in candidates]


# --- the recipe's teacher stage: the choice on calib, stored, then used batch by batch --------------------------

CHOICE_FILE = "choice.json"  # the decision only: teach@<batch> depends on it, so new calib scores alone re-teach nothing
SCORES_FILE = "scores.json"  # the calib measurement behind it, and why each class got its teacher
CHOICE_FORMAT = 1


def decide(cfg, scores: dict[str, dict] | None, class_names: list[str], names: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Per class the teacher to use: `teach.teacher` when it names one; for `auto` the best on calib
    (`choose`), and `teach.fallback` for every class when there is no calib image to measure on."""
    if cfg.teacher != "auto":
        if cfg.teacher not in names:
            raise B2PError(f"teach.teacher {cfg.teacher!r} is not available here (candidates: {', '.join(names)})")
        return dict.fromkeys(class_names, cfg.teacher), dict.fromkeys(class_names, "set by teach.teacher")
    if scores is None:
        if cfg.fallback not in names:
            raise B2PError(f"teach.fallback {cfg.fallback!r} is not a teacher candidate; choose one of {', '.join(names)}")
        return dict.fromkeys(class_names, cfg.fallback), dict.fromkeys(class_names, "no calib masks: teach.fallback")
    return choose(scores, class_names)


def choose_teacher(cfg, batch_files: list[Path], out: str | Path, progress: bool = True) -> dict:
    """The recipe's `teachers` stage: score every candidate teacher on the calib images of all batches, decide
    per class (`decide`), and write OUT/choice.json (the decision and the chosen teachers' settings),
    OUT/scores.json (the calib scores and the reasons) and OUT/<candidate>/<batch>/labelmaps/<key>.png: each
    candidate's masks of the manually masked test images, the "every teacher" rows of `b2p evaluate`. OUT is
    replaced whole once complete. Returns choice and scores in one record."""
    from b2p.dataset import class_list_of, load_batches
    from b2p.fileio import staged_dirs, write_json_atomic
    from b2p.labels import write_label_map
    from b2p.teach.base import Progress, teach_image

    out = Path(out)
    batches = load_batches(batch_files)
    class_names = list(class_list_of(batches).names)
    candidates, skipped = build_candidates(cfg, cfg.candidates, progress)
    names = candidate_names(candidates)
    calib = calib_images(batches)
    scores = score_candidates(batches, candidates, progress)[0] if calib else None
    choice, reason = decide(cfg, scores, class_names, names)
    test = [im for b in batches for im in b.split("test") if im.has_manual_mask]
    decision = {
        "format": CHOICE_FORMAT,
        "classes": class_names,
        "choice": choice,
        "candidates": {c.name: {"kind": c.teacher.name, "settings": c.teacher.settings()} for c in candidates},
        "calib": bool(calib),
    }
    measured = {
        "calib_images": len(calib),
        "reason": reason,
        "iou_on_calib": AutoChoice(class_names, len(calib), scores, choice, reason).to_json()["iou_on_calib"] if scores else None,
        "skipped": skipped,
        "test_images": len(test),
    }
    with staged_dirs([out]) as (stage,):
        with Progress(progress, "teachers on the test images", len(test) * len(candidates)) as advance:
            for cand in candidates:
                for im in test:
                    write_label_map(label_map_path(stage / cand.name, im.batch, im.file_name), teach_image(cand.teacher, im)[1])
                    advance(1)
        write_json_atomic(stage / CHOICE_FILE, decision)
        write_json_atomic(stage / SCORES_FILE, measured)
    return {**decision, **measured}


def read_choice(path: str | Path, class_names: list[str]) -> dict:
    """A `choice.json` of `choose_teacher`, checked against the batches' class list."""
    from b2p.fileio import read_json

    rec = read_json(path, "teacher choice")
    if not isinstance(rec, dict) or rec.get("format") != CHOICE_FORMAT or not isinstance(rec.get("choice"), dict):
        raise B2PError("not a teacher choice written by `b2p choose-teacher`", path)
    missing = [n for n in class_names if n not in rec["choice"]]
    if missing:
        raise B2PError(f"the teacher choice has no teacher for class(es) {', '.join(missing)}: run `b2p choose-teacher` again over every batch", path)
    return rec


def teacher_from_choice(cfg, path: str | Path, class_names: list[str], class_ids: dict[str, int], progress: bool = True) -> AutoTeacher:
    """The per-class teacher a `choice.json` names, its candidates rebuilt from `cfg` (a TeachConfig). Their
    settings must be the ones the choice was measured with: a changed `teach:` section means choosing again."""
    rec = read_choice(path, class_names)
    candidates, _ = build_candidates(cfg, cfg.candidates, progress)
    by_name = {c.name: c for c in candidates}
    for cls in class_names:
        name = rec["choice"][cls]
        if name not in by_name:
            raise B2PError(f"class {cls!r} is taught by {name!r}, which is not available with these settings (candidates: {', '.join(by_name)})", path)
        if rec.get("candidates", {}).get(name, {}).get("settings") != by_name[name].teacher.settings():
            raise B2PError(f"teacher {name!r} was chosen with other settings than `teach:` has now: run `b2p choose-teacher` again", path)
    decision = AutoChoice(class_names, 0, {}, {n: rec["choice"][n] for n in class_names}, dict.fromkeys(class_names, f"chosen in {path}"))
    return AutoTeacher(candidates, decision, class_ids)


def build_auto_teacher(cfg, batch_files: list[Path], extra: dict[str, str] | None = None, progress: bool = True) -> AutoTeacher:
    """Score every candidate on the calib images of `batch_files` and return the per-class AutoTeacher."""
    from b2p.dataset import class_list_of, load_batches

    batches = load_batches(batch_files)
    classes = class_list_of(batches)
    if not calib_images(batches):  # fail before loading any model
        score_candidates(batches, [], progress=False)
    candidates, skipped = build_candidates(cfg, extra, progress)
    scores, n = score_candidates(batches, candidates, progress)
    choice, reason = choose(scores, list(classes.names))
    decision = AutoChoice(list(classes.names), n, scores, choice, reason, skipped)
    return AutoTeacher(candidates, decision, {name: classes.id_of(name) for name in classes.names})


def score_table(decision: AutoChoice):
    """A rich Table: candidates x classes (IoU on calib), the chosen cell per class in bold green."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"teacher IoU on the calib split ({decision.calib_images} images); chosen per class in green")
    t.add_column("teacher", no_wrap=True)
    for n in decision.class_names:
        t.add_column(n, justify="right")
    t.add_column("anomaly mIoU", justify="right")
    t.add_column("binary IoU", justify="right")
    for cand, s in decision.scores.items():
        cells = []
        for n in decision.class_names:
            v = s["per_class"][n]["iou"]
            text = "-" if v is None else f"{v:.4f}"
            cells.append(f"[bold green]{text}[/]" if decision.choice[n] == cand else text)
        a, b = s["anomaly_miou"], s["binary_iou"]
        t.add_row(escape(cand), *cells, "-" if a is None else f"{a:.4f}", "-" if b is None else f"{b:.4f}")
    return t
