"""Snapping the student's mask to the image: GrabCut seeded by the student's own probabilities, no boxes.

Why: on small images the student's decoder works at stride 2-8 and paints each defect as a blob with a
rim of a few pixels, confidently: no threshold removes it (README "Main job"). The image itself knows where
a dark defect ends. Here the student decides what is surely defect (p(defect) >= `sure`) and surely
background (p(defect) <= 1 - `sure`); OpenCV's GrabCut learns the colours of both from the whole image
(from each window of a large one: SnapSettings.window) and settles only the pixels in between (the rim). No box is read: this is still the student alone at
test time. Each defect pixel keeps the student's most likely defect class.

It is an option, not a default (`b2p predict --snap grabcut`): it pays where defects differ in colour from
their surroundings (the demo: dark marks on a lighter texture) and not on grey, low-contrast surfaces
(Magnetic-Tile calib, README "Student").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from b2p.errors import B2PError

SNAP_MODES = ("none", "grabcut")
GMM_COMPONENTS = 5  # OpenCV's GrabCut fits 5-component colour models: each side needs at least 5 pixels


def check_snap(mode: str) -> str:
    if mode not in SNAP_MODES:
        raise B2PError(f"--snap must be one of {', '.join(SNAP_MODES)}, got {mode!r}")
    return mode


@dataclass(frozen=True)
class SnapSettings:
    # p(defect) at or above this is fixed defect, at or below 1 - sure fixed background
    sure: float = 0.9
    iterations: int = 5  # GrabCut's EM iterations (as the GrabCut teacher)
    seed: int = 0  # OpenCV's k-means initialisation of the colour models is random
    # GrabCut's graph costs about 230 bytes a pixel (a 4000 x 3000 frame: 2.7 GB): a larger image is cut into
    # square windows of this side, overlapping by `overlap` px, each with its own colour models, each pixel
    # taken from the window whose core holds it. Images up to this side are one window
    window: int = 1024
    overlap: int = 64

    def __post_init__(self) -> None:
        if not 0.5 < self.sure < 1.0:
            raise B2PError(f"--snap-sure (predict.snap_sure) must be in (0.5, 1): p(defect) at or above it is fixed defect, got {self.sure}")
        if self.iterations < 1:
            raise B2PError(f"snap iterations must be >= 1, got {self.iterations}")
        if self.overlap < 0 or self.window <= 2 * self.overlap:
            raise B2PError(f"snap window ({self.window}) must exceed twice its overlap ({self.overlap})")


def _spans(length: int, window: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(window start, window end, core start, core end) along one axis: the cores partition [0, length) and
    each window is its core widened by `overlap` (clipped), at most `window` long."""
    if length <= window:
        return [(0, length, 0, length)]
    step = window - 2 * overlap
    out = []
    for c0 in range(0, length, step):
        c1 = min(length, c0 + step)
        out.append((max(0, c0 - overlap), min(length, c1 + overlap), c0, c1))
    return out


def snap_grabcut(image: np.ndarray, probs: np.ndarray, settings: SnapSettings = SnapSettings()) -> tuple[np.ndarray, bool]:
    """(label map HxW uint8, snapped) from an HxWx3 uint8 RGB image and the student's (K+1)xHxW class
    probabilities (background first). `snapped` is False when one side of p(defect) = 0.5 holds fewer than
    GMM_COMPONENTS pixels (no defect found, or nothing but defect): no colour model can be fitted for it,
    and the label map is the student's own argmax (run_prediction counts and prints such images). In a
    large image (SnapSettings.window), a window with too few pixels on one side keeps the student's pixels."""
    import cv2

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise B2PError(f"expected an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2] or probs.shape[0] < 2:
        raise B2PError(f"probabilities of shape {probs.shape} do not match an image of {image.shape[:2]}")
    argmax = probs.argmax(0).astype(np.uint8)
    p_defect = 1.0 - probs[0]
    defect = p_defect > 0.5
    n_defect = int(defect.sum())
    if min(n_defect, defect.size - n_defect) < GMM_COMPONENTS:
        return argmax, False
    s = settings
    gc = np.full(p_defect.shape, cv2.GC_PR_BGD, np.uint8)
    gc[defect] = cv2.GC_PR_FGD
    gc[p_defect >= s.sure] = cv2.GC_FGD
    gc[p_defect <= 1.0 - s.sure] = cv2.GC_BGD
    fg = defect.copy()
    h, w = defect.shape
    for y0, y1, cy0, cy1 in _spans(h, s.window, s.overlap):
        for x0, x1, cx0, cx1 in _spans(w, s.window, s.overlap):
            g = gc[y0:y1, x0:x1].copy()
            n_fg = int(np.count_nonzero((g == cv2.GC_FGD) | (g == cv2.GC_PR_FGD)))
            if min(n_fg, g.size - n_fg) < GMM_COMPONENTS:
                continue  # no colour model for one side here: the student's own pixels
            bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
            cv2.setRNGSeed(s.seed)
            crop = np.ascontiguousarray(image[y0:y1, x0:x1, ::-1])  # BGR, as OpenCV expects
            cv2.grabCut(crop, g, None, bgd, fgd, s.iterations, cv2.GC_INIT_WITH_MASK)
            core = g[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
            fg[cy0:cy1, cx0:cx1] = (core == cv2.GC_FGD) | (core == cv2.GC_PR_FGD)
    cls = (1 + probs[1:].argmax(0)).astype(np.uint8)  # the student's most likely defect class
    return np.where(fg, cls, 0).astype(np.uint8), True
