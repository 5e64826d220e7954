"""The class list and the label-map format: the one place that defines both.

Label map: a single-channel uint8 PNG the size of its image; 0 is background and every other value is a
canonical class id (1..K) from the project's class list; a palette PNG (VOC-style) counts as single-channel
and is read by its indices, never its colours. Teacher pseudo-masks, manual masks and student predictions
are all stored this way, one file per image, at `<root>/<batch>/labelmaps/<label_map_key(file_name)>.png`.

Class list file (`data/classes.json` by default): `{"classes": [{"id": 1, "name": "crack"}, ...]}` with
ids 1..K in order. It is shared by every batch: ids never change once given, new classes are appended only
when asked for explicitly.
"""

from __future__ import annotations

import difflib
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from b2p.errors import B2PError
from b2p.fileio import encode_png, read_json, write_bytes_atomic, write_json_atomic

BACKGROUND = 0
MAX_CLASSES = 255  # label maps are uint8


def normalize_class_name(name: str) -> str:
    """The one spelling of a class name: surrounding blanks dropped, Unicode NFC. `e\u0301rosion` (NFD, as
    macOS tools write it) and `\u00e9rosion` (NFC) look identical and must be one class, not two."""
    return unicodedata.normalize("NFC", name.strip())


@dataclass(frozen=True)
class ClassList:
    """Defect class names; the class with id i is names[i - 1]. Id 0 is background. Names are normalised
    (`normalize_class_name`) wherever they come from: a class list file, a batch, a model."""

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(normalize_class_name(n) if isinstance(n, str) else n for n in self.names))
        if len(set(self.names)) != len(self.names):
            raise B2PError(f"class list has duplicate names: {list(self.names)}")
        if len(self.names) > MAX_CLASSES:
            raise B2PError(f"at most {MAX_CLASSES} classes fit in a uint8 label map, got {len(self.names)}")
        for n in self.names:
            if not n or not n.strip():
                raise B2PError("class names must be non-empty")

    @property
    def num_classes(self) -> int:
        """Defect classes K (the fine head predicts K + 1 with background)."""
        return len(self.names)

    def id_of(self, name: str) -> int:
        try:
            return self.names.index(normalize_class_name(name)) + 1
        except ValueError:
            raise B2PError(f"unknown class {name!r}; known: {list(self.names)}") from None

    def name_of(self, class_id: int) -> str:
        if class_id == BACKGROUND:
            return "background"
        if not 1 <= class_id <= len(self.names):
            raise B2PError(f"unknown class id {class_id}; valid ids are 1..{len(self.names)}")
        return self.names[class_id - 1]

    def to_coco_categories(self) -> list[dict]:
        return [{"id": i + 1, "name": n, "supercategory": "defect"} for i, n in enumerate(self.names)]

    def merged_with(self, new_names: Sequence[str], allow_new: bool, source: str | Path | None = None) -> ClassList:
        """This list with `new_names` appended (ids of existing classes never move).

        Unknown names are an error unless `allow_new`: a batch that renames a class (say `crak` for
        `crack`) would otherwise silently create a second class.
        """
        unknown = [n for n in dict.fromkeys(normalize_class_name(n) for n in new_names) if n not in self.names]
        if unknown and not allow_new and self.names:
            hints = []
            for n in unknown:
                close = difflib.get_close_matches(n, self.names, n=1)
                hints.append(f"{n!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise B2PError(
                f"batch introduces classes not in the canonical class list {list(self.names)}: "
                + ", ".join(hints)
                + "; fix the batch, or pass --add-classes to append them",
                source,
            )
        return ClassList(self.names + tuple(unknown))


def load_class_list(path: str | Path) -> ClassList:
    data = read_json(path, "class list")
    try:
        entries = data["classes"]
        ids = [int(e["id"]) for e in entries]
        names = tuple(str(e["name"]) for e in entries)
    except (TypeError, KeyError, ValueError):
        raise B2PError('class list must look like {"classes": [{"id": 1, "name": "crack"}, ...]}', path) from None
    if ids != list(range(1, len(ids) + 1)):
        raise B2PError(f"class ids must be 1..K in order, got {ids}", path)
    return ClassList(names)


def save_class_list(path: str | Path, classes: ClassList) -> None:
    write_json_atomic(path, {"classes": [{"id": i + 1, "name": n} for i, n in enumerate(classes.names)]})


def check_class_lists(model_names: list[str], batch_names: list[str], model_path: str | Path | None) -> None:
    """A model predicts class ids; they mean the same classes only if the batch's list starts with the model's.

    A batch list may have appended classes since training (the model never predicts them); any other
    difference (another order, a renamed class) would silently give pixels the wrong class.
    """
    model_names = [normalize_class_name(n) for n in model_names]  # a model saved before names were normalised
    if [normalize_class_name(n) for n in batch_names[: len(model_names)]] != model_names:
        raise B2PError(
            f"the model was trained on classes {list(model_names)} (ids 1..{len(model_names)}) but the batches' class "
            f"list is {list(batch_names)}: class ids would mean other classes; retrain on these batches",
            model_path,
        )


# --- label-map files -------------------------------------------------------------------------------------


def label_map_key(file_name: str) -> str:
    """File stem of an image's label map: its relative file name with folders flattened, extension dropped."""
    stem = file_name.rsplit(".", 1)[0] if "." in Path(file_name).name else file_name
    return stem.replace("\\", "/").replace("/", "__")


def label_map_key_clashes(file_names: Sequence[str]) -> list[list[str]]:
    """Groups of image file names that would share one label-map file (each group sorted).

    `label_map_key` drops the extension and flattens folders, so `a.png` + `a.jpg` or `a/b.png` + `a__b.png`
    map to one key; so do names differing only in case on a case-insensitive file system (macOS,
    Windows). One image's masks would silently replace another's, so such a batch is refused.
    """
    groups: dict[str, list[str]] = {}
    for name in file_names:
        groups.setdefault(label_map_key(name).casefold(), []).append(name)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def check_label_map_keys(file_names: Sequence[str], source: str | Path | None = None) -> None:
    """Raise a B2PError naming `source` when two images of one batch would share a label-map file."""
    clashes = label_map_key_clashes(file_names)
    if clashes:
        shown = "; ".join(" + ".join(repr(n) for n in g) for g in clashes[:10])
        more = f" (and {len(clashes) - 10} more groups)" if len(clashes) > 10 else ""
        raise B2PError(
            f"{len(clashes)} group(s) of images would share one label-map file: {shown}{more}. Label maps are "
            "named by the file name without extension, folders joined by '__', case ignored: rename the images",
            source,
        )


def export_stem(batch: str, file_name: str) -> str:
    """File stem of an image in a flat export or report folder: `<batch>__<label-map key>` (batches never collide)."""
    return f"{batch}__{label_map_key(file_name)}"


def overlay_name(rank: int, batch: str, file_name: str) -> str:
    """File name of the evaluation overlay of the `rank`-th worst image."""
    return f"{rank:02d}_{export_stem(batch, file_name)}.png"


def derived_file_names(batch: str, file_name: str) -> dict[str, str]:
    """Every file name b2p derives from an image's name, by what it is: the importer refuses an image whose
    longest one would not fit the file system (`fileio.name_max`) rather than let a later stage crash.
    Hidden temporary names are kept short by `fileio.temp_prefix`, so they never are the longest."""
    key, stem = label_map_key(file_name), export_stem(batch, file_name)
    ext = Path(file_name).suffix.lower() or ".png"
    return {
        "label map": f"{key}.png",
        "teacher resume part": f"{key}.json",
        "class probabilities": f"{key}.npz",
        "exported image": f"{stem}{ext}",
        "exported label map": f"{stem}.png",
        "exported YOLO label": f"{stem}.txt",
        "evaluation overlay": overlay_name(999, batch, file_name),
    }


def label_map_path(root: str | Path, batch: str, file_name: str) -> Path:
    """Where the label map of image `file_name` of `batch` lives under a mask root (teacher, predictions)."""
    return Path(root) / batch / "labelmaps" / f"{label_map_key(file_name)}.png"


def encode_label_map(label_map: np.ndarray, path: str | Path | None = None) -> bytes:
    """The PNG bytes `write_label_map` writes (for a worker that returns its maps to be written elsewhere)."""
    lm = np.asarray(label_map)
    if lm.ndim != 2:
        raise B2PError(f"label map must be HxW, got shape {lm.shape}", path)
    if lm.size and (lm.min() < 0 or lm.max() > MAX_CLASSES):
        raise B2PError("label map values must be in 0..255", path)
    return encode_png(lm.astype(np.uint8), path)


def write_label_map(path: str | Path, label_map: np.ndarray) -> None:
    write_bytes_atomic(path, encode_label_map(label_map, path))


def read_label_map(path: str | Path, shape: tuple[int, int] | None = None, num_classes: int | None = None) -> np.ndarray:
    """Read a label-map PNG as HxW uint8; check its size against `shape` (H, W) and ids against K."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise B2PError("label map not found", path)
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise B2PError("label map is an empty (0-byte) file", path)
    lm = _palette_indices(data) if _is_palette_png(data) else cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if lm is None:
        raise B2PError("label map could not be decoded (corrupt or not an image)", path)
    if lm.ndim == 3:
        raise B2PError("label map must be a single-channel PNG (values are class ids)", path)
    if lm.dtype != np.uint8:
        # a 16-bit PNG must not wrap modulo 256 (257 would become class 1): accept it only when every
        # value already fits a uint8 label map
        if not np.issubdtype(lm.dtype, np.integer):
            raise B2PError(f"label map holds {lm.dtype} values; it must be an 8-bit PNG of class ids", path)
        if lm.size and (int(lm.min()) < 0 or int(lm.max()) > MAX_CLASSES):
            bad = int(lm.max()) if int(lm.max()) > MAX_CLASSES else int(lm.min())
            raise B2PError(f"label map holds value {bad} ({lm.dtype} PNG); class ids must be 0..{MAX_CLASSES}", path)
    if shape is not None and lm.shape != tuple(shape):
        raise B2PError(f"label map is {lm.shape[1]}x{lm.shape[0]} but its image is {shape[1]}x{shape[0]}", path)
    if num_classes is not None and lm.size and int(lm.max()) > num_classes:
        raise B2PError(f"label map holds class id {int(lm.max())} but only {num_classes} classes exist", path)
    return lm.astype(np.uint8)


def _is_palette_png(data: np.ndarray) -> bool:
    """A PNG of colour type 3 (palette): its IHDR chunk comes first, colour type at byte 25."""
    head = data[:26].tobytes()
    return len(head) == 26 and head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR" and head[25] == 3


def _palette_indices(data: np.ndarray) -> np.ndarray | None:
    """A palette PNG's indices (VOC-style masks: the index is the class id, the palette only colours it).

    OpenCV expands the palette into colours, so Pillow reads these; None when the file does not decode.
    """
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data.tobytes())) as im:
            return np.asarray(im) if im.mode == "P" else None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


# --- painting instance masks into one label map --------------------------------------------------------


def paint_label_map(
    shape: tuple[int, int],
    masks: Sequence[np.ndarray],
    class_ids: Sequence[int],
    scores: Sequence[float] | None = None,
) -> np.ndarray:
    """Paint binary instance masks into one HxW label map.

    Overlap rule (pixels claimed by masks of different classes): the smaller mask wins. Masks are painted
    largest first, so a thin crack inside a big erosion box keeps its pixels: defects are sparse and the
    smaller, more specific mask is the better evidence. Ties in area go to the higher score, then to the
    lower class id (a deterministic order).
    """
    h, w = shape
    out = np.zeros((h, w), dtype=np.uint8)
    if scores is None:
        scores = [1.0] * len(masks)
    areas = [int(np.count_nonzero(m)) for m in masks]
    order = sorted(range(len(masks)), key=lambda i: (-areas[i], scores[i], -class_ids[i]))
    for i in order:
        m = np.asarray(masks[i], dtype=bool)
        if m.shape != (h, w):
            raise B2PError(f"mask {i} has shape {m.shape}, expected {(h, w)}")
        out[m] = class_ids[i]
    return out


# --- colours: one fixed, readable colour per class id (plots, overlays and FiftyOne all use these) ----------

_PALETTE = [
    (0, 0, 0),  # background
    (230, 25, 75),  # red
    (60, 180, 75),  # green
    (0, 130, 200),  # blue
    (245, 130, 48),  # orange
    (145, 30, 180),  # purple
    (70, 240, 240),  # cyan
    (240, 50, 230),  # magenta
    (210, 245, 60),  # lime
    (255, 225, 25),  # yellow
    (0, 128, 128),  # teal
]


def class_color(class_id: int) -> tuple[int, int, int]:
    """RGB colour of a class id; background is black. Stable across runs and tools."""
    if class_id < len(_PALETTE):
        return _PALETTE[class_id]
    rng = np.random.default_rng(class_id)  # deterministic beyond the fixed palette
    return tuple(int(v) for v in rng.integers(64, 256, 3))


def class_color_hex(class_id: int) -> str:
    return "#%02x%02x%02x" % class_color(class_id)


def colorize(label_map: np.ndarray) -> np.ndarray:
    """HxW label map -> HxWx3 uint8 RGB using `class_color`."""
    lut = np.array([class_color(i) for i in range(256)], dtype=np.uint8)
    return lut[np.asarray(label_map, dtype=np.uint8)]
