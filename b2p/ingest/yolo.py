"""Read YOLO box labels into a `SourceBatch`.

Layout: one `.txt` per image at the image's relative path under the labels folder (`imgs/a/b.jpg` ->
`labels/a/b.txt`), each line `class cx cy w h` with coordinates normalised to [0, 1]; a class list file
with one name per line, or a YOLO `data.yaml` with `names` (a list, or a {index: name} mapping).
An image without a label file has no defects (the YOLO convention); a label file without an image is an
error (it usually means the two folders do not belong together).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

from b2p.errors import B2PError
from b2p.fileio import sha256_file
from b2p.labels import normalize_class_name
from b2p.ingest.source import SourceAnnotation, SourceBatch, SourceImage, files_by_stem, list_images, name_key


def _read_text(path: Path, what: str) -> str:
    """UTF-8 text without a leading byte-order mark (Windows Notepad writes one; kept, it would become
    part of the first class name or class index)."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise B2PError(f"{what} is not UTF-8 text", path) from None


def read_yolo_classes(path: str | Path) -> list[str]:
    """Class names in index order from a names file (one per line) or a data.yaml with `names`."""
    path = Path(path)
    if not path.is_file():
        raise B2PError("YOLO class list not found", path)
    text = _read_text(path, "YOLO class list")
    if path.suffix.lower() in (".yaml", ".yml"):
        from b2p.params import parse_yaml

        data = parse_yaml(text, path, "YOLO data.yaml")
        names = data.get("names") if isinstance(data, dict) else None
        if isinstance(names, dict):
            if not all(isinstance(k, int) and not isinstance(k, bool) for k in names):
                raise B2PError(f"'names' keys must be the integers 0..N-1, got {list(names)}", path)
            keys = sorted(names)
            if keys != list(range(len(keys))):
                raise B2PError(f"'names' keys must be 0..N-1, got {keys}", path)
            names = [names[k] for k in keys]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise B2PError("YOLO data.yaml needs 'names': a list (or {index: name} map) of non-empty class names", path)
    else:
        lines = text.splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        for i, line in enumerate(lines, 1):
            if not line.strip():
                raise B2PError(f"line {i} is empty; one class name per line, class index = line number - 1", path)
        names = lines
        if not names:
            raise B2PError("YOLO class list is empty", path)
    names = [normalize_class_name(n) for n in names]
    if len(set(names)) != len(names):
        raise B2PError(f"YOLO class list has duplicate names: {names}", path)
    return names


def _parse_label_file(path: Path, num_classes: int) -> list[SourceAnnotation]:
    text = _read_text(path, "YOLO label file")
    anns = []
    for i, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"line {i}"
        if len(fields) != 5:
            raise B2PError(f"{where}: expected 5 fields 'class cx cy w h', got {len(fields)}: {line.strip()!r}", path)
        try:
            cls = int(fields[0])
        except ValueError:
            raise B2PError(f"{where}: class index {fields[0]!r} is not an integer", path) from None
        try:
            cx, cy, w, h = (float(v) for v in fields[1:])
        except ValueError:
            raise B2PError(f"{where}: coordinates must be numbers, got {' '.join(fields[1:])!r}", path) from None
        if not 0 <= cls < num_classes:
            raise B2PError(f"{where}: class index {cls} is beyond the class list (indices 0..{num_classes - 1})", path)
        for name, text_v, v in zip(("cx", "cy", "w", "h"), fields[1:], (cx, cy, w, h)):
            if not math.isfinite(v) or not 0 <= v <= 1:
                raise B2PError(f"{where}: {name}={text_v} is outside [0, 1] (YOLO coordinates are normalised)", path)
        anns.append(SourceAnnotation(cls + 1, (0.0, 0.0, 0.0, 0.0), where, normalized_cxcywh=(cx, cy, w, h)))
    return anns


def tree_digest(root: Path, files: list[Path]) -> str:
    """One SHA-256 over many files (relative names and contents), to record a folder source in `info`."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


def read_yolo(images_dir: str | Path, labels_dir: str | Path, classes_file: str | Path) -> SourceBatch:
    """Pair every image under `images_dir` with its label file; parse and check the labels."""
    images_dir, labels_dir, classes_file = Path(images_dir), Path(labels_dir), Path(classes_file)
    names = read_yolo_classes(classes_file)
    if not labels_dir.is_dir():
        raise B2PError("YOLO labels folder not found", labels_dir)
    if not images_dir.is_dir():
        raise B2PError("image folder not found", images_dir)
    labels = files_by_stem(labels_dir, ".txt", "YOLO label", exclude=classes_file)
    if not labels:
        # every image defect-free is almost surely the wrong folder (or labels named other than *.txt)
        raise B2PError("no YOLO label file (*.txt) in this folder; give the folder holding one .txt per image", labels_dir)
    label_files = sorted(labels.values())
    by_stem: dict[str, str] = {}
    for rel in list_images(images_dir):
        stem = name_key(rel.rsplit(".", 1)[0])
        if stem in by_stem:
            raise B2PError(f"images {by_stem[stem]!r} and {rel!r} would share one label file {stem}.txt", images_dir)
        by_stem[stem] = rel
    images = {rel: SourceImage(rel) for rel in by_stem.values()}
    for stem, lf in labels.items():
        if stem not in by_stem:
            raise B2PError(f"label file has no image {stem}.* in {images_dir}", lf)
        im = images[by_stem[stem]]
        im.label_file = lf
        im.annotations = _parse_label_file(lf, len(names))
    return SourceBatch(
        format="yolo",
        categories={i + 1: n for i, n in enumerate(names)},
        images=[images[k] for k in sorted(images)],
        annotation_file=labels_dir,
        class_file=classes_file,
        label_files=label_files,
        sources=[
            {"role": "yolo_labels", "path": str(labels_dir), "sha256": tree_digest(labels_dir, label_files), "files": len(label_files)},
            {"role": "yolo_classes", "path": str(classes_file), "sha256": sha256_file(classes_file)},
        ],
    )
