"""The canonical annotation file: one COCO-based JSON per imported batch (`b2p import` writes it).

Layout (COCO plus a few keys, so COCO tools still read it):

    {
      "info": {"b2p_format": 1, "batch": "NAME", "image_root": "<folder of the images>", ...},
      "categories": [{"id": 1, "name": "crack", "supercategory": "defect"}, ...],   # the full class list
      "images": [{"id", "file_name", "width", "height", "sha256", "batch", "split", "has_manual_mask"}],
      "annotations": [{"id", "image_id", "category_id", "bbox": [x, y, w, h], "area", "iscrowd": 0}],
      "manual_masks": [{"image_id", "category_id", "segmentation": {"size": [H, W], "counts": "..."}}]
    }

`image_root` is relative to the annotation file's folder when it can be, else absolute. Boxes are COCO
XYWH in pixels, already validated to lie inside the image with positive size. Manual masks are semantic
(one RLE per image and class); an image with `has_manual_mask: true` and no entries is defect-free.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from b2p.errors import B2PError, Problems
from b2p.fileio import read_json, write_json_atomic
from b2p.labels import ClassList

FORMAT_VERSION = 1
# Boxes may overhang the image by at most this many pixels (rounding in annotation tools); they are clipped.
# Anything further outside is refused: it means the box belongs to another image size or is corrupt.
BOX_TOLERANCE_PX = 0.5
# a batch name becomes a folder name under every output root: no separators, no leading dot
# (matched with fullmatch: `$` also matches before a final newline)
BATCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class Box:
    id: int
    category_id: int
    xywh: tuple[float, float, float, float]

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        x, y, w, h = self.xywh
        return (x, y, x + w, y + h)


@dataclass
class ImageRecord:
    id: int
    file_name: str
    path: Path  # resolved path of the image file
    width: int
    height: int
    split: str
    batch: str
    sha256: str
    has_manual_mask: bool
    boxes: list[Box] = field(default_factory=list)
    manual_rles: list[tuple[int, dict]] = field(default_factory=list)  # (category_id, COCO RLE)

    @property
    def key(self) -> str:
        """Identity across batches."""
        return f"{self.batch}/{self.file_name}"

    def boxes_xyxy(self) -> np.ndarray:
        """Nx4 float32 XYXY pixel boxes."""
        return np.array([b.xyxy for b in self.boxes], dtype=np.float32).reshape(-1, 4)

    def box_class_ids(self) -> np.ndarray:
        return np.array([b.category_id for b in self.boxes], dtype=np.int64)

    def manual_label_map(self) -> np.ndarray | None:
        """HxW uint8 manual label map, or None when the image has no manual mask."""
        if not self.has_manual_mask:
            return None
        from b2p.labels import paint_label_map
        from b2p.masks import rle_decode

        masks = [rle_decode(r) for _, r in self.manual_rles]
        return paint_label_map((self.height, self.width), masks, [c for c, _ in self.manual_rles])


@dataclass
class Batch:
    """One imported batch: its class list and its images with boxes (and manual masks where given)."""

    name: str
    classes: ClassList
    images: list[ImageRecord]
    path: Path  # the canonical annotation file
    info: dict = field(default_factory=dict)
    image_root: Path | None = None  # the folder the images' file names are relative to

    def split(self, *splits: str) -> list[ImageRecord]:
        return [im for im in self.images if im.split in splits]


def to_coco_dict(
    batch: str,
    classes: ClassList,
    images: list[dict],
    annotations: list[dict],
    manual_masks: list[dict],
    image_root: str,
    extra_info: dict | None = None,
) -> dict:
    info = {"b2p_format": FORMAT_VERSION, "batch": batch, "image_root": image_root, **(extra_info or {})}
    return {
        "info": info,
        "categories": classes.to_coco_categories(),
        "images": images,
        "annotations": annotations,
        "manual_masks": manual_masks,
    }


def save_batch_dict(path: str | Path, coco: dict) -> None:
    write_json_atomic(path, coco)


def relative_image_root(image_root: str | Path, annotation_path: str | Path) -> str:
    """Store the image folder relative to the annotation file when possible, so a project can move."""
    image_root = Path(image_root).resolve()
    base = Path(annotation_path).resolve().parent
    try:
        return os.path.relpath(image_root, base)
    except ValueError:  # another drive on Windows
        return str(image_root)


def check_batch_name(batch: str) -> str:
    if not isinstance(batch, str) or not BATCH_NAME.fullmatch(batch):
        raise B2PError(f"batch name {batch!r} must start with a letter or digit and hold only letters, digits, '.', '_', '-'")
    return batch


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def load_batch(path: str | Path) -> Batch:
    """Read and validate a canonical annotation file written by `b2p import`.

    This is the one place that checks the file every later stage trusts: a hand-edited or corrupted file
    is refused here, with every problem listed and the file named, never a KeyError downstream or a
    label map painted with a class id that does not exist. Checked: the batch name (it becomes a folder
    name, so `../x` must not escape), class ids 1..K, image ids, file names (normalised, inside the image
    folder, one label-map file each), sizes, splits, hashes, and every box and manual mask against its
    image and the class list.
    """
    path = Path(path)
    data = read_json(path, "canonical annotation file")
    if not isinstance(data, dict) or not isinstance(data.get("info"), dict) or data["info"].get("b2p_format") != FORMAT_VERSION:
        raise B2PError("not a b2p canonical annotation file (run `b2p import` to make one)", path)
    info = data["info"]
    p = Problems(path, "canonical annotation file")
    _check_batch_layout(data, p)
    p.check()

    root = Path(info["image_root"])
    if not root.is_absolute():
        root = path.parent / root
    classes = _read_categories(data["categories"], path)
    k = classes.num_classes
    by_id = _read_images(data["images"], info, root, p)
    _read_boxes(data["annotations"], by_id, k, p)
    _read_manual_masks(data.get("manual_masks", []), by_id, k, p)
    p.check()
    return Batch(info["batch"], classes, list(by_id.values()), path, info, root)


def _check_batch_layout(data: dict, p: Problems) -> None:
    """The file's top level: its lists, its batch name and its image root (problems noted in `p`)."""
    info = data["info"]
    for key in ("categories", "images", "annotations"):
        if not isinstance(data.get(key), list):
            p.add(f"{key!r} must be a list")
    if not isinstance(data.get("manual_masks", []), list):
        p.add("'manual_masks' must be a list")
    try:
        check_batch_name(info.get("batch"))
    except B2PError as e:
        p.add(f"info.batch: {e.problem}")
    if not isinstance(info.get("image_root"), str) or not info["image_root"]:
        p.add("info.image_root must be a non-empty string")


def _read_categories(cats: list, path: Path) -> ClassList:
    """The class list from the categories, whose ids must be 1..K."""
    if not all(isinstance(c, dict) and _is_int(c.get("id")) and isinstance(c.get("name"), str) for c in cats):
        raise B2PError("every category needs an integer 'id' and a string 'name'", path)
    ids = sorted(c["id"] for c in cats)
    if ids != list(range(1, len(ids) + 1)):
        raise B2PError(f"category ids must be 1..K, got {ids}", path)
    try:
        return ClassList(tuple(c["name"] for c in sorted(cats, key=lambda c: c["id"])))
    except B2PError as e:
        raise B2PError(e.problem, path) from None


def _read_images(images: list, info: dict, root: Path, p: Problems) -> dict[int, ImageRecord]:
    """The valid image records by id (their fields, file names inside `root`, one label-map file each); problems noted in `p`."""
    from b2p.fileio import normalize_file_name, safe_join
    from b2p.labels import label_map_key_clashes
    from b2p.splits import SPLITS

    by_id: dict[int, ImageRecord] = {}
    for i, im in enumerate(images):
        where = f"images[{i}]"
        if not isinstance(im, dict):
            p.add(f"{where} must be an object")
            continue
        bad = [key for key, ok in (
            ("id", _is_int(im.get("id"))),
            ("file_name", isinstance(im.get("file_name"), str)),
            ("width", _is_int(im.get("width")) and im.get("width", 0) > 0),
            ("height", _is_int(im.get("height")) and im.get("height", 0) > 0),
            ("split", im.get("split") in SPLITS),
            ("sha256", isinstance(im.get("sha256"), str) and len(im["sha256"]) == 64),
            ("batch", im.get("batch") == info.get("batch")),
            ("has_manual_mask", isinstance(im.get("has_manual_mask", False), bool)),
        ) if not ok]
        if bad:
            p.add(f"{where}: missing or invalid {', '.join(bad)} (got {', '.join(f'{b}={im.get(b)!r}' for b in bad)})")
            continue
        try:
            if normalize_file_name(im["file_name"]) != im["file_name"]:
                raise B2PError(f"image file name {im['file_name']!r} is not in normal form (expected {normalize_file_name(im['file_name'])!r})")
            safe_join(root, im["file_name"], "image file name")
        except B2PError as e:
            p.add(f"{where}: {e.problem}")
            continue
        if im["id"] in by_id:
            p.add(f"{where}: duplicate image id {im['id']}")
            continue
        by_id[im["id"]] = ImageRecord(
            id=im["id"],
            file_name=im["file_name"],
            path=root / im["file_name"],
            width=im["width"],
            height=im["height"],
            split=im["split"],
            batch=im["batch"],
            sha256=im["sha256"],
            has_manual_mask=bool(im.get("has_manual_mask", False)),
        )
    for group in label_map_key_clashes([r.file_name for r in by_id.values()]):
        p.add(f"images {group} would share one label-map file")
    return by_id


def _read_boxes(annotations: list, by_id: dict[int, ImageRecord], k: int, p: Problems) -> None:
    """Each valid box joins its image (class 1..k, inside the image within BOX_TOLERANCE_PX); problems noted in `p`."""
    seen_ann: set[int] = set()
    for i, a in enumerate(annotations):
        where = f"annotations[{i}]"
        if not (isinstance(a, dict) and _is_int(a.get("id")) and _is_int(a.get("image_id")) and _is_int(a.get("category_id"))):
            p.add(f"{where}: needs integer 'id', 'image_id' and 'category_id'")
            continue
        where = f"annotation id {a['id']}"
        im = by_id.get(a["image_id"])
        box = a.get("bbox")
        if a["id"] in seen_ann:
            p.add(f"{where}: duplicate annotation id")
        elif im is None:
            p.add(f"{where}: refers to image id {a['image_id']}, which is not in 'images'")
        elif not 1 <= a["category_id"] <= k:
            p.add(f"{where}: category id {a['category_id']} is not a class id (1..{k})")
        elif not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            p.add(f"{where}: 'bbox' must be [x, y, w, h] finite numbers, got {box!r}")
        elif box[2] <= 0 or box[3] <= 0 or box[0] < -BOX_TOLERANCE_PX or box[1] < -BOX_TOLERANCE_PX or (
            box[0] + box[2] > im.width + BOX_TOLERANCE_PX or box[1] + box[3] > im.height + BOX_TOLERANCE_PX
        ):
            p.add(f"{where}: box {box} is empty or outside its {im.width}x{im.height} image")
        else:
            im.boxes.append(Box(a["id"], a["category_id"], tuple(float(v) for v in box)))
        seen_ann.add(a["id"])


def _read_manual_masks(masks: list, by_id: dict[int, ImageRecord], k: int, p: Problems) -> None:
    """Each valid manual-mask RLE joins its image (one that declares has_manual_mask, at its size); problems noted in `p`."""
    for i, m in enumerate(masks):
        where = f"manual_masks[{i}]"
        if not (isinstance(m, dict) and _is_int(m.get("image_id")) and _is_int(m.get("category_id"))):
            p.add(f"{where}: needs integer 'image_id' and 'category_id'")
            continue
        im = by_id.get(m["image_id"])
        seg = m.get("segmentation")
        if im is None:
            p.add(f"{where}: refers to image id {m['image_id']}, which is not in 'images'")
        elif not 1 <= m["category_id"] <= k:
            p.add(f"{where}: category id {m['category_id']} is not a class id (1..{k})")
        elif not im.has_manual_mask:
            p.add(f"{where}: image id {im.id} does not declare has_manual_mask")
        elif not (isinstance(seg, dict) and seg.get("size") == [im.height, im.width] and isinstance(seg.get("counts"), str | list)):
            p.add(f"{where}: 'segmentation' must be an RLE of the image size [{im.height}, {im.width}]")
        else:
            im.manual_rles.append((m["category_id"], seg))


def input_folders(batches: list[Batch]) -> dict[str, Path]:
    """What a command reading `batches` reads, by name for messages: the folders of their batch files and
    their image folders (no output may be, hold or lie inside one: `fileio.check_separate_folders`)."""
    out: dict[str, Path] = {}
    for b in batches:
        out.setdefault(f"the folder of batch file {b.path.name}", b.path.parent)
        if b.image_root is not None:
            out[f"the image folder of batch {b.name!r}"] = b.image_root
    return out


def load_batches(paths: list[str | Path]) -> list[Batch]:
    """Several batches that must share one class list (they do when imported against the same list)."""
    batches = [load_batch(p) for p in paths]
    names = [b.name for b in batches]
    if len(set(names)) != len(names):
        raise B2PError(f"the same batch is given twice: {names}")
    folded: dict[str, str] = {}
    for n in names:  # one folder per batch under every output root: `Line7` and `line7` are one on macOS / Windows
        if n.casefold() in folded:
            raise B2PError(f"batches {folded[n.casefold()]!r} and {n!r} differ only in case: their output folders collide on a case-insensitive file system; rename one")
        folded[n.casefold()] = n
    for b in batches[1:]:
        if b.classes.names[: len(batches[0].classes.names)] != batches[0].classes.names[: len(b.classes.names)]:
            raise B2PError(
                f"batch {b.name!r} has class list {list(b.classes.names)}, which conflicts with "
                f"{list(batches[0].classes.names)} of batch {batches[0].name!r}",
                b.path,
            )
    return batches


def check_image_unchanged(im: ImageRecord) -> None:
    """Refuse an image that is gone or whose bytes changed since `b2p import` (its boxes, masks and splits
    were made for the old pixels): the check every command that reads the images makes before writing."""
    from b2p.fileio import sha256_file

    if not im.path.is_file():
        raise B2PError(f"image {im.file_name!r} of batch {im.batch!r} not found (moved since import?)", im.path)
    if sha256_file(im.path) != im.sha256:
        raise B2PError(f"image changed since `b2p import` (sha256 differs from the batch file); re-run `b2p import --batch {im.batch}`", im.path)


def class_list_of(batches: list[Batch]) -> ClassList:
    """The longest class list among batches (later batches may have appended classes)."""
    return max((b.classes for b in batches), key=lambda c: c.num_classes)
