"""Training data of the student: tiles of images, teacher label maps and box masks, plus a feature cache.

Geometry (geometry.py): every image is seen at the training scale (1.0 = its native resolution), aspect
ratio kept, padded bottom/right to a multiple of the backbone's stride and to at least one tile; padding is
IGNORE in the target and False in `valid`. Training draws `crops_per_image` square tiles per image and
epoch: a share `box_crop_fraction` centred (with jitter) on a random box, so sparse defects are seen, the
rest uniform anywhere, defect-free images included. Training may flip the whole model-space image, labels
and box mask together (left-right and up-down, each with probability 1/2) before cropping: defects have no
preferred orientation. Validation uses whole images in the same geometry. The box-union mask marks pixels
inside any annotated box: outside it the pseudo-label is background with near certainty (used by the
`boxes` self-correction region).

A batch is a dict (see `collate`): image Bx3xTxT float (normalised), target BxTxT int64 (IGNORE = -1 on
padding), valid BxTxT bool, box_mask BxTxT bool, boxes: B float tensors Nx6 (x0, y0, x1, y1 in tile pixels
clipped to the tile, class id, 1.0 when the tile border cut the box), index, flip (bit 0 left-right, bit 1
up-down), origin Bx2 (y0, x0 of the tile in the flipped model-space image).
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
from b2p.student.geometry import Geometry

@dataclass
class Sample:
    record: ImageRecord
    label_path: Path | None  # teacher label map (None for pure inference)


def gather_samples(batch_files: list[Path], teacher_root: str | Path, splits: tuple[str, ...]) -> tuple[list[Sample], int]:
    """Images of `splits` in the batches with their teacher label maps; returns (samples, K + 1).

    A missing teacher label map is an error that names the file and the command that makes it, and so is
    a teacher root made for other images of a batch (`check_teacher_root`).
    """
    from b2p.teach.base import check_teacher_root

    batches = load_batches(batch_files)
    num_classes = max(b.classes.num_classes for b in batches) + 1
    out = []
    for b in batches:
        check_teacher_root(teacher_root, b)
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


def normalise(img: np.ndarray, mean, std) -> torch.Tensor:
    """HxWx3 uint8 RGB -> 3xHxW float32 tensor, (x / 255 - mean) / std (windows.normalise, the one definition)."""
    from b2p.student.windows import normalise as normalise_np

    return torch.from_numpy(normalise_np(img, mean, std))


def prepare_image(img: np.ndarray, size: int, mean, std) -> torch.Tensor:
    """LEGACY (model.pt version 1): HxWx3 uint8 RGB squashed to a SxS square, normalised."""
    import cv2

    r = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR if min(img.shape[:2]) <= size else cv2.INTER_AREA)
    return normalise(r, mean, std)


AUGMENTATIONS = ("none", "flips")


@dataclass(frozen=True)
class TileSampling:
    """How training tiles are drawn (the `train:` keys of the same names)."""

    tile: int  # tile side at model scale
    box_crop_fraction: float = 0.5  # share of tiles centred (with jitter) on a random box
    crops_per_image: int = 1  # tiles per image per epoch
    origin_step: int = 1  # tile origins on this grid (the backbone's stride when features are cached)

    def __post_init__(self) -> None:
        if not 0.0 <= self.box_crop_fraction <= 1.0:
            raise B2PError(f"box_crop_fraction must be in [0, 1], got {self.box_crop_fraction}")
        if self.crops_per_image < 1:
            raise B2PError(f"crops_per_image must be at least 1, got {self.crops_per_image}")
        if self.origin_step < 1 or self.tile % self.origin_step:
            raise B2PError(f"tile size {self.tile} must be a multiple of the origin step {self.origin_step}")


def _flip_boxes(boxes: np.ndarray, code: int, hp: int, wp: int) -> np.ndarray:
    b = boxes.copy()
    if code & 1:
        b[:, [0, 2]] = wp - boxes[:, [2, 0]]
    if code & 2:
        b[:, [1, 3]] = hp - boxes[:, [3, 1]]
    return b


READ_CACHE_BYTES = 512 * 2**20  # decoded images and label maps a dataset keeps in memory (StudentDataset.read)


class StudentDataset(torch.utils.data.Dataset):
    """Model-space views of the samples: training tiles (`sampling` given) or whole padded images (None).

    item -> dict (see the module docstring; `collate` stacks them). Whole images are padded to at least
    one tile when `min_side` is given, so they share the geometry (and cached features) of training.
    """

    def __init__(
        self,
        samples: list[Sample],
        mean,
        std,
        num_classes: int,
        scale: float = 1.0,
        max_side: int | None = None,
        multiple: int = 32,
        sampling: TileSampling | None = None,
        augment: str = "none",
        min_side: int = 0,
    ):
        if augment not in AUGMENTATIONS:
            raise B2PError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
        self.samples, self.mean, self.std, self.num_classes = samples, mean, std, num_classes
        self.scale, self.max_side, self.multiple = scale, max_side, multiple
        self.sampling, self.augment = sampling, augment
        self.min_side = sampling.tile if sampling is not None else min_side
        if sampling is not None and sampling.tile % multiple:
            raise B2PError(f"tile size {sampling.tile} must be a multiple of {multiple}")
        self._decoded: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._decoded_bytes = 0

    def __len__(self) -> int:
        return len(self.samples) * (self.sampling.crops_per_image if self.sampling else 1)

    def geometry(self, i: int) -> Geometry:
        rec = self.samples[i].record
        return Geometry.for_image(rec.height, rec.width, self.scale, self.max_side, self.multiple)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(HxWx3 uint8 image, HxW uint8 teacher label map) of sample i, checked against its record.

        Kept decoded in memory up to READ_CACHE_BYTES (first come, no eviction): an epoch draws several tiles
        of every image, and decoding them again cost the demo's training 0.2 s an epoch. Read-only arrays:
        every caller resizes or pads into a new array, and one that wrote would fail loudly."""
        hit = self._decoded.get(i)
        if hit is not None:
            return hit
        img, lm = self._read(i)
        if self._decoded_bytes + img.nbytes + lm.nbytes <= READ_CACHE_BYTES:
            img.flags.writeable = lm.flags.writeable = False
            self._decoded[i] = (img, lm)
            self._decoded_bytes += img.nbytes + lm.nbytes
        return img, lm

    def _read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.samples[i]
        img = read_image(s.record.path)
        if img.shape[:2] != (s.record.height, s.record.width):
            raise B2PError(
                f"image is {img.shape[1]}x{img.shape[0]} but its annotation file says {s.record.width}x{s.record.height}",
                s.record.path,
            )
        return img, read_label_map(s.label_path, shape=img.shape[:2], num_classes=self.num_classes - 1)

    def model_image(self, i: int, code: int = 0) -> torch.Tensor:
        """3xHpxWp normalised whole model-space image of sample i, flipped by `code` (the feature cache's input)."""
        g = self.geometry(i)
        img, _ = g.image_to_model(self.read(i)[0], self.min_side)
        return _flip(normalise(img, self.mean, self.std), code)

    def draw_flip(self) -> int:
        code = 0
        if self.augment == "flips":
            # torch's global generator: seeded by the trainer, so a run is reproducible
            for bit in (1, 2):
                if bool(torch.rand(()) < 0.5):
                    code |= bit
        return code

    def draw_origin(self, hp: int, wp: int, boxes: np.ndarray) -> tuple[int, int]:
        """A tile origin in a HpxWp model image: around a random box (with jitter up to a quarter tile) with
        probability box_crop_fraction, else uniform; always on the origin grid and inside the image."""
        sp, t = self.sampling, self.sampling.tile
        step = sp.origin_step
        ny, nx = (hp - t) // step, (wp - t) // step  # last grid index; hp - t is on the grid (both multiples)
        if len(boxes) and bool(torch.rand(()) < sp.box_crop_fraction):
            b = boxes[int(torch.randint(len(boxes), ()))]
            jy, jx = ((torch.rand(2) - 0.5) * (t / 2)).tolist()
            cy, cx = (b[1] + b[3]) / 2 + jy, (b[0] + b[2]) / 2 + jx
            gy = min(max(round((cy - t / 2) / step), 0), ny)
            gx = min(max(round((cx - t / 2) / step), 0), nx)
        else:
            gy, gx = int(torch.randint(ny + 1, ())), int(torch.randint(nx + 1, ()))
        return gy * step, gx * step

    def draw(self, k: int) -> tuple[int, int, tuple[int, int]]:
        """The random part of item k: (sample index, flip code, tile origin), drawn from torch's global
        generator in the order `__getitem__` always drew them, without reading the image (distributed
        training draws every item of a global batch on every rank, and builds only its own share)."""
        i = k // self.sampling.crops_per_image if self.sampling else k
        code = self.draw_flip()
        if not self.sampling:
            return i, code, (0, 0)
        g = self.geometry(i)
        hp, wp = g.padded_size(self.min_side)
        boxes = _flip_boxes(g.boxes_to_model(self.samples[i].record.boxes_xyxy()), code, hp, wp)
        return i, code, self.draw_origin(hp, wp, boxes)

    def __getitem__(self, k: int | tuple[int, int, tuple[int, int]]) -> dict:
        """Item k, or the item of a plan `draw` made: (sample index, flip code, tile origin)."""
        i, code, (y0, x0) = k if isinstance(k, tuple) else self.draw(k)
        rec = self.samples[i].record
        g = self.geometry(i)
        img, lm = self.read(i)
        x, valid = g.image_to_model(img, self.min_side)
        y = g.labels_to_model(lm, self.min_side)
        bm = g.box_mask_to_model(rec.boxes_xyxy(), self.min_side)
        hp, wp = y.shape
        boxes = _flip_boxes(g.boxes_to_model(rec.boxes_xyxy()), code, hp, wp)
        x, y, valid, bm = (_flip_np(a, code) for a in (x, y, valid, bm))
        er, ec = g.edge_distance(self.min_side, code)
        if self.sampling:  # crop before normalising: a tile of a large image costs a tile
            t = self.sampling.tile
            x, y, valid, bm = (a[y0 : y0 + t, x0 : x0 + t] for a in (x, y, valid, bm))
            er, ec = er[y0 : y0 + t], ec[x0 : x0 + t]
        x = normalise(x, self.mean, self.std)
        y, valid, bm = (torch.from_numpy(np.ascontiguousarray(a)) for a in (y, valid, bm))
        return {
            "image": x,
            "target": y,
            "valid": valid,
            "edge_rows": torch.from_numpy(np.ascontiguousarray(er)),
            "edge_cols": torch.from_numpy(np.ascontiguousarray(ec)),
            "box_mask": bm,
            "boxes": tile_boxes(boxes, rec.box_class_ids(), (y0, x0), tuple(y.shape)),
            "index": i,
            "flip": code,
            "origin": (y0, x0),
        }


def _flip(t: torch.Tensor, code: int) -> torch.Tensor:
    """Flip a ...xHxW tensor by `code` (bit 0 left-right, bit 1 up-down)."""
    dims = [d for bit, d in ((1, -1), (2, -2)) if code & bit]
    return t.flip(dims) if dims else t


def _flip_np(a: np.ndarray, code: int) -> np.ndarray:
    """Flip an HxW[xC] array by `code` (a view)."""
    if code & 1:
        a = a[:, ::-1]
    if code & 2:
        a = a[::-1]
    return a


def tile_boxes(boxes: np.ndarray, class_ids: np.ndarray, origin: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Nx6 float32 (x0, y0, x1, y1, class id, clipped) of the model-space boxes that overlap the tile at
    `origin` (y0, x0) of `size` (h, w), in tile pixels clipped to it; clipped = 1.0 where the border cut a box."""
    oy, ox = origin
    h, w = size
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) - [ox, oy, ox, oy]
    c = np.stack([b[:, 0].clip(0, w), b[:, 1].clip(0, h), b[:, 2].clip(0, w), b[:, 3].clip(0, h)], 1)
    keep = (c[:, 2] > c[:, 0]) & (c[:, 3] > c[:, 1])
    clipped = (np.abs(c - b) > 1e-9).any(1)
    out = np.concatenate([c, np.asarray(class_ids, np.float64).reshape(-1, 1), clipped[:, None]], 1)[keep]
    return torch.from_numpy(out.astype(np.float32)).reshape(-1, 6)


def collate(items: list[dict]) -> dict:
    """Stack dataset items of one size (tiles; whole images grouped by `same_size_batches`) into a batch."""
    sizes = {tuple(it["target"].shape) for it in items}
    if len(sizes) != 1:
        raise B2PError(f"a batch must hold items of one size, got {sorted(sizes)}")
    return {
        **{k: torch.stack([it[k] for it in items]) for k in ("image", "target", "valid", "box_mask", "edge_rows", "edge_cols")},
        "boxes": [it["boxes"] for it in items],
        "index": torch.tensor([it["index"] for it in items]),
        "flip": torch.tensor([it["flip"] for it in items]),
        "origin": torch.tensor([it["origin"] for it in items]),
    }


def same_size_batches(ds: StudentDataset, batch_size: int) -> list[list[int]]:
    """Batches of dataset items whose whole padded images have one size (validation on whole images)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i in range(len(ds)):
        groups.setdefault(ds.geometry(i).padded_size(ds.min_side), []).append(i)
    return [g[j : j + batch_size] for _, g in sorted(groups.items()) for j in range(0, len(g), batch_size)]


class FeatureCache:
    """Frozen-backbone features per image, in memory and optionally on disk.

    Key: image content (sha256) + a fingerprint of the backbone (its name, taps, input statistics and a
    hash of its weights) + the view (`feature_view_key`: scale, padded size, flip), so a changed backbone
    or geometry never reuses stale features. Stored as float16 to halve memory. With tiles, an entry holds
    the features of the whole model-space image; `crop_features` cuts a tile's out of them.
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
    h.update(f"{c.backbone}|{c.taps}|{c.mean}|{c.std}|{c.dinov2_config}".encode())
    for name, t in sorted(model.backbone.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(-1)[:4096].float().numpy().tobytes())
        h.update(str(tuple(t.shape)).encode())
    return h.hexdigest()[:16]


def feature_view_key(image_sha: str, geometry: Geometry, min_side: int, flip: int) -> str:
    """The cache key part that names one view of an image: scale, padded model size and flip code."""
    hp, wp = geometry.padded_size(min_side)
    return f"{image_sha}|scale={geometry.scale:.6g}|{hp}x{wp}|flip={flip}"


def crop_features(feats: list[torch.Tensor], origin: tuple[int, int], size: tuple[int, int], padded: tuple[int, int]) -> list[torch.Tensor]:
    """A tile's share of whole-image features: each ...xhxw map of a HpxWp model image, cut at origin (y0, x0)
    and size (h, w) divided by the map's stride. Exact only on the stride grid (the dataset's origin grid)."""
    hp, wp = padded
    (oy, ox), (th, tw) = origin, size
    out = []
    for f in feats:
        sy, sx = hp // f.shape[-2], wp // f.shape[-1]
        if sy * f.shape[-2] != hp or sx * f.shape[-1] != wp or oy % sy or ox % sx or th % sy or tw % sx:
            raise B2PError(
                f"features of {tuple(f.shape[-2:])} for a {hp}x{wp} image cannot be cut exactly at {origin} for a {th}x{tw} tile"
            )
        out.append(f[..., oy // sy : (oy + th) // sy, ox // sx : (ox + tw) // sx])
    return out


def load_batch_files_for_inference(batch_files: list[Path], split: str) -> list[ImageRecord]:
    """The images of `split`: all, one split or a comma-separated list (splits.parse_splits)."""
    from b2p.splits import parse_splits

    return [rec for b in load_batches(batch_files) for rec in b.split(*parse_splits(split))]
