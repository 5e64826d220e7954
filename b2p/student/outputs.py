"""Where `b2p predict` and the ONNX runtime (b2p/deploy) put their outputs, torch-free: the items of a run (an
image and the files it gives), the probabilities files, and the staged, all-or-nothing writing of each output
root with its manifest (manifest.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from b2p.errors import B2PError
from b2p.fileio import write_json_atomic
from b2p.labels import label_map_key
from b2p.student.manifest import MANIFEST, merged_manifest

if TYPE_CHECKING:  # batches are read by the torch side only; the runtime ships without b2p.dataset
    from b2p.dataset import ImageRecord

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


# --probs files: (K+1)xHxW class probabilities quantised to uint8 (p * PROBS_SCALE, rounded), compressed:
# 1/255 is far below any threshold step b2p chooses, and uint8 is far smaller and faster to write than
# float16. Files written before hold float16 and still read.
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
    from b2p.fileio import write_bytes_atomic

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


def outputs_of(it: PredictItem, kind: str) -> list[Path]:
    return [Path(p) for p in (getattr(it, a) for a in ROOT_OUTPUTS[kind]) if p is not None]


def default_roots(items: list[PredictItem]) -> dict[str, Path]:
    """The nearest folder holding all outputs of each kind (callers that name no roots)."""
    roots = {}
    for kind in ROOT_OUTPUTS:
        parents = [str(p.absolute().parent) for it in items for p in outputs_of(it, kind)]
        if parents:
            roots[kind] = Path(os.path.commonpath(parents))
    return roots


def relative_to_root(path: Path, root: Path) -> Path:
    try:
        return Path(path).absolute().relative_to(Path(root).absolute())
    except ValueError:
        raise B2PError(f"output lies outside its prediction root {root}", path) from None


@contextlib.contextmanager
def staged_roots(roots: dict[str, Path]) -> Iterator[dict[str, Path]]:
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


def commit_roots(roots: dict[str, Path], stages: dict[str, Path], runs: dict[str, dict]) -> dict[str, dict]:
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

