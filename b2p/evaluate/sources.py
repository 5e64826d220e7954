"""What `b2p evaluate` scores: a named mask source (a root in the standard layout, or the box fill painted
from the boxes), how one image's map is read from it, and the result (evaluate.py computes, plots.py draws)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from b2p.dataset import ImageRecord
from b2p.errors import B2PError
from b2p.labels import ClassList, label_map_path, paint_label_map, read_label_map

STUDENT, TEACHER, BOX = "student", "teacher", "box"
RESERVED = {STUDENT, TEACHER, BOX, "noise"}
SOURCE_NAME = r"[A-Za-z0-9][A-Za-z0-9_.+-]*"


@dataclass(frozen=True)
class MaskSource:
    """A named set of label maps to score: a mask root in the standard layout, or None for the box fill."""

    name: str
    root: Path | None

    def label_map_file(self, im: ImageRecord) -> Path:
        assert self.root is not None
        return label_map_path(self.root, im.batch, im.file_name)


def parse_source(spec: str) -> MaskSource:
    """`NAME=ROOT` (the `--source` option) -> MaskSource; names are plain words not used by the built-ins."""
    name, sep, root = spec.partition("=")
    name, root = name.strip(), root.strip()
    if not sep or not name or not root:
        raise B2PError(f"--source must look like NAME=ROOT (e.g. sam_vit_b=data/bench/sam_vit_b), got {spec!r}")
    if not re.fullmatch(SOURCE_NAME, name):
        raise B2PError(f"source name {name!r} must be letters, digits, '_', '.', '-', '+' (it names files and JSON keys)")
    if name in RESERVED:
        raise B2PError(f"source name {name!r} is reserved for the built-in sources {sorted(RESERVED)}; choose another")
    return MaskSource(name, Path(root))


def box_fill_label_map(im: ImageRecord) -> np.ndarray:
    """The box baseline: every box filled with its class, painted by the label-map overlap rule (HxW uint8).

    Same pixels as the `box` teacher (`b2p.boxes.box_mask`), computed here so the baseline is always
    scored even when no box teacher was run.
    """
    from b2p.boxes import box_mask

    shape = (im.height, im.width)
    masks = [box_mask(np.asarray(b.xyxy), shape) for b in im.boxes]
    return paint_label_map(shape, masks, [b.category_id for b in im.boxes])


def load_source_map(source: MaskSource, im: ImageRecord, num_classes: int) -> np.ndarray:
    """HxW uint8 label map of `im` from `source`, refusing a size other than the image's."""
    if source.root is None:
        return box_fill_label_map(im)
    path = source.label_map_file(im)
    lm = read_label_map(path, num_classes=num_classes)
    if lm.shape != (im.height, im.width):
        raise B2PError(
            f"label map of source {source.name!r} is {lm.shape[1]}x{lm.shape[0]} but image {im.key} and its "
            f"manual mask are {im.width}x{im.height}; label maps must be image-size (b2p predict writes them so)",
            path,
        )
    return lm


@dataclass
class EvalResult:
    """What `evaluate` computed; everything is also in the files under `out`."""

    metrics: dict
    confusion: dict[str, np.ndarray]
    rows: list[dict]
    images: list[ImageRecord]
    sources: list[MaskSource]
    classes: ClassList
    overlays: list[Path] = field(default_factory=list)
