"""Shared fixtures: tiny canonical batches built from core modules only (no importer needed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from b2p.dataset import save_batch_dict, to_coco_dict  # noqa: E402
from b2p.fileio import sha256_file, write_png_atomic  # noqa: E402
from b2p.labels import ClassList, save_class_list  # noqa: E402
from b2p.masks import rle_encode  # noqa: E402
from b2p.splits import SplitRule  # noqa: E402

CLASSES = ClassList(("crack", "spot"))


def make_synthetic_batch(
    root: Path,
    name: str = "b1",
    n_images: int = 6,
    size: int = 64,
    seed: int = 0,
    manual_every: int = 3,
    calib: float = 0.0,
) -> tuple[Path, dict[str, np.ndarray]]:
    """Write `n_images` textured gray images, each with a dark crack (class 1) and a dark spot (class 2).

    Every `manual_every`-th image carries its exact manual mask (and so lands in the test split, or with
    `calib` > 0 that share of them in the calib split).
    Returns the canonical annotation file and the true label map of every image by file name.
    """
    rng = np.random.default_rng(seed)
    img_dir = root / "raw" / name / "images"
    images, anns, manual, truth = [], [], [], {}
    ann_id = 1
    rule = SplitRule(val=0.2, test=0.0, calib=calib)
    for i in range(n_images):
        h = w = size
        img = (150 + rng.normal(0, 6, (h, w))).clip(0, 255)
        lm = np.zeros((h, w), np.uint8)
        # crack: a thin diagonal line
        x0, y0 = rng.integers(4, w // 3), rng.integers(4, h // 3)
        length = rng.integers(size // 3, size // 2)
        for t in range(length):
            y, x = y0 + t, x0 + t // 2
            lm[y, x : x + 2] = 1
        # spot: a small disc
        cy, cx, r = rng.integers(h // 2, h - 8), rng.integers(w // 2, w - 8), rng.integers(3, 5)
        yy, xx = np.mgrid[:h, :w]
        lm[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 2
        img[lm > 0] = 60
        rgb = np.repeat(img.astype(np.uint8)[..., None], 3, axis=2)
        fname = f"img_{i:03d}.png"
        write_png_atomic(img_dir / fname, rgb)
        has_manual = manual_every > 0 and i % manual_every == 0
        images.append(
            {
                "id": i + 1,
                "file_name": fname,
                "width": w,
                "height": h,
                "sha256": sha256_file(img_dir / fname),
                "batch": name,
                "split": rule.split_of(name, fname, has_manual),
                "has_manual_mask": has_manual,
            }
        )
        for cid in (1, 2):
            ys, xs = np.nonzero(lm == cid)
            x, y = int(xs.min()), int(ys.min())
            bw, bh = int(xs.max()) - x + 1, int(ys.max()) - y + 1
            anns.append({"id": ann_id, "image_id": i + 1, "category_id": cid, "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
            ann_id += 1
            if has_manual:
                manual.append({"image_id": i + 1, "category_id": cid, "segmentation": rle_encode(lm == cid)})
        truth[fname] = lm
    path = root / "imported" / f"{name}.json"
    coco = to_coco_dict(name, CLASSES, images, anns, manual, image_root=os.path.relpath(img_dir, path.parent))
    save_batch_dict(path, coco)
    save_class_list(root / "classes.json", CLASSES)
    return path, truth


@pytest.fixture
def synthetic_batch(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    return make_synthetic_batch(tmp_path)
