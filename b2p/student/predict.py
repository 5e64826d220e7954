"""Inference with a trained student: label maps at each image's original size (+ optional probabilities).

Images are resized to the model's square input; the logits are resized back to the original size
(bilinear) before the argmax, so the label map has the image's exact size.

Box-guided masks (`within_boxes`): for images that carry box annotations the student can also turn each box
into a mask, the way a teacher does: the student's defect pixels inside the box, painted with the box's
class; outside every box, background. This is b2p's answer to "boxes in, pixel masks out" for the
annotated images themselves, and it is scored like a teacher (both see the same boxes).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from b2p.errors import B2PError
from b2p.fileio import atomic_write, read_image
from b2p.labels import label_map_key, label_map_path, write_label_map
from b2p.student.data import load_batch_files_for_inference, prepare_image

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass
class PredictItem:
    image_path: Path
    label_out: Path
    probs_out: Path | None
    boxes_xyxy: np.ndarray | None = None  # Nx4 annotated boxes (batches only)
    box_classes: np.ndarray | None = None  # N class ids
    boxed_out: Path | None = None  # box-guided label map


def within_boxes(
    p_defect: np.ndarray, boxes_xyxy: np.ndarray, class_ids: np.ndarray, threshold: float = 0.5, relative: float = 0.5
) -> tuple[np.ndarray, int]:
    """Box-guided label map from an HxW defect probability map; returns (label map, boxes rescued).

    Each box keeps its pixels with p(defect) > `threshold`, painted with the box's class (overlaps: the
    smaller mask wins, as for teachers). A box is an annotator's statement that a defect is there, so a box
    where the student finds nothing is never left empty: it keeps its pixels with p(defect) >= `relative`
    x the box's highest p(defect) (the student's best guess), and is counted as rescued.
    """
    from b2p.labels import paint_label_map
    from b2p.teach.base import box_pixel_bounds  # the same box pixels as the box teacher and box fill

    h, w = p_defect.shape
    masks, rescued = [], 0
    for box in np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4):
        xa, ya, xb, yb = box_pixel_bounds(box, (h, w))
        m = np.zeros((h, w), dtype=bool)
        inside = p_defect[ya:yb, xa:xb]
        keep = inside > threshold
        if inside.size and not keep.any():
            keep = inside >= relative * float(inside.max())
            rescued += 1
        m[ya:yb, xa:xb] = keep
        masks.append(m)
    return paint_label_map((h, w), masks, [int(c) for c in class_ids]), rescued


def predict_images(
    model: torch.nn.Module, images: list[np.ndarray], device: torch.device | str = "cpu"
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Predict a list of HxWx3 uint8 RGB images (any sizes) in one batch.

    Returns (label maps HxW uint8, class probabilities (K+1)xHxW float32), at each image's own size.
    """
    c = model.config
    x = torch.stack([prepare_image(im, c.input_size, c.mean, c.std) for im in images]).to(device)
    with torch.no_grad():
        logits = model(x)["fine"].float()
    labels, probs = [], []
    for i, im in enumerate(images):
        lg = torch.nn.functional.interpolate(logits[i : i + 1], size=im.shape[:2], mode="bilinear", align_corners=False)[0]
        p = torch.softmax(lg, dim=0)
        labels.append(p.argmax(0).to(torch.uint8).cpu().numpy())
        probs.append(p.cpu().numpy())
    return labels, probs


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def run_prediction(
    model_dir: str | Path,
    items: list[PredictItem],
    batch_size: int = 4,
    device: str = "auto",
    console: Console | None = None,
    progress: bool = True,
    box_threshold: float = 0.5,
) -> dict:
    """Predict every item and write its label map (and probabilities when `probs_out` is set, and the
    box-guided label map when `boxed_out` is set)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from b2p.student.checkpoint import load_student
    from b2p.student.model import describe_backbone
    from b2p.student.train import pick_device

    console = console or Console(stderr=True)
    dev = pick_device(device)
    model, ck = load_student(model_dir, dev)
    console.print(f"student from {ck['path']}: backbone {describe_backbone(model)}; {len(items)} images on {dev}")
    if batch_size < 1:
        raise B2PError(f"batch size must be at least 1, got {batch_size}")
    n_defect_px = rescued = n_boxes = 0
    with Progress(TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, disable=not progress) as bar:
        task = bar.add_task("predict", total=len(items))
        for chunk in _chunks(items, batch_size):
            imgs = [read_image(it.image_path) for it in chunk]
            labels, probs = predict_images(model, imgs, dev)
            for it, lm, pr in zip(chunk, labels, probs):
                write_label_map(it.label_out, lm)
                n_defect_px += int(np.count_nonzero(lm))
                if it.boxed_out is not None:
                    boxed, r = within_boxes(1.0 - pr[0], it.boxes_xyxy, it.box_classes, box_threshold)
                    write_label_map(it.boxed_out, boxed)
                    rescued += r
                    n_boxes += len(it.box_classes)
                if it.probs_out is not None:
                    with atomic_write(it.probs_out) as f:
                        np.savez_compressed(f, probs=pr.astype(np.float16), class_names=np.array(["background", *ck["class_names"]]))
            bar.advance(task, len(chunk))
    if n_boxes:
        console.print(
            f"box-guided masks for {n_boxes} boxes; {rescued} boxes had no pixel above p(defect) {box_threshold} "
            "and kept the student's best pixels in them"
        )
    return {"images": len(items), "defect_pixels": n_defect_px, "model": ck["path"], "boxes": n_boxes, "boxes_rescued": rescued}


def items_from_batches(
    batch_files: list[Path], split: str, out_root: str | Path, probs: bool, boxed_root: str | Path | None = None
) -> list[PredictItem]:
    """One item per image of `split` (train|val|test|all): ROOT/<batch>/labelmaps/<key>.png (+ probs/<key>.npz,
    + BOXED_ROOT/<batch>/labelmaps/<key>.png)."""
    if split not in ("train", "val", "test", "all"):
        raise B2PError(f"split must be train, val, test or all, got {split!r}")
    out = []
    for rec in load_batch_files_for_inference(batch_files, split):
        lp = label_map_path(out_root, rec.batch, rec.file_name)
        pp = Path(out_root) / rec.batch / "probs" / f"{label_map_key(rec.file_name)}.npz" if probs else None
        bp = label_map_path(boxed_root, rec.batch, rec.file_name) if boxed_root is not None else None
        out.append(PredictItem(rec.path, lp, pp, rec.boxes_xyxy(), rec.box_class_ids(), bp))
    return out


def items_from_folder(images_dir: str | Path, out_dir: str | Path, probs: bool) -> list[PredictItem]:
    """Every image under `images_dir` (recursively) -> OUT/<key>.png (+ OUT/probs/<key>.npz)."""
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    if not images_dir.is_dir():
        raise B2PError("image folder not found", images_dir)
    files = sorted(p for p in images_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise B2PError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) in this folder", images_dir)
    out = []
    for f in files:
        key = label_map_key(f.relative_to(images_dir).as_posix())
        out.append(PredictItem(f, out_dir / f"{key}.png", out_dir / "probs" / f"{key}.npz" if probs else None))
    return out
