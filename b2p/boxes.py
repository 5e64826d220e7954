"""The box rules: which pixels a box covers, and a box turned into a mask. One home for every stage
(teachers, the box fill, the student's box-guided and final masks, the exports, training's box losses).

A COCO box [x, y, w, h] covers the pixels x..x+w-1 and y..y+h-1: in XYXY (x, y, x+w, y+h) that is
x0 = floor(x0), x1 = ceil(x1) (end-exclusive), clipped to the image.
"""

from __future__ import annotations

import numpy as np

from b2p.labels import paint_label_map


def box_pixel_bounds(box: np.ndarray, shape: tuple[int, int], margin: int = 0) -> tuple[int, int, int, int]:
    """Integer pixel bounds (x0, y0, x1, y1), end-exclusive, of an XYXY box grown by `margin`, inside the image.

    A COCO box [x, y, w, h] covers pixels x..x+w-1, so XYXY (x, y, x+w, y+h) maps to x0=floor(x), x1=ceil(x+w).
    """
    h, w = shape
    x0 = max(0, int(np.floor(box[0])) - margin)
    y0 = max(0, int(np.floor(box[1])) - margin)
    x1 = min(w, int(np.ceil(box[2])) + margin)
    y1 = min(h, int(np.ceil(box[3])) + margin)
    return x0, y0, max(x0, x1), max(y0, y1)


def clip_to_box(mask: np.ndarray, box: np.ndarray, margin: int = 0) -> np.ndarray:
    """HxW bool mask with everything outside the box (grown by `margin` px) set to False."""
    x0, y0, x1, y1 = box_pixel_bounds(box, mask.shape, margin)
    out = np.zeros_like(mask, dtype=bool)
    out[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
    return out


def boxes_area(boxes: np.ndarray) -> float:
    """Summed area in pixels of Nx4 XYXY boxes (overlaps counted twice: an estimate of the work they make)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return float(np.sum(np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)))


def box_mask(box: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """HxW bool mask of the box itself (the trivial pseudo-mask)."""
    x0, y0, x1, y1 = box_pixel_bounds(box, shape)
    m = np.zeros(shape, dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def within_boxes(
    p_defect: np.ndarray,
    boxes_xyxy: np.ndarray,
    class_ids: np.ndarray,
    threshold: float = 0.5,
    relative: float = 0.5,
    defect: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Box-guided label map from an HxW defect probability map; returns (label map, boxes rescued).

    Each box keeps its pixels with p(defect) > `threshold`, painted with the box's class (overlaps: the
    smaller mask wins, as for teachers). A box is an annotator's statement that a defect is there, so a box
    where the student finds nothing is never left empty: it keeps its pixels with p(defect) >= `relative`
    x the box's highest p(defect) (the student's best guess), and is counted as rescued.
    `defect` (HxW bool, e.g. the student's mask snapped to the image) replaces p(defect) > `threshold` as
    the pixels a box keeps; the rescue still ranks by p(defect).
    """
    h, w = p_defect.shape
    masks, rescued = [], 0
    for box in np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4):
        xa, ya, xb, yb = box_pixel_bounds(box, (h, w))
        m = np.zeros((h, w), dtype=bool)
        inside = p_defect[ya:yb, xa:xb]
        keep = defect[ya:yb, xa:xb] if defect is not None else inside > threshold
        if inside.size and not keep.any():
            keep = inside >= relative * float(inside.max())
            rescued += 1
        m[ya:yb, xa:xb] = keep
        masks.append(m)
    return paint_label_map((h, w), masks, [int(c) for c in class_ids]), rescued
