"""One mask per annotated box, cut out of a label map.

Rule: the mask of a box is the pixels of the box's class inside the box (the same box pixels as the
teachers use, `b2p.boxes.box_pixel_bounds`). Where boxes of the same class overlap, a pixel belongs to
ONE of them, decided as b2p paints label maps (`b2p.labels.paint_label_map`): the smaller mask wins, equal
areas go to the higher score, then to the earlier box. Boxes of different classes cannot share a pixel
(it holds one class). So the instance masks are disjoint and their union is the label map's defect
pixels that lie in a box of their class; defect pixels outside every such box (the student alone predicts
anywhere; a SAM mask may reach past its box) belong to no instance and are counted (`unboxed_pixels`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from b2p.dataset import ImageRecord


@dataclass
class Instance:
    box_id: int
    category_id: int
    box_xywh: tuple[float, float, float, float]
    score: float | None
    mask: np.ndarray  # HxW bool

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.mask))

    def mask_bbox(self) -> list[int]:
        """Tight XYWH pixel box of the mask ([0, 0, 0, 0] when empty)."""
        rows, cols = np.flatnonzero(self.mask.any(1)), np.flatnonzero(self.mask.any(0))
        if not rows.size:
            return [0, 0, 0, 0]
        return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def box_instances(label_map: np.ndarray, record: ImageRecord, scores: dict[int, float]) -> tuple[list[Instance], int]:
    """Instances of every box of `record` in its label map (empty masks included), and the unboxed pixel count."""
    from b2p.boxes import box_pixel_bounds

    h, w = label_map.shape
    candidates = []
    covered = np.zeros((h, w), dtype=bool)
    for box in record.boxes:
        x0, y0, x1, y1 = box_pixel_bounds(np.asarray(box.xyxy, dtype=np.float64), (h, w))
        m = np.zeros((h, w), dtype=bool)
        m[y0:y1, x0:x1] = label_map[y0:y1, x0:x1] == box.category_id
        covered |= m
        candidates.append(m)
    unboxed = int(np.count_nonzero((label_map > 0) & ~covered))

    # the overlap rule of paint_label_map, with box indices instead of class ids: largest painted first
    areas = [int(np.count_nonzero(m)) for m in candidates]
    box_scores = [scores.get(b.id, 1.0) for b in record.boxes]
    order = sorted(range(len(candidates)), key=lambda i: (-areas[i], box_scores[i], -i))
    owner = np.full((h, w), -1, dtype=np.int32)
    for i in order:
        owner[candidates[i]] = i
    return [
        Instance(b.id, b.category_id, tuple(float(v) for v in b.xywh), scores.get(b.id), owner == i)
        for i, b in enumerate(record.boxes)
    ], unboxed
