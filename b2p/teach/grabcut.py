"""GrabCut teacher: OpenCV's `cv2.grabCut` initialised from each box, no weights needed.

Per box: crop the image around the box with some context, mark the context (everything outside the box)
as definite background and the box as probable foreground, run GrabCut, and keep the (probable)
foreground, which lies inside the box by construction. This is the classic box-supervision teacher
("Simple Does It", Khoreva et al. 2017).

Degenerate boxes are handled explicitly and every case is recorded as a per-box note (provenance.json):
  - a box thinner than `min_side` px: GrabCut cannot model its colours; the box is filled, score 0;
  - a box leaving fewer than `min_background` context pixels (it covers almost the whole image): no
    background model can be learned; the box is filled, score 0;
  - with `min_context_ratio` > 0, a box whose context has fewer pixels than that ratio times its own
    area: the background model is too poor to trust; the box is filled, score 0;
  - GrabCut returns no foreground (or, with `min_fill` > 0, less than that fraction of the box): the box is filled (`empty="box"`, default) or the mask stays empty
    (`empty="keep"`); either way it is noted.
With `rim` > 0 only a rim of the box is left to GrabCut (probable foreground) and the box's inside is definite
foreground: a tight box's defect fills its centre and differs from the box along its sides, which is where
the cut is wanted; GrabCut can then not collapse, nor cut a large box along its texture.
Score: 1.0 where GrabCut made the mask, 0.0 where the box was filled instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from b2p.errors import B2PError
from b2p.boxes import box_mask, box_pixel_bounds
from b2p.teach.base import Teacher, TeacherOutput, check_inputs


@dataclass(frozen=True)
class GrabCutSettings:
    iterations: int = 5  # GrabCut iterations per box
    context_frac: float = 0.5  # context around the box, as a fraction of its longer side ...
    context_px: int = 8  # ... but at least this many pixels
    min_side: int = 4  # a box thinner than this is filled (noted): too few pixels for colour models
    min_background: int = 32  # context pixels a box needs for a background colour model, else it is filled (noted)
    # fill the box when the context around it has fewer than this many pixels per box pixel (0 = off):
    # a background colour model estimated from a thin, image-clipped border cannot explain a box that
    # covers a large part of the image, and GrabCut then cuts the box along texture
    min_context_ratio: float = 0.0
    # a GrabCut mask holding less than this fraction of its box is a collapse, handled like an empty result
    # (0 = off): no tight box around a real defect allows it (the defect touches all four sides of its box)
    min_fill: float = 0.0
    # GrabCut decides only a rim of each box, this fraction of its shorter half-side (0 = off, the whole box;
    # 1: at most a 1 px line of inside left); the inside is definite foreground
    rim: float = 0.0
    empty: str = "box"  # what to do when GrabCut finds no foreground: "box" (fill, noted) or "keep"
    seed: int = 0  # OpenCV's k-means initialisation of the colour models is random

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise B2PError(f"grabcut iterations must be >= 1, got {self.iterations}")
        if self.context_frac < 0 or self.context_px < 1:
            raise B2PError("grabcut context must be positive (context_px >= 1, context_frac >= 0)")
        if self.min_side < 2 or self.min_background < 5:
            raise B2PError("grabcut min_side must be >= 2 and min_background >= 5 (GMMs need samples)")
        if not 0 <= self.min_fill < 1:
            raise B2PError(f"grabcut min_fill must be in [0, 1), got {self.min_fill}")
        if self.min_context_ratio < 0:
            raise B2PError(f"grabcut min_context_ratio must be >= 0, got {self.min_context_ratio}")
        if not 0 <= self.rim <= 1:
            raise B2PError(f"grabcut rim must be in [0, 1] (a fraction of the box's shorter half-side), got {self.rim}")
        if self.empty not in ("box", "keep"):
            raise B2PError(f"grabcut empty must be 'box' or 'keep', got {self.empty!r}")


class GrabCutTeacher(Teacher):
    name = "grabcut"

    def __init__(self, settings: GrabCutSettings | None = None, **overrides: Any):
        base = settings or GrabCutSettings()
        self.cfg = GrabCutSettings(**{**asdict(base), **overrides}) if overrides else base

    def settings(self) -> dict[str, Any]:
        return asdict(self.cfg)

    def predict(self, image: np.ndarray, boxes: np.ndarray) -> TeacherOutput:
        """image: HxWx3 uint8 RGB; boxes: Nx4 float XYXY -> masks NxHxW bool inside each box, scores N."""
        image, boxes = check_inputs(image, boxes)
        h, w = image.shape[:2]
        masks = np.zeros((len(boxes), h, w), dtype=bool)
        scores = np.zeros(len(boxes), dtype=np.float32)
        notes: list[str | None] = []
        for i, box in enumerate(boxes):
            m, ok, note = self._one(image, box)
            masks[i], scores[i] = m, 1.0 if ok else 0.0
            notes.append(note)
        return TeacherOutput(masks, scores, notes)

    def _one(self, image: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, bool, str | None]:
        """(mask HxW bool, GrabCut produced it, note)."""
        import cv2

        c = self.cfg
        shape = image.shape[:2]
        x0, y0, x1, y1 = box_pixel_bounds(box, shape)
        bw, bh = x1 - x0, y1 - y0
        if min(bw, bh) < c.min_side:
            return box_mask(box, shape), False, f"grabcut skipped: box {bw}x{bh} px is thinner than min_side={c.min_side}; box filled"
        ctx = max(c.context_px, int(round(c.context_frac * max(bw, bh))))
        cx0, cy0 = max(0, x0 - ctx), max(0, y0 - ctx)
        cx1, cy1 = min(shape[1], x1 + ctx), min(shape[0], y1 + ctx)
        n_bg = (cx1 - cx0) * (cy1 - cy0) - bw * bh
        if n_bg < c.min_background:
            return (
                box_mask(box, shape),
                False,
                f"grabcut skipped: box covers nearly the whole image, only {n_bg} background pixels around it "
                f"(< min_background={c.min_background}); box filled",
            )
        if n_bg < c.min_context_ratio * bw * bh:
            return (
                box_mask(box, shape),
                False,
                f"grabcut skipped: {n_bg} context pixels for a {bw}x{bh} box "
                f"(< min_context_ratio={c.min_context_ratio} per box pixel); box filled",
            )
        crop = np.ascontiguousarray(image[cy0:cy1, cx0:cx1, ::-1])  # BGR, as OpenCV expects
        gc = np.full(crop.shape[:2], cv2.GC_BGD, np.uint8)
        gc[y0 - cy0 : y1 - cy0, x0 - cx0 : x1 - cx0] = cv2.GC_PR_FGD
        if c.rim > 0:
            r = max(1, int(round(c.rim * min(bw, bh) / 2)))
            if min(bw, bh) > 2 * r:
                gc[y0 - cy0 + r : y1 - cy0 - r, x0 - cx0 + r : x1 - cx0 - r] = cv2.GC_FGD
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.setRNGSeed(c.seed)
        try:
            cv2.grabCut(crop, gc, None, bgd, fgd, c.iterations, cv2.GC_INIT_WITH_MASK)
        except cv2.error as e:
            msg = str(e).strip().splitlines()[-1][:200]
            return box_mask(box, shape), False, f"grabcut failed ({msg}); box filled"
        fg = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
        mask = np.zeros(shape, dtype=bool)
        mask[cy0:cy1, cx0:cx1] = fg
        kept = int(mask.sum())
        if kept == 0 or kept < c.min_fill * bw * bh:
            what = "no foreground" if kept == 0 else f"only {kept} px ({kept / (bw * bh):.1%} of the box, < min_fill={c.min_fill})"
            if c.empty == "box":
                return box_mask(box, shape), False, f"grabcut found {what} in the box; box filled"
            return np.zeros(shape, dtype=bool), False, f"grabcut found {what} in the box; mask left empty"
        return mask, True, None
