"""The teacher interface and the batch loop that turns boxes into pseudo-masks.

A teacher maps one image and its boxes to one binary mask per box (`Teacher.predict`). `teach_batch` runs a
teacher over every image of a canonical batch (all splits: evaluation scores the teacher on the test split)
and writes, under `<out_root>/<batch>/`:

  labelmaps/<key>.png  one label map per image (b2p.labels format), masks painted with
                       `b2p.labels.paint_label_map`: where masks of different boxes overlap, the SMALLER mask
                       wins (a thin crack inside a big erosion box keeps its pixels); equal areas go to the
                       higher score, then the lower class id.
  instances.json       COCO: one annotation per box (`box_id` = the canonical box annotation id,
                       category_id, RLE segmentation, area, bbox of the mask, `score` = the teacher's score,
                       `note` when the teacher had to do something special for that box).
  provenance.json      teacher, settings, checkpoint, versions, counts, time, every per-box note.
  preview.png          up to 8 images (test split first) with the label map in class colours and the boxes.

Engine (b2p/scale/engine.py): the images are taught in this process (local) or on Ray workers; either way
this process writes every file below, and provenance.json records the engine and its workers.

Resume: each finished image is written atomically to `.parts/<key>.json` (+ `.png`) with the hash of the
teacher's settings. A rerun skips images whose part has the same settings hash, image hash and boxes, and
redoes the rest; the final files above are assembled from the parts only once every image is done, so an
interrupted or failed run never leaves a half-updated output.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from b2p.boxes import boxes_area
from b2p.dataset import Batch, ImageRecord, check_image_unchanged, input_folders, load_batch
from b2p.errors import B2PError
from b2p.fileio import check_separate_folders, read_image, read_json, write_bytes_atomic, write_json_atomic, write_png_atomic
from b2p.labels import encode_label_map, label_map_key, label_map_path, paint_label_map
from b2p.scale.engine import Engine
from b2p.masks import rle_decode, rle_encode
from b2p.progress import Progress
from b2p.splits import SPLITS


PART_FORMAT = 1
PARTS_DIR = ".parts"
STAGING_DIR = ".staging"
COMPLETE_MARKER = "COMPLETE"


@dataclass
class TeacherOutput:
    """What a teacher returns for one image with N boxes.

    masks: NxHxW bool, scores: N float32 in [0, 1], notes: N entries, None where the box was handled
    normally, else a short text saying what happened instead (a fallback, a degenerate box, ...).
    """

    masks: np.ndarray
    scores: np.ndarray
    notes: list[str | None]


@dataclass
class PseudoMask:
    """One teacher mask for one box, as stored in instances.json."""

    box_id: int
    image_id: int
    category_id: int
    mask: np.ndarray  # HxW bool
    score: float
    note: str | None = None

    def to_coco(self) -> dict:
        m = np.asarray(self.mask, dtype=bool)
        cols, rows = np.flatnonzero(m.any(0)), np.flatnonzero(m.any(1))
        bbox = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)] if cols.size else [0, 0, 0, 0]
        ann = {
            "id": self.box_id,
            "box_id": self.box_id,
            "image_id": self.image_id,
            "category_id": self.category_id,
            "segmentation": rle_encode(m),
            "area": int(m.sum()),
            "bbox": bbox,
            "iscrowd": 0,
            "score": round(float(self.score), 6),
        }
        if self.note:
            ann["note"] = self.note
        return ann


class Teacher(ABC):
    """Box-prompted mask maker. Subclasses set `name` and implement `predict` and `settings`."""

    name: str = "teacher"

    @abstractmethod
    def predict(self, image: np.ndarray, boxes: np.ndarray) -> TeacherOutput:
        """image: HxWx3 uint8 RGB; boxes: Nx4 float XYXY pixels -> TeacherOutput (masks NxHxW bool)."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """Every setting that changes the masks (JSON-able); its hash decides whether resume may reuse work."""

    def provenance(self) -> dict[str, Any]:
        """Extra facts for provenance.json (checkpoint, device, counters); settings are added by the loop."""
        return {}

    def predict_for(self, record: ImageRecord, image: np.ndarray, boxes: np.ndarray, class_ids: np.ndarray) -> TeacherOutput:
        """`predict` given also the image's identity and the boxes' class ids (N int), for teachers that need
        them (`auto` picks a teacher per class; earlier-round masks are looked up by image)."""
        return self.predict(image, boxes)

    # --- on an engine's workers (b2p/scale/engine.py): the teacher travels pickled, without its model ---

    def setup(self) -> None:
        """Load what pickling left out (a model), once per worker; a no-op for teachers without one."""

    def counters(self) -> dict[str, int]:
        """Running counts that provenance reports (encoder calls, cache hits), to be summed over workers."""
        return {}

    def add_counters(self, counts: dict[str, int]) -> None:
        """Add counts a worker's copy of this teacher made (see `counters`)."""


def check_inputs(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a teacher's inputs: HxWx3 uint8 image and Nx4 float boxes; returns them as arrays."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise B2PError(f"teacher expects an HxWx3 uint8 image, got shape {image.shape} dtype {image.dtype}")
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return image, boxes


def settings_hash(teacher: Teacher) -> str:
    blob = json.dumps({"format": PART_FORMAT, "teacher": teacher.name, "settings": teacher.settings()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- the batch loop ----------------------------------------------------------------------------------------


@dataclass
class TeachReport:
    """What one `teach_batch` call did."""

    batch: str
    out_dir: Path
    images: int
    boxes: int
    taught: int  # images the teacher ran on in this call
    reused: int  # images taken from an earlier (interrupted) run with the same settings
    notes: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _part_paths(out_dir: Path, im: ImageRecord) -> tuple[Path, Path]:
    key = label_map_key(im.file_name)
    return out_dir / PARTS_DIR / f"{key}.json", out_dir / PARTS_DIR / f"{key}.png"


def _boxes_signature(im: ImageRecord) -> list:
    return [[b.id, b.category_id, [round(float(v), 4) for v in b.xywh]] for b in im.boxes]


def _load_part(json_path: Path, png_path: Path, im: ImageRecord, shash: str) -> dict | None:
    """The finished part of image `im` if it matches the current settings, image and boxes, else None."""
    if not (json_path.is_file() and png_path.is_file()):
        return None
    try:
        part = json.loads(json_path.read_text())
    except (OSError, ValueError):
        return None  # unreadable part: redo the image
    if (
        part.get("format") != PART_FORMAT
        or part.get("settings_hash") != shash
        or part.get("image_sha256") != im.sha256
        or part.get("boxes") != _boxes_signature(im)
    ):
        return None
    return part


def teach_image(teacher: Teacher, im: ImageRecord) -> tuple[list[PseudoMask], np.ndarray]:
    image = read_image(im.path)
    if image.shape[:2] != (im.height, im.width):
        raise B2PError(
            f"image is {image.shape[1]}x{image.shape[0]} but the batch file says {im.width}x{im.height} "
            "(changed since import? re-run `b2p import`)",
            im.path,
        )
    boxes = im.boxes_xyxy()
    if len(boxes):
        out = teacher.predict_for(im, image, boxes, im.box_class_ids())
        masks, scores, notes = out.masks, out.scores, out.notes
        if masks.shape != (len(boxes), im.height, im.width):
            raise RuntimeError(f"teacher {teacher.name} returned masks {masks.shape} for {len(boxes)} boxes")
    else:
        masks, scores, notes = np.zeros((0, im.height, im.width), bool), np.zeros(0, np.float32), []
    pms = [
        PseudoMask(b.id, im.id, b.category_id, masks[i].astype(bool), float(scores[i]), notes[i])
        for i, b in enumerate(im.boxes)
    ]
    lm = paint_label_map((im.height, im.width), [p.mask for p in pms], [p.category_id for p in pms], [p.score for p in pms])
    return pms, lm


@dataclass
class TeachJob:
    """One image's teaching, as an engine runs it (b2p/scale/engine.py): the teacher set up once per worker,
    then per image (label-map PNG bytes, COCO annotations, the teacher's counter increments)."""

    teacher: Teacher

    def setup(self) -> None:
        self.teacher.setup()

    def cost(self, im: ImageRecord) -> float:
        """A teacher's work grows with the pixels it decides; an image without boxes costs next to nothing."""
        return boxes_area(im.boxes_xyxy())

    def run(self, im: ImageRecord) -> tuple[bytes, list[dict], dict[str, int]]:
        before = self.teacher.counters()
        pms, lm = teach_image(self.teacher, im)
        after = self.teacher.counters()
        return encode_label_map(lm), [p.to_coco() for p in pms], {k: v - before.get(k, 0) for k, v in after.items()}


def teach_batch(
    batch_file: str | Path,
    out_root: str | Path,
    teacher: Teacher,
    resume: bool = True,
    progress: bool = True,
    limit: int | None = None,
    engine: Engine | None = None,
) -> TeachReport:
    """Run `teacher` on every image of the canonical batch `batch_file`; write `<out_root>/<batch>/`.

    `resume=False` redoes every image even when a matching part exists. `limit` stops after that many
    newly taught images WITHOUT assembling the final files (a deliberate interruption, for tests and
    benchmarks). `engine` (b2p/scale/engine.py; default local) runs the images; this process writes every
    file. Every image is checked (unchanged since import) before any is taught. Returns a TeachReport.
    """
    batch_file = Path(batch_file)
    if not batch_file.is_file():
        raise B2PError("batch was never imported (annotation file missing); run `b2p import` first", batch_file)
    batch = load_batch(batch_file)
    out_dir = Path(out_root) / batch.name
    check_separate_folders({"--out": out_dir}, input_folders([batch]))
    for im in batch.images:  # every image before anything is written, the hidden resume files included
        check_image_unchanged(im)
    engine = engine or Engine()
    commit_staged_outputs(out_dir)  # an assembly killed earlier: finish it, or drop it when incomplete
    shash = settings_hash(teacher)
    t0 = time.perf_counter()
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    parts, pending = _finished_parts(batch, out_dir, shash, resume)
    reused = len(parts)
    interrupted = limit is not None and len(pending) > limit
    pending = pending[:limit] if interrupted else pending
    taught = _teach_images(batch, pending, parts, out_dir, teacher, shash, engine, reused, progress)
    if interrupted:
        return TeachReport(batch.name, out_dir, len(batch.images), 0, taught, reused, seconds=time.perf_counter() - t0)

    # every image is done: assemble the final files from the parts in a staging folder, then swap it in
    staging = out_dir / STAGING_DIR
    shutil.rmtree(staging, ignore_errors=True)
    annotations, notes = _assemble_parts(batch, parts, out_dir, staging)
    write_preview(staging / "preview.png", batch, out_root, label_root=staging / "labelmaps")
    seconds = time.perf_counter() - t0
    instances = {
        "info": {"batch": batch.name, "teacher": teacher.name, "settings_hash": shash, "description": "b2p teacher pseudo-masks"},
        "images": [{"id": im.id, "file_name": im.file_name, "width": im.width, "height": im.height, "split": im.split} for im in batch.images],
        "categories": batch.classes.to_coco_categories(),
        "annotations": annotations,
    }
    write_json_atomic(staging / "instances.json", instances, indent=None)
    prov = _teach_provenance(batch, batch_file, teacher, shash, engine, annotations, notes, taught, reused, started, seconds)
    write_json_atomic(staging / "provenance.json", prov)
    write_bytes_atomic(staging / COMPLETE_MARKER, b"")
    commit_staged_outputs(out_dir)
    _remove_stale(out_dir, batch)
    return TeachReport(batch.name, out_dir, len(batch.images), len(annotations), taught, reused, notes, seconds)


def _finished_parts(batch: Batch, out_dir: Path, shash: str, resume: bool) -> tuple[dict[int, dict], list[ImageRecord]]:
    """The parts an earlier run finished with these settings, by image id (none without `resume`), and the images still to teach."""
    parts: dict[int, dict] = {}
    pending: list[ImageRecord] = []
    for im in batch.images:
        part = _load_part(*_part_paths(out_dir, im), im, shash) if resume else None
        if part is None:
            pending.append(im)
        else:
            parts[im.id] = part
    return parts, pending


def _teach_images(batch: Batch, pending: list[ImageRecord], parts: dict[int, dict], out_dir: Path, teacher: Teacher, shash: str,
                  engine: Engine, reused: int, progress: bool) -> int:
    """Teach the pending images on the engine, each written as a part (PNG, then its JSON) as it comes and added to
    `parts`; returns how many were taught."""

    def write_part(i: int, result: tuple[bytes, list[dict], dict[str, int]]) -> None:
        png, annotations, counts = result
        im = pending[i]
        jpath, ppath = _part_paths(out_dir, im)
        part = {
            "format": PART_FORMAT,
            "settings_hash": shash,
            "image_sha256": im.sha256,
            "file_name": im.file_name,
            "boxes": _boxes_signature(im),
            "annotations": annotations,
        }
        write_bytes_atomic(ppath, png)  # png first: a part counts as finished only once its json exists
        write_json_atomic(jpath, part, indent=None)
        if not engine.in_process:  # a worker's copy of the teacher counted these
            teacher.add_counters(counts)
        parts[im.id] = part
        advance(1)

    with Progress(progress, f"teach {batch.name} ({teacher.name})", len(batch.images)) as advance:
        advance(reused)
        return engine.map(TeachJob(teacher), pending, write_part).done


def _assemble_parts(batch: Batch, parts: dict[int, dict], out_dir: Path, staging: Path) -> tuple[list[dict], list[dict]]:
    """Every part's label map copied into `staging`; all the parts' annotations, and the boxes that carry a note."""
    annotations, notes = [], []
    for im in batch.images:
        _, ppath = _part_paths(out_dir, im)
        # the part PNG is already a valid label map (write_label_map wrote it): copy its bytes
        write_bytes_atomic(staging / "labelmaps" / f"{label_map_key(im.file_name)}.png", ppath.read_bytes())
        for ann in parts[im.id]["annotations"]:
            annotations.append(ann)
            if ann.get("note"):
                notes.append({"box_id": ann["box_id"], "image": im.file_name, "note": ann["note"]})
    return annotations, notes


def _teach_provenance(batch: Batch, batch_file: Path, teacher: Teacher, shash: str, engine: Engine, annotations: list[dict],
                      notes: list[dict], taught: int, reused: int, started: str, seconds: float) -> dict:
    """provenance.json: the teacher, its settings and versions, the images' hashes, the counts, the time, the notes."""
    return {
        "batch": batch.name,
        "batch_file": str(batch_file),
        "teacher": teacher.name,
        "settings": teacher.settings(),
        "settings_hash": shash,
        "image_sha256": {im.file_name: im.sha256 for im in batch.images},  # check_teacher_root: masks of these pixels
        **teacher.provenance(),
        "engine": engine.record(),
        "versions": _versions(),
        "counts": {
            "images": len(batch.images),
            "boxes": len(annotations),
            "images_by_split": {s: len(batch.split(s)) for s in SPLITS},
            "taught_this_run": taught,
            "reused_from_earlier_run": reused,
            "boxes_with_notes": len(notes),
            "empty_masks": sum(1 for a in annotations if a["area"] == 0),
        },
        "time": {"started": started, "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "seconds": round(seconds, 3)},
        "notes": notes,
    }


def check_teacher_root(teacher_root: str | Path, batch: Batch) -> None:
    """Refuse a mask root (TEACHER/<batch>/) made for other images than this batch's: same batch and file
    names, other pixels (another dataset, or images re-imported since), whose masks would be trained on,
    blended or scored as if they were this batch's.

    The producers record the image hashes they saw: `teach_batch` (`b2p teach`, `--teacher auto`,
    `b2p suite-combine`) and `b2p finalize` in provenance.json `image_sha256`; teacher roots written before
    that in their `.parts/<key>.json`. A root without provenance.json (`masks-to-boxes --oracle-out`, masks
    written by hand) or without recorded hashes cannot be checked and is accepted; so is an image the root
    did not record (a missing label map is its reader's error).
    """
    d = Path(teacher_root) / batch.name
    prov_path = d / "provenance.json"
    if not prov_path.is_file():
        return
    prov = read_json(prov_path, "teacher provenance")
    if not isinstance(prov, dict):
        raise B2PError("teacher provenance is not a JSON object (not written by b2p?)", prov_path)
    recorded = prov.get("image_sha256")
    if recorded is not None and not (isinstance(recorded, dict) and all(isinstance(v, str) for v in recorded.values())):
        raise B2PError("teacher provenance's `image_sha256` is not a map of file name to hash (not written by b2p?)", prov_path)
    where = dict.fromkeys(recorded or {}, prov_path)
    if recorded is None:  # an older teacher root: the hashes in its resume parts
        recorded = {}
        for im in batch.images:
            jpath = d / PARTS_DIR / f"{label_map_key(im.file_name)}.json"
            try:
                part = json.loads(jpath.read_text()) if jpath.is_file() else {}
            except (OSError, ValueError):
                continue
            if isinstance(part, dict) and isinstance(part.get("image_sha256"), str):
                recorded[im.file_name], where[im.file_name] = part["image_sha256"], jpath
    other = [im.file_name for im in batch.images if recorded.get(im.file_name, im.sha256) != im.sha256]
    if other:
        more = f" (and {len(other) - 1} more of {len(batch.images)})" if len(other) > 1 else ""
        raise B2PError(
            f"these masks were made for other images than batch {batch.name!r} holds: {other[0]!r}{more} has other "
            f"pixels (another dataset, or re-imported since); make them again for this batch (`b2p teach {batch.path}`, "
            "or `b2p finalize` for final masks)",
            where[other[0]],
        )


def commit_staged_outputs(out_dir: Path) -> None:
    """Move a completely assembled staging folder into place, or delete an incomplete one.

    The final files (labelmaps/, instances.json, provenance.json, preview.png) must change together: a
    kill during assembly must not leave new label maps beside the old instances.json. Assembly therefore
    writes them all under `.staging/` and marks it complete; only then are they renamed into place. Each
    step below can be repeated, so a kill during the renames is finished by the next run.
    """
    staging = out_dir / STAGING_DIR
    if not staging.is_dir():
        return
    if not (staging / COMPLETE_MARKER).is_file():
        shutil.rmtree(staging)  # killed before it was complete: the old outputs are still whole
        return
    new, old, final = staging / "labelmaps", staging / "labelmaps.old", out_dir / "labelmaps"
    if new.is_dir():
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(new, final)
    for name in ("preview.png", "instances.json", "provenance.json"):
        if (staging / name).is_file():
            os.replace(staging / name, out_dir / name)
    shutil.rmtree(staging)


def write_preview(
    path: Path, batch: Batch, out_root: str | Path, n: int = 8, tile: int = 256, label_root: Path | None = None
) -> None:
    """A picture of the teacher's work: up to `n` images (test split first, where the teacher is scored)
    with its label map blended in class colours and the boxes drawn, tiled in one PNG. Label maps come
    from `out_root`'s final folder, or from `label_root` (a folder of <key>.png) when given."""
    import cv2

    from b2p.labels import class_color, colorize, read_label_map

    chosen = (batch.split("test") + batch.split("val", "train"))[:n]
    tiles = []
    for im in chosen:
        img = read_image(im.path)
        lm_path = label_map_path(out_root, batch.name, im.file_name) if label_root is None else label_root / f"{label_map_key(im.file_name)}.png"
        lm = read_label_map(lm_path)
        blend = np.where(lm[..., None] > 0, (0.45 * img + 0.55 * colorize(lm)).astype(np.uint8), img)
        scale = tile / max(im.width, im.height)
        small = cv2.resize(blend, (max(1, round(im.width * scale)), max(1, round(im.height * scale))), interpolation=cv2.INTER_AREA)
        canvas = np.zeros((tile, tile, 3), np.uint8)
        canvas[: small.shape[0], : small.shape[1]] = small
        for b in im.boxes:
            x0, y0, x1, y1 = (int(round(v * scale)) for v in b.xyxy)
            cv2.rectangle(canvas, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), class_color(b.category_id), 1)
        tiles.append(canvas)
    if tiles:
        cols = min(4, len(tiles))
        rows = -(-len(tiles) // cols)
        grid = np.zeros((rows * tile, cols * tile, 3), np.uint8)
        for i, t in enumerate(tiles):
            grid[(i // cols) * tile : (i // cols + 1) * tile, (i % cols) * tile : (i % cols + 1) * tile] = t
        write_png_atomic(path, grid)


def _remove_stale(out_dir: Path, batch: Batch) -> None:
    """Drop parts of images no longer in the batch, and temporary files a killed run left (our own only)."""
    keep = {label_map_key(im.file_name) for im in batch.images}
    for folder in (out_dir, out_dir / PARTS_DIR):
        if folder.is_dir():
            for f in folder.iterdir():
                stale_part = folder.name == PARTS_DIR and f.suffix in (".png", ".json") and f.stem not in keep
                killed_write = f.name.startswith(".") and f.name.endswith(".tmp")  # atomic_write's temp name
                if f.is_file() and (stale_part and not f.name.startswith(".") or killed_write):
                    f.unlink()


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("b2p", "numpy", "opencv-python-headless", "torch", "segment-anything", "pycocotools"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def read_instances(out_dir: str | Path) -> dict:
    """Read a teacher root's instances.json (for tools downstream)."""
    return read_json(Path(out_dir) / "instances.json", "teacher instances file")


def decode_instances(instances: dict) -> dict[int, np.ndarray]:
    """box_id -> HxW bool mask of every annotation in an instances.json dict."""
    return {a["box_id"]: rle_decode(a["segmentation"]) for a in instances["annotations"]}


__all__ = [
    "PseudoMask",
    "Teacher",
    "TeacherOutput",
    "TeachReport",
    "teach_batch",
    "settings_hash",
]

