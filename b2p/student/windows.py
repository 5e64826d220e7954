"""The sliding-window prediction of a student, in numpy only: the one implementation that `b2p predict`
(torch) and the ONNX runtime (b2p/deploy, no torch) share. The network itself is a callable passed in.

An HxWx3 uint8 RGB image is mapped to the model's geometry (geometry.py: resized to `scale`, padded to the
backbone's multiple and to at least one training tile), cut into square windows of `window` px (at least
the training tile, at most the padded image's shorter side) that overlap by `overlap` (a fraction of the
window), each normalised with the backbone's statistics and run through the network. Each window's logits
are weighted by a separable ramp that falls linearly over the overlap but never reaches zero, summed at model
scale in float32, divided by the summed weights (so a pixel seen by one window gets exactly that window's
logits), and mapped back to the image (padding cropped, bilinear). Test-time flips average the logits of
the image and its flips, each flipped back. Probabilities are their softmax over the classes.

Memory is bounded by the model-scale logit canvas plus `tile_batch` windows, whatever the image size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from b2p.errors import B2PError
from b2p.student.geometry import Geometry

DEFAULT_OVERLAP = 0.25  # of the window side
DEFAULT_TILE_BATCH = 4  # windows per forward pass: bounds activation memory
# prediction window side at model scale (rounded up to the model's multiple, at least its tile): a large
# window computes fewer pixels twice. Not for a strip-context model: its row / column means span its
# window, so it predicts best in windows of the tile it was trained on (`WindowModel.nominal_window`)
DEFAULT_WINDOW = 512
# test-time augmentation: name -> the views averaged, each the image axes flipped (0 rows, 1 columns;
# () = the image as is); a view's logits are flipped back along the same axes (+1: the class axis first)
TTA_MODES: dict[str, list[tuple[int, ...]]] = {"none": [()], "flips": [(), (1,), (0,), (0, 1)]}

# forward(normalised windows Bx3xTxT float32, edge rows BxT float32, edge cols BxT float32) ->
# fine-head logits Bx(K+1)xTxT float32
Forward = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def check_overlap(overlap: float) -> float:
    if not 0.0 <= overlap < 1.0:
        raise B2PError(f"overlap is a fraction of the tile in [0, 1), got {overlap}")
    return float(overlap)


def overlap_px(tile: int, overlap: float) -> int:
    """Overlap as a fraction of the tile -> pixels."""
    return int(round(check_overlap(overlap) * tile))


def check_tta(tta: str) -> str:
    if tta not in TTA_MODES:
        raise B2PError(f"test-time augmentation must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    return tta


def check_tile_batch(tile_batch: int) -> int:
    if tile_batch < 1:
        raise B2PError(f"tiles per forward pass must be at least 1, got {tile_batch}")
    return int(tile_batch)


def blend_window(tile: int, ramp: int) -> np.ndarray:
    """tile x tile float32 weights: 1 inside, falling linearly to 1/(ramp+1) over `ramp` px at each edge.

    Never zero, so every pixel of the canvas has weight; separable, so overlapping tiles cross-fade along
    both axes. ramp 0: all ones (plain averaging)."""
    i = np.arange(tile, dtype=np.float32)
    r = np.float32(max(int(ramp), 0) + 1)
    w1 = np.minimum(np.minimum(i + 1, tile - i), r) / r
    return w1[:, None] * w1[None, :]


def normalise(img: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """HxWx3 uint8 RGB -> 3xHxW float32, (x / 255 - mean) / std (bit for bit what training feeds)."""
    x = np.ascontiguousarray(img).transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    return (x - np.asarray(mean, np.float32).reshape(3, 1, 1)) / np.asarray(std, np.float32).reshape(3, 1, 1)


@dataclass(frozen=True)
class WindowModel:
    """What the sliding window needs to know of a student: its geometry, statistics and inputs.

    `strip_context`: the student's strip context means span its input (its default window is its tile);
    `edges`: it reads each window row's / column's distance to the image edges (model.StripContext)."""

    scale: float
    max_side: int | None
    multiple: int
    tile_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    strip_context: bool = False
    edges: bool = False

    @classmethod
    def of_config(cls, c) -> WindowModel:
        """From a StudentConfig (or anything with its fields)."""
        return cls(float(c.scale), c.max_side, int(c.multiple), int(c.tile_size), tuple(c.mean), tuple(c.std), c.context == "strip", bool(c.edges))

    def geometry(self, height: int, width: int) -> Geometry:
        """The geometry the model was trained in, for an HxW image."""
        return Geometry.for_image(height, width, scale=self.scale, max_side=self.max_side, multiple=self.multiple)

    def nominal_window(self, window: int | None = None) -> int:
        """The prediction window side (model px): `window`, else the training tile for a strip-context model and
        DEFAULT_WINDOW for any other, rounded up to the model's multiple and never below its training tile.

        Why the tile: a strip-context model's row, column and image means are taken over its input, so a larger
        window shows it statistics over a wider area than any it was trained on, and scores drop (measured on
        calib: docs/student.md)."""
        if window is None:
            window = self.tile_size if self.strip_context else DEFAULT_WINDOW
        w = int(window)
        if w < 1:
            raise B2PError(f"the prediction window must be a positive number of pixels, got {window}")
        return max(self.tile_size, -(-w // self.multiple) * self.multiple)

    def window_for(self, window: int | None, height: int, width: int) -> int:
        """The window an HxW image is predicted in: `nominal_window`, capped by the image's padded model-scale
        canvas (a window never pads a small or elongated image further), never below the training tile."""
        padded = self.geometry(height, width).padded_size(self.tile_size)
        return max(self.tile_size, min(self.nominal_window(window), *padded))


def check_image(img: np.ndarray) -> None:
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise B2PError(f"expected an HxWx3 uint8 RGB image, got {img.shape} {img.dtype}")


def view_logits(forward: Forward, img: np.ndarray, wm: WindowModel, overlap: float, tile_batch: int, window: int | None) -> np.ndarray:
    """(K+1)xHxW float32 logits of one view (the image as given): the sliding window at the training geometry."""
    geo = wm.geometry(img.shape[0], img.shape[1])
    # the canvas is padded as in training (to at least one tile); the square window never exceeds it, so a
    # large window never pads a small or elongated image further
    canvas, _ = geo.image_to_model(img, min_side=wm.tile_size)  # HpxWpx3 uint8: resized, padded
    tile = wm.window_for(window, *img.shape[:2])
    ov = overlap_px(tile, overlap)
    origins = geo.tile_origins(tile, ov, min_side=wm.tile_size)
    ramp = blend_window(tile, ov)
    ramp64 = ramp.astype(np.float64)
    hp, wp = canvas.shape[:2]
    er, ec = geo.edge_distance(wm.tile_size)  # each model row's / column's distance to the image edges
    acc = wsum = None
    for i in range(0, len(origins), tile_batch):
        chunk = origins[i : i + tile_batch]
        tiles = np.stack([normalise(canvas[y0 : y0 + tile, x0 : x0 + tile], wm.mean, wm.std) for y0, x0 in chunk])
        rows = np.stack([er[y0 : y0 + tile] for y0, _ in chunk])
        cols = np.stack([ec[x0 : x0 + tile] for _, x0 in chunk])
        logits = np.asarray(forward(tiles, rows, cols), dtype=np.float32)
        if logits.ndim != 4 or logits.shape[0] != len(chunk) or logits.shape[2:] != (tile, tile):
            raise B2PError(f"the network returned logits of shape {logits.shape} for {len(chunk)} windows of {tile} px")
        if acc is None:
            acc = np.zeros((logits.shape[1], hp, wp), np.float32)
            wsum = np.zeros((hp, wp), np.float32)
        for (y0, x0), lg in zip(chunk, logits):
            # acc + lg * ramp rounded once, as a fused multiply-add (the float64 product of two float32 is
            # exact): the sum torch's addcmul gave `b2p predict` before this module, so its outputs stay the same
            a = acc[:, y0 : y0 + tile, x0 : x0 + tile]
            np.add(a, lg * ramp64, out=a, casting="same_kind", dtype=np.float64)
            wsum[y0 : y0 + tile, x0 : x0 + tile] += ramp
    del canvas
    acc /= wsum
    return geo.logits_to_image(acc)


def image_logits(
    forward: Forward,
    img: np.ndarray,
    wm: WindowModel,
    overlap: float = DEFAULT_OVERLAP,
    tile_batch: int = DEFAULT_TILE_BATCH,
    window: int | None = None,
    tta: str = "none",
) -> np.ndarray:
    """Fine-head logits (K+1)xHxW float32 of an HxWx3 uint8 RGB image, at the image's size.

    `tta` "flips": the mean of the logits of the image and its horizontal, vertical and double flip, each
    flipped back (TTA_MODES)."""
    check_image(img)
    check_tile_batch(tile_batch)
    views = TTA_MODES[check_tta(tta)]
    acc = view_logits(forward, img, wm, overlap, tile_batch, window)  # every mode starts with the image as is
    for axes in views[1:]:
        lg = view_logits(forward, np.ascontiguousarray(np.flip(img, axis=axes)), wm, overlap, tile_batch, window)
        acc += np.flip(lg, axis=tuple(a + 1 for a in axes))
    if len(views) > 1:
        acc /= np.float32(len(views))
    return acc


def softmax_(logits: np.ndarray, exp: Callable[[np.ndarray], object] | None = None) -> np.ndarray:
    """Class probabilities of (K+1)xHxW logits, in place (on a multi-megapixel image every extra copy is
    hundreds of MB); returns the same array. `exp` exponentiates an array in place (default numpy's): torch's
    differs from numpy's in the last bit, and `b2p predict` keeps torch's so its probabilities stay the same."""
    logits -= logits.max(0, keepdims=True)
    if exp is None:
        np.exp(logits, out=logits)
    else:
        exp(logits)
    logits /= logits.sum(0, keepdims=True)
    return logits


def class_map(scores: np.ndarray) -> np.ndarray:
    """HxW uint8: the per-pixel class of (K+1)xHxW logits or probabilities, ties to the first class (argmax).
    One comparison per class: several times faster than argmax over the leading axis of a large image."""
    best = scores[0].copy()
    out = np.zeros(best.shape, np.uint8)
    for k in range(1, scores.shape[0]):
        better = scores[k] > best
        out[better] = k
        np.maximum(best, scores[k], out=best)
    return out


def image_probs(
    forward: Forward,
    img: np.ndarray,
    wm: WindowModel,
    overlap: float = DEFAULT_OVERLAP,
    tile_batch: int = DEFAULT_TILE_BATCH,
    window: int | None = None,
    tta: str = "none",
    exp: Callable[[np.ndarray], object] | None = None,
) -> np.ndarray:
    """(K+1)xHxW float32 class probabilities (background first) of an HxWx3 uint8 RGB image."""
    return softmax_(image_logits(forward, img, wm, overlap, tile_batch, window, tta), exp)
