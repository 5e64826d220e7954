"""`b2p add-batch`: copy a new box-annotated batch into the project and register it in params.yaml.

The pipeline (dvc.yaml) runs one `import` and one `teach` stage per entry of params.yaml's `batches:`
mapping (DVC `foreach`), so registering a batch is all it takes for `dvc repro` to import and teach that
batch only, then retrain and re-evaluate. An entry looks like

    batches:
      line7:                       # the batch name: DVC stages import@line7, teach@line7
        source: data/raw/line7     # the folder add-batch copied (a dependency of import@line7)
        format: coco               # coco | yolo
        files:                     # `b2p import` options, unpacked by DVC into --images ... --coco ...
          images: data/raw/line7/images
          coco: data/raw/line7/annotations.json
          masks: data/raw/line7/masks

Order of work, so that bad input changes nothing: validate the source exactly as `b2p import` does (by
running the importer into a scratch folder), copy it into a hidden scratch folder under data/raw, rename
that folder into place, write the class list if the batch adds classes, then rewrite params.yaml
atomically (comments kept). A failure at any step undoes the earlier ones.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from b2p.errors import B2PError
from b2p.fileio import make_dir_like_mkdir, write_bytes_atomic

# Stricter than the importer's batch-name rule: the name becomes a DVC stage key (`teach@NAME`) and a
# folder name, and is interpolated unquoted into shell commands; dots are refused so `${key}` paths and
# stage addresses stay unambiguous.
DVC_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # fullmatch: `$` would pass a final newline
FORMATS = ("coco", "yolo")


@dataclass
class AddBatchResult:
    name: str
    folder: Path  # data/raw/NAME
    entry: dict  # what was registered under batches.NAME in params.yaml
    num_images: int
    num_boxes: int
    manual_masks: int
    splits: dict[str, int]
    new_classes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# --- params.yaml: round-trip editing that keeps comments and layout -------------------------------------


def load_params(path: str | Path) -> Any:
    """Parse params.yaml for editing (a ruamel CommentedMap) with the project's one YAML reader
    (b2p.params); B2PError names the file on any problem."""
    from b2p.params import read_yaml_for_editing
    from b2p.params import check_section_names

    path = Path(path)
    if not path.is_file():
        raise B2PError("params file not found (run add-batch in the project root, or pass --params)", path)
    data = read_yaml_for_editing(path)
    if data is None:
        from ruamel.yaml.comments import CommentedMap

        data = CommentedMap()
    if not hasattr(data, "keys"):
        raise B2PError("params file must be a mapping of sections (base:, train:, batches:, ...)", path)
    check_section_names(data, path)
    batches = data.get("batches")
    if batches is not None and not hasattr(batches, "keys"):
        raise B2PError("`batches:` must be a mapping of batch name -> {source, format, files}", path)
    return data


def registered_batches(path: str | Path) -> dict[str, dict]:
    """The `batches:` mapping of a params file as plain dicts (empty when there is none)."""
    data = load_params(path)
    return {str(k): dict(v) for k, v in (data.get("batches") or {}).items()}


def dump_params(data: Any) -> str:
    from b2p.params import dump_yaml_for_editing

    return dump_yaml_for_editing(data)


def batch_entry(name: str, raw_root: str | Path, fmt: str, has_masks: bool, yolo_classes_name: str | None = None) -> dict:
    """The params.yaml entry for a batch copied to RAW_ROOT/NAME (paths as the pipeline sees them)."""
    if fmt not in FORMATS:
        raise B2PError(f"batch format must be one of {FORMATS}, got {fmt!r}")
    folder = Path(raw_root) / name
    files: dict[str, str] = {"images": (folder / "images").as_posix()}
    if fmt == "coco":
        files["coco"] = (folder / "annotations.json").as_posix()
    else:
        files["yolo-labels"] = (folder / "labels").as_posix()
        files["yolo-classes"] = (folder / (yolo_classes_name or "classes.txt")).as_posix()
    if has_masks:
        files["masks"] = (folder / "masks").as_posix()
    return {"source": folder.as_posix(), "format": fmt, "files": files}


def _commented(value: Any) -> Any:
    """Plain dicts -> ruamel CommentedMaps (so comments can be attached to them)."""
    from ruamel.yaml.comments import CommentedMap

    if isinstance(value, dict):
        m = CommentedMap()
        for k, v in value.items():
            m[k] = _commented(v)
        return m
    return value


def _pop_trailing_comment(node: Any) -> Any:
    """Detach and return the comment after the last value of a (nested) mapping, or None."""
    if not hasattr(node, "ca") or not hasattr(node, "keys") or not len(node):
        return None
    last = list(node.keys())[-1]
    token = _pop_trailing_comment(node[last])
    if token is not None:
        return token
    item = node.ca.items.get(last)
    if item and len(item) > 2 and item[2] is not None:
        token, item[2] = item[2], None
        return token
    return None


def _push_trailing_comment(node: Any, token: Any) -> None:
    """Attach `token` after the deepest last value of a mapping (undo of `_pop_trailing_comment`)."""
    last = list(node.keys())[-1]
    if hasattr(node[last], "ca") and hasattr(node[last], "keys") and len(node[last]):
        _push_trailing_comment(node[last], token)
    else:
        node.ca.items[last] = [None, None, token, None]


def register_batch(params_path: str | Path, name: str, entry: dict) -> None:
    """Append `name: entry` to params.yaml's `batches:` (created if absent), atomically, keeping comments."""
    params_path = Path(params_path)
    data = load_params(params_path)
    if data.get("batches") is None:
        from ruamel.yaml.comments import CommentedMap

        data["batches"] = CommentedMap()
    if name in data["batches"]:
        raise B2PError(f"batch {name!r} is already registered in `batches:`; choose another --name", params_path)
    batches = data["batches"]
    # ruamel attaches the comment block that follows `batches:` (the next section's heading) to the deepest
    # last value inside it; move it below the new entry so the next section keeps its comment
    trailing = _pop_trailing_comment(batches)
    batches[name] = _commented(entry)
    if trailing is not None:
        _push_trailing_comment(batches, trailing)
    text = dump_params(data)
    # the rewrite must parse (with the plain reader every stage uses) to the old mapping plus the new entry:
    # a guard against any round-trip slip, since DVC and every stage read this file
    from b2p.params import parse_yaml, read_yaml

    before = read_yaml(params_path, "params file") or {}
    after = parse_yaml(text, params_path, "rewritten params file")
    new_entry = after.get("batches", {}).pop(name, None)
    if not after.get("batches"):
        after.pop("batches", None)
    if new_entry != entry or after != {k: v for k, v in before.items() if not (k == "batches" and not v)}:
        raise B2PError("internal error: rewriting params.yaml would change more than the new entry; file left untouched", params_path)
    write_bytes_atomic(params_path, text.encode())


# --- validation and copying -------------------------------------------------------------------------------


def check_name(name: str) -> str:
    """Refuse a batch name that is not a safe folder name and DVC stage key."""
    from b2p.ingest.importer import check_batch_name

    check_batch_name(name)  # the importer's rule first (one place for it) ...
    if not DVC_SAFE_NAME.fullmatch(name):  # ... then what DVC stage keys and shell commands need on top
        raise B2PError(
            f"batch name {name!r} must be at most 64 letters, digits, '_' or '-' (it becomes a folder and the DVC "
            f"stage names import@{name} / teach@{name})"
        )
    return name


def import_rule(params: Path):
    """The split rule `dvc repro` will import with: params.yaml's `import:` section (so the counts add-batch
    prints are the ones the pipeline will produce)."""
    from b2p.schema import resolve

    return resolve("import", params if params.is_file() else None).split_rule()


def _copy_files(src: Path, relative: list[str] | list[Path], dst: Path) -> None:
    """Copy the files `src/REL` to `dst/REL`. The importer's result says which files a batch consists of,
    so what add-batch copies is exactly what validated (no images, label or mask files lost or added)."""
    for rel in relative:
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, target)


def add_batch(
    source: str | Path,
    name: str,
    *,
    coco: str | Path | None = None,
    yolo_labels: str | Path | None = None,
    yolo_classes: str | Path | None = None,
    masks: str | Path | None = None,
    add_classes: bool = False,
    params: str | Path = "params.yaml",
    raw_root: str | Path = "data/raw",
    classes: str | Path = "data/classes.json",
) -> AddBatchResult:
    """Validate a box-annotated batch, copy it to RAW_ROOT/NAME and register it in PARAMS.

    `source` is the image folder (as `b2p import --images`); boxes come from `coco` (a COCO JSON) or from
    `yolo_labels` + `yolo_classes`; `masks` is an optional folder of manual-mask PNG label maps. With
    `add_classes`, class names new to CLASSES are appended to it (ids of existing classes never move).
    Raises B2PError with params.yaml, CLASSES and RAW_ROOT untouched on any bad input.
    """
    from b2p.labels import save_class_list

    source, params, raw_root, classes = Path(source), Path(params), Path(raw_root), Path(classes)
    folder = _check_add_batch(source, name, coco, yolo_labels, yolo_classes, params, raw_root)
    fmt = "coco" if coco is not None else "yolo"
    # 1. validate exactly as `b2p import` does
    result = _validate_in_scratch(source, name, coco, yolo_labels, yolo_classes, masks, add_classes, params, classes)
    new_class_list = result.classes

    # 2. copy into a hidden scratch folder beside the target, then rename it into place (atomic on one fs)
    raw_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=raw_root))
    make_dir_like_mkdir(tmp)  # mkdtemp gives 0700: the team sharing the project must read the batch
    old_classes = classes.read_bytes() if classes.is_file() else None
    renamed = False
    try:
        yolo_classes_name = _copy_batch(source, result, tmp, coco, yolo_labels, yolo_classes, masks)
        os.rename(tmp, folder)
        renamed = True
        entry = batch_entry(name, raw_root, fmt, masks is not None, yolo_classes_name)
        # 3. class list (only when the batch adds classes, or the project has none yet), then params.yaml
        if old_classes is None or result.new_classes:
            save_class_list(classes, new_class_list)
        register_batch(params, name, entry)
    except BaseException:
        # undo in reverse order so a failure leaves the project as it was
        _restore_class_list(classes, old_classes)
        shutil.rmtree(folder if renamed else tmp, ignore_errors=True)
        raise
    return AddBatchResult(
        name=name,
        folder=folder,
        entry=entry,
        num_images=result.num_images,
        num_boxes=result.num_boxes,
        manual_masks=result.manual_masks,
        splits=result.splits,
        new_classes=list(result.new_classes),
        warnings=list(result.warnings),
    )


def _check_add_batch(source: Path, name: str, coco, yolo_labels, yolo_classes, params: Path, raw_root: Path) -> Path:
    """The checks before any work: the name, one box source, not registered yet, no folder RAW_ROOT/NAME yet, the image
    folder there; returns RAW_ROOT/NAME."""
    check_name(name)
    if (coco is None) == (yolo_labels is None):
        raise B2PError("give exactly one box source: --coco FILE, or --yolo-labels DIR with --yolo-classes FILE")
    if yolo_labels is not None and yolo_classes is None:
        raise B2PError("--yolo-labels needs --yolo-classes FILE (names, one per line, or a data.yaml)")
    if coco is not None and yolo_classes is not None:
        raise B2PError("--yolo-classes goes with --yolo-labels, not with --coco")
    registered = registered_batches(params)
    if name in registered:
        raise B2PError(f"batch {name!r} is already registered in `batches:`; choose another --name", params)
    # a name that differs only in case gives the same folders on a case-insensitive file system (Windows, macOS)
    names = set(registered)
    if raw_root.is_dir():
        names |= {p.name for p in raw_root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    clash = next((n for n in sorted(names) if n.casefold() == name.casefold() and n != name), None)
    if clash is not None:
        raise B2PError(f"batch name {name!r} differs only in case from the batch {clash!r}: their folders would collide; choose another --name", params)
    folder = raw_root / name
    if folder.exists():
        raise B2PError(f"folder already exists; remove it or choose another --name than {name!r}", folder)
    if not source.is_dir():
        raise B2PError("image folder not found", source)
    if _inside(raw_root.resolve(), source.resolve()):  # the copy would land inside what it copies
        raise B2PError(f"the image folder holds the project's batch folder {raw_root}: give the folder of this batch's images only", source)
    return folder


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _validate_in_scratch(source: Path, name: str, coco, yolo_labels, yolo_classes, masks, add_classes: bool, params: Path, classes: Path):
    """The importer's result for the batch, run against a scratch copy of the class list and a scratch output."""
    from b2p.ingest.importer import import_batch

    with tempfile.TemporaryDirectory(prefix="b2p-add-batch-") as scratch:
        scratch_classes = Path(scratch) / "classes.json"
        if classes.is_file():
            shutil.copy2(classes, scratch_classes)
        return import_batch(
            name,
            source,
            coco=coco,
            yolo_labels=yolo_labels,
            yolo_classes=yolo_classes,
            masks_dir=masks,
            classes_path=scratch_classes,
            add_classes=add_classes,
            rule=import_rule(params),
            out=Path(scratch) / f"{name}.json",
        )


def _copy_batch(source: Path, result, tmp: Path, coco, yolo_labels, yolo_classes, masks) -> str | None:
    """Copy the files the importer validated into `tmp` (images/, annotations.json or labels/ + the class file, masks/);
    returns the YOLO class file's name there (None for COCO)."""
    _copy_files(source, result.image_files, tmp / "images")
    yolo_classes_name = None
    if coco is not None:
        shutil.copy2(coco, tmp / "annotations.json")
    else:
        _copy_files(Path(yolo_labels), [p.relative_to(yolo_labels) for p in result.label_files], tmp / "labels")
        suffix = Path(yolo_classes).suffix.lower()
        yolo_classes_name = "data.yaml" if suffix in (".yaml", ".yml") else "classes.txt"
        shutil.copy2(yolo_classes, tmp / yolo_classes_name)
    if masks is not None:
        _copy_files(Path(masks), [p.relative_to(masks) for p in result.mask_files], tmp / "masks")
    return yolo_classes_name


def _restore_class_list(classes: Path, old_classes: bytes | None) -> None:
    """Put the class list back as it was before add-batch (removed when there was none)."""
    if old_classes is not None:
        if classes.is_file() and classes.read_bytes() != old_classes:
            write_bytes_atomic(classes, old_classes)
    else:
        with contextlib.suppress(FileNotFoundError):
            classes.unlink()
