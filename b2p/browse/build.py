"""Build or update the persistent FiftyOne dataset that shows every stage's output side by side.

One sample per imported image, keyed by `b2p_key` = "<batch>/<file_name>" (`ImageRecord.key`), so running
again after a new batch adds only the new images, refreshes samples whose inputs changed (a fingerprint
of boxes, split and mask file contents decides) and leaves the rest untouched.

Sample fields
- `boxes`: fo.Detections, label = class name, relative [x, y, w, h] boxes, attribute `box_id`.
- further sources (`build_dataset(extra_roots=...)`, `b2p browse --source` / `--recipe`: the combined masks,
  every student alone and final): fo.Segmentation each, with `<field>_iou` against the manual mask.
- `manual`, `teacher`, `student`, `final`: fo.Segmentation. Teacher, student and final (the delivered
  masks of `b2p finalize`, one per box) point at their label-map PNGs
  (`mask_path`, no copies); the manual mask exists only as RLE in the canonical file, so it is stored as
  a mask array. Values are canonical class ids, mask targets {id: class name}; the App colours masks by
  field (FIELD_COLORS: one colour per source, so teacher and student masks of one image can be told apart)
  and boxes by class (`b2p.labels.class_color_hex`, the same in every b2p picture).
- `batch`, `split`, `has_manual_mask`, `b2p_key`, `b2p_fingerprint`.
- Scores (binary defect-vs-background, `b2p.metrics` per-image helpers; an image where neither
  map has a defect pixel scores 1.0): `teacher_iou`, `teacher_precision`, `teacher_recall` and
  `student_iou` against the manual mask; `disagreement` = 1 - IoU(teacher, student);
  `student_gain` = student_iou - teacher_iou; `final_iou` (final masks against the manual mask) and
  `final_gain` = final_iou - teacher_iou. None where an input is missing.
- Tags `teacher_miss` / `teacher_hallucination` (see `TagRule`), with `tag_reference` saying which mask
  they were judged against: "manual" where the image has a manual mask, else "student" (the student's
  prediction stands in for the truth, so those tags mean "teacher and student disagree this way").

Saved views: worst-teacher, student-fixed-teacher, newest-batch, by-disagreement, teacher-errors,
worst-final.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from b2p.dataset import Batch, ImageRecord, class_list_of, load_batches
from b2p.errors import B2PError
from b2p.metrics import binary_iou, image_binary_scores
from b2p.labels import ClassList, class_color_hex, label_map_path, read_label_map
from b2p.splits import SPLITS

BUILD_VERSION = 2  # part of every fingerprint: bump when sample contents change meaning (2: final masks)
MASK_FIELDS = ("manual", "teacher", "student", "final")
SCORE_FIELDS = (
    "teacher_iou", "teacher_precision", "teacher_recall", "student_iou", "disagreement", "student_gain", "final_iou", "final_gain",
)
OUR_TAGS = ("teacher_miss", "teacher_hallucination")
SAVED_VIEWS = ("worst-teacher", "student-fixed-teacher", "newest-batch", "by-disagreement", "teacher-errors", "worst-final")


@dataclass(frozen=True)
class TagRule:
    """When the teacher's mask is tagged as wrong, judged against a reference mask (manual, else student).

    teacher_miss: the teacher covers less than `min_recall` of the reference's defect pixels and misses
    at least `min_pixels` of them. teacher_hallucination: less than `min_precision` of the teacher's
    defect pixels are defect in the reference, and at least `min_pixels` are not. The pixel floor keeps
    a few stray pixels on a tiny defect from tagging an image. `fixed_gain`: the student IoU gain over the
    teacher (both against the manual mask) for the "student-fixed-teacher" view.
    """

    min_recall: float = 0.5
    min_precision: float = 0.5
    min_pixels: int = 16
    fixed_gain: float = 0.1

    def as_dict(self) -> dict:
        return {"min_recall": self.min_recall, "min_precision": self.min_precision,
                "min_pixels": self.min_pixels, "fixed_gain": self.fixed_gain}


@dataclass
class SampleContent:
    """Everything one FiftyOne sample will hold, computed without FiftyOne (so it is testable alone)."""

    key: str
    batch: str
    split: str
    file_name: str
    filepath: str
    width: int
    height: int
    has_manual_mask: bool
    boxes: list[tuple[str, list[float], int]]  # (class name, relative [x, y, w, h], box id)
    manual: np.ndarray | None  # HxW uint8 label map
    teacher_path: str | None
    student_path: str | None
    scores: dict[str, float | None]
    tags: list[str]
    tag_reference: str | None
    fingerprint: str = ""
    final_path: str | None = None
    extra_paths: dict[str, str | None] = field(default_factory=dict)  # field name -> label-map path (other sources)


@dataclass
class BuildSummary:
    name: str
    num_samples: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    batches: dict[str, dict[str, int]] = field(default_factory=dict)  # batch -> images/manual/teacher/student
    newest_batch: str | None = None
    tags: dict[str, int] = field(default_factory=dict)
    means: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    views: list[str] = field(default_factory=list)
    seconds: float = 0.0


# --- pure part: label maps, scores, tags ------------------------------------------------------------------


def _file_digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def relative_box(xywh: Sequence[float], width: int, height: int) -> list[float]:
    """COCO pixel [x, y, w, h] -> FiftyOne relative [x, y, w, h] in [0, 1]."""
    x, y, w, h = (float(v) for v in xywh)
    return [x / width, y / height, w / width, h / height]


def mask_scores(
    manual: np.ndarray | None, teacher: np.ndarray | None, student: np.ndarray | None, final: np.ndarray | None = None
) -> dict[str, float | None]:
    """Per-image scores (see module docstring) from HxW uint8 label maps; None where an input is missing."""
    s: dict[str, float | None] = dict.fromkeys(SCORE_FIELDS)
    if manual is not None and teacher is not None:
        t = image_binary_scores(teacher, manual)
        s["teacher_iou"], s["teacher_precision"], s["teacher_recall"] = t["iou"], t["precision"], t["recall"]
    if manual is not None and student is not None:
        s["student_iou"] = binary_iou(student, manual)
    if teacher is not None and student is not None:
        s["disagreement"] = 1.0 - binary_iou(teacher, student)
    if s["teacher_iou"] is not None and s["student_iou"] is not None:
        s["student_gain"] = s["student_iou"] - s["teacher_iou"]
    if manual is not None and final is not None:
        s["final_iou"] = binary_iou(final, manual)
        if s["teacher_iou"] is not None:
            s["final_gain"] = s["final_iou"] - s["teacher_iou"]
    return s


def teacher_tags(teacher: np.ndarray | None, reference: np.ndarray | None, rule: TagRule) -> list[str]:
    """`teacher_miss` / `teacher_hallucination` of a teacher label map against a reference (see TagRule)."""
    if teacher is None or reference is None:
        return []
    s = image_binary_scores(teacher, reference)
    tags = []
    if s["recall"] < rule.min_recall and s["fn"] >= rule.min_pixels:
        tags.append("teacher_miss")
    if s["precision"] < rule.min_precision and s["fp"] >= rule.min_pixels:
        tags.append("teacher_hallucination")
    return tags


def _labelmaps_dir(root: Path | None, batch: Batch, what: str, needed: bool) -> Path | None:
    """The batch's label-map folder under a mask root; None when the root does not exist (allowed)."""
    if root is None or not root.exists() or not needed:
        return None
    folder = root / batch.name / "labelmaps"
    if not folder.is_dir():
        raise B2PError(
            f"the {what} root {root} exists but has no label maps for batch {batch.name!r} "
            f"(expected the folder {folder}); produce them first or point --{what}-root elsewhere",
            folder,
        )
    return folder


def _read_mask(root: Path, im: ImageRecord, classes: ClassList, what: str) -> tuple[np.ndarray, Path]:
    path = label_map_path(root, im.batch, im.file_name)
    if not path.is_file():
        raise B2PError(f"{what} label map missing for image {im.file_name!r} of batch {im.batch!r}", path)
    return read_label_map(path, (im.height, im.width), classes.num_classes), path


def field_name(source: str) -> str:
    """A FiftyOne field name for a mask source (`students.bitfit.final` -> `students_bitfit_final`: a dot
    would mean an embedded field)."""
    import re

    name = re.sub(r"[^A-Za-z0-9_]", "_", source)
    if not name or name[0].isdigit() or name in (*MASK_FIELDS, "boxes", "filepath", "tags", "metadata", "id"):
        raise B2PError(f"source {source!r} cannot be a FiftyOne field of its own; rename it")
    return name


def sample_content(
    im: ImageRecord,
    classes: ClassList,
    teacher_root: Path | None,
    pred_root: Path | None,
    rule: TagRule = TagRule(),
    final_root: Path | None = None,
    extra_roots: dict[str, Path] | None = None,
) -> SampleContent:
    """Compute one sample: boxes, masks, scores, tags, fingerprint. A None root means "no such masks";
    `extra_roots` {field name: root} are further sources, each its own field with its IoU (`<field>_iou`)."""
    if not im.path.is_file():
        raise B2PError(f"image of {im.key!r} not found (moved since import?)", im.path)
    manual = im.manual_label_map()
    teacher = student = final = None
    t_path = s_path = f_path = None
    digest: dict[str, Any] = {}
    if teacher_root is not None:
        teacher, t_path = _read_mask(teacher_root, im, classes, "teacher")
        digest["teacher"] = _file_digest(t_path)
    if pred_root is not None:
        student, s_path = _read_mask(pred_root, im, classes, "pred")
        digest["student"] = _file_digest(s_path)
    if final_root is not None:
        final, f_path = _read_mask(final_root, im, classes, "final")
        digest["final"] = _file_digest(f_path)
    extra_paths: dict[str, str | None] = {}
    extra_scores: dict[str, float | None] = {}
    for fname, root in (extra_roots or {}).items():
        lm, path = _read_mask(root, im, classes, fname)
        digest[fname] = _file_digest(path)
        extra_paths[fname] = str(path.resolve())
        extra_scores[f"{fname}_iou"] = binary_iou(lm, manual) if manual is not None else None
    if manual is not None:
        digest["manual"] = hashlib.sha1(np.ascontiguousarray(manual).tobytes()).hexdigest()
    boxes = [(classes.name_of(b.category_id), relative_box(b.xywh, im.width, im.height), int(b.id)) for b in im.boxes]
    reference, ref_name = (manual, "manual") if manual is not None else (student, "student")
    tags = teacher_tags(teacher, reference, rule)
    content = SampleContent(
        key=im.key, batch=im.batch, split=im.split, file_name=im.file_name, filepath=str(im.path.resolve()),
        width=im.width, height=im.height, has_manual_mask=im.has_manual_mask, boxes=boxes, manual=manual,
        teacher_path=str(t_path.resolve()) if t_path else None, student_path=str(s_path.resolve()) if s_path else None,
        scores={**mask_scores(manual, teacher, student, final), **extra_scores}, tags=tags,
        tag_reference=ref_name if (teacher is not None and reference is not None) else None,
        final_path=str(f_path.resolve()) if f_path else None, extra_paths=extra_paths,
    )
    # the fingerprint covers every input; scores and tags follow from them (and from the rule)
    content.fingerprint = hashlib.sha1(json.dumps({
        "v": BUILD_VERSION, "key": im.key, "file": content.filepath, "sha": im.sha256, "split": im.split,
        "size": [im.width, im.height], "boxes": boxes, "masks": digest,
        "paths": [content.teacher_path, content.student_path, content.final_path, extra_paths], "rule": rule.as_dict(), "classes": classes.names,
    }, sort_keys=True).encode()).hexdigest()
    return content


def collect_contents(
    batches: list[Batch],
    teacher_root: Path | None,
    pred_root: Path | None,
    pred_splits: Sequence[str] = SPLITS,
    rule: TagRule = TagRule(),
    progress: bool = True,
    final_root: Path | None = None,
    extra_roots: dict[str, Path] | None = None,
) -> tuple[list[SampleContent], dict[str, dict[str, int]], list[str]]:
    """Sample contents of every image of `batches`, per-batch counts, and notes for the summary.

    Student masks are expected only for images whose split is in `pred_splits` (`b2p predict` may have
    run on the test split only); inside those, a missing label map is an error like the teacher's.
    """
    from rich.progress import Progress

    classes = class_list_of(batches)
    notes = []
    for root, what in ((teacher_root, "teacher"), (pred_root, "pred")):
        if root is not None and not root.exists():
            notes.append(f"{what} root {root} does not exist: the {'teacher' if what == 'teacher' else 'student'} field is left empty")
    if final_root is not None and not final_root.exists():
        notes.append(f"final root {final_root} does not exist: the final field is left empty (`b2p finalize` writes it)")
    extras = {}
    for fname, root in (extra_roots or {}).items():
        if root.exists():
            extras[fname] = root
        else:
            notes.append(f"{fname} root {root} does not exist: that field is left empty")
    bad = [s for s in pred_splits if s not in SPLITS]
    if bad:
        raise B2PError(f"unknown split(s) {bad} for student predictions; choose from {list(SPLITS)}")
    contents: list[SampleContent] = []
    counts: dict[str, dict[str, int]] = {}
    total = sum(len(b.images) for b in batches)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("reading masks and scoring", total=total)
        for b in batches:
            t_dir = _labelmaps_dir(teacher_root, b, "teacher", needed=bool(b.images))
            p_dir = _labelmaps_dir(pred_root, b, "pred", needed=any(im.split in pred_splits for im in b.images))
            f_dir = _labelmaps_dir(final_root, b, "final", needed=bool(b.images))
            here = {f: r for f, r in extras.items() if _labelmaps_dir(r, b, f, needed=bool(b.images)) is not None}
            c = counts.setdefault(b.name, {"images": 0, "manual": 0, "teacher": 0, "student": 0, "final": 0})
            for im in b.images:
                sc = sample_content(
                    im, classes,
                    teacher_root if t_dir is not None else None,
                    pred_root if (p_dir is not None and im.split in pred_splits) else None,
                    rule,
                    final_root if f_dir is not None else None,
                    here,
                )
                contents.append(sc)
                c["images"] += 1
                c["manual"] += sc.manual is not None
                c["teacher"] += sc.teacher_path is not None
                c["student"] += sc.student_path is not None
                c["final"] += sc.final_path is not None
                bar.advance(task)
    return contents, counts, notes


# --- FiftyOne part ------------------------------------------------------------------------------------------


def _declare_schema(fo: ModuleType, ds: Any, extra_fields: Sequence[str] = ()) -> None:
    schema = ds.get_field_schema()
    for name, kind, kwargs in (
        ("b2p_key", fo.StringField, {}),
        ("b2p_fingerprint", fo.StringField, {}),
        ("batch", fo.StringField, {}),
        ("split", fo.StringField, {}),
        ("has_manual_mask", fo.BooleanField, {}),
        ("tag_reference", fo.StringField, {}),
        ("boxes", fo.EmbeddedDocumentField, {"embedded_doc_type": fo.Detections}),
        *((m, fo.EmbeddedDocumentField, {"embedded_doc_type": fo.Segmentation}) for m in MASK_FIELDS),
        *((s, fo.FloatField, {}) for s in SCORE_FIELDS),
        *((m, fo.EmbeddedDocumentField, {"embedded_doc_type": fo.Segmentation}) for m in extra_fields),
        *((f"{m}_iou", fo.FloatField, {}) for m in extra_fields),
    ):
        if name not in schema:
            ds.add_sample_field(name, kind, **kwargs)
    # an index on the identity keeps updates of big datasets fast; unique guards against duplicates
    if "b2p_key" not in ds.list_indexes():
        ds.create_index("b2p_key", unique=True)


def _apply(fo: ModuleType, sample: Any, c: SampleContent) -> None:
    """Write a SampleContent into a fo.Sample (new or existing); user tags other than ours are kept."""
    sample["filepath"] = c.filepath
    sample["metadata"] = fo.ImageMetadata(width=c.width, height=c.height)
    sample["b2p_key"] = c.key
    sample["b2p_fingerprint"] = c.fingerprint
    sample["batch"] = c.batch
    sample["split"] = c.split
    sample["has_manual_mask"] = c.has_manual_mask
    sample["tag_reference"] = c.tag_reference
    sample["boxes"] = fo.Detections(detections=[
        fo.Detection(label=label, bounding_box=box, box_id=box_id) for label, box, box_id in c.boxes
    ])
    sample["manual"] = fo.Segmentation(mask=c.manual) if c.manual is not None else None
    sample["teacher"] = fo.Segmentation(mask_path=c.teacher_path) if c.teacher_path else None
    sample["student"] = fo.Segmentation(mask_path=c.student_path) if c.student_path else None
    sample["final"] = fo.Segmentation(mask_path=c.final_path) if c.final_path else None
    for k in SCORE_FIELDS:
        sample[k] = c.scores[k]
    for m, path in c.extra_paths.items():
        sample[m] = fo.Segmentation(mask_path=path) if path else None
        sample[f"{m}_iou"] = c.scores.get(f"{m}_iou")
    sample.tags = [t for t in sample.tags if t not in OUR_TAGS] + list(c.tags)


# one colour per mask field (the App colours masks by field): teacher and student masks of one image differ
FIELD_COLORS = {"boxes": "#ffffff", "manual": "#ffe119", "teacher": "#f58231", "student": "#42d4f4", "final": "#3cb44b"}
EXTRA_COLORS = ("#911eb4", "#f032e6", "#bfef45", "#469990", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075", "#dcbeff")


def field_colors(extra_fields: Sequence[str]) -> dict[str, str]:
    """The colour of every field: the built-in ones fixed, further sources from EXTRA_COLORS in order."""
    return {**FIELD_COLORS, **{m: EXTRA_COLORS[i % len(EXTRA_COLORS)] for i, m in enumerate(extra_fields)}}


def _app_config(fo: ModuleType, ds: Any, classes: ClassList, extra_fields: Sequence[str] = ()) -> None:
    """Mask targets, one colour per field, and the fields ticked when the App opens (the built-in masks;
    further sources are one click away in the sidebar)."""
    targets = {i + 1: n for i, n in enumerate(classes.names)}
    ds.default_mask_targets = targets
    box_colors = [{"value": n, "color": class_color_hex(i)} for i, n in targets.items()]
    colors = field_colors(extra_fields)
    ds.app_config.color_scheme = fo.ColorScheme(
        color_by="field",
        opacity=0.6,
        fields=[
            {"path": "boxes", "fieldColor": colors["boxes"], "colorByAttribute": "label", "valueColors": box_colors},
            *({"path": m, "fieldColor": colors[m]} for m in (*MASK_FIELDS, *extra_fields)),
        ],
    )
    # FiftyOne draws only ticked label fields; masks are dense labels, which it leaves unticked by default
    ds.app_config.active_fields = fo.ActiveFields(paths=["boxes", *MASK_FIELDS])


def _save_views(ds: Any, newest: str | None, rule: TagRule) -> list[str]:
    from fiftyone import ViewField as F

    views = {
        "worst-teacher": ds.exists("teacher_iou").sort_by("teacher_iou"),
        "student-fixed-teacher": ds.match(F("student_gain") >= rule.fixed_gain).sort_by("student_gain", reverse=True),
        "newest-batch": ds.match(F("batch") == (newest or "")).sort_by("disagreement", reverse=True),
        "by-disagreement": ds.exists("disagreement").sort_by("disagreement", reverse=True),
        "teacher-errors": ds.match_tags(list(OUR_TAGS)),
        "worst-final": ds.exists("final_iou").sort_by("final_iou"),
    }
    descriptions = {
        "worst-teacher": "images with a manual mask, lowest teacher IoU first",
        "student-fixed-teacher": f"student IoU at least {rule.fixed_gain} above the teacher's (manual masks)",
        "newest-batch": f"batch {newest!r}, highest teacher-student disagreement first",
        "by-disagreement": "all images with teacher and student masks, highest disagreement first",
        "teacher-errors": "images tagged teacher_miss or teacher_hallucination",
        "worst-final": "images with a manual mask, lowest final-mask IoU first",
    }
    for name, view in views.items():
        ds.save_view(name, view, description=descriptions[name], overwrite=True)
    return list(views)


def open_dataset(fo: ModuleType, name: str) -> Any:
    """Load the persistent dataset `name`, or create it; refuse a dataset b2p did not make."""
    if fo.dataset_exists(name):
        ds = fo.load_dataset(name)
        if not ds.info.get("b2p"):
            raise B2PError(f"FiftyOne dataset {name!r} exists but was not made by b2p; choose another --name")
        return ds
    ds = fo.Dataset(name, persistent=True)
    ds.info = {"b2p": {"build_version": BUILD_VERSION, "batch_order": []}}
    ds.save()
    return ds


def sync_dataset(
    fo: ModuleType, ds: Any, contents: list[SampleContent], batch_names: Sequence[str], summary: BuildSummary, extra_fields: Sequence[str] = ()
) -> None:
    """Make `ds` hold exactly `contents` for the given batches: add new keys, rewrite changed ones, drop
    samples of those batches whose image is gone. Samples of other batches are left alone."""
    _declare_schema(fo, ds, extra_fields)
    existing: dict[str, str | None] = {}
    if len(ds):
        keys, prints = ds.values(["b2p_key", "b2p_fingerprint"])
        existing = dict(zip(keys, prints))
    wanted = {c.key: c for c in contents}
    if len(wanted) != len(contents):
        dup = [k for k, n in Counter(c.key for c in contents).items() if n > 1]
        raise B2PError(f"the same image key appears twice: {dup[:5]}")
    new = [c for c in contents if c.key not in existing]
    changed = {c.key: c for c in contents if c.key in existing and existing[c.key] != c.fingerprint}
    if new:
        samples = []
        for c in new:
            s = fo.Sample(filepath=c.filepath)
            _apply(fo, s, c)
            samples.append(s)
        ds.add_samples(samples)
    if changed:
        for s in ds.select_by("b2p_key", list(changed)).iter_samples(autosave=True):
            _apply(fo, s, changed[s["b2p_key"]])
    from fiftyone import ViewField as F

    stale = ds.match(F("batch").is_in(list(batch_names)) & ~F("b2p_key").is_in(list(wanted)))
    summary.removed = len(stale)
    if summary.removed:
        ds.delete_samples(stale)
    summary.added, summary.updated = len(new), len(changed)
    summary.unchanged = len(contents) - len(new) - len(changed)


def build_dataset(
    batch_files: Sequence[str | Path],
    teacher_root: str | Path | None = None,
    pred_root: str | Path | None = None,
    name: str = "b2p",
    pred_splits: Sequence[str] = SPLITS,
    rule: TagRule = TagRule(),
    progress: bool = True,
    final_root: str | Path | None = None,
    extra_roots: dict[str, str | Path] | None = None,
) -> BuildSummary:
    """Build or update the persistent FiftyOne dataset `name` from canonical batch files and mask roots.

    Returns a BuildSummary (counts of added / updated / unchanged / removed samples, per-batch mask
    coverage, tag counts, mean scores, notes about missing roots, saved view names, seconds taken).
    """
    from b2p.browse.fo_env import connect, import_fiftyone

    t0 = time.perf_counter()
    batches = load_batches(list(batch_files))
    classes = class_list_of(batches)
    summary = BuildSummary(name=name)
    extras = {field_name(n): Path(r) for n, r in (extra_roots or {}).items()}
    contents, summary.batches, summary.notes = collect_contents(
        batches, Path(teacher_root) if teacher_root else None, Path(pred_root) if pred_root else None,
        pred_splits, rule, progress, Path(final_root) if final_root else None, extras,
    )
    fo = import_fiftyone()
    connect(fo)
    fo.config.show_progress_bars = False  # our own rich progress is enough
    ds = open_dataset(fo, name)
    sync_dataset(fo, ds, contents, [b.name for b in batches], summary, list(extras))

    info = dict(ds.info)
    b2p_info = dict(info.get("b2p") or {})
    order = list(b2p_info.get("batch_order", []))
    order += [b.name for b in batches if b.name not in order]  # first-seen order: the last is the newest
    present = set(ds.distinct("batch"))
    order = [b for b in order if b in present]
    b2p_info.update({"build_version": BUILD_VERSION, "batch_order": order, "classes": list(classes.names),
                     "tag_rule": rule.as_dict(), "tag_reference": "manual mask where the image has one, else the student's mask"})
    info["b2p"] = b2p_info
    ds.info = info
    _app_config(fo, ds, classes, list(extras))
    ds.save()
    summary.newest_batch = order[-1] if order else None
    summary.views = _save_views(ds, summary.newest_batch, rule)

    summary.num_samples = len(ds)
    summary.tags = {t: int(n) for t, n in ds.count_sample_tags().items() if t in OUR_TAGS}
    summary.means = {k: ds.mean(k) if ds.exists(k).count() else None for k in (*SCORE_FIELDS, *(f"{m}_iou" for m in extras))}
    summary.seconds = time.perf_counter() - t0
    return summary
