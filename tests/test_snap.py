"""Snapping the student's mask to the image (b2p/student/snap.py): GrabCut seeded by its own probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from b2p.errors import B2PError
from b2p.student.snap import SnapSettings, snap_grabcut


def _scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A dark 16x16 square on a lighter noisy texture, and the student's probabilities: a blob twice the
    square's area (p(defect) 0.98 at the centre, above 0.5 on a 4 px rim around the square), class 2 on the
    square's left half, class 1 on its right half."""
    rng = np.random.default_rng(seed)
    img = np.full((64, 64, 3), 200.0)
    img[20:36, 24:40] = 60
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    truth = np.zeros((64, 64), bool)
    truth[20:36, 24:40] = True
    yy, xx = np.mgrid[:64, :64]
    d = np.maximum(np.abs(yy - 27.5) / 8, np.abs(xx - 31.5) / 8)  # 1 on the square's border
    p = np.clip(1.3 - 0.5 * d, 0.02, 0.98)
    left = xx < 32
    probs = np.stack([1 - p, np.where(left, 0.3, 0.7) * p, np.where(left, 0.7, 0.3) * p])
    return img, probs, truth


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def test_snap_cuts_the_rim_off_a_blob_and_keeps_the_students_classes():
    img, probs, truth = _scene()
    own = probs.argmax(0)
    assert _iou(own > 0, truth) < 0.6  # the blob: about twice the square
    lm, snapped = snap_grabcut(img, probs)
    assert snapped and lm.dtype == np.uint8 and lm.shape == truth.shape
    assert _iou(lm > 0, truth) > 0.95
    xx = np.mgrid[:64, :64][1]
    inside = lm > 0
    assert (lm[inside & (xx < 32)] == 2).all() and (lm[inside & (xx >= 32)] == 1).all()
    # sure pixels are fixed: the square's centre (p 0.98) stays defect, the far background (p 0.02) stays background
    assert lm[26:30, 30:34].all() and not lm[:8].any()
    # deterministic (OpenCV's random colour-model start is seeded)
    assert np.array_equal(snap_grabcut(img, probs)[0], lm)


def test_snap_keeps_the_students_map_when_a_side_has_no_colour_model():
    img, probs, _ = _scene()
    nothing = np.stack([np.full((64, 64), 0.9), np.full((64, 64), 0.06), np.full((64, 64), 0.04)])
    lm, snapped = snap_grabcut(img, nothing)
    assert not snapped and not lm.any()
    everything = nothing[[1, 0, 2]]  # defect class 1 everywhere
    lm, snapped = snap_grabcut(img, everything)
    assert not snapped and (lm == 1).all()


def test_snap_refuses_bad_inputs():
    img, probs, _ = _scene()
    with pytest.raises(B2PError, match="do not match"):
        snap_grabcut(img, probs[:, :32])
    with pytest.raises(B2PError, match="uint8 RGB"):
        snap_grabcut(img[..., 0], probs)
    with pytest.raises(B2PError, match="sure"):
        SnapSettings(sure=0.5)


def test_box_guided_masks_keep_the_snapped_pixels_inside_each_box():
    from b2p.boxes import within_boxes

    img, probs, truth = _scene()
    snapped, _ = snap_grabcut(img, probs)
    p = 1.0 - probs[0]
    boxes = np.array([[22, 18, 42, 38], [0, 50, 10, 60]], float)  # around the square; an empty corner
    lm, rescued = within_boxes(p, boxes, np.array([1, 2]), defect=snapped > 0)
    assert np.array_equal(lm[18:38, 22:42] == 1, truth[18:38, 22:42])  # the snapped square, the box's class
    assert rescued == 1 and (lm[50:60, 0:10] == 2).any()  # a box with nothing snapped is still rescued
    plain, _ = within_boxes(p, boxes, np.array([1, 2]))
    assert (plain[18:38, 22:42] > 0).sum() > 1.3 * truth.sum()  # without the snap: the blob's rim


def test_a_square_across_window_borders_snaps_as_in_one_window():
    img, probs, truth = _scene()
    small = SnapSettings(window=24, overlap=4)  # 64 px: three windows a side, the square crosses their borders
    lm, snapped = snap_grabcut(img, probs, small)
    assert snapped and _iou(lm > 0, truth) > 0.95
    with pytest.raises(B2PError, match="window"):
        SnapSettings(window=8, overlap=4)


# Peak memory of the snap on a 4000 x 3000 frame: GrabCut's graph costs about 230 bytes a pixel (2.7 GB for
# the whole frame at once, measured 2026-11-30); in 1024 px windows it stays near one window's worth.
# The bound: the snap grows the process's peak RSS by less than 600 MB (measured 2026-11-30: +235 MB, 486 MB peak).
SNAP_GROWTH_MB = 600
_SNAP_MEMORY_SCRIPT = """
import json
import numpy as np
from b2p.memory import peak_rss_mb as peak_mb
from b2p.student.snap import snap_grabcut
h, w = 3000, 4000
img = np.full((h, w, 3), 180, np.uint8)
img[1000:1400, 1500:2600] = 70
img += np.random.default_rng(0).integers(0, 16, img.shape, dtype=np.uint8)
dy = (np.abs(np.arange(h, dtype=np.float32) - 1200) / 200)[:, None]
dx = (np.abs(np.arange(w, dtype=np.float32) - 2050) / 550)[None, :]
p = np.clip(1.3 - 0.5 * np.maximum(dy, dx), 0.02, 0.98)  # a blob 1.6x the dark rectangle's area
probs = np.stack([1 - p, p])
del p
before = peak_mb()
lm, snapped = snap_grabcut(img, probs)
inside = np.zeros((h, w), bool)
inside[1000:1400, 1500:2600] = True
d = lm > 0
print(json.dumps({"before": before, "peak": peak_mb(), "snapped": snapped, "iou": float((d & inside).sum() / (d | inside).sum())}))
"""


def test_4000x3000_frame_snaps_in_bounded_memory():
    import json
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _SNAP_MEMORY_SCRIPT], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["snapped"] and m["iou"] > 0.98, m
    assert m["peak"] - m["before"] < SNAP_GROWTH_MB, m
