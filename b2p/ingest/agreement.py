"""Manual masks against their boxes: the one check, for PNG label maps and COCO segmentations alike.

The manual masks choose every calibrated setting and give every test score, so a mask that contradicts its
image's boxes (the masks of two images swapped, a mask transposed, class ids renumbered without remapping
the PNG values, a segmentation scaled for another image size) would silently become wrong ground truth.
Refused, with every problem of the batch listed in one error:

- defect pixels of class c outside every box of class c: a defect with no box, or a mask that does not
  belong to these boxes;
- a box that holds no pixel of its class: the box's defect is missing from the mask;
- (COCO) an instance whose segmentation lies mostly (more than half of its pixels) outside its own box.

A pixel belongs to a box when its centre lies inside the box grown by BOX_TOLERANCE_PX on every side, the
half pixel that box coordinates may overhang the image by (rounding in annotation tools). Masks that boxes
were derived from (`b2p masks-to-boxes`, the demo data: one tight box per connected component) always agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from b2p.dataset import BOX_TOLERANCE_PX
from b2p.labels import BACKGROUND

MOSTLY_OUTSIDE = 0.5  # an instance with more than this share of its pixels outside its own box is refused


@dataclass
class CheckedBox:
    where: str  # how messages name it: "annotation id 7", "line 3"
    class_id: int  # canonical
    class_name: str
    xywh: tuple[float, float, float, float]  # pixels, as stored (clipped to the image)


def tolerant_bounds(xywh: tuple[float, float, float, float], shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), end-exclusive: the pixels whose centre lies in the box grown by BOX_TOLERANCE_PX."""
    h, w = shape
    x, y, bw, bh = xywh
    t = BOX_TOLERANCE_PX
    x0, y0 = max(0, math.ceil(x - t - 0.5)), max(0, math.ceil(y - t - 0.5))
    x1, y1 = min(w, math.floor(x + bw + t - 0.5) + 1), min(h, math.floor(y + bh + t - 0.5) + 1)
    return x0, y0, max(x0, x1), max(y0, y1)


def _box_text(b: CheckedBox) -> str:
    return f"{b.where} (box [{', '.join(f'{v:g}' for v in b.xywh)}], class {b.class_name!r})"


def instance_problem(mask: np.ndarray, box: CheckedBox) -> str | None:
    """Why one instance segmentation contradicts its own box, or None (more than MOSTLY_OUTSIDE of it outside)."""
    x0, y0, x1, y1 = tolerant_bounds(box.xywh, mask.shape)
    total = int(np.count_nonzero(mask))
    inside = int(np.count_nonzero(mask[y0:y1, x0:x1]))
    outside = total - inside
    if total == 0 or outside <= MOSTLY_OUTSIDE * total:
        return None
    if inside == 0:
        return f"{_box_text(box)}: segmentation lies entirely outside its box; the mask and the box disagree"
    return (
        f"{_box_text(box)}: {outside} of the segmentation's {total} pixels ({100 * outside / total:.0f} %) lie outside "
        "its box; the mask and the box disagree (a segmentation for another image size, or another box's?)"
    )


def label_map_problems(image: str, label_map: np.ndarray, boxes: list[CheckedBox], names: dict[int, str]) -> list[str]:
    """Every way the image's manual label map (canonical class ids) contradicts its boxes, as messages
    naming the image, the box and the class. `names`: class id -> name, for messages."""
    values = [int(v) for v in np.unique(label_map) if v != BACKGROUND]
    if not values and boxes:
        return [
            f"image {image!r}: mask is empty (all 0) but the image has {len(boxes)} box(es); the mask and the "
            "boxes disagree (a defect-free image has no boxes)"
        ]
    problems = []
    allowed: dict[int, np.ndarray] = {}
    for b in boxes:
        x0, y0, x1, y1 = tolerant_bounds(b.xywh, label_map.shape)
        region = allowed.setdefault(b.class_id, np.zeros(label_map.shape, bool))
        region[y0:y1, x0:x1] = True
        if not (label_map[y0:y1, x0:x1] == b.class_id).any():
            inside = sorted({names.get(int(v), str(v)) for v in np.unique(label_map[y0:y1, x0:x1]) if v != BACKGROUND})
            seen = f"; it holds only {', '.join(repr(n) for n in inside)} pixels" if inside else "; it holds only background"
            problems.append(f"image {image!r}: {_box_text(b)} holds no {b.class_name!r} pixel of the manual mask{seen}")
    for c in values:
        stray = (label_map == c) & ~allowed.get(c, False)
        n = int(np.count_nonzero(stray))
        if not n:
            continue
        ys, xs = np.nonzero(stray)
        name = names.get(c, str(c))
        where = f"image {image!r}: {n} manual-mask pixel(s) of class {name!r} at x {xs.min()}..{xs.max()}, y {ys.min()}..{ys.max()}"
        if c in allowed:
            problems.append(f"{where} lie outside every {name!r} box (by more than {BOX_TOLERANCE_PX:g} px); every defect pixel must lie in a box of its class")
        else:
            hint = "; are the mask values this batch's class ids?" if boxes else " (a defect-free image has an empty mask)"
            problems.append(f"{where}, but the image has no {name!r} box{hint}")
    return problems
