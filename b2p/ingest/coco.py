"""Read a COCO box file into a `SourceBatch`, checking its structure (keys, types, ids, references).

Accepted: the standard COCO detection layout (`images`, `annotations`, `categories`), boxes as
`bbox: [x, y, w, h]` in pixels, optional `segmentation` (polygons, or RLE with compressed or list counts).
Extension: an image entry with `"has_manual_mask": true` declares its segmentations complete, so an image
with that flag and no annotations is a defect-free manual mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from b2p.errors import B2PError
from b2p.fileio import normalize_file_name, read_json, sha256_file
from b2p.ingest.source import SourceAnnotation, SourceBatch, SourceImage, is_int, is_number
from b2p.labels import normalize_class_name


def _require_list(data: dict, key: str, path: Path) -> list:
    if key not in data:
        raise B2PError(f"not a COCO file: the top-level key {key!r} is missing", path)
    if not isinstance(data[key], list):
        raise B2PError(f"not a COCO file: {key!r} must be a list, got {type(data[key]).__name__}", path)
    return data[key]


def _entry(obj: Any, kind: str, index: int, path: Path) -> dict:
    if not isinstance(obj, dict):
        raise B2PError(f"{kind} #{index} must be an object, got {type(obj).__name__}", path)
    return obj


def _field(obj: dict, key: str, check, type_name: str, where: str, path: Path) -> Any:
    if key not in obj:
        raise B2PError(f"{where}: missing key {key!r}", path)
    if not check(obj[key]):
        raise B2PError(f"{where}: {key!r} must be {type_name}, got {obj[key]!r}", path)
    return obj[key]


def _check_segmentation(seg: Any, where: str, path: Path) -> Any:
    """Structure of a COCO segmentation; None when absent or empty. Pixel checks happen in the importer."""
    if seg is None or seg == [] or seg == {}:
        return None
    if isinstance(seg, list):
        for poly in seg:
            if not isinstance(poly, list) or not all(is_number(v) for v in poly):
                raise B2PError(f"{where}: polygon segmentation must be a list of [x1, y1, x2, y2, ...] lists of finite numbers, got {str(poly)[:80]}", path)
            if len(poly) < 6 or len(poly) % 2:
                raise B2PError(f"{where}: a polygon needs an even number (at least 6) of coordinates, got {len(poly)}", path)
        return seg
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(is_int(v) and v > 0 for v in size)):
            raise B2PError(f"{where}: RLE segmentation needs 'size': [height, width], got {size!r}", path)
        if not (isinstance(counts, str) or (isinstance(counts, list) and all(is_int(v) and v >= 0 for v in counts))):
            raise B2PError(f"{where}: RLE 'counts' must be a string (compressed) or a list of non-negative ints", path)
        return seg
    raise B2PError(f"{where}: segmentation must be polygons (a list) or RLE (an object), got {type(seg).__name__}", path)


def b2p_origin(data: dict) -> str | None:
    """Why a COCO-looking file is one b2p wrote itself, or None. Its masks are b2p's own pseudo-masks or
    predictions, not manual masks, so importing it would make them ground truth (and an export's `bbox` is
    each mask's extent, not the annotated box; boxes whose mask was empty are not in it at all)."""
    info = data.get("info") if isinstance(data.get("info"), dict) else {}
    anns = data.get("annotations") if isinstance(data.get("annotations"), list) else []
    first = anns[0] if anns and isinstance(anns[0], dict) else {}
    if info.get("b2p_format") is not None:
        return "a b2p canonical batch file (written by `b2p import`): it is imported already; import the original box file it names under info.sources"
    if "mask_rule" in info or "b2p_box" in first:
        return (
            f"a b2p export (`b2p export`, {info.get('source', 'unknown')} masks): its segmentations are masks b2p made, not manual "
            "masks, and its bboxes are those masks' extents, not the annotated boxes; import the batch's original box file "
            "instead (data/imported/<batch>.json names it under info.sources)"
        )
    if str(info.get("description", "")).startswith("b2p teacher") or ("box_id" in first and "score" in first):
        return "b2p teacher pseudo-masks (instances.json of `b2p teach`), not manual masks; import the batch's original box file instead"
    return None


def read_coco(path: str | Path) -> SourceBatch:
    """Parse a COCO JSON file; raise a B2PError naming the file and the entry at fault. A file b2p wrote
    itself (an export, a teacher's instances.json, a canonical batch file) is refused (`b2p_origin`)."""
    path = Path(path)
    data = read_json(path, "COCO annotation file")
    if not isinstance(data, dict):
        raise B2PError(f"not a COCO file: the top level must be an object, got {type(data).__name__}", path)
    if (origin := b2p_origin(data)) is not None:
        raise B2PError(f"this file is {origin}", path)
    raw_images = _require_list(data, "images", path)
    raw_anns = _require_list(data, "annotations", path)
    raw_cats = _require_list(data, "categories", path)

    categories = _read_categories(raw_cats, path)
    images = _read_images(raw_images, path)
    _read_annotations(raw_anns, images, categories, path)
    return SourceBatch(
        format="coco",
        categories=categories,
        images=list(images.values()),
        annotation_file=path,
        class_file=path,
        sources=[{"role": "coco", "path": str(path), "sha256": sha256_file(path)}],
    )


def _read_categories(raw_cats: list, path: Path) -> dict[int, str]:
    """Class names by category id (positive, unique; names normalised and unique)."""
    categories: dict[int, str] = {}
    for i, c in enumerate(raw_cats):
        c = _entry(c, "category", i, path)
        where = f"category #{i}"
        cid = _field(c, "id", is_int, "an integer", where, path)
        # one spelling per name, as for YOLO names (" crack" is "crack"; NFD "e\u0301" is NFC "\u00e9")
        name = normalize_class_name(_field(c, "name", lambda v: isinstance(v, str) and v.strip(), "a non-empty string", where, path))
        if cid <= 0:
            raise B2PError(f"{where}: category id must be positive (0 is background), got {cid}", path)
        if cid in categories:
            raise B2PError(f"duplicate category id {cid}", path)
        if name in categories.values():
            raise B2PError(f"duplicate category name {name!r}", path)
        categories[cid] = name
    return categories


def _read_images(raw_images: list, path: Path) -> dict[int, SourceImage]:
    """The images by id (unique ids, sizes positive where given, file names normalised and unique)."""
    images: dict[int, SourceImage] = {}
    names: set[str] = set()
    for i, im in enumerate(raw_images):
        im = _entry(im, "image", i, path)
        where = f"image #{i}"
        iid = _field(im, "id", is_int, "an integer", where, path)
        fname = _field(im, "file_name", lambda v: isinstance(v, str) and v, "a non-empty string", where, path)
        where = f"image id {iid} ({fname!r})"
        for key in ("width", "height"):
            if key in im and not (is_int(im[key]) and im[key] > 0):
                raise B2PError(f"{where}: {key!r} must be a positive integer, got {im[key]!r}", path)
        flag = im.get("has_manual_mask", False)
        if not isinstance(flag, bool):
            raise B2PError(f"{where}: 'has_manual_mask' must be true or false, got {flag!r}", path)
        if iid in images:
            raise B2PError(f"duplicate image id {iid}", path)
        try:
            norm = normalize_file_name(fname)
        except B2PError as e:
            raise B2PError(f"{where}: {e.problem}", path) from None
        if norm in names:
            raise B2PError(f"{where}: duplicate image file name {fname!r} (the same file as {norm!r} listed before)", path)
        names.add(norm)
        images[iid] = SourceImage(norm, width=im.get("width"), height=im.get("height"), declared_manual_mask=flag, label_file=path)
    return images


def _read_annotations(raw_anns: list, images: dict[int, SourceImage], categories: dict[int, str], path: Path) -> None:
    """Each annotation joins its image: ids unique where given, a known image and category, a box, a well-formed segmentation."""
    seen_ann_ids: set[int] = set()
    for i, a in enumerate(raw_anns):
        a = _entry(a, "annotation", i, path)
        # the importer renumbers annotations, so a missing id is allowed; it is named by its position, not
        # given one that could collide with a real id
        if "id" in a:
            aid = a["id"]
            if not is_int(aid):
                raise B2PError(f"annotation #{i}: 'id' must be an integer, got {aid!r}", path)
            if aid in seen_ann_ids:
                raise B2PError(f"duplicate annotation id {aid}", path)
            seen_ann_ids.add(aid)
            where = f"annotation id {aid}"
        else:
            where = f"annotation #{i} (no id)"
        image_id = _field(a, "image_id", is_int, "an integer", where, path)
        cat = _field(a, "category_id", is_int, "an integer", where, path)
        bbox = _field(
            a, "bbox", lambda v: isinstance(v, list) and len(v) == 4 and all(is_number(x) for x in v), "[x, y, w, h] finite numbers", where, path
        )
        if image_id not in images:
            raise B2PError(f"{where}: refers to image id {image_id}, which is not in 'images'", path)
        where = f"{where} (image {images[image_id].file_name!r})"
        if cat not in categories:
            raise B2PError(f"{where}: unknown category id {cat}; categories are {sorted(categories)}", path)
        seg = _check_segmentation(a.get("segmentation"), where, path)
        images[image_id].annotations.append(SourceAnnotation(cat, tuple(float(v) for v in bbox), where, seg))
