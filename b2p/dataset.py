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

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from b2p.errors import B2PError
from b2p.fileio import read_json, write_json_atomic
from b2p.labels import ClassList

FORMAT_VERSION = 1


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


def load_batch(path: str | Path) -> Batch:
    """Read a canonical annotation file written by `b2p import`."""
    path = Path(path)
    data = read_json(path, "canonical annotation file")
    if not isinstance(data, dict) or data.get("info", {}).get("b2p_format") != FORMAT_VERSION:
        raise B2PError("not a b2p canonical annotation file (run `b2p import` to make one)", path)
    info = data["info"]
    root = Path(info["image_root"])
    if not root.is_absolute():
        root = path.parent / root
    classes = ClassList(tuple(c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])))
    by_id: dict[int, ImageRecord] = {}
    for im in data["images"]:
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
    for a in data["annotations"]:
        by_id[a["image_id"]].boxes.append(Box(a["id"], a["category_id"], tuple(a["bbox"])))
    for m in data.get("manual_masks", []):
        by_id[m["image_id"]].manual_rles.append((m["category_id"], m["segmentation"]))
    return Batch(info["batch"], classes, list(by_id.values()), path, info)


def load_batches(paths: list[str | Path]) -> list[Batch]:
    """Several batches that must share one class list (they do when imported against the same list)."""
    batches = [load_batch(p) for p in paths]
    names = [b.name for b in batches]
    if len(set(names)) != len(names):
        raise B2PError(f"the same batch is given twice: {names}")
    for b in batches[1:]:
        if b.classes.names[: len(batches[0].classes.names)] != batches[0].classes.names[: len(b.classes.names)]:
            raise B2PError(
                f"batch {b.name!r} has class list {list(b.classes.names)}, which conflicts with "
                f"{list(batches[0].classes.names)} of batch {batches[0].name!r}",
                b.path,
            )
    return batches


def class_list_of(batches: list[Batch]) -> ClassList:
    """The longest class list among batches (later batches may have appended classes)."""
    return max((b.classes for b in batches), key=lambda c: c.num_classes)
