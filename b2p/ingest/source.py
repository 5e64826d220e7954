"""What a parsed box source (COCO or YOLO) looks like before validation against the images.

The readers (`coco.py`, `yolo.py`) only check the syntax of their own format and produce a `SourceBatch`;
`importer.py` then checks every image, box and mask against the image files and writes the canonical file.
Class ids here are the batch's own (COCO category id, or YOLO class index + 1), remapped by name later.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from b2p.dataset import BOX_TOLERANCE_PX
from b2p.errors import B2PError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
BOX_DECIMALS = 3  # canonical boxes are stored rounded to this many decimals (1/1000 px)



@dataclass
class SourceAnnotation:
    category_id: int  # the batch's own class id
    xywh: tuple[float, float, float, float]  # pixels (YOLO boxes are converted once the image size is known)
    where: str  # for error messages: "annotation id 7", "line 3"
    segmentation: Any = None  # COCO polygons (list of lists) or RLE dict, None when absent
    normalized_cxcywh: tuple[float, float, float, float] | None = None  # YOLO: converted after decoding


@dataclass
class SourceImage:
    file_name: str  # relative to the image folder, '/'-separated
    annotations: list[SourceAnnotation] = field(default_factory=list)
    width: int | None = None  # as declared by the source (COCO), checked against the decoded image
    height: int | None = None
    declared_manual_mask: bool = False  # COCO extension `"has_manual_mask": true`
    label_file: Path | None = None  # the file these annotations came from (errors name it)


@dataclass
class SourceBatch:
    format: str  # "coco" | "yolo"
    categories: dict[int, str]  # batch class id -> name, in the batch's order
    images: list[SourceImage]
    annotation_file: Path  # the file errors about annotations name (COCO JSON, or the YOLO labels folder)
    class_file: Path | None = None  # the file the class names come from (errors about classes name it)
    label_files: list[Path] = field(default_factory=list)  # YOLO: every label file read (add-batch copies these)
    sources: list[dict] = field(default_factory=list)  # [{"role", "path", "sha256"}] recorded in `info`


def check_box(
    xywh: Sequence[float], width: int, height: int, where: str, path: str | Path
) -> tuple[tuple[float, float, float, float], bool]:
    """Validate an XYWH pixel box against a `width` x `height` image.

    Returns the box clipped to the image and rounded to BOX_DECIMALS (as stored), and whether it overhung
    the image. Refuses non-finite numbers, zero or negative size (also after rounding), and boxes reaching
    more than BOX_TOLERANCE_PX outside the image.
    """
    x, y, w, h = (float(v) for v in xywh)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise B2PError(f"{where}: box {list(xywh)} holds a non-finite number", path)
    if w <= 0 or h <= 0:
        raise B2PError(f"{where}: box {list(xywh)} has zero or negative size (width {w}, height {h})", path)
    t = BOX_TOLERANCE_PX
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        raise B2PError(
            f"{where}: box [x={x:g}, y={y:g}, w={w:g}, h={h:g}] lies outside the {width}x{height} image "
            f"(more than {t} px; boxes must be in pixels of this image)",
            path,
        )
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(width)), min(y + h, float(height))
    # rounded here, once: the canonical file stores 3 decimals, and a box must not become empty there
    clipped = tuple(round(v, BOX_DECIMALS) for v in (x0, y0, x1 - x0, y1 - y0))
    if clipped[2] <= 0 or clipped[3] <= 0:
        raise B2PError(
            f"{where}: box {list(xywh)} has no area inside the {width}x{height} image once clipped and rounded "
            f"to {BOX_DECIMALS} decimals (width {clipped[2]:g}, height {clipped[3]:g} px)",
            path,
        )
    # clipped only when it really overhung: comparing x1 - x0 with w flags in-image boxes on float noise
    overhung = x < 0 or y < 0 or x + w > width or y + h > height
    return clipped, overhung


def list_images(folder: Path) -> list[str]:
    """Relative '/'-separated names of every image file under `folder` (recursive, sorted)."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def name_key(relative_stem: str) -> str:
    """How a label or mask file is paired with its image: by relative stem in Unicode NFC, since macOS
    writes decomposed (NFD) names while most tools write composed ones, and both look the same."""
    return unicodedata.normalize("NFC", relative_stem)


def files_by_stem(folder: Path, suffix: str, what: str, exclude: Path | None = None) -> dict[str, Path]:
    """Files `*.SUFFIX` under `folder` (suffix in any case, as `list_images`; hidden files skipped) by
    `name_key` of their relative stem. The one rule for which label / mask files a batch has: the
    importer reads exactly these and add-batch copies exactly these. Two files for one stem (`a.txt` and
    `a.TXT`) are refused: which one counts would depend on the file system."""
    found: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        if not (p.is_file() and p.suffix.lower() == suffix and not p.name.startswith(".")):
            continue
        if exclude is not None and p.resolve() == exclude.resolve():
            continue
        key = name_key(p.relative_to(folder).with_suffix("").as_posix())
        if key in found:
            raise B2PError(f"two {what} files for one name: {found[key].name!r} and {p.name!r}; keep one", p)
        found[key] = p
    return found


T = TypeVar("T")


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a rich progress bar on stderr."""
    from rich.console import Console
    from rich.progress import track

    yield from track(items, description=description, total=total, console=Console(stderr=True), transient=True)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite JSON number: NaN, Infinity (Python's json accepts them) and ints beyond float range
    (10**400, which `float()` cannot convert) are refused here, where the file is still named."""
    if not isinstance(v, int | float) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False
