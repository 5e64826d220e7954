"""Training data of the student: images, teacher label maps and box-union masks, plus a feature cache.

Every image is resized to the model's square input (bilinear; labels and box masks nearest), normalised
with the model's mean/std. Training may flip image, labels and box mask together (left-right and up-down,
each with probability 1/2): defects have no preferred orientation, and a few hundred images are few. The
box-union mask marks pixels inside any annotated box: outside it the pseudo-label is background with near
certainty (used by the `boxes` self-correction region).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from b2p.dataset import ImageRecord, load_batches
from b2p.errors import B2PError
from b2p.fileio import read_image
from b2p.labels import label_map_path, read_label_map


@dataclass
class Sample:
    record: ImageRecord
    label_path: Path | None  # teacher label map (None for pure inference)


def gather_samples(batch_files: list[Path], teacher_root: str | Path, splits: tuple[str, ...]) -> tuple[list[Sample], int]:
    """Images of `splits` in the batches with their teacher label maps; returns (samples, K + 1).

    A missing teacher label map is an error that names the file and the command that makes it.
    """
    batches = load_batches(batch_files)
    num_classes = max(b.classes.num_classes for b in batches) + 1
    out = []
    for b in batches:
        for rec in b.split(*splits):
            p = label_map_path(teacher_root, b.name, rec.file_name)
            if not p.is_file():
                raise B2PError(
                    f"no teacher label map for image {rec.file_name!r} of batch {b.name!r}; "
                    f"run `b2p teach {b.path}` (teacher root {teacher_root}) first",
                    p,
                )
            out.append(Sample(rec, p))
    return out, num_classes


def box_union_mask(rec: ImageRecord) -> np.ndarray:
    """HxW bool: pixels inside at least one box of the image (original resolution)."""
    m = np.zeros((rec.height, rec.width), dtype=bool)
    for x0, y0, x1, y1 in rec.boxes_xyxy():
        xa, ya = int(np.floor(x0)), int(np.floor(y0))
        xb, yb = int(np.ceil(x1)), int(np.ceil(y1))
        m[max(ya, 0) : max(yb, 0), max(xa, 0) : max(xb, 0)] = True
    return m


def prepare_image(img: np.ndarray, size: int, mean, std) -> torch.Tensor:
    """HxWx3 uint8 RGB -> 3xSxS float32 normalised tensor."""
    import cv2

    r = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR if min(img.shape[:2]) <= size else cv2.INTER_AREA)
    t = torch.from_numpy(r).permute(2, 0, 1).float().div_(255.0)
    return (t - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def resize_nearest(arr: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return cv2.resize(arr.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)


AUGMENTATIONS = ("none", "flips")


class StudentDataset(torch.utils.data.Dataset):
    """item i -> (image 3xSxS float32, target SxS int64, box mask SxS bool, index, flip code).

    The flip code (bit 0 left-right, bit 1 up-down) keys cached frozen-backbone features, which belong
    to the flipped image, not the original one.
    """

    def __init__(self, samples: list[Sample], size: int, mean, std, num_classes: int, augment: str = "none"):
        if augment not in AUGMENTATIONS:
            raise B2PError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
        self.samples, self.size, self.mean, self.std, self.num_classes = samples, size, mean, std, num_classes
        self.augment = augment

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        img = read_image(s.record.path)
        if img.shape[:2] != (s.record.height, s.record.width):
            raise B2PError(
                f"image is {img.shape[1]}x{img.shape[0]} but its annotation file says {s.record.width}x{s.record.height}",
                s.record.path,
            )
        lm = read_label_map(s.label_path, shape=img.shape[:2], num_classes=self.num_classes - 1)
        x = prepare_image(img, self.size, self.mean, self.std)
        y = torch.from_numpy(resize_nearest(lm, self.size).astype(np.int64))
        bm = torch.from_numpy(resize_nearest(box_union_mask(s.record), self.size).astype(bool))
        code = 0
        if self.augment == "flips":
            # torch's global generator: seeded by the trainer, so a run is reproducible
            for bit, dim in ((1, -1), (2, -2)):
                if bool(torch.rand(()) < 0.5):
                    x, y, bm = x.flip(dim), y.flip(dim), bm.flip(dim)
                    code |= bit
        return x, y, bm, i, code


class FeatureCache:
    """Frozen-backbone features per image, in memory and optionally on disk.

    Key: image content (sha256) + a fingerprint of the backbone (its name, taps, input size and a hash of
    its weights), so a changed backbone never reuses stale features. Stored as float16 to halve memory.
    """

    def __init__(self, fingerprint: str, disk_dir: str | Path | None = None):
        self.fingerprint = fingerprint
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self.mem: dict[str, list[torch.Tensor]] = {}
        self.hits = self.misses = 0

    def _key(self, image_sha: str) -> str:
        return hashlib.sha1(f"{image_sha}:{self.fingerprint}".encode()).hexdigest()

    def get(self, image_sha: str) -> list[torch.Tensor] | None:
        k = self._key(image_sha)
        if k in self.mem:
            self.hits += 1
            return self.mem[k]
        if self.disk_dir is not None:
            p = self.disk_dir / f"{k}.pt"
            if p.is_file():
                try:
                    feats = torch.load(p, map_location="cpu", weights_only=True)
                    self.mem[k] = feats
                    self.hits += 1
                    return feats
                except Exception:  # a damaged cache file is recomputed, never trusted
                    pass
        self.misses += 1
        return None

    def put(self, image_sha: str, feats: list[torch.Tensor]) -> None:
        import io

        from b2p.fileio import write_bytes_atomic

        k = self._key(image_sha)
        feats = [f.detach().to("cpu", torch.float16).contiguous() for f in feats]
        self.mem[k] = feats
        if self.disk_dir is not None:
            buf = io.BytesIO()
            torch.save(feats, buf)
            write_bytes_atomic(self.disk_dir / f"{k}.pt", buf.getvalue())


def backbone_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the backbone's identity: config fields that shape the features and its weights."""
    h = hashlib.sha1()
    c = model.config
    h.update(f"{c.backbone}|{c.taps}|{c.input_size}|{c.mean}|{c.std}|{c.dinov2_config}".encode())
    for name, t in sorted(model.backbone.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(-1)[:4096].float().numpy().tobytes())
        h.update(str(tuple(t.shape)).encode())
    return h.hexdigest()[:16]


def load_batch_files_for_inference(batch_files: list[Path], split: str) -> list[ImageRecord]:
    splits = ("train", "val", "test", "calib") if split == "all" else (split,)
    return [rec for b in load_batches(batch_files) for rec in b.split(*splits)]
