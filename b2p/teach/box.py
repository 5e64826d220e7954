"""The trivial teacher: every box filled. The baseline any real teacher must beat."""

from __future__ import annotations

from typing import Any

import numpy as np

from b2p.boxes import box_mask
from b2p.teach.base import Teacher, TeacherOutput, check_inputs


class BoxTeacher(Teacher):
    """Mask = the box's pixels; score 1.0 (the box is the annotator's own statement)."""

    name = "box"

    def predict(self, image: np.ndarray, boxes: np.ndarray) -> TeacherOutput:
        """image: HxWx3 uint8; boxes: Nx4 float XYXY -> masks NxHxW bool (the boxes), scores N ones."""
        image, boxes = check_inputs(image, boxes)
        shape = image.shape[:2]
        masks = np.stack([box_mask(b, shape) for b in boxes]) if len(boxes) else np.zeros((0, *shape), bool)
        return TeacherOutput(masks, np.ones(len(boxes), np.float32), [None] * len(boxes))

    def settings(self) -> dict[str, Any]:
        return {}
