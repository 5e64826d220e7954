"""Which epoch's student to keep: the `train.select` rule.

- `box` (default): a teacher-free score on the val split. For each annotated box, the Dice between the
  max-projections of the predicted defect mask inside the box onto the x and y axes and the box's own
  projections (all ones: a tight box is touched by its defect on every row and column), averaged over both
  axes and all boxes; times (1 - the share of predicted defect pixels outside every box). It rewards masks
  that fill their boxes' extent and stay inside boxes, without asking the student to copy the teacher's
  pixels, which is what self-correction exists to change.
- `pseudo`: val anomaly mIoU against the teacher's pseudo-masks (the former rule; rewards copying them).
- `last`: no selection; the EMA weights after the last epoch.
"""

from __future__ import annotations

import numpy as np

SELECT_RULES = ("box", "pseudo", "last")
RULES_DIR = "rules"  # MODEL_DIR/rules/<rule>.pt: the epoch another rule would have kept (train.keep_rule_models)


def rule_score(rule: str, val: dict | None) -> float | None:
    """An epoch's score under `rule` from its validation dict (train.py `_validate`); None for `last` or
    without validation (every epoch then replaces the one before). Higher is better."""
    if val is None or rule == "last":
        return None
    return (val["box_score"] if rule == "box" else val["anomaly_miou"]) or 0.0


class BoxFitScore:
    """Accumulates the `box` rule over val images; `value()` is None when no box was seen."""

    def __init__(self) -> None:
        self.dice_sum = 0.0
        self.boxes = 0
        self.defect_pixels = 0
        self.outside_pixels = 0

    def update(self, defect: np.ndarray, boxes_xyxy: np.ndarray) -> None:
        """defect: HxW bool predicted defect mask at the image's size; boxes_xyxy: Nx4 image pixels."""
        from b2p.boxes import box_pixel_bounds  # the box pixel rule of every teacher

        defect = np.asarray(defect, dtype=bool)
        inside = np.zeros_like(defect)
        for box in np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4):
            x0, y0, x1, y1 = box_pixel_bounds(box, defect.shape)
            if x1 <= x0 or y1 <= y0:
                continue
            crop = defect[y0:y1, x0:x1]
            inside[y0:y1, x0:x1] = True
            dice = [2.0 * proj.sum() / (proj.size + proj.sum()) for proj in (crop.any(0), crop.any(1))]
            self.dice_sum += float(np.mean(dice))
            self.boxes += 1
        self.defect_pixels += int(defect.sum())
        self.outside_pixels += int((defect & ~inside).sum())

    def parts(self) -> dict[str, float | None]:
        """{box_dice, outside_share, box_score} (None where undefined)."""
        if not self.boxes:
            return {"box_dice": None, "outside_share": None, "box_score": None}
        dice = self.dice_sum / self.boxes
        outside = self.outside_pixels / self.defect_pixels if self.defect_pixels else 0.0
        return {"box_dice": dice, "outside_share": outside, "box_score": dice * (1.0 - outside)}

    def value(self) -> float | None:
        return self.parts()["box_score"]
