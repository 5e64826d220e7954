"""The one place that maps image <-> model coordinates for the student (training, prediction, caches).

An image of HxW pixels is seen by the model at `scale` model px per image px (1.0 = native resolution:
defects keep their real width), resized with its aspect ratio kept, then padded at the bottom and right up
to a multiple of `multiple` (the backbone's deepest stride, 32 for the CNN, the patch size 14 for DINOv2)
and to at least `min_side` (the tile size: an image smaller than a tile is padded, never stretched).

    model (y, x) = image (y, x) * (sy, sx),  sy = hs / H, sx = ws / W   (hs, ws = round(H*scale), round(W*scale))

The per-axis factors (sy, sx) are the exact ones of the resized raster, so boxes, masks and logits line
up with the resized image even though rounding makes them differ slightly from `scale`. Padding is marked
by `valid` = False and by the label IGNORE in targets: losses and scores skip it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from b2p.errors import B2PError

IGNORE = -1  # target label of padding (and of anything else no loss may see)


def round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


@dataclass(frozen=True)
class Geometry:
    """Image <-> model mapping of one image. Shapes: images HxWx3 uint8, labels HxW, boxes Nx4 XYXY pixels."""

    height: int  # original image size
    width: int
    scale: float  # model px per image px (1.0 = native resolution)
    multiple: int = 32  # model-space sides padded up to a multiple of this

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise B2PError(f"image size must be positive, got {self.width}x{self.height}")
        if not self.scale > 0:
            raise B2PError(f"scale must be positive, got {self.scale}")
        if self.multiple < 1:
            raise B2PError(f"multiple must be at least 1, got {self.multiple}")

    @classmethod
    def for_image(
        cls, height: int, width: int, scale: float | None = 1.0, max_side: int | None = None, multiple: int = 32
    ) -> Geometry:
        """The geometry of an HxW image at `scale` (None: 1.0), capped so the longer scaled side is at most
        `max_side` (huge images). The cap only ever shrinks: nothing is upscaled unless scale > 1 is asked."""
        s = 1.0 if scale is None else float(scale)
        if max_side is not None:
            if max_side < 1:
                raise B2PError(f"max_side must be at least 1, got {max_side}")
            s = min(s, max_side / max(height, width))
        return cls(int(height), int(width), s, int(multiple))

    # --- sizes ---
    @property
    def scaled_size(self) -> tuple[int, int]:
        """(hs, ws): the resized image, before padding."""
        return max(1, round(self.height * self.scale)), max(1, round(self.width * self.scale))

    @property
    def factors(self) -> tuple[float, float]:
        """(sy, sx): exact model px per image px along each axis."""
        hs, ws = self.scaled_size
        return hs / self.height, ws / self.width

    @property
    def is_identity(self) -> bool:
        return self.scaled_size == (self.height, self.width)

    def padded_size(self, min_side: int = 0) -> tuple[int, int]:
        """(hp, wp): >= the scaled size and >= min_side, each a multiple of `multiple`."""
        hs, ws = self.scaled_size
        return round_up(max(hs, min_side), self.multiple), round_up(max(ws, min_side), self.multiple)

    # --- image -> model ---
    def _pad(self, arr: np.ndarray, min_side: int, fill) -> np.ndarray:
        hp, wp = self.padded_size(min_side)
        out = np.full((hp, wp, *arr.shape[2:]), fill, dtype=arr.dtype)
        out[: arr.shape[0], : arr.shape[1]] = arr
        return out

    def valid_mask(self, min_side: int = 0) -> np.ndarray:
        """HpxWp bool: True on real (resized) image pixels, False on padding."""
        hs, ws = self.scaled_size
        v = np.zeros(self.padded_size(min_side), dtype=bool)
        v[:hs, :ws] = True
        return v

    def edge_distance(self, min_side: int = 0, flip: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(Hp float32, Wp float32): each model-space row's (column's) distance in model px to the nearer of
        the image's top and bottom (left and right) edges, 0 on the edge rows and on padding; `flip` (bit 0
        left-right, bit 1 up-down) as the view was flipped. Symmetric, so a flipped view's distances are its
        own rows' distances."""
        hs, ws = self.scaled_size
        hp, wp = self.padded_size(min_side)

        def dist(n_pad: int, n: int, flipped: bool) -> np.ndarray:
            i = np.arange(n_pad)
            i = n_pad - 1 - i if flipped else i
            return np.clip(np.minimum(i, n - 1 - i), 0, None).astype(np.float32)

        return dist(hp, hs, bool(flip & 2)), dist(wp, ws, bool(flip & 1))

    def _check_hw(self, arr: np.ndarray, what: str) -> None:
        if arr.shape[:2] != (self.height, self.width):
            raise B2PError(f"{what} is {arr.shape[1]}x{arr.shape[0]}, the geometry is for {self.width}x{self.height}")

    def resize_image(self, img: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> hs x ws x 3 uint8 (INTER_AREA when shrinking: no aliasing; INTER_LINEAR when growing)."""
        import cv2

        self._check_hw(img, "image")
        if self.is_identity:
            return np.ascontiguousarray(img)
        hs, ws = self.scaled_size
        shrink = hs * ws < self.height * self.width
        return cv2.resize(img, (ws, hs), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)

    def image_to_model(self, img: np.ndarray, min_side: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """HxWx3 uint8 -> (HpxWpx3 uint8 resized and zero-padded bottom/right, HpxWp bool valid)."""
        return self._pad(self.resize_image(img), min_side, 0), self.valid_mask(min_side)

    def labels_to_model(self, labels: np.ndarray, min_side: int = 0) -> np.ndarray:
        """HxW label map (0 background, 1..K defects) -> HpxWp int64, IGNORE in the padding.

        Scale 1: an exact copy. Growing: nearest neighbour. Shrinking keeps thin defects: with c the share of
        a model pixel's footprint covered by defect, the pixel is defect where c >= 0.5 (the majority) or where
        c > 0 is a local maximum of c in its 3x3 neighbourhood (the ridge of a line thinner than one model
        pixel, which a majority or nearest-neighbour rule would erase). Its class is the defect class with the
        largest cover.
        """
        import cv2

        self._check_hw(labels, "label map")
        labels = np.asarray(labels)
        hs, ws = self.scaled_size
        if self.is_identity:
            out = labels.astype(np.int64)
        elif hs * ws >= self.height * self.width:
            out = cv2.resize(labels.astype(np.uint8), (ws, hs), interpolation=cv2.INTER_NEAREST).astype(np.int64)
        else:
            out = np.zeros((hs, ws), dtype=np.int64)
            classes = [int(c) for c in np.unique(labels) if c > 0]
            if classes:
                covers = np.stack(
                    [cv2.resize((labels == c).astype(np.float32), (ws, hs), interpolation=cv2.INTER_AREA) for c in classes]
                )
                total = covers.sum(0)
                ridge = (total > 1e-6) & (total >= cv2.dilate(total, np.ones((3, 3), np.uint8)) - 1e-6)
                defect = (total >= 0.5 - 1e-6) | ridge
                out[defect] = np.asarray(classes, dtype=np.int64)[covers.argmax(0)][defect]
        return self._pad(out, min_side, IGNORE)

    def boxes_to_model(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """Nx4 XYXY image pixels -> Nx4 float64 XYXY model pixels (same continuous box, scaled per axis)."""
        b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
        sy, sx = self.factors
        return b * np.array([sx, sy, sx, sy])

    def box_mask_to_model(self, boxes_xyxy: np.ndarray, min_side: int = 0) -> np.ndarray:
        """HpxWp bool: model pixels inside at least one box, with b2p.boxes.box_pixel_bounds' pixel rule
        (floor the start, ceil the end) applied in model space, so a thin box keeps at least one pixel."""
        from b2p.boxes import box_pixel_bounds

        m = np.zeros(self.padded_size(min_side), dtype=bool)
        for box in self.boxes_to_model(boxes_xyxy):
            x0, y0, x1, y1 = box_pixel_bounds(box, self.scaled_size)
            m[y0:y1, x0:x1] = True
        return m

    # --- model -> image ---
    def logits_to_image(self, logits: np.ndarray) -> np.ndarray:
        """CxHpxWp (or BxCxHpxWp) float model-space logits -> CxHxW (BxCxHxW) float32: padding cropped,
        bilinear to the image (`resize_bilinear`). At identity scale the result is a view of `logits`."""
        x = np.asarray(logits)
        hs, ws = self.scaled_size
        if x.ndim not in (3, 4):
            raise B2PError(f"logits must be CxHxW or BxCxHxW, got shape {x.shape}")
        if x.shape[-2] < hs or x.shape[-1] < ws:
            raise B2PError(f"logits of {tuple(x.shape[-2:])} do not cover the scaled image {hs}x{ws}")
        x = x[..., :hs, :ws]
        if self.is_identity:
            return x
        if x.ndim == 4:
            return np.stack([resize_bilinear(b, (self.height, self.width)) for b in x])
        return resize_bilinear(x, (self.height, self.width))

    def mask_to_image(self, mask: np.ndarray) -> np.ndarray:
        """HpxWp (or hs x ws) model-space mask/labels -> HxW by nearest neighbour (for display and tests)."""
        import cv2

        hs, ws = self.scaled_size
        m = np.asarray(mask)[:hs, :ws]
        if self.is_identity:
            return m.copy()
        return cv2.resize(m.astype(np.uint8), (self.width, self.height), interpolation=cv2.INTER_NEAREST).astype(mask.dtype)

    # --- tiles ---
    def tile_origins(self, tile: int, overlap: int = 0, min_side: int = 0) -> list[tuple[int, int]]:
        """(y0, x0) of tile x tile windows covering the padded image (padded to at least `tile`).

        Along each axis the step is tile - overlap rounded down to a multiple of `multiple` (so origins stay on
        the backbone's stride grid and cached features crop exactly); the last window sits flush with the
        border. `tile` must be a multiple of `multiple`.
        """
        if tile < self.multiple or tile % self.multiple:
            raise B2PError(f"tile size {tile} must be a positive multiple of {self.multiple}")
        if not 0 <= overlap < tile:
            raise B2PError(f"tile overlap must be in [0, {tile}), got {overlap}")
        hp, wp = self.padded_size(max(min_side, tile))
        step = max(self.multiple, (tile - overlap) // self.multiple * self.multiple)

        def axis(n: int) -> list[int]:
            starts = list(range(0, n - tile, step))
            return starts + [n - tile]

        return [(y, x) for y in axis(hp) for x in axis(wp)]


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(first source index, second, their weights) of each output index: half-pixel centres, as torch's
    bilinear interpolation with align_corners=False (its float32 arithmetic, so the two agree to ~1e-7)."""
    scale = np.float32(n_in / n_out)
    src = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    return i0, i1, (np.float32(1) - w1), w1


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """CxHxW float -> CxH'xW' float32 by bilinear interpolation (align_corners False, no antialiasing: the
    way the network's own logits are resized), one channel at a time so memory stays at two planes."""
    h, w = size
    r0, r1, rw0, rw1 = _linear_taps(x.shape[-2], h)
    c0, c1, cw0, cw1 = _linear_taps(x.shape[-1], w)
    out = np.empty((x.shape[0], h, w), np.float32)
    for c in range(x.shape[0]):
        plane = np.asarray(x[c], dtype=np.float32)
        cols = plane[:, c0] * cw0 + plane[:, c1] * cw1  # H x W'
        out[c] = cols[r0] * rw0[:, None] + cols[r1] * rw1[:, None]
    return out
