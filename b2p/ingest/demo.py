"""`b2p demo-data`: a small synthetic inspection dataset, deterministic from a seed.

Textured surfaces (brushed metal or concrete-like noise, illumination gradients, tile borders) carry
sparse thin defects of three classes: `crack` (thin branching dark polylines, 1-2 px), `spot` (small dark
or bright blobs) and `erosion` (irregular rough patches). Distractors are placed on purpose over the
defect boxes: soft shadows, stains, bright scratch lines and tile borders, so that filling a box or running
GrabCut in it gives a visibly noisy mask: the situation a box-supervised student has to cope with.

Outputs (all PNGs via atomic writes, byte-identical for the same arguments):
  OUT/images/img_NNN.png        RGB images
  OUT/annotations.json          COCO: categories and one tight box per defect instance
  OUT/masks/img_NNN.png         exact manual label maps (COCO category ids) for a hashed fraction of images
  OUT/classes.txt               class names, one per line (category id = line number)
  OUT/preview.png               a contact sheet: images, and masks + boxes overlaid
Image i depends only on (seed, i, size), so fewer images give a prefix of a larger set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from b2p.errors import B2PError
from b2p.fileio import write_json_atomic, write_png_atomic, write_text_atomic
from b2p.ingest.source import progress
from b2p.labels import colorize, class_color, paint_label_map
from b2p.splits import unit_hash

DEMO_CLASSES = ("crack", "spot", "erosion")
CRACK, SPOT, EROSION = 1, 2, 3
_OWN_FILE = re.compile(r"img_\d+\.png")  # fullmatch: `$` would also match before a final newline


@dataclass
class DemoResult:
    out: Path
    images: int
    masks: int
    instances_per_class: dict[str, int]
    defect_pixel_fraction: float  # over all images
    defect_free_images: int


# --- surfaces ------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean unit-ish noise with features about size/cells pixels wide (bicubic upsampling)."""
    import cv2

    small = rng.normal(0, 1, (cells, cells)).astype(np.float32)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def _surface(rng: np.random.Generator, size: int) -> np.ndarray:
    """HxW float32 gray surface: brushed metal or concrete, with an illumination gradient."""
    import cv2

    base = rng.uniform(120, 170)
    if rng.random() < 0.5:  # brushed metal: streaks along one direction
        n = rng.normal(0, 1, (size, size)).astype(np.float32)
        k = max(3, size // 6) | 1
        n = cv2.GaussianBlur(n, (k, 1), sigmaX=k / 3, sigmaY=0.4)
        n /= n.std() + 1e-6  # the long blur flattens the noise; restore unit contrast
        if rng.random() < 0.5:
            n = n.T.copy()
        img = base + n * rng.uniform(7, 12) + _smooth_noise(rng, size, 4) * 6
    else:  # concrete: several octaves plus fine grain
        img = base + sum(_smooth_noise(rng, size, c) * a for c, a in ((3, 10), (8, 7), (24, 5), (64, 3)))
        img = img + rng.normal(0, 5, (size, size))
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    img = img + (np.cos(angle) * xx + np.sin(angle) * yy - 0.5) * rng.uniform(20, 50)
    return img.astype(np.float32)


def _tile_borders(rng: np.random.Generator, img: np.ndarray) -> None:
    """Grooves between tiles: a dark line with a bright lip (strong edges that are not defects)."""
    import cv2

    size = img.shape[0]
    for _ in range(rng.integers(1, 3)):
        pos = int(rng.integers(size // 5, 4 * size // 5))
        vertical = rng.random() < 0.5
        p0, p1 = ((pos, 0), (pos, size - 1)) if vertical else ((0, pos), (size - 1, pos))
        lip = ((pos + 2, 0), (pos + 2, size - 1)) if vertical else ((0, pos + 2), (size - 1, pos + 2))
        cv2.line(img, p0, p1, float(img.mean() - 45), 2)
        cv2.line(img, *lip, float(img.mean() + 35), 1)


# --- defects (each returns its instance mask, and paints the image in place) ---------------------------


def _crack(rng: np.random.Generator, img: np.ndarray, s: float) -> np.ndarray:
    import cv2

    size = img.shape[0]
    mask = np.zeros((size, size), np.uint8)
    pt = rng.uniform(0.15, 0.85, 2) * size
    angle = rng.uniform(0, 2 * np.pi)
    path = [pt.copy()]
    for _ in range(int(rng.integers(14, 26) * s)):
        angle += rng.normal(0, 0.35)
        pt = pt + 2.5 * np.array([np.cos(angle), np.sin(angle)])
        path.append(pt.copy())
    thick = int(rng.integers(1, 3))
    cv2.polylines(mask, [np.round(path).astype(np.int32)], False, 1, thick, lineType=cv2.LINE_8)
    for _ in range(rng.integers(0, 3)):  # branches
        start = path[int(rng.integers(len(path) // 4, len(path)))]
        a = angle + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2)
        branch, p = [start], start.copy()
        for _ in range(int(rng.integers(4, 10) * s)):
            a += rng.normal(0, 0.4)
            p = p + 2.5 * np.array([np.cos(a), np.sin(a)])
            branch.append(p.copy())
        cv2.polylines(mask, [np.round(branch).astype(np.int32)], False, 1, 1, lineType=cv2.LINE_8)
    m = mask.astype(bool)
    img[m] -= rng.uniform(45, 75)
    return m


def _spot(rng: np.random.Generator, img: np.ndarray, s: float) -> np.ndarray:
    import cv2

    size = img.shape[0]
    mask = np.zeros((size, size), np.uint8)
    c = rng.uniform(0.1, 0.9, 2) * size
    for _ in range(rng.integers(1, 4)):  # a few overlapping ellipses make an irregular blob
        centre = tuple(int(v) for v in np.round(c + rng.normal(0, 1.5 * s, 2)))
        axes = tuple(int(v) for v in np.round(rng.uniform(1.5, 4.5, 2) * s))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    m = mask.astype(bool)
    img[m] += rng.choice([-1, 1]) * rng.uniform(50, 80)
    return m


def _erosion(rng: np.random.Generator, img: np.ndarray, s: float) -> np.ndarray:
    size = img.shape[0]
    r = rng.uniform(9, 18) * s
    c = rng.uniform(0.15, 0.85, 2) * size
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    d = np.sqrt((yy - c[1]) ** 2 + (xx - c[0]) ** 2) / r
    rough = _smooth_noise(rng, size, max(8, size // 5))
    m = (1.0 - d + 0.45 * rough) > 0.35
    if m.sum() < 8:
        m = d < 1
    img[m] = img[m] * 0.75 + rng.normal(0, 16, int(m.sum())) - rng.uniform(10, 25)
    return m


_DEFECTS = {CRACK: _crack, SPOT: _spot, EROSION: _erosion}


# --- distractors over a box ----------------------------------------------------------------------------


def _distract(rng: np.random.Generator, img: np.ndarray, box: tuple[int, int, int, int], s: float) -> None:
    """Put a stain, a shadow or a bright scratch over (part of) the box x0, y0, x1, y1."""
    import cv2

    size = img.shape[0]
    x0, y0, x1, y1 = box
    px, py = rng.uniform(x0, x1 + 1), rng.uniform(y0, y1 + 1)
    kind = rng.integers(0, 3)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    if kind == 0:  # stain: soft irregular blotch, darker or brighter
        r = rng.uniform(8, 18) * s
        d = np.sqrt((yy - py) ** 2 + (xx - px) ** 2) / r
        blob = np.clip(1.2 - d + 0.4 * _smooth_noise(rng, size, max(6, size // 12)), 0, 1)
        img += blob * rng.choice([-1, 1]) * rng.uniform(18, 32)
    elif kind == 1:  # shadow: a large soft multiplicative darkening reaching into the box
        r = rng.uniform(18, 35) * s
        cx, cy = px + rng.normal(0, r / 2), py + rng.normal(0, r / 2)
        d = np.sqrt(((yy - cy) / rng.uniform(0.5, 1.0)) ** 2 + (xx - cx) ** 2) / r
        img *= 1.0 - rng.uniform(0.25, 0.4) * np.clip(1.3 - d, 0, 1)
    else:  # bright scratch line across the box
        a = rng.uniform(0, np.pi)
        dx, dy = np.cos(a) * size, np.sin(a) * size
        p0 = (int(px - dx), int(py - dy))
        p1 = (int(px + dx), int(py + dy))
        layer = np.zeros_like(img)
        cv2.line(layer, p0, p1, float(rng.uniform(35, 60)), 1, lineType=cv2.LINE_AA)
        img += layer


# --- one image -----------------------------------------------------------------------------------------


def generate_image(seed: int, index: int, size: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One demo image: (HxWx3 uint8 RGB, [(class_id, HxW bool instance mask), ...]).

    Instances do not overlap (each is placed away from the others), so every instance keeps all its
    pixels in the label map.
    """
    import cv2

    rng = np.random.default_rng([seed, index, size])
    s = size / 192
    img = _surface(rng, size)
    if rng.random() < 0.5:
        _tile_borders(rng, img)
    instances: list[tuple[int, np.ndarray]] = []
    taken = np.zeros((size, size), bool)
    n_defects = 0 if rng.random() < 0.12 else int(rng.integers(1, 5))
    for _ in range(n_defects):
        cls = int(rng.choice([CRACK, SPOT, EROSION], p=[0.4, 0.3, 0.3]))
        for _try in range(20):
            trial = img.copy()
            m = _DEFECTS[cls](rng, trial, s)
            grown = cv2.dilate(m.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
            if m.sum() >= 4 and not (grown & taken).any():
                img, taken = trial, taken | grown
                instances.append((cls, m))
                break
    for cls, m in instances:  # distractors over most boxes
        if rng.random() < 0.75:
            ys, xs = np.nonzero(m)
            _distract(rng, img, (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())), s)
    if rng.random() < 0.5:  # and some elsewhere
        p = rng.integers(0, size, 2)
        _distract(rng, img, (int(p[0]), int(p[1]), int(p[0]), int(p[1])), s)
    img = img + rng.normal(0, 2.5, img.shape)
    tint = np.array([1.0, rng.uniform(0.96, 1.0), rng.uniform(0.9, 1.0)], np.float32)
    rgb = np.clip(np.round(img[..., None] * tint), 0, 255).astype(np.uint8)
    return rgb, instances


def tight_box(mask: np.ndarray) -> list[int]:
    """COCO [x, y, w, h] covering exactly the mask's pixels (pixel-inclusive)."""
    ys, xs = np.nonzero(mask)
    x, y = int(xs.min()), int(ys.min())
    return [x, y, int(xs.max()) - x + 1, int(ys.max()) - y + 1]


def _preview(tiles: list[tuple[np.ndarray, np.ndarray, list[tuple[int, list[int]]]]], size: int) -> np.ndarray:
    """Contact sheet: top row images, bottom row masks overlaid with their boxes, then a legend."""
    import cv2

    cols = []
    for rgb, lm, boxes in tiles:
        over = rgb.copy()
        fg = lm > 0
        over[fg] = (0.35 * rgb[fg] + 0.65 * colorize(lm)[fg]).astype(np.uint8)
        for cid, (x, y, w, h) in boxes:
            cv2.rectangle(over, (x - 1, y - 1), (x + w, y + h), class_color(cid), 1)
        cols.append(np.concatenate([rgb, over], axis=0))
    sheet = np.concatenate(cols, axis=1)
    legend = np.full((22, sheet.shape[1], 3), 255, np.uint8)
    x = 6
    for cid, name in enumerate(DEMO_CLASSES, 1):
        cv2.rectangle(legend, (x, 6), (x + 10, 16), class_color(cid), -1)
        cv2.putText(legend, name, (x + 14, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        x += 90
    return np.concatenate([sheet, legend], axis=0)


def make_demo_data(
    out: str | Path,
    seed: int = 0,
    images: int = 64,
    size: int = 192,
    mask_fraction: float = 0.3,
    all_masks: bool = False,
) -> DemoResult:
    """Write the demo dataset under `out` (see the module docstring). Removes stale img_*.png of older runs."""
    out = Path(out)
    if images < 1:
        raise B2PError(f"--images must be at least 1, got {images}")
    if not 64 <= size <= 2048:
        raise B2PError(f"--size must be in 64..2048 px, got {size}")
    if not 0 <= mask_fraction <= 1:
        raise B2PError(f"--mask-fraction must be in [0, 1], got {mask_fraction}")
    names = [f"img_{i:03d}.png" for i in range(images)]
    # which images get a manual mask: the lowest hashes (exact count, stable when --images grows)
    n_masks = images if all_masks else int(round(mask_fraction * images))
    masked = set(sorted(names, key=lambda n: unit_hash(f"b2p-demo-masks:{seed}:{n}"))[:n_masks])
    (out / "masks").mkdir(parents=True, exist_ok=True)  # also with no mask: the batch entry names the folder

    coco_images, anns = [], []
    counts = dict.fromkeys(DEMO_CLASSES, 0)
    defect_px, free = 0, 0
    tiles = []
    for i, name in enumerate(progress(names, "demo images", total=images)):
        rgb, instances = generate_image(seed, i, size)
        lm = paint_label_map((size, size), [m for _, m in instances], [c for c, _ in instances])
        write_png_atomic(out / "images" / name, rgb)
        if name in masked:
            write_png_atomic(out / "masks" / name, lm)
        coco_images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        boxes = []
        for cid, m in instances:
            bbox = tight_box(m)
            anns.append(
                {"id": len(anns) + 1, "image_id": i + 1, "category_id": cid, "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0}
            )
            boxes.append((cid, bbox))
            counts[DEMO_CLASSES[cid - 1]] += 1
        defect_px += int(np.count_nonzero(lm))
        free += not instances
        if len(tiles) < 6 and instances:
            tiles.append((rgb, lm, boxes))
    coco = {
        "info": {
            "description": "b2p synthetic demo data (b2p demo-data)",
            "seed": seed,
            "size": size,
            "images": images,
            "masks": n_masks,
            "masks_note": "exact manual label maps (COCO category ids) in masks/ for the listed fraction",
        },
        "categories": [{"id": i + 1, "name": n, "supercategory": "defect"} for i, n in enumerate(DEMO_CLASSES)],
        "images": coco_images,
        "annotations": anns,
    }
    write_json_atomic(out / "annotations.json", coco)
    write_text_atomic(out / "classes.txt", "".join(f"{n}\n" for n in DEMO_CLASSES))
    if tiles:
        write_png_atomic(out / "preview.png", _preview(tiles, size))
    # stale files from an earlier run with more images or another mask choice would be imported as truth
    for folder, keep in (("images", set(names)), ("masks", masked)):
        d = out / folder
        for p in d.iterdir() if d.is_dir() else []:
            if _OWN_FILE.fullmatch(p.name) and p.name not in keep:
                p.unlink()
    return DemoResult(out, images, n_masks, counts, defect_px / (images * size * size), free)
