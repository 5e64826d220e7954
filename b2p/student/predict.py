"""Inference with a trained student: label maps at each image's original size (+ optional probabilities).

Sliding window at the training geometry (geometry.py): the image is resized to the model's `scale` (aspect
kept; 1.0 = native resolution), padded to the backbone's multiple and to at least one tile, and cut into
square windows of `window` px (default DEFAULT_WINDOW, the training tile for a strip-context model; at least
the training tile, at most the padded image's shorter side) that overlap by `overlap` (a fraction of the window). The network is fully
convolutional, so a window larger than the training tile sees the same scale with fewer borders and costs
fewer pixels than many overlapping tiles. Each window's logits are weighted by a separable ramp that falls
linearly over the overlap but never reaches zero, summed at model scale in float32, divided by the summed
weights (so a pixel seen by one window gets exactly that window's logits), and mapped back to the image
(padding cropped, bilinear). Memory is bounded by the model-scale logit canvas plus a few windows at a
time, whatever the image size; an image smaller than a tile is padded, never stretched.

LEGACY: models saved before issue 12 (model.pt version 1) were trained on images squashed to an
`input_size` square; they are still predicted that way (`_legacy_square_logits`), with their own statistics.

Box-guided masks (`within_boxes`): for images that carry box annotations the student can also turn each box
into a mask, the way a teacher does: the student's defect pixels inside the box, painted with the box's
class; outside every box, background. This is b2p's answer to "boxes in, pixel masks out" for the
annotated images themselves, and it is scored like a teacher (both see the same boxes).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from b2p.dataset import ImageRecord
from b2p.errors import B2PError
from b2p.fileio import read_json, sha256_file, write_bytes_atomic, write_json_atomic
from b2p.labels import label_map_key, label_map_path
from b2p.student.data import load_batch_files_for_inference, normalise, prepare_image
from b2p.student.geometry import Geometry
from b2p.student.model import class_map
from b2p.scale.engine import Engine
from b2p.student.predict_job import ImagePrediction, PredictJob, PredictTally
from b2p.student.snap import GMM_COMPONENTS, SnapSettings, check_snap
from b2p.student.manifest import MANIFEST, PREDICT_FORMAT, merged_manifest, prediction_model, read_prediction_manifest, run_key  # noqa: F401 (re-exported)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
DEFAULT_OVERLAP = 0.25  # of the tile side
DEFAULT_TILE_BATCH = 4  # windows per forward pass: bounds activation memory
# prediction window side at model scale (rounded up to the model's multiple, at least its tile): 512 px keeps
# a whole Magnetic-Tile image (up to ~600 px) in one or two windows: 1.4x faster than 128-px windows, and
# better on calib (README "Geometry"). Not for a strip-context model (below): its row / column means span
# its window, so it predicts best in windows of the tile it was trained on
DEFAULT_WINDOW = 512
# test-time augmentation: name -> the flips averaged (dims of a (K+1)xHxW logit map; () = the image as is)
TTA_MODES = {"none": [()], "flips": [(), (2,), (1,), (1, 2)]}
# inference arithmetic: float32 (the default; the README's figures unless said), bfloat16 autocast, or auto:
# bfloat16 where a CPU has it in hardware (AMX / AVX512-BF16), float32 elsewhere. On such a CPU bfloat16
# predicts 1.4-1.9x faster than float32 and moves under 0.1 % of the argmax labels
# (benchmarks/results_bench_inference_cpu.txt)
PRECISIONS = ("float32", "bfloat16", "auto")


# --probs files: (K+1)xHxW class probabilities quantised to uint8 (p * PROBS_SCALE, rounded), compressed:
# 1/255 is far below any threshold step b2p chooses, and uint8 writes 5x faster and 20x smaller than
# float16 (Magnetic-Tile: 44 kB vs 846 kB an image). Files written before hold float16 and still read.
PROBS_SCALE = 255


def encode_probs(probs: np.ndarray, class_names: list[str]) -> bytes:
    """The bytes of a --probs file of (K+1)xHxW float probabilities: np.savez_compressed's layout (np.load
    reads it), with a fixed time stamp on its members, so that the same probabilities give the same file."""
    import io
    import zipfile

    q = np.rint(np.clip(probs, 0.0, 1.0) * PROBS_SCALE).astype(np.uint8)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, arr in (("probs", q), ("scale", np.float32(PROBS_SCALE)), ("class_names", np.array(class_names))):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with z.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)
    return buf.getvalue()


def write_probs(path: Path, probs: np.ndarray, class_names: list[str]) -> None:
    """Write (K+1)xHxW float probabilities as a --probs file (atomically)."""
    write_bytes_atomic(path, encode_probs(probs, class_names))


def read_probs(path: Path) -> np.ndarray:
    """(K+1)xHxW float32 probabilities from a --probs file (uint8 + scale, or the float16 of older files)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            probs = z["probs"]
            scale = float(z["scale"]) if "scale" in z.files else None
    except (OSError, ValueError, KeyError) as e:
        raise B2PError(f"unreadable probabilities file ({e})", path) from None
    if probs.dtype == np.uint8:
        if not scale:
            raise B2PError("uint8 probabilities without their scale", path)
        return probs.astype(np.float32) / np.float32(scale)
    if probs.dtype not in (np.float16, np.float32):
        raise B2PError(f"probabilities of dtype {probs.dtype}: expected uint8 or float16", path)
    return probs.astype(np.float32)


@dataclass
class PredictItem:
    image_path: Path
    label_out: Path
    probs_out: Path | None
    boxes_xyxy: np.ndarray | None = None  # Nx4 annotated boxes (batches only)
    box_classes: np.ndarray | None = None  # N class ids
    boxed_out: Path | None = None  # box-guided label map
    snapped_out: Path | None = None  # label map snapped to the image (snap.py)
    record: ImageRecord | None = None  # the import record (batches): the image must still be the one imported


def within_boxes(
    p_defect: np.ndarray,
    boxes_xyxy: np.ndarray,
    class_ids: np.ndarray,
    threshold: float = 0.5,
    relative: float = 0.5,
    defect: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Box-guided label map from an HxW defect probability map; returns (label map, boxes rescued).

    Each box keeps its pixels with p(defect) > `threshold`, painted with the box's class (overlaps: the
    smaller mask wins, as for teachers). A box is an annotator's statement that a defect is there, so a box
    where the student finds nothing is never left empty: it keeps its pixels with p(defect) >= `relative`
    x the box's highest p(defect) (the student's best guess), and is counted as rescued.
    `defect` (HxW bool, e.g. the student's mask snapped to the image) replaces p(defect) > `threshold` as
    the pixels a box keeps; the rescue still ranks by p(defect).
    """
    from b2p.labels import paint_label_map
    from b2p.teach.base import box_pixel_bounds  # the same box pixels as the box teacher and box fill

    h, w = p_defect.shape
    masks, rescued = [], 0
    for box in np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4):
        xa, ya, xb, yb = box_pixel_bounds(box, (h, w))
        m = np.zeros((h, w), dtype=bool)
        inside = p_defect[ya:yb, xa:xb]
        keep = defect[ya:yb, xa:xb] if defect is not None else inside > threshold
        if inside.size and not keep.any():
            keep = inside >= relative * float(inside.max())
            rescued += 1
        m[ya:yb, xa:xb] = keep
        masks.append(m)
    return paint_label_map((h, w), masks, [int(c) for c in class_ids]), rescued


def blend_window(tile: int, ramp: int) -> torch.Tensor:
    """tile x tile float32 weights: 1 inside, falling linearly to 1/(ramp+1) over `ramp` px at each edge.

    Never zero, so every pixel of the canvas has weight; separable, so overlapping tiles cross-fade along
    both axes. ramp 0: all ones (plain averaging)."""
    i = torch.arange(tile, dtype=torch.float32)
    r = max(int(ramp), 0) + 1
    w1 = torch.minimum(torch.minimum(i + 1, tile - i), torch.tensor(float(r))) / r
    return w1[:, None] * w1[None, :]


def check_overlap(overlap: float) -> float:
    if not 0.0 <= overlap < 1.0:
        raise B2PError(f"overlap is a fraction of the tile in [0, 1), got {overlap}")
    return float(overlap)


def overlap_px(tile: int, overlap: float) -> int:
    """Overlap as a fraction of the tile -> pixels."""
    return int(round(check_overlap(overlap) * tile))


def window_of(model: torch.nn.Module, window: int | None = None) -> int:
    """The prediction window side (model px): `window`, else the training tile for a strip-context model and
    DEFAULT_WINDOW for any other, rounded up to the model's multiple and never below its training tile.

    Why the tile: a strip-context model's row, column and image means are taken over its input, so a larger
    window shows it statistics over a wider area than any it was trained on (Magnetic-Tile calib, b2p-lite
    on 256 px tiles: binary IoU 0.691 in 256 px windows vs 0.665 in 384-512 px ones, seed 1; 0.669 vs 0.658,
    seed 2)."""
    c = model.config
    if window is None:
        window = c.tile_size if c.context == "strip" else DEFAULT_WINDOW
    w = int(window)
    if w < 1:
        raise B2PError(f"the prediction window must be a positive number of pixels, got {window}")
    return max(c.tile_size, -(-w // c.multiple) * c.multiple)


def window_for(model: torch.nn.Module, window: int | None, height: int, width: int) -> int:
    """The window an HxW image is predicted in: `window_of`, capped by the image's padded model-scale canvas
    (a window never pads a small or elongated image further), never below the training tile."""
    c = model.config
    return max(c.tile_size, min(window_of(model, window), *geometry_of(model, height, width).padded_size(c.tile_size)))


def geometry_of(model: torch.nn.Module, height: int, width: int) -> Geometry:
    """The geometry `model` was trained in, for an HxW image."""
    c = model.config
    return Geometry.for_image(height, width, scale=c.scale, max_side=c.max_side, multiple=c.multiple)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise B2PError(f"inference precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def inference_setup(model: torch.nn.Module, device: torch.device, precision: str = "float32") -> tuple[contextlib.AbstractContextManager, str]:
    """(the context to run the model in, the precision it runs at: float32 or bfloat16) for `precision`.

    On a CPU the model goes NHWC (channels_last): oneDNN's convolutions are faster in that layout and give the
    same logits up to float rounding (about 1e-5). bfloat16 where it would be emulated (a CPU without it in
    hardware: slower than float32) or unsupported (an older GPU) is refused; `auto` takes float32 there."""
    from b2p.student.train import cpu_native_bf16

    check_precision(precision)
    if device.type == "cpu":
        model.to(memory_format=torch.channels_last)
        native = cpu_native_bf16()
        where = "this CPU has no native bfloat16 (AMX or AVX512-BF16)"
    else:
        native = device.type == "cuda" and torch.cuda.is_bf16_supported()
        where = f"{device} has no bfloat16"
    if precision == "bfloat16" and not native:
        raise B2PError(f"bfloat16 inference asked for, but {where}; use float32 or auto")
    if precision == "float32" or (precision == "auto" and (device.type != "cpu" or not native)):
        return contextlib.nullcontext(), "float32"
    return torch.autocast(device.type, dtype=torch.bfloat16), "bfloat16"


def check_tta(tta: str) -> str:
    if tta not in TTA_MODES:
        raise B2PError(f"test-time augmentation must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    return tta


@torch.no_grad()
def image_logits(
    model: torch.nn.Module,
    img: np.ndarray,
    device: torch.device | str = "cpu",
    overlap: float = DEFAULT_OVERLAP,
    tile_batch: int = DEFAULT_TILE_BATCH,
    window: int | None = None,
    tta: str = "none",
) -> torch.Tensor:
    """Fine-head logits (K+1)xHxW float32 (on `device`) of an HxWx3 uint8 RGB image, at the image's size.

    `tta` "flips": the mean of the logits of the image and its horizontal, vertical and double flip, each
    flipped back (TTA_MODES)."""
    c = model.config
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise B2PError(f"expected an HxWx3 uint8 RGB image, got {img.shape} {img.dtype}")
    if tile_batch < 1:
        raise B2PError(f"tiles per forward pass must be at least 1, got {tile_batch}")
    check_tta(tta)

    def logits(view: np.ndarray) -> torch.Tensor:
        if c.legacy_input_size is not None:
            return _legacy_square_logits(model, view, device)
        return _window_logits(model, view, device, overlap, tile_batch, window)

    views = TTA_MODES[tta]
    acc = logits(img)  # every mode starts with the image as is (dims ())
    for dims in views[1:]:
        # logit dims (1 = rows, 2 = columns) flip image axes dims - 1; the view's logits are flipped back
        acc.add_(logits(np.ascontiguousarray(np.flip(img, axis=tuple(d - 1 for d in dims)))).flip(dims))
    return acc.div_(len(views)) if len(views) > 1 else acc


def _window_logits(
    model: torch.nn.Module, img: np.ndarray, device: torch.device | str, overlap: float, tile_batch: int, window: int | None
) -> torch.Tensor:
    """image_logits of one view: the sliding window at the training geometry."""
    c = model.config
    geo = geometry_of(model, img.shape[0], img.shape[1])
    # the canvas is padded as in training (to at least one tile); the square window never exceeds it, so a
    # large window never pads a small or elongated image further
    canvas, _ = geo.image_to_model(img, min_side=c.tile_size)  # HpxWpx3 uint8: resized, padded
    tile = window_for(model, window, *img.shape[:2])
    ov = overlap_px(tile, overlap)
    origins = geo.tile_origins(tile, ov, min_side=c.tile_size)
    ramp = blend_window(tile, ov).to(device)
    hp, wp = canvas.shape[:2]
    er, ec = (torch.from_numpy(a) for a in geo.edge_distance(c.tile_size))
    acc = torch.zeros(c.num_classes, hp, wp, dtype=torch.float32, device=device)
    wsum = torch.zeros(hp, wp, dtype=torch.float32, device=device)
    for i in range(0, len(origins), tile_batch):
        chunk = origins[i : i + tile_batch]
        tiles = torch.stack([normalise(canvas[y0 : y0 + tile, x0 : x0 + tile], c.mean, c.std) for y0, x0 in chunk])
        rows = torch.stack([er[y0 : y0 + tile] for y0, _ in chunk])  # each window's distances to the image edges
        cols = torch.stack([ec[x0 : x0 + tile] for _, x0 in chunk])
        logits = model(tiles.to(device), edges=(rows.to(device), cols.to(device)))["fine"].float()
        for (y0, x0), lg in zip(chunk, logits):
            acc[:, y0 : y0 + tile, x0 : x0 + tile].addcmul_(lg, ramp)
            wsum[y0 : y0 + tile, x0 : x0 + tile].add_(ramp)
    del canvas
    acc.div_(wsum)
    del wsum
    return geo.logits_to_image(acc)


def _legacy_square_logits(model: torch.nn.Module, img: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """LEGACY (model.pt version 1): the image squashed to the `legacy_input_size` square (data.prepare_image),
    as those models were trained, logits resized back to the image (bilinear). Kept only so old models
    still predict as trained; new models never take this path."""
    c = model.config
    x = prepare_image(img, c.legacy_input_size, c.mean, c.std)[None].to(device)
    lg = model(x)["fine"].float()
    return torch.nn.functional.interpolate(lg, size=img.shape[:2], mode="bilinear", align_corners=False)[0]


def predict_image(
    model: torch.nn.Module,
    img: np.ndarray,
    device: torch.device | str = "cpu",
    overlap: float = DEFAULT_OVERLAP,
    tile_batch: int = DEFAULT_TILE_BATCH,
    window: int | None = None,
    tta: str = "none",
) -> tuple[np.ndarray, np.ndarray]:
    """(label map HxW uint8, class probabilities (K+1)xHxW float32) of an HxWx3 uint8 RGB image."""
    p = image_logits(model, img, device, overlap, tile_batch, window, tta)
    # softmax in place: on a multi-megapixel image every extra (K+1)xHxW copy is hundreds of MB
    p.sub_(p.amax(0, keepdim=True)).exp_()
    p.div_(p.sum(0, keepdim=True))
    labels = class_map(p, 0).to(torch.uint8).cpu().numpy()
    return labels, p.cpu().numpy()


def predict_images(
    model: torch.nn.Module,
    images: list[np.ndarray],
    device: torch.device | str = "cpu",
    overlap: float = DEFAULT_OVERLAP,
    tile_batch: int = DEFAULT_TILE_BATCH,
    window: int | None = None,
    tta: str = "none",
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Predict HxWx3 uint8 RGB images of any sizes, one after the other (see `predict_image`).

    Returns (label maps HxW uint8, class probabilities (K+1)xHxW float32), at each image's own size.
    """
    out = [predict_image(model, im, device, overlap, tile_batch, window, tta) for im in images]
    return [o[0] for o in out], [o[1] for o in out]


# Each output root (--out, --boxes-out, --snap-out) says which model wrote it: manifest.py. A run builds its
# files in a hidden folder inside each root and moves them in at the end, so a failed or killed run leaves
# the earlier maps as they were; a kill while moving leaves the root without a manifest, which
# read_prediction_manifest refuses.
STAGE_PREFIX, STAGE_SUFFIX = ".predict.", ".building"
# the outputs of an item that go to each kind of root
ROOT_OUTPUTS = {"student": ("label_out", "probs_out"), "boxes": ("boxed_out",), "snapped": ("snapped_out",)}
MAP_OF = {"student": "label_out", "boxes": "boxed_out", "snapped": "snapped_out"}


def check_roots_apart(roots: dict[str, Path], images_dir: Path | None = None, images: Iterable[Path] = ()) -> None:
    """Refuse an output root (option name -> folder) that is or lies inside the image folder, holds it, or
    holds an input image: the maps would overwrite the images, or the next run would read them as images."""
    d = Path(images_dir).resolve() if images_dir is not None else None
    files = [Path(f).resolve() for f in images]
    for opt, root in roots.items():
        r = Path(root).resolve()
        if d is not None and (r == d or d in r.parents):
            raise B2PError(
                f"{opt} is or lies inside the --images folder {images_dir}: the maps would overwrite the images or be "
                "read as images by the next run; write them elsewhere", root,
            )
        if d is not None and r in d.parents:
            raise B2PError(f"{opt} holds the --images folder {images_dir}: write the maps elsewhere", root)
        held = next((f for f in files if r in f.parents), None)
        if held is not None:
            raise B2PError(f"{opt} holds the input image {held}: the maps would overwrite or mix with the images; write them elsewhere", root)


def check_inputs(items: list[PredictItem]) -> None:
    """Every image exists and, where it was imported, is still the imported one (sha256): all are checked
    before anything is written, so a replaced image is never predicted with its old boxes."""
    from b2p.teach.base import _check_unchanged  # the check teach makes

    for it in items:
        if it.record is not None:
            _check_unchanged(it.record)
        elif not Path(it.image_path).is_file():
            raise B2PError("image file not found", it.image_path)


def _outputs(it: PredictItem, kind: str) -> list[Path]:
    return [Path(p) for p in (getattr(it, a) for a in ROOT_OUTPUTS[kind]) if p is not None]


def _default_roots(items: list[PredictItem]) -> dict[str, Path]:
    """The nearest folder holding all outputs of each kind (callers that name no roots)."""
    roots = {}
    for kind in ROOT_OUTPUTS:
        parents = [str(p.absolute().parent) for it in items for p in _outputs(it, kind)]
        if parents:
            roots[kind] = Path(os.path.commonpath(parents))
    return roots


def _relative(path: Path, root: Path) -> Path:
    try:
        return Path(path).absolute().relative_to(Path(root).absolute())
    except ValueError:
        raise B2PError(f"output lies outside its prediction root {root}", path) from None


@contextlib.contextmanager
def _staged_roots(roots: dict[str, Path]) -> Iterator[dict[str, Path]]:
    """A hidden build folder in each root (those a killed run left are removed first); on error they vanish,
    with any output folder this run created."""
    stages: dict[str, Path] = {}
    created: list[Path] = []
    try:
        for kind, root in roots.items():
            for stale in root.glob(f"{STAGE_PREFIX}*{STAGE_SUFFIX}") if root.is_dir() else []:
                shutil.rmtree(stale, ignore_errors=True)
            created += [p for p in [root, *root.parents] if not p.exists()]
            try:
                root.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise B2PError("cannot create this folder: a file of that name is in the way", root) from None
            stages[kind] = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, suffix=STAGE_SUFFIX, dir=root))
        yield stages
    except BaseException:
        for s in stages.values():
            shutil.rmtree(s, ignore_errors=True)
        for p in sorted(created, key=lambda p: len(p.parts), reverse=True):  # deepest first; only empty ones go
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def _commit(roots: dict[str, Path], stages: dict[str, Path], runs: dict[str, dict]) -> dict[str, dict]:
    """Move every staged file into its root and write each root's manifest; returns the manifests."""
    manifests = {k: merged_manifest(roots[k], k, runs[k]) for k in roots}  # read before any manifest goes
    for root in roots.values():
        (root / MANIFEST).unlink(missing_ok=True)  # from here until the new manifest, the root reads as unfinished
    for kind, root in roots.items():
        stage = stages[kind]
        for f in sorted(stage.rglob("*")):
            if f.is_file():
                dst = root / f.relative_to(stage)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, dst)
        shutil.rmtree(stage)
    for kind, root in roots.items():
        write_json_atomic(root / MANIFEST, manifests[kind])
    return manifests


def run_prediction(
    model_dir: str | Path,
    items: list[PredictItem],
    tile_batch: int = DEFAULT_TILE_BATCH,
    device: str = "auto",
    console: Console | None = None,
    progress: bool = True,
    box_threshold: float = 0.5,
    overlap: float = DEFAULT_OVERLAP,
    window: int | None = None,
    tta: str = "none",
    snap: str = "none",
    snap_settings: SnapSettings | None = None,
    roots: dict[str, Path] | None = None,
    inputs: dict | None = None,
    precision: str = "float32",
    engine: Engine | None = None,
) -> dict:
    """Predict every item and write its label map (and probabilities when `probs_out` is set, the
    box-guided label map when `boxed_out` is set, and the label map snapped to the image by `snap` when
    `snapped_out` is set: snap.py; with snap "none" that map is the student's own). With a snap, the
    box-guided maps are cut from the snapped mask too. Images one at a time, `tile_batch` tiles per pass.

    `roots` ("student", "boxes", "snapped" -> folder; default: the nearest folder holding each kind's
    outputs) get their files all at once at the end, and a MANIFEST naming the model, the settings, the
    maps and `inputs` (what was predicted). Every image is checked (exists, unchanged since import) first.
    `engine` (b2p/scale/engine.py; default local) runs the images, each worker loading the model once.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from b2p.student.checkpoint import load_student
    from b2p.student.model import describe_backbone
    from b2p.student.train import pick_device

    console = console or Console(stderr=True)
    engine = engine or Engine()
    if tile_batch < 1:
        raise B2PError(f"tiles per forward pass must be at least 1, got {tile_batch}")
    check_overlap(overlap)  # refuse a bad overlap or TTA before loading anything
    check_tta(tta)
    check_snap(snap)
    check_precision(precision)
    snap_settings = snap_settings or SnapSettings()
    roots = {k: Path(v) for k, v in (roots or _default_roots(items)).items()}
    for it in items:  # every output inside its root, before anything is written
        for kind in roots:
            for p in _outputs(it, kind):
                _relative(p, roots[kind])
    check_inputs(items)
    dev = pick_device(device)
    model, ck = load_student(model_dir, dev)
    model_rec = {"path": ck["path"], "sha256": sha256_file(ck["path"])}
    arithmetic, used = inference_setup(model, dev, precision)
    c = model.config
    legacy = c.legacy_input_size is not None
    nominal = None if legacy else window_of(model, window)
    how = (
        f"LEGACY square {c.legacy_input_size} px (version-1 model)"
        if legacy
        else f"windows up to {nominal} px (trained on {c.tile_size} px tiles), overlap {overlap:g}, scale {c.scale:g}" + (f", max side {c.max_side}" if c.max_side else "")
    ) + ("" if tta == "none" else f"; TTA {tta} (x{len(TTA_MODES[tta])} the time)")
    if precision != "float32":  # what auto became, said
        how += f"; {used}" + (" (precision auto)" if precision == "auto" else " autocast")
    if snap != "none":
        how += f"; snapped to the image: {snap} (sure at p >= {snap_settings.sure:g})"
    elif any(it.snapped_out is not None for it in items):
        how += "; snap none: the snapped maps are the student's own"
    where = dev if engine.in_process else f"{engine.workers} {engine.name} workers"
    console.print(f"student from {ck['path']}: backbone {describe_backbone(model)}; {len(items)} images on {where}; {how}")
    job = PredictJob(
        str(model_dir), device, precision, used, overlap, tile_batch, window, tta, snap, snap_settings, box_threshold,
        ["background", *ck["class_names"]], loaded=(model, dev, arithmetic),
    )
    tally = PredictTally()
    kind_of = {attr: kind for kind, attrs in ROOT_OUTPUTS.items() for attr in attrs}
    with _staged_roots(roots) as stages:

        def write(i: int, p: ImagePrediction) -> None:
            it = items[i]
            for attr, data in p.files.items():
                path = getattr(it, attr)
                write_bytes_atomic(stages[kind_of[attr]] / _relative(path, roots[kind_of[attr]]), data)
            tally.add(p)
            bar.advance(task)

        with Progress(TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, disable=not progress) as bar:
            task = bar.add_task("predict", total=len(items))
            engine.map(job, items, write)
        n_defect_px, n_boxes, rescued, n_snapped, n_unsnapped = tally.defect_pixels, tally.boxes, tally.rescued, tally.snapped, tally.unsnapped
        used_windows = tally.windows
        student = {"window": nominal, "overlap": overlap, "tta": tta} if not legacy else {"legacy_input_size": c.legacy_input_size, "tta": tta}
        if used != "float32":  # float32 unnamed: manifests written before the option stay the same run
            student["precision"] = used
        snapping = {"snap": snap, **({"snap_sure": snap_settings.sure} if snap != "none" else {})}
        settings = {"student": student, "snapped": {**student, **snapping}, "boxes": {**student, **snapping, "box_threshold": box_threshold}}
        runs = {
            kind: {
                "model": model_rec, "settings": settings[kind], "inputs": inputs or {}, "engine": engine.record(),
                **({"probs": any(it.probs_out is not None for it in items)} if kind == "student" else {}),
                "maps": sorted(_relative(getattr(it, MAP_OF[kind]), root).as_posix() for it in items if getattr(it, MAP_OF[kind]) is not None),
            }
            for kind, root in roots.items()
        }
        manifests = _commit(roots, stages, runs)
    if used_windows and used_windows != {nominal}:
        console.print(
            f"windows used: {', '.join(str(w) for w in sorted(used_windows))} px (a window never exceeds the image's "
            f"padded side at model scale; asked {nominal} px)"
        )
    for kind, m in manifests.items():
        if len({run_key(r) for r in m["runs"]}) > 1:
            console.print(
                f"[yellow]{roots[kind]} now holds maps of {len(m['runs'])} predict runs with different models or settings: "
                "predict every split again with one model before using it[/]"
            )
    if n_boxes:
        console.print(
            f"box-guided masks for {n_boxes} boxes; {rescued} boxes had no pixel above p(defect) {box_threshold} "
            "and kept the student's best pixels in them"
        )
    if n_unsnapped:
        console.print(
            f"snap {snap}: {n_unsnapped} of {n_snapped + n_unsnapped} images kept the student's own map (fewer than "
            f"{GMM_COMPONENTS} defect or background pixels: no colour model to snap with)"
        )
    return {
        "images": len(items), "defect_pixels": n_defect_px, "model": ck["path"], "boxes": n_boxes, "boxes_rescued": rescued,
        "snapped": n_snapped, "unsnapped": n_unsnapped, "windows": sorted(used_windows),
    }


def items_from_batches(
    batch_files: list[Path],
    split: str,
    out_root: str | Path,
    probs: bool,
    boxed_root: str | Path | None = None,
    snapped_root: str | Path | None = None,
) -> list[PredictItem]:
    """One item per image of `split` (all, one of splits.SPLITS or a comma-separated list of them):
    ROOT/<batch>/labelmaps/<key>.png (+ probs/<key>.npz, + BOXED_ROOT/<batch>/labelmaps/<key>.png, +
    SNAPPED_ROOT/<batch>/labelmaps/<key>.png)."""
    from b2p.splits import parse_splits

    parse_splits(split)  # refuse a bad split before reading any batch
    out = []
    for rec in load_batch_files_for_inference(batch_files, split):
        lp = label_map_path(out_root, rec.batch, rec.file_name)
        pp = Path(out_root) / rec.batch / "probs" / f"{label_map_key(rec.file_name)}.npz" if probs else None
        bp = label_map_path(boxed_root, rec.batch, rec.file_name) if boxed_root is not None else None
        sp = label_map_path(snapped_root, rec.batch, rec.file_name) if snapped_root is not None else None
        out.append(PredictItem(rec.path, lp, pp, rec.boxes_xyxy(), rec.box_class_ids(), bp, sp, record=rec))
    return out


def items_from_folder(images_dir: str | Path, out_dir: str | Path, probs: bool, snapped_dir: str | Path | None = None) -> list[PredictItem]:
    """Every image under `images_dir` (recursively) -> OUT/<key>.png (+ OUT/probs/<key>.npz, + SNAPPED/<key>.png)."""
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    if not images_dir.is_dir():
        raise B2PError("image folder not found", images_dir)
    files = sorted(p for p in images_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise B2PError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) in this folder", images_dir)
    out = []
    for f in files:
        key = label_map_key(f.relative_to(images_dir).as_posix())
        sp = Path(snapped_dir) / f"{key}.png" if snapped_dir is not None else None
        out.append(PredictItem(f, out_dir / f"{key}.png", out_dir / "probs" / f"{key}.npz" if probs else None, snapped_out=sp))
    return out
