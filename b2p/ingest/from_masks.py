"""`b2p masks-to-boxes`: simulate a box annotation from a dataset that has manual masks.

Layout: `ROOT/<CLASS>/Imgs/NAME.jpg` with the manual mask `ROOT/<CLASS>/Imgs/NAME.png` (8-bit grey, possibly
anti-aliased; a pixel is defect when its value is >= threshold; 16-bit only when its values fit 8 bits,
colour masks refused, and a mask whose non-zero pixels all lie below the threshold refused). Every connected defect component
(8-connectivity) of at least `min_area` pixels becomes one tight box of the folder's class; smaller
components are treated as annotation noise (no box, and not part of the manual mask) and counted.
Folders whose masks are all empty (e.g. MT_Free) hold defect-free images and define no class.

The manual masks are written (one RLE `segmentation` per component, `"has_manual_mask": true` on the
image) ONLY for images that the split rule puts in the test split, or in calib (`rule.calib`, a share of
the other images: their masks choose settings), so importing the file with the same batch name and
fractions reproduces that split and manual masks never reach training.

`oracle_out` additionally writes the manual masks of every kept image as a teacher root
(`ORACLE/<batch>/labelmaps/<key>.png`, class ids as in the COCO file): training on it (train and val splits
only, as every teacher) gives the fully supervised ceiling of a student; the test masks are in it only so
the folder is a complete teacher root for `b2p evaluate`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from b2p.errors import B2PError
from b2p.fileio import check_separate_folders, read_image, write_json_atomic
from b2p.ingest.importer import check_batch_name
from b2p.ingest.source import progress
from b2p.labels import label_map_path, write_label_map
from b2p.masks import rle_encode
from b2p.splits import SplitRule, unit_hash

MASK_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # the mask is NAME.png, so images are not PNG


@dataclass
class MasksToBoxesResult:
    out: Path
    categories: list[str]
    images: int
    images_per_class: dict[str, int]  # folder class (or "defect-free") -> images written
    boxes_per_class: dict[str, int]
    dropped_per_class: dict[str, int]  # components below min_area
    test_images: int  # test images written with their manual mask (all masked ones under `masked`: kept_masks)
    calib_images: int  # calib images written with their manual mask
    masked_images: int  # images written with their manual mask
    free_total: int  # defect-free images found
    free_kept: int
    folders: dict[str, str] = field(default_factory=dict)  # folder -> class name or "defect-free"


@dataclass
class _Item:
    folder: str
    file_name: str  # relative to ROOT
    image_path: Path
    mask_path: Path
    shape: tuple[int, int]  # (H, W) of the mask
    binary: np.ndarray | None  # HxW bool, thresholded; None when empty (most images of a defect-free folder)


AUTO_PREFIX = "auto"


def common_prefix(folders: list[str]) -> str:
    """The prefix shared by all class folders, cut after its last separator ('_', '-', '.', ' '):
    MT_Blowhole, MT_Break -> "MT_"; a single folder or no shared separator -> ""."""
    if len(folders) < 2:
        return ""
    shared = folders[0]
    for f in folders[1:]:
        while not f.startswith(shared):
            shared = shared[:-1]
    cut = max(shared.rfind(c) for c in "_-. ")
    return shared[: cut + 1] if cut >= 0 else ""


def class_name_of(folder: str, strip_prefix: str = "") -> str:
    name = folder[len(strip_prefix) :] if strip_prefix and folder.startswith(strip_prefix) else folder
    return name.lower()


def _read_mask(path: Path, threshold: int) -> np.ndarray:
    """The mask's defect pixels (value >= threshold), read unchanged: decoding as 8-bit grey would scale a
    16-bit mask down (255 -> 0) and turn a colour mask into grey 76, dropping defects silently."""
    import cv2

    data = np.fromfile(path, dtype=np.uint8)
    m = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if m is None:
        raise B2PError("mask could not be decoded", path)
    if m.ndim == 3:  # BGR or BGRA (palette PNGs decode to BGR): accepted only when grey and opaque
        if m.shape[2] == 4 and (m[..., 3] != m[..., 3].flat[0]).any():
            raise B2PError("mask has a varying alpha channel; save it as a single-channel (grey) PNG", path)
        if (m[..., 1] != m[..., 0]).any() or (m[..., 2] != m[..., 0]).any():
            raise B2PError("mask is a colour image; save it as a single-channel (grey) PNG, defect >= --threshold", path)
        m = m[..., 0]
    if m.dtype == np.uint16:
        if m.max() > 255 and (m % 257).any():  # 8-bit values scaled to 16 bits are multiples of 257
            raise B2PError(f"16-bit mask holds value {int(m.max())}, which does not fit 8 bits; save it as an 8-bit PNG", path)
        m = m // 257 if m.max() > 255 else m
    elif m.dtype != np.uint8:
        raise B2PError(f"mask holds {m.dtype} values; save it as an 8-bit PNG", path)
    binary = m >= threshold
    if m.any() and not binary.any():
        raise B2PError(
            f"mask has non-zero pixels (up to {int(m.max())}) but none reach --threshold {threshold}; its defects would "
            f"be dropped: pass --threshold {int(m.max())} or lower (e.g. 1 for a 0/1 mask)",
            path,
        )
    return binary


def _components(binary: np.ndarray, min_area: int) -> tuple[list[tuple[list[int], int, np.ndarray]], int]:
    """Kept components as ([x, y, w, h], area, HxW bool mask) in label order, and the number dropped."""
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    kept, dropped = [], 0
    for k in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[k])
        if area < min_area:
            dropped += 1
            continue
        kept.append(([x, y, w, h], area, labels == k))
    return kept, dropped


def _class_folders(root: Path, folders: list[str] | None) -> list[str]:
    if not root.is_dir():
        raise B2PError("dataset root not found", root)
    if folders:
        for f in folders:
            if not (root / f / "Imgs").is_dir():
                raise B2PError(f"folder {f!r} has no Imgs/ subfolder", root / f)
        return list(dict.fromkeys(folders))
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "Imgs").is_dir())
    if not found:
        raise B2PError("no class folders here (expected ROOT/<CLASS>/Imgs/NAME.jpg + NAME.png)", root)
    return found


def masks_to_boxes(
    root: str | Path,
    out: str | Path,
    batch: str,
    *,
    strip_prefix: str = "",
    threshold: int = 128,
    min_area: int = 10,
    free_images: int | None = None,
    rule: SplitRule | None = None,
    folders: list[str] | None = None,
    oracle_out: str | Path | None = None,
    masked: float | None = None,
) -> MasksToBoxesResult:
    """Write a COCO box file for ROOT (boxes for all images, manual masks for the test split only).

    `strip_prefix="auto"` strips the prefix all class folders share (`common_prefix`); `oracle_out` also
    writes every kept image's manual mask as a teacher root (module docstring). `masked` (a share in [0, 1])
    keeps instead the masks of that hashed share of the images, as a user who masked a few would have them:
    `b2p import` then splits them into calib and test by its own rule."""
    check_batch_name(batch)
    rule = rule or SplitRule()
    root, out = Path(root), Path(out)
    # the dataset is read again by `b2p import` (and the oracle's PNGs would pass for masks there)
    check_separate_folders({"--out": out, "--oracle-out": oracle_out}, {"the dataset root": root})
    _check_options(threshold, masked, min_area, free_images)

    class_folders = _class_folders(root, folders)
    if strip_prefix == AUTO_PREFIX:
        strip_prefix = common_prefix(class_folders)
    pairs = _image_mask_pairs(root, class_folders)
    items = []
    for folder, p, m in progress(pairs, "reading masks", total=len(pairs)):
        binary = _read_mask(m, threshold)
        items.append(_Item(folder, p.relative_to(root).as_posix(), p, m, binary.shape, binary if binary.any() else None))
    free_folders, folder_class = _folder_classes(items, strip_prefix)
    categories = sorted({c for f, c in folder_class.items() if f not in free_folders})
    cat_id = {n: i + 1 for i, n in enumerate(categories)}

    free, keep_free = _defect_free(items, free_folders, free_images)
    keep = {it.file_name for it in keep_free} | {it.file_name for it in items if it.folder not in free_folders}
    t = _boxes_of_items(items, keep, folder_class, cat_id, batch, rule, masked, min_area, oracle_out)
    info = {
        "description": "boxes simulated from manual masks by `b2p masks-to-boxes` (one box per connected component)",
        "root": str(root),
        "batch": batch,
        "threshold": threshold,
        "min_area": min_area,
        "connectivity": 8,
        "strip_prefix": strip_prefix,
        "split_rule": {k: v for k, v in rule.info().items() if k != "manual_masks"},
        "manual_masks": (f"a hashed share {masked:g} of the images" if masked is not None
                         else "test and calib splits only" if rule.calib else "test split only"),
        "free_images": {"found": len(free), "kept": len(keep_free)},
        "oracle_out": None if oracle_out is None else str(oracle_out),
        "dropped_components": dict(sorted(t.dropped.items())),
        "folders": folder_class,
    }
    coco = {
        "info": info,
        "categories": [{"id": cat_id[n], "name": n, "supercategory": "defect"} for n in categories],
        "images": t.images,
        "annotations": t.annotations,
    }
    write_json_atomic(out, coco)
    return MasksToBoxesResult(
        out=out,
        categories=categories,
        images=len(t.images),
        images_per_class=dict(t.per_class_images),
        boxes_per_class={n: t.boxes[n] for n in categories},
        dropped_per_class={n: t.dropped[n] for n in categories},
        test_images=t.n_test,
        masked_images=t.n_masked,
        calib_images=t.n_calib,
        free_total=len(free),
        free_kept=len(keep_free),
        folders=folder_class,
    )


def _check_options(threshold: int, masked: float | None, min_area: int, free_images: int | None) -> None:
    """Refuse out-of-range options before any file is read."""
    if not 1 <= threshold <= 255:
        raise B2PError(f"--threshold must be in 1..255, got {threshold}")
    if masked is not None and not 0 <= masked <= 1:
        raise B2PError(f"--masked must be a share in [0, 1], got {masked}")
    if min_area < 1:
        raise B2PError(f"--min-area must be at least 1, got {min_area}")
    if free_images is not None and free_images < 0:
        raise B2PError(f"--free-images must be >= 0, got {free_images}")


def _image_mask_pairs(root: Path, class_folders: list[str]) -> list[tuple[str, Path, Path]]:
    """(folder, image, mask) for every image of the class folders; a mask without its image, or an image without its mask, is refused."""
    pairs: list[tuple[str, Path, Path]] = []
    for folder in class_folders:
        imgs_dir = root / folder / "Imgs"
        images = sorted(p for p in imgs_dir.iterdir() if p.is_file() and p.suffix.lower() in MASK_IMAGE_EXTENSIONS)
        stems = {p.stem for p in images}
        for m in sorted(imgs_dir.glob("*.png")):
            if m.stem not in stems:
                raise B2PError("mask has no image of the same name (NAME.jpg)", m)
        for p in images:
            mask = p.with_suffix(".png")
            if not mask.is_file():
                raise B2PError(f"image has no manual mask {mask.name} beside it", p)
            pairs.append((folder, p, mask))
    if not pairs:
        raise B2PError("no images found (expected ROOT/<CLASS>/Imgs/NAME.jpg + NAME.png)", root)
    return pairs


def _folder_classes(items: list[_Item], strip_prefix: str) -> tuple[set[str], dict[str, str]]:
    """The defect-free folders (every mask empty) and each folder's class name ("defect-free" for those)."""
    by_folder: dict[str, list[_Item]] = {}
    for it in items:
        by_folder.setdefault(it.folder, []).append(it)
    free_folders = {f for f, its in by_folder.items() if all(it.binary is None for it in its)}
    folder_class = {f: ("defect-free" if f in free_folders else class_name_of(f, strip_prefix)) for f in by_folder}
    return free_folders, folder_class


def _defect_free(items: list[_Item], free_folders: set[str], free_images: int | None) -> tuple[list[_Item], list[_Item]]:
    """The defect-free images found, and those kept (all, or `free_images` of them)."""
    # a deterministic subset, chosen by a hash independent of the split hash (choosing by the split hash
    # would keep only test images)
    free = [it for it in items if it.folder in free_folders]
    keep_free = free
    if free_images is not None and free_images < len(free):
        keep_free = sorted(free, key=lambda it: unit_hash(f"b2p-free-images:{it.file_name}"))[:free_images]
    return free, keep_free


@dataclass
class _Tally:
    """The COCO images and annotations made from the masks, and their counts."""

    images: list[dict] = field(default_factory=list)
    annotations: list[dict] = field(default_factory=list)
    boxes: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    per_class_images: Counter = field(default_factory=Counter)
    n_test: int = 0
    n_calib: int = 0
    n_masked: int = 0


def _keeps_mask(batch: str, file_name: str, rule: SplitRule, masked: float | None) -> tuple[bool, bool, bool]:
    """(keep its manual mask, in calib, in test): by the split rule, or with `masked` by a hashed share."""
    if masked is None:
        is_calib = rule.is_calib(batch, file_name)
        is_test = rule.hash_split(batch, file_name) == "test"
        return is_test or is_calib, is_calib, is_test
    # which of them become calib or test is import's rule
    return unit_hash(f"{rule.salt}:masked:{batch}/{file_name}") < masked, False, False


def _boxes_of_items(
    items: list[_Item], keep: set[str], folder_class: dict[str, str], cat_id: dict[str, int], batch: str,
    rule: SplitRule, masked: float | None, min_area: int, oracle_out: str | Path | None,
) -> _Tally:
    """One COCO image per kept item, one box per component (with its RLE where the mask is kept); the oracle's label maps on the way."""
    t = _Tally()
    for it in progress([i for i in items if i.file_name in keep], "boxes from masks", total=len(keep)):
        h, w = read_image(it.image_path).shape[:2]
        if it.shape != (h, w):
            raise B2PError(f"mask is {it.shape[1]}x{it.shape[0]} but its image is {w}x{h}", it.mask_path)
        cls = folder_class[it.folder]
        keep_mask, is_calib, is_test = _keeps_mask(batch, it.file_name, rule, masked)
        image_id = len(t.images) + 1
        t.images.append({"id": image_id, "file_name": it.file_name, "width": w, "height": h, "has_manual_mask": keep_mask})
        t.per_class_images[cls] += 1
        t.n_test += is_test
        t.n_calib += is_calib
        t.n_masked += keep_mask
        if it.binary is None:
            if oracle_out is not None:
                write_label_map(label_map_path(oracle_out, batch, it.file_name), np.zeros((h, w), np.uint8))
            continue
        kept, n_dropped = _components(it.binary, min_area)
        t.dropped[cls] += n_dropped
        if oracle_out is not None:  # the kept components only: the same pixels as the test split's manual masks
            lm = np.zeros((h, w), np.uint8)
            for _, _, comp in kept:
                lm[comp] = cat_id[cls]
            write_label_map(label_map_path(oracle_out, batch, it.file_name), lm)
        for bbox, area, comp in kept:
            ann = {"id": len(t.annotations) + 1, "image_id": image_id, "category_id": cat_id[cls], "bbox": bbox, "area": area, "iscrowd": 0}
            if keep_mask:
                ann["segmentation"] = rle_encode(comp)
            t.annotations.append(ann)
            t.boxes[cls] += 1
    return t
