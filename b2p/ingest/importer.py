"""`b2p import`: one box-annotated batch (COCO or YOLO, optional manual masks) -> the canonical file.

Everything is validated first (structure, every image decoded, every box and mask checked against its
image, classes matched by name against the shared class list); only then is the canonical annotation file
written, then the class list, both atomically. A bad input therefore raises a B2PError naming the file
and the problem, and leaves every previously written file byte-identical.

Manual masks come from PNG label maps (`--masks DIR`, values = the batch's own class ids: COCO category
id, or YOLO class index + 1; 0 background) or from COCO `segmentation` (polygons or RLE). They are stored
semantically: one RLE per image and class, painted with `b2p.labels.paint_label_map` (smaller mask wins
where instances of different classes overlap), and must agree with the boxes (`agreement.py`).

Also refused, all problems of a batch in one error: one image content under two names of the batch, and
names whose derived output names (`labels.derived_file_names`) the file system cannot hold. A batch whose
name differs from an imported one only in case is refused; images another imported batch holds too are a
warning (that batch is not an input of this import).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from b2p import __version__
from b2p.dataset import check_batch_name, relative_image_root, save_batch_dict, to_coco_dict
from b2p.errors import B2PError, Problems
from b2p.fileio import (
    check_separate_folders,
    describe_orientation,
    describe_size_mismatch,
    exif_orientation,
    name_max,
    read_image,
    read_json,
    safe_join,
    sha256_file,
)
from b2p.ingest.agreement import CheckedBox, instance_problem, label_map_problems
from b2p.ingest.coco import read_coco
from b2p.ingest.source import (
    BOX_TOLERANCE_PX,
    SourceAnnotation,
    SourceBatch,
    SourceImage,
    check_box,
    files_by_stem,
    list_images,
    name_key,
    progress,
)
from b2p.ingest.yolo import read_yolo, tree_digest
from b2p.labels import (
    BACKGROUND,
    ClassList,
    check_label_map_keys,
    derived_file_names,
    load_class_list,
    paint_label_map,
    read_label_map,
    save_class_list,
)
from b2p.masks import polygons_to_mask, rle_encode
from b2p.splits import SPLITS, SplitRule


@dataclass
class ImportResult:
    out: Path
    classes_path: Path
    classes: ClassList
    new_classes: list[str]
    classes_written: bool
    num_images: int
    num_boxes: int
    manual_masks: int  # images with a manual mask
    clipped_boxes: int  # boxes overhanging the image by <= BOX_TOLERANCE_PX, clipped
    splits: dict[str, int]
    boxes_per_class: dict[str, int]
    unlisted_images: int = 0  # COCO: image files in the folder the JSON does not mention (not imported)
    warnings: list[str] = field(default_factory=list)
    # exactly the input files the batch consists of (add-batch copies these, so the copy imports the same)
    image_files: list[str] = field(default_factory=list)  # relative to the image folder
    label_files: list[Path] = field(default_factory=list)  # YOLO label files
    mask_files: list[Path] = field(default_factory=list)  # manual-mask PNGs


def _mask_files(masks_dir: Path, src: SourceBatch) -> dict[str, Path]:
    """Mask PNGs by `name_key` of their relative stem ('sub/a' for masks/sub/a.png or a.PNG); each must
    belong to an image of the batch."""
    if not masks_dir.is_dir():
        raise B2PError("mask folder not found", masks_dir)
    masks = files_by_stem(masks_dir, ".png", "mask")
    stems = {_stem(im.file_name) for im in src.images}
    for stem, p in masks.items():
        if stem not in stems:
            raise B2PError(f"mask has no image {stem}.* in this batch", p)
    return masks


def _stem(file_name: str) -> str:
    return name_key(file_name.rsplit(".", 1)[0] if "." in Path(file_name).name else file_name)


def _rle_string_counts(counts: str, where: str, path: Path) -> list[int]:
    """Run lengths of a compressed COCO RLE string (pycocotools' `rleFrString`), decoded here because
    pycocotools reads past the end of a truncated string and paints whatever memory it finds."""
    runs: list[int] = []
    p = 0
    while p < len(counts):
        x = k = 0
        while True:
            if p >= len(counts):
                raise B2PError(f"{where}: RLE 'counts' string ends inside a number (truncated)", path)
            c = ord(counts[p]) - 48
            if not 0 <= c < 64 or k > 7:  # 6-bit characters '0'..'o'; a run fits 32 bits (<= 8 characters)
                raise B2PError(f"{where}: RLE 'counts' string is corrupt at character {p}", path)
            x |= (c & 0x1F) << (5 * k)
            p, k = p + 1, k + 1
            if not c & 0x20:
                if c & 0x10:
                    x |= -1 << (5 * k)
                break
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            raise B2PError(f"{where}: RLE 'counts' string decodes to a negative run length", path)
        runs.append(x)
    return runs


def _instance_mask(a: SourceAnnotation, height: int, width: int, path: Path) -> np.ndarray:
    """One COCO segmentation (structure checked by coco.py) -> HxW bool mask, checked against its image (its
    box: agreement.py): a corrupt or mis-scaled segmentation would otherwise become wrong ground truth."""
    seg, where = a.segmentation, a.where
    if isinstance(seg, list):
        coords = np.concatenate([np.asarray(poly, np.float64) for poly in seg])
        xs, ys = coords[0::2], coords[1::2]
        t = BOX_TOLERANCE_PX
        if xs.min() < -t or ys.min() < -t or xs.max() > width + t or ys.max() > height + t:
            raise B2PError(
                f"{where}: polygon reaches x {xs.min():g}..{xs.max():g}, y {ys.min():g}..{ys.max():g}, outside the "
                f"{width}x{height} image (more than {t} px; polygons must be in pixels of this image)",
                path,
            )
        if coords.max() <= 1 and max(height, width) > 2:
            raise B2PError(f"{where}: every polygon coordinate lies in [0, 1]; COCO polygons are in pixels, not normalised", path)
        m = polygons_to_mask(seg, height, width)
    else:
        if list(seg["size"]) != [height, width]:
            raise B2PError(f"{where}: RLE size {seg['size']} differs from the image size [{height}, {width}] (height, width)", path)
        runs = seg["counts"] if isinstance(seg["counts"], list) else _rle_string_counts(seg["counts"], where, path)
        if sum(runs) != height * width:
            raise B2PError(f"{where}: RLE run lengths sum to {sum(runs)}, not height*width = {height * width}", path)
        # column-major runs, background first (the COCO layout)
        m = np.repeat(np.arange(len(runs)) % 2 == 1, runs).reshape(width, height).T
    if not m.any():
        raise B2PError(f"{where}: segmentation covers no pixel; a defect's manual mask cannot be empty", path)
    return m


def _manual_label_map(
    im: SourceImage,
    shape: tuple[int, int],
    mask_png: Path | None,
    src: SourceBatch,
    remap: dict[int, int],
    boxes: list[CheckedBox] | None,
    names: dict[int, str],
) -> tuple[np.ndarray | None, list[B2PError]]:
    """The image's manual label map in canonical class ids (None when it has no manual mask), and every way
    it contradicts the image's boxes (agreement.py; `boxes`, one per annotation, None when a box was refused:
    then only the mask itself is checked). A mask that cannot be read at all raises."""
    segs = [a for a in im.annotations if a.segmentation is not None]
    src_file = im.label_file or src.annotation_file
    instance_problems: list[str | None] = []
    if mask_png is not None:
        if segs or im.declared_manual_mask:
            raise B2PError(
                f"image {im.file_name!r} has both a mask PNG ({mask_png}) and COCO segmentation / has_manual_mask; give one",
                src_file,
            )
        raw = read_label_map(mask_png, shape=shape)
        unknown = [int(v) for v in np.unique(raw) if v != BACKGROUND and int(v) not in remap]
        if unknown:
            raise B2PError(
                f"mask value {unknown[0]} is not a class id of this batch (known ids: {sorted(remap)}; "
                f"{'COCO category ids' if src.format == 'coco' else 'YOLO class index + 1'}, 0 = background)",
                mask_png,
            )
        lut = np.zeros(256, np.uint8)
        for b, c in remap.items():
            lut[b] = c
        lm, where = lut[raw], mask_png
    else:
        if not segs and not im.declared_manual_mask:
            return None, []
        missing = [a for a in im.annotations if a.segmentation is None]
        if missing:
            reason = "the image declares has_manual_mask" if im.declared_manual_mask else "other annotations of this image have one"
            raise B2PError(
                f"{missing[0].where}: has no segmentation but {reason}; a manual mask must cover every defect of its image",
                src_file,
            )
        h, w = shape
        masks = [_instance_mask(a, h, w, src_file) for a in im.annotations]
        if boxes is not None:
            instance_problems = [instance_problem(m, b) for m, b in zip(masks, boxes)]
        lm, where = paint_label_map(shape, masks, [remap[a.category_id] for a in im.annotations]), src_file
    problems = [p for p in instance_problems if p]
    if boxes is not None:
        problems += label_map_problems(im.file_name, lm, boxes, names)
    return lm, [B2PError(p, where) for p in problems]


@dataclass
class _Collected:
    """What the per-image checks keep for the canonical file."""

    images: list[dict] = field(default_factory=list)
    annotations: list[dict] = field(default_factory=list)
    manual: list[dict] = field(default_factory=list)
    clipped: int = 0
    oriented: list[tuple[str, int]] = field(default_factory=list)  # images read as displayed, turned by their EXIF tag


def _import_image(
    idx: int, im: SourceImage, images_dir: Path, src: SourceBatch, classes: ClassList, remap: dict[int, int],
    mask_png: Path | None, batch: str, rule: SplitRule, got: _Collected, problems: Problems,
) -> None:
    """Check one image, its boxes and its manual mask; keep what passes in `got`, every problem in `problems`."""
    src_file = im.label_file or src.annotation_file
    try:
        img_path = safe_join(images_dir, im.file_name, "image file name")
    except B2PError as e:
        problems.add(B2PError(e.problem, src_file))
        return
    try:
        h, w = read_image(img_path).shape[:2]
    except B2PError as e:
        problems.add(e)
        return
    if (im.width is not None and im.width != w) or (im.height is not None and im.height != h):
        problems.add(B2PError(describe_size_mismatch(img_path, (im.width, im.height), (w, h), im.file_name), src_file))
        return
    if (o := exif_orientation(img_path)) != 1:
        got.oriented.append((im.file_name, o))
    checked: list[CheckedBox] = []
    for a in im.annotations:
        if a.normalized_cxcywh is not None:  # YOLO: pixels once the size is known
            cx, cy, bw, bh = a.normalized_cxcywh
            a.xywh = ((cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h)
        try:
            box, was_clipped = check_box(a.xywh, w, h, a.where, src_file)
        except B2PError as e:
            problems.add(e)
            continue
        got.clipped += was_clipped
        cid = remap[a.category_id]
        checked.append(CheckedBox(a.where, cid, classes.name_of(cid), box))
        got.annotations.append(
            {"id": len(got.annotations) + 1, "image_id": idx, "category_id": cid, "bbox": list(box),  # rounded by check_box
             "area": round(box[2] * box[3], 3), "iscrowd": 0}
        )
    names = {i + 1: n for i, n in enumerate(classes.names)}
    try:  # against the boxes only when every box passed (a refused box is reported already)
        lm, disagree = _manual_label_map(im, (h, w), mask_png, src, remap, checked if len(checked) == len(im.annotations) else None, names)
    except B2PError as e:
        problems.add(e)
        return
    for e in disagree:
        problems.add(e)
    if lm is not None:
        for c in np.unique(lm):
            if c != BACKGROUND:
                got.manual.append({"image_id": idx, "category_id": int(c), "segmentation": rle_encode(lm == c)})
    got.images.append(
        {"id": idx, "file_name": im.file_name, "width": w, "height": h, "sha256": sha256_file(img_path), "batch": batch,
         "split": rule.split_of(batch, im.file_name, lm is not None), "has_manual_mask": lm is not None}
    )


def _check_outputs(out: Path, classes_path: Path, inputs: dict[str, str | Path | None]) -> None:
    """The two files import writes must not be, or lie inside, one of its inputs."""
    if out.is_dir():
        raise B2PError("--out is a folder; give the canonical file to write (e.g. data/imported/NAME.json)", out)
    # an output written over an input would destroy the user's source file
    for opt, target in (("--out", out), ("--classes", classes_path)):
        for src_opt in ("--coco", "--yolo-classes"):
            src_path = inputs.get(src_opt)
            if src_path is not None and target.resolve() == Path(src_path).resolve():
                raise B2PError(f"{opt} is the {src_opt} input file; writing it would overwrite your annotations", target)
    if out.resolve() == classes_path.resolve():
        raise B2PError("--out and --classes are the same file; give two files", out)
    folders = {k: v for k, v in inputs.items() if k in ("--images", "--masks", "--yolo-labels")}
    check_separate_folders({"--out": out, "--classes": classes_path}, folders)


def _name_length_problems(batch: str, file_names: list[str], folder: Path, source: Path) -> list[B2PError]:
    """Images whose longest derived file name (labels.derived_file_names) the file system of `folder` cannot
    hold: refused here, before a later stage would crash on them."""
    limit = name_max(folder)
    problems = []
    for name in file_names:
        what, longest = max(derived_file_names(batch, name).items(), key=lambda kv: len(kv[1].encode()))
        if len(longest.encode()) > limit:
            problems.append(B2PError(
                f"image {name!r}: b2p derives the file name {longest!r} from it ({what}, {len(longest.encode())} bytes), "
                f"longer than the {limit} bytes this file system allows; shorten the file name, its folders (joined "
                "into the name with '__') or the batch name", source,
            ))
    return problems


def _duplicate_problems(images: list[dict], source: Path) -> list[B2PError]:
    """The same image content under two names of one batch: two sets of labels for one image, possibly in two
    splits (trained on and tested on). Refused."""
    by_hash: dict[str, list[str]] = {}
    for i in images:
        by_hash.setdefault(i["sha256"], []).append(i["file_name"])
    return [
        B2PError(
            f"images {' and '.join(repr(n) for n in names)} have the same content (sha256 {h[:12]}...): one image "
            "under two names gets two sets of labels and may sit in two splits (trained on, then tested on); keep one",
            source,
        )
        for h, names in by_hash.items() if len(names) > 1
    ]


def _other_batches(batch: str, out: Path) -> list[tuple[str, Path, dict[str, tuple[str, str]]]]:
    """The other canonical batch files beside `out`: (batch name, file, {sha256: (file name, split)}); a
    batch whose name differs from this one only in case is refused (its output folders would collide on a
    case-insensitive file system)."""
    others = []
    for f in sorted(out.parent.glob("*.json")) if out.parent.is_dir() else []:
        if f.resolve() == out.resolve():
            continue
        try:
            data = read_json(f)
            info = data["info"]
            name = info["batch"] if info.get("b2p_format") is not None else None
        except (B2PError, KeyError, TypeError, AttributeError):
            continue  # not a canonical file: not a batch
        if not isinstance(name, str) or name == batch:
            continue
        if name.casefold() == batch.casefold():
            raise B2PError(
                f"batch name {batch!r} differs only in case from the imported batch {name!r}: their output folders "
                "collide on case-insensitive file systems (macOS, Windows); choose another name", f,
            )
        hashes = {i["sha256"]: (i["file_name"], i["split"]) for i in data.get("images", []) if isinstance(i, dict) and "sha256" in i}
        others.append((name, f, hashes))
    return others


def _cross_batch_warnings(images: list[dict], others: list[tuple[str, Path, dict]]) -> list[str]:
    """Images whose content another imported batch holds too: a warning (the other file is not an input of
    this import, so refusing would make the result depend on which batch was imported first)."""
    out = []
    for name, f, hashes in others:
        same = [(i["file_name"], i["split"], *hashes[i["sha256"]]) for i in images if i["sha256"] in hashes]
        if not same:
            continue
        crossed = [s for s in same if s[1] != s[3]]
        shown = ", ".join(f"{a!r} ({sa}) = {name}/{b!r} ({sb})" for a, sa, b, sb in same[:3]) + (f" and {len(same) - 3} more" if len(same) > 3 else "")
        out.append(
            f"{len(same)} image(s) of this batch are also in batch {name!r} ({f}), byte for byte: {shown}"
            + (f"; {len(crossed)} of them sit in different splits, so a test score may include an image trained on" if crossed else "")
            + "; remove the copies from one batch"
        )
    return out


def _warnings(got: _Collected, others: list, out: Path, rule_info: dict) -> list[str]:
    """What import says but does not refuse: images another batch holds too, EXIF-turned images, a changed split rule."""
    warnings = _cross_batch_warnings(got.images, others)
    oriented = got.oriented
    if oriented:
        shown = ", ".join(f"{n!r} ({describe_orientation(o)})" for n, o in oriented[:3]) + (f" and {len(oriented) - 3} more" if len(oriented) > 3 else "")
        warnings.append(
            f"{len(oriented)} image(s) carry an EXIF orientation tag and are read as displayed: {shown}; boxes must be drawn on "
            "the displayed image. If yours were made on the raw pixels (PIL, labelImg, scripts), remove the tags "
            "(exiftool -Orientation=1 -n FILE) and import again"
        )
    if out.is_file():
        try:
            old_rule = read_json(out).get("info", {}).get("split_rule")
        except (B2PError, AttributeError):
            old_rule = None
        if old_rule is not None and old_rule != rule_info:
            warnings.append(f"{out} was imported with split rule {old_rule}; re-importing with {rule_info} moves images between splits")
    return warnings


def import_batch(
    batch: str,
    images_dir: str | Path,
    *,
    coco: str | Path | None = None,
    yolo_labels: str | Path | None = None,
    yolo_classes: str | Path | None = None,
    masks_dir: str | Path | None = None,
    classes_path: str | Path = "data/classes.json",
    add_classes: bool = False,
    rule: SplitRule | None = None,
    out: str | Path | None = None,
) -> ImportResult:
    """Validate one batch and write its canonical annotation file (and the class list on first use).

    Returns what was written and counted. Raises B2PError (nothing written) on any bad input.
    """
    check_batch_name(batch)
    rule = rule or SplitRule()
    images_dir = Path(images_dir)
    classes_path = Path(classes_path)
    out = Path(out) if out is not None else Path("data/imported") / f"{batch}.json"
    if (coco is None) == (yolo_labels is None):
        raise B2PError("give exactly one box source: --coco FILE, or --yolo-labels DIR with --yolo-classes FILE")
    _check_outputs(out, classes_path, {"--coco": coco, "--yolo-classes": yolo_classes, "--images": images_dir,
                                       "--masks": masks_dir, "--yolo-labels": yolo_labels})
    if not images_dir.is_dir():
        raise B2PError("image folder not found", images_dir)
    src = _read_box_source(images_dir, coco, yolo_labels, yolo_classes)
    others = _other_batches(batch, out)

    # classes: matched by name against the shared list; ids of existing classes never move
    existing = load_class_list(classes_path) if classes_path.exists() else ClassList(())
    classes = existing.merged_with(list(src.categories.values()), allow_new=add_classes, source=src.class_file or src.annotation_file)
    new_classes = list(classes.names[existing.num_classes :])
    remap = {bid: classes.id_of(name) for bid, name in src.categories.items()}

    masks_dir = Path(masks_dir) if masks_dir is not None else None
    masks = _mask_files(masks_dir, src) if masks_dir is not None else {}
    got = _collect(batch, src, images_dir, classes, remap, masks, rule, out)
    images, annotations, manual, clipped = got.images, got.annotations, got.manual, got.clipped

    rule_info = rule.info()
    warnings = _warnings(got, others, out, rule_info)
    # COCO: image files in the folder that the file does not list (not imported; said, not refused)
    unlisted = len(set(list_images(images_dir)) - {im.file_name for im in src.images}) if src.format == "coco" else 0
    split_counts = {s: sum(i["split"] == s for i in images) for s in SPLITS}
    per_class = {n: sum(a["category_id"] == classes.id_of(n) for a in annotations) for n in classes.names}
    info = _batch_info(src, images_dir, masks_dir, masks, rule_info, got, split_counts)
    coco_dict = to_coco_dict(batch, classes, images, annotations, manual, relative_image_root(images_dir, out), info)
    # all checks passed: annotation file first, then the class list (both atomic)
    save_batch_dict(out, coco_dict)
    write_classes = not classes_path.exists() or classes != existing
    if write_classes:
        save_class_list(classes_path, classes)
    return ImportResult(
        out=out,
        classes_path=classes_path,
        classes=classes,
        new_classes=new_classes,
        classes_written=write_classes,
        num_images=len(images),
        num_boxes=len(annotations),
        manual_masks=info["counts"]["manual_masks"],
        clipped_boxes=clipped,
        splits=split_counts,
        boxes_per_class=per_class,
        unlisted_images=unlisted,
        warnings=warnings,
        image_files=[i["file_name"] for i in images],
        label_files=list(src.label_files),
        mask_files=list(masks.values()),
    )


def _read_box_source(images_dir: Path, coco, yolo_labels, yolo_classes) -> SourceBatch:
    """The batch's images, boxes and classes as its COCO file or YOLO folder gives them; refused when it holds no image
    or two of its file names would share one label-map file."""
    if coco is not None:
        if yolo_classes is not None:
            raise B2PError("--yolo-classes goes with --yolo-labels, not with --coco")
        src = read_coco(coco)
    else:
        if yolo_classes is None:
            raise B2PError("--yolo-labels needs --yolo-classes FILE (names, one per line, or a data.yaml)")
        src = read_yolo(images_dir, yolo_labels, yolo_classes)
    if not src.images:
        raise B2PError("the batch holds no images", src.annotation_file)
    check_label_map_keys([im.file_name for im in src.images], src.annotation_file)
    return src


def _collect(batch: str, src: SourceBatch, images_dir: Path, classes: ClassList, remap: dict, masks: dict, rule: SplitRule, out: Path) -> _Collected:
    """Every image, box and mask checked and converted; all the problems raised together, before anything is written."""
    # every problem is collected, so a large batch with many bad boxes is fixed in one round, not one error per run
    problems = Problems(src.annotation_file, "batch")
    for e in _name_length_problems(batch, [im.file_name for im in src.images], out.parent, src.annotation_file):
        problems.add(e)
    got = _Collected()
    for idx, im in enumerate(progress(src.images, f"importing {batch}", total=len(src.images)), 1):
        _import_image(idx, im, images_dir, src, classes, remap, masks.get(_stem(im.file_name)), batch, rule, got, problems)
    for e in _duplicate_problems(got.images, src.annotation_file):
        problems.add(e)
    problems.check()
    return got


def _batch_info(src: SourceBatch, images_dir: Path, masks_dir: Path | None, masks: dict, rule_info: dict, got: _Collected, split_counts: dict) -> dict:
    """The canonical file's extra `info`: its sources (with the masks' digest), split rule, box tolerance and counts."""
    images = got.images
    sources = list(src.sources) + [{"role": "images", "path": str(images_dir)}]
    if masks_dir is not None:
        sources.append({"role": "masks", "path": str(masks_dir), "sha256": tree_digest(masks_dir, list(masks.values())), "files": len(masks)})
    return {
        "source_format": src.format,
        "sources": sources,
        "split_rule": rule_info,
        "box_tolerance_px": BOX_TOLERANCE_PX,
        "clipped_boxes": got.clipped,
        "counts": {"images": len(images), "boxes": len(got.annotations), "manual_masks": sum(i["has_manual_mask"] for i in images), **split_counts},
        "b2p_version": __version__,
    }
