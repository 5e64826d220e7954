"""Write the pixel dataset as COCO instance segmentation, YOLO-seg and semantic PNGs (MMSegmentation layout).

Each format gets its own folder `OUT/<format>/`, rebuilt whole on every run:

  coco/      images/<name>.<ext>, annotations/instances_<split>.json, export.json
  yolo/      images/<split>/<name>.<ext>, labels/<split>/<name>.txt, data.yaml, export.json
  semantic/  img_dir/<split>/<name>.<ext>, ann_dir/<split>/<name>.png, splits/<split>.txt, classes.txt,
             classes.json, export.json

`<name>` is `<batch>__<label-map key>` (folders of the file name flattened as in the label-map layout), so
images of different batches never collide and no path holds an inner `images/` folder, which YOLO tools
would rewrite to find the labels. `export.json` records where the masks came from, the counts and, for
polygons, how well they rasterise back.

Reproducible and all-or-nothing: JSON keys are sorted, nothing carries a time, and every format of a run is
built in ONE hidden folder inside OUT (each file written atomically), then the formats are swapped in as a
set (`fileio.staged_dirs`): a run killed at any point leaves them all old or, once the swap has begun, all new
(the next run finishes a swap a kill interrupted before it reads anything). On any error the hidden folder is
removed and nothing changes. A folder is replaced only if it holds a b2p `export.json`, so an existing
folder b2p did not write is refused rather than deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from b2p.dataset import ImageRecord, class_list_of, input_folders, load_batches
from b2p.errors import B2PError
from b2p.fileio import check_separate_folders, exif_orientation, read_json, recover_staged, sha256_file, staged_dirs, temp_prefix, write_bytes_atomic
from b2p.labels import ClassList, export_stem, label_map_path, read_label_map
from b2p.masks import rle_encode

# Named mask sources and the root each one reads by default (`--source-root` points anywhere).
SOURCES = {
    "final": "data/final",  # the recipe's final masks (`b2p combine` of the combined and distilled masks)
    "combined": "data/combined",  # the combined masks the distilled students learnt from
    "teacher": "data/teach",  # teacher pseudo-masks
    "student": "data/model/masks",  # the shipped student alone, with its calibrated rule (`b2p deploy`)
    "boxes": "data/predict_boxes",  # box-guided student masks (`b2p predict --boxes-out`)
    "snapped": "data/predict_snap",  # the student alone snapped to the image (b2p predict --snap)
}
DEFAULT_SOURCE = "final"
STUDENT_SOURCES = ("boxes", "student", "snapped")  # a model stands behind them
FORMATS = ("coco", "yolo", "semantic")
IMAGE_MODES = ("copy", "symlink", "hardlink")
COCO_MASKS = ("rle", "polygons")
SPLIT_ORDER = ("train", "val", "calib", "test")  # others follow alphabetically
MARKER = "export.json"
EXPORT_FORMAT = 1

MASK_RULE = (
    "one annotation per annotated box: the pixels of the box's class inside the box in the label map; "
    "where boxes of the same class overlap, the smaller mask wins (equal areas: higher score, then the "
    "earlier box), as b2p paints label maps; boxes whose mask is empty are left out and counted"
)
POLYGON_RULE = (
    "each instance is one polygon: every boundary ring (outer rings of its parts, rings of its holes) "
    "joined by zero-width cuts along a minimum spanning tree of closest-vertex distances"
)


@dataclass
class ExportOptions:
    formats: tuple[str, ...] = FORMATS
    source: str = DEFAULT_SOURCE
    source_root: Path | None = None
    splits: tuple[str, ...] = ()  # empty: every split present
    images: str = "copy"
    coco_masks: str = "rle"
    unboxed: str | None = None  # a source for the images without boxes ("none" / None: the main source)
    unboxed_root: Path | None = None


@dataclass
class ExportItem:
    record: ImageRecord
    label_map: Path
    name: str  # file stem in the export: <batch>__<key>

    @property
    def ext(self) -> str:
        return Path(self.record.file_name).suffix.lower() or ".png"


@dataclass
class ExportReport:
    out: Path
    formats: dict[str, dict] = field(default_factory=dict)  # format -> its export.json


def resolve_source(source: str, source_root: str | Path | None) -> Path:
    if source not in SOURCES:
        raise B2PError(f"unknown mask source {source!r}; choose one of {sorted(SOURCES)} (or give --source-root)")
    return Path(source_root) if source_root is not None else Path(SOURCES[source])


def _ordered_splits(present: set[str]) -> list[str]:
    return [s for s in SPLIT_ORDER if s in present] + sorted(present - set(SPLIT_ORDER))


def _dumps(obj, indent: int | None = 1) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=indent) + "\n").encode()


def _git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _teacher_record(teacher_root: Path, batches: list[str]) -> dict | None:
    """Which teacher made the pseudo-masks of each batch (no times or counters, so re-runs match)."""
    out = {}
    for b in batches:
        p = teacher_root / b / "provenance.json"
        if p.is_file():
            prov = read_json(p, "teacher provenance")
            out[b] = {k: prov.get(k) for k in ("teacher", "settings", "settings_hash")}
    return out or None


def _model_record(model_dir: Path | None, source: str, source_root: Path, maps: list[Path]) -> dict | None:
    """The student behind the masks: the one the source root's prediction manifest names (`maps` must all
    be its run's), else `model_dir` for a student source read from its default root (a root predicted before
    manifests); None for masks that are not the student's own."""
    from b2p.student.manifest import MANIFEST, read_prediction_manifest

    if source not in STUDENT_SOURCES:
        return None
    if (source_root / MANIFEST).is_file():
        m = read_prediction_manifest(source_root, maps)  # refuses maps of two models or of an earlier run
        return {**m["model"], "settings": m["settings"]}
    if model_dir is None or source_root.resolve() != Path(SOURCES[source]).resolve():
        return None  # masks from elsewhere: --model says nothing about them
    ckpt = model_dir / "model.pt"
    if not ckpt.is_file():
        return None
    rec = {"path": str(model_dir), "sha256": sha256_file(ckpt)}
    metrics = model_dir / "metrics.json"
    if metrics.is_file():
        rec["backbone"] = read_json(metrics, "model metrics").get("backbone")
    return rec


def _scores(source_root: Path, batch: str) -> dict[int, float]:
    """Per-box scores where the source has them (a teacher's instances.json); label maps alone have none."""
    p = source_root / batch / "instances.json"
    if not p.is_file():
        return {}
    return {int(a["box_id"]): float(a["score"]) for a in read_json(p, "instances file").get("annotations", []) if "score" in a}


def collect_items(
    batch_files: list[Path], source_root: Path, splits: tuple[str, ...], unboxed_root: Path | None = None
) -> tuple[ClassList, dict[str, list[ExportItem]], list]:
    """The images to export by split, each with its label map (an image without boxes from `unboxed_root`
    when given); every label map must exist and every image be the one imported (sha256; checked here,
    before anything is written)."""
    batches = load_batches(batch_files)
    classes = class_list_of(batches)
    present = {im.split for b in batches for im in b.images}
    wanted = list(splits) or _ordered_splits(present)
    unknown = [s for s in wanted if s not in present]
    if unknown:
        raise B2PError(f"no images in split(s) {unknown}; the batches have splits {_ordered_splits(present)}")
    by_split: dict[str, list[ExportItem]] = {s: [] for s in wanted}
    names: dict[str, str] = {}
    missing = []
    for b in batches:
        for rec in b.images:
            if rec.split not in by_split:
                continue
            name = export_stem(b.name, rec.file_name)
            if name in names:
                raise B2PError(f"images {names[name]!r} and {rec.key!r} would get the same export name {name!r}")
            names[name] = rec.key
            lm = label_map_path(unboxed_root if unboxed_root is not None and not rec.boxes else source_root, b.name, rec.file_name)
            if not lm.is_file():
                missing.append(lm)
            by_split[rec.split].append(ExportItem(rec, lm, name))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise B2PError(f"mask source has no label map for {len(missing)} exported image(s){more}", missing[0])
    from b2p.dataset import check_image_unchanged
    from b2p.teach.base import check_teacher_root  # the checks teach and train make

    for b in batches:  # masks a teacher or finalize made from other images must not ship with these
        check_teacher_root(source_root, b)
        if unboxed_root is not None:
            check_teacher_root(unboxed_root, b)
    for item in (i for items in by_split.values() for i in items):  # a replaced image must not get the old one's masks
        check_image_unchanged(item.record)
    return classes, by_split, batches


def _check_out(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise B2PError("export output is a file, not a folder", folder)
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MARKER).is_file():
        raise B2PError(f"folder exists and is not a b2p export (no {MARKER}); refusing to replace it", folder)


def _place_image(src: Path, dst: Path, mode: str) -> None:
    if not src.is_file():
        raise B2PError("image file not found", src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "copy":
        write_bytes_atomic(dst, src.read_bytes())
        return
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(dst.name), suffix=".tmp", dir=dst.parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        if mode == "symlink":
            os.symlink(src.resolve(), tmp)
        else:
            os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise B2PError(f"could not {mode} the image into the export ({e.strerror}); use --images copy", src) from None


class _IoU:
    """How well polygons rasterise back: pooled IoU over all instances and the worst instance."""

    def __init__(self) -> None:
        self.inter = self.union = 0
        self.worst = 1.0
        self.n = self.with_holes = self.multi_part = 0

    def add(self, mask: np.ndarray, back: np.ndarray) -> None:
        from b2p.export.polygons import parts_and_holes

        parts, holes = parts_and_holes(mask)
        self.with_holes += holes > 0
        self.multi_part += parts > 1
        i, u = int(np.count_nonzero(mask & back)), int(np.count_nonzero(mask | back))
        self.inter += i
        self.union += u
        self.worst = min(self.worst, i / u if u else 1.0)
        self.n += 1

    def summary(self, rasteriser: str) -> dict:
        return {
            "rasterised_with": rasteriser,
            "instances": self.n,
            "instances_with_holes": self.with_holes,
            "multi_part_instances": self.multi_part,
            "pooled_iou": round(self.inter / self.union, 6) if self.union else None,
            "min_iou": round(self.worst, 6) if self.n else None,
        }


# --- the formats ---------------------------------------------------------------------------------------


class _Writer:
    """One format's folder being built in `stage`; `add` gets every image with its label map and instances."""

    needs_instances = True

    def __init__(self, stage: Path, classes: ClassList, opts: ExportOptions, info: dict):
        self.stage, self.classes, self.opts, self.info = stage, classes, opts, info
        self.counts: dict[str, dict[str, int]] = {}

    def count(self, split: str, key: str, n: int = 1) -> None:
        c = self.counts.setdefault(split, {})
        c[key] = c.get(key, 0) + n

    def add(self, split: str, item: ExportItem, label_map: np.ndarray, instances: list, image_id: int) -> None:
        raise NotImplementedError

    def finish(self, splits: list[str]) -> dict:
        raise NotImplementedError


class CocoWriter(_Writer):
    def __init__(self, *a):
        super().__init__(*a)
        self.images: dict[str, list] = {}
        self.anns: dict[str, list] = {}
        self.iou = _IoU()

    def add(self, split, item, label_map, instances, image_id):
        rec = item.record
        file_name = f"{item.name}{item.ext}"
        _place_image(rec.path, self.stage / "images" / file_name, self.opts.images)
        self.images.setdefault(split, []).append(
            {"id": image_id, "file_name": file_name, "width": rec.width, "height": rec.height,
             "b2p_batch": rec.batch, "b2p_file_name": rec.file_name, "b2p_split": split}
        )
        anns = self.anns.setdefault(split, [])
        for inst in instances:
            if self.opts.coco_masks == "rle":
                seg = rle_encode(inst.mask)
            else:
                from b2p.export.polygons import mask_to_polygon, rasterise_coco_polygons

                poly = mask_to_polygon(inst.mask, "edge")
                seg = [[float(v) for v in poly.ravel()]]
                self.iou.add(inst.mask, rasterise_coco_polygons(seg, rec.width, rec.height))
            ann = {"id": 0, "image_id": image_id, "category_id": inst.category_id, "segmentation": seg,
                   "area": inst.area, "bbox": inst.mask_bbox(), "iscrowd": 0, "box_id": inst.box_id,
                   "b2p_box": list(inst.box_xywh)}
            if inst.score is not None:
                ann["score"] = inst.score
            anns.append(ann)
        self.count(split, "images")
        self.count(split, "instances", len(instances))

    def finish(self, splits):
        next_id = 1
        for split in splits:
            for ann in self.anns.get(split, []):  # ids unique across the split files, in export order
                ann["id"] = next_id
                next_id += 1
            coco = {"info": {**self.info, "mask_rule": MASK_RULE}, "licenses": [],
                    "categories": self.classes.to_coco_categories(),
                    "images": self.images.get(split, []), "annotations": self.anns.get(split, [])}
            if self.opts.coco_masks == "polygons":
                coco["info"]["polygon_rule"] = POLYGON_RULE
            write_bytes_atomic(self.stage / "annotations" / f"instances_{split}.json", _dumps(coco, indent=None))
        extra = {"masks": self.opts.coco_masks}
        if self.opts.coco_masks == "polygons":
            extra["polygon_iou"] = self.iou.summary("pycocotools (pixel centres inside the polygon)")
        return extra


class YoloWriter(_Writer):
    def __init__(self, *a):
        super().__init__(*a)
        self.iou = _IoU()

    def add(self, split, item, label_map, instances, image_id):
        from b2p.export.polygons import mask_to_polygon, rasterise_centre_polygon

        rec = item.record
        _place_image(rec.path, self.stage / "images" / split / f"{item.name}{item.ext}", self.opts.images)
        lines = []
        for inst in instances:
            poly = mask_to_polygon(inst.mask, "centre")
            if len(poly) < 3:  # 1-2 vertices (a dot, a short line): repeat them, YOLO needs 3 points
                poly = np.concatenate([poly, poly[::-1], poly])[:3]
            norm = (poly + 0.5) / (rec.width, rec.height)
            text = " ".join(f"{v:.6f}" for v in norm.ravel())
            lines.append(f"{inst.category_id - 1} {text}\n")
            back = np.array(text.split(), dtype=np.float64)
            self.iou.add(inst.mask, rasterise_centre_polygon(back, rec.width, rec.height))
        # written whole every time (never appended), empty when the image has no defects
        write_bytes_atomic(self.stage / "labels" / split / f"{item.name}.txt", "".join(lines).encode())
        self.count(split, "images")
        self.count(split, "instances", len(instances))

    def finish(self, splits):
        import yaml

        # no `path:` key: Ultralytics and FiftyOne then read the split folders relative to this file
        data = {s: f"images/{s}" for s in splits}
        data["nc"] = self.classes.num_classes
        data["names"] = {i: n for i, n in enumerate(self.classes.names)}
        header = "# b2p export, YOLO-seg: one line per annotated box, class index = b2p class id - 1\n"
        body = yaml.safe_dump(data, sort_keys=True, default_flow_style=False, allow_unicode=True)
        write_bytes_atomic(self.stage / "data.yaml", (header + body).encode())
        return {"polygon_iou": self.iou.summary("cv2.fillPoly on coordinates x W, H truncated to int (Ultralytics)")}


class SemanticWriter(_Writer):
    needs_instances = False

    def __init__(self, *a):
        super().__init__(*a)
        self.lists: dict[str, list[str]] = {}
        self.suffixes: set[str] = set()

    def add(self, split, item, label_map, instances, image_id):
        from b2p.labels import write_label_map

        _place_image(item.record.path, self.stage / "img_dir" / split / f"{item.name}{item.ext}", self.opts.images)
        write_label_map(self.stage / "ann_dir" / split / f"{item.name}.png", label_map)
        self.lists.setdefault(split, []).append(item.name)
        self.suffixes.add(item.ext)
        self.count(split, "images")
        self.count(split, "defect_pixels", int(np.count_nonzero(label_map)))

    def finish(self, splits):
        for s in splits:
            write_bytes_atomic(self.stage / "splits" / f"{s}.txt", "".join(f"{n}\n" for n in self.lists.get(s, [])).encode())
        names = ["background", *self.classes.names]
        write_bytes_atomic(self.stage / "classes.txt", "".join(f"{n}\n" for n in names).encode())
        write_bytes_atomic(self.stage / "classes.json", _dumps({"classes": [{"id": i, "name": n} for i, n in enumerate(names)]}))
        return {"image_suffixes": sorted(self.suffixes), "label_values": "0 = background, i = classes.txt line i (0-based)"}


WRITERS = {"coco": CocoWriter, "yolo": YoloWriter, "semantic": SemanticWriter}


# --- the job -------------------------------------------------------------------------------------------


def export_dataset(
    batch_files: list[Path],
    out: str | Path,
    opts: ExportOptions,
    teacher_root: str | Path | None = None,
    model_dir: str | Path | None = None,
    progress: bool = True,
) -> ExportReport:
    """Export the masks of `opts.source` for the images of `batch_files` into OUT/<format>/ for each format.

    Everything is checked before anything is written: the options, the output folders, that every label
    map exists. `teacher_root` and `model_dir` only feed the provenance record (where present).
    """
    _check_options(opts)
    source_root, unboxed_root = _mask_roots(opts)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise B2PError("export output is a file, not a folder", out)
    targets = [out / f for f in dict.fromkeys(opts.formats)]
    for t in targets:
        _check_out(t)
    classes, by_split, batches = collect_items(batch_files, source_root, opts.splits, unboxed_root)
    inputs = {f"the mask source ({opts.source})": source_root, "--teacher-root": teacher_root, "--model": model_dir}
    if unboxed_root is not None:
        inputs[f"the mask source of the images without boxes ({opts.unboxed})"] = unboxed_root
    check_separate_folders({"--out": out}, {**inputs, **input_folders(batches)})
    splits = list(by_split)
    scores = {b.name: _scores(source_root, b.name) for b in batches}

    if opts.source == "teacher":  # the masks ARE the teacher's: record the root they came from
        teacher_root = source_root
    teacher_root = Path(teacher_root) if teacher_root is not None else None
    info = _provenance(opts, by_split, batches, splits, source_root, unboxed_root, teacher_root, model_dir)
    recover_staged([out / fmt for fmt in FORMATS])  # a killed run's swap or leftovers, of formats not written this time too
    with staged_dirs(targets) as stages:
        writers = [WRITERS[f](s, classes, opts, info) for f, s in zip(dict.fromkeys(opts.formats), stages)]
        totals = _write_items(writers, splits, by_split, classes, scores, progress)
        report = ExportReport(out)
        for fmt, w, stage in zip(dict.fromkeys(opts.formats), writers, stages):
            report.formats[fmt] = _finish_format(fmt, w, stage, splits, opts, info, totals)
    return report


def _check_options(opts: ExportOptions) -> None:
    """Refuse an unknown (or no) format, image mode or COCO mask encoding."""
    for f in opts.formats:
        if f not in WRITERS:
            raise B2PError(f"unknown export format {f!r}; choose from {list(FORMATS)}")
    if not opts.formats:
        raise B2PError(f"no export format given; choose from {list(FORMATS)}")
    if opts.images not in IMAGE_MODES:
        raise B2PError(f"unknown image mode {opts.images!r}; choose from {list(IMAGE_MODES)}")
    if opts.coco_masks not in COCO_MASKS:
        raise B2PError(f"unknown COCO mask encoding {opts.coco_masks!r}; choose from {list(COCO_MASKS)}")


def _mask_roots(opts: ExportOptions) -> tuple[Path, Path | None]:
    """The folder of the source's masks and, with `opts.unboxed`, that of the images without boxes; each must exist."""
    source_root = resolve_source(opts.source, opts.source_root)
    if not source_root.is_dir():
        raise B2PError(f"mask source {opts.source!r} has no masks here (run the stage that writes them first)", source_root)
    unboxed_root = None
    if opts.unboxed not in (None, "none"):
        unboxed_root = resolve_source(opts.unboxed, opts.unboxed_root)
        if not unboxed_root.is_dir():
            raise B2PError(f"mask source {opts.unboxed!r} (images without boxes) has no masks here (run the stage that writes them first)", unboxed_root)
    return source_root, unboxed_root


def _provenance(opts: ExportOptions, by_split: dict, batches: list, splits: list[str], source_root: Path, unboxed_root: Path | None,
                teacher_root: Path | None, model_dir) -> dict:
    """The `info` every format records: the source of the masks, its teacher and model, the batches and splits, the version."""
    from b2p import __version__

    # the masks follow the image as displayed (EXIF orientation applied, fileio.read_image); the exported
    # file keeps its tag, so a reader that ignores it (torchvision's decode_jpeg by default) sees them turned
    oriented = [i.record.key for items in by_split.values() for i in items if exif_orientation(i.record.path) != 1]
    return {
        "description": f"b2p pixel dataset ({opts.source} masks)",
        "exif_oriented_images": oriented,
        "b2p_version": __version__,
        "git_commit": _git_commit(),
        "source": opts.source,
        "source_root": str(source_root),
        "unboxed_source": None if unboxed_root is None else {"source": opts.unboxed, "root": str(unboxed_root)},
        "splits": splits,
        "batches": [b.name for b in batches],
        "teacher": _teacher_record(teacher_root, [b.name for b in batches]) if teacher_root is not None else None,
        "model": _model_record(Path(model_dir) if model_dir is not None else None, opts.source, source_root,
                               [i.label_map for items in by_split.values() for i in items]),
    }


def _write_items(writers: list, splits: list[str], by_split: dict, classes, scores: dict, progress: bool) -> dict[str, int]:
    """Each image's label map (and its box instances, where a format needs them) to every writer; the box totals."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    n_items = sum(len(v) for v in by_split.values())
    need_instances = any(w.needs_instances for w in writers)
    totals = {"unboxed_pixels": 0, "empty_boxes": 0, "boxes": 0}
    image_id = 0
    with Progress(TextColumn("[bold]export"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True, disable=not progress) as bar:
        task = bar.add_task("export", total=n_items)
        for split in splits:
            for item in by_split[split]:
                rec = item.record
                image_id += 1
                lm = read_label_map(item.label_map, (rec.height, rec.width), classes.num_classes)
                kept: list = []
                if need_instances:
                    from b2p.export.instances import box_instances

                    instances, unboxed = box_instances(lm, rec, scores[rec.batch])
                    kept = [i for i in instances if i.area > 0]
                    totals["boxes"] += len(instances)
                    totals["empty_boxes"] += len(instances) - len(kept)
                    totals["unboxed_pixels"] += unboxed
                for w in writers:
                    w.add(split, item, lm, kept, image_id)
                bar.advance(task)
    return totals


def _finish_format(fmt: str, w: _Writer, stage: Path, splits: list[str], opts: ExportOptions, info: dict, totals: dict) -> dict:
    """A format's closing files and its manifest (MARKER), returned."""
    extra = w.finish(splits)
    manifest = {
        "b2p_export": EXPORT_FORMAT,
        "format": fmt,
        "info": info,
        "images": opts.images,
        "counts": w.counts,
        **extra,
    }
    if w.needs_instances:
        manifest["mask_rule"] = MASK_RULE
        manifest["boxes"] = totals
    if fmt == "yolo" or (fmt == "coco" and opts.coco_masks == "polygons"):
        manifest["polygon_rule"] = POLYGON_RULE
    write_bytes_atomic(stage / MARKER, _dumps(manifest))
    return manifest
