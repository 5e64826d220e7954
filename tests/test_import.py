"""`b2p import`: COCO and YOLO batches, manual masks, every refused input, splits, class list, atomicity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from b2p.cli import app
from b2p.dataset import load_batch
from b2p.errors import B2PError
from b2p.fileio import write_png_atomic
from b2p.ingest.importer import import_batch
from b2p.labels import load_class_list
from b2p.masks import rle_encode
from b2p.splits import SplitRule

runner = CliRunner()
W, H = 48, 40  # every test image is 48 wide, 40 high
# COCO category ids deliberately not 1..K, so the remapping to canonical ids is exercised
CATS = [{"id": 7, "name": "crack"}, {"id": 3, "name": "spot"}]


def _write_images(folder: Path, names: list[str], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for n in names:
        write_png_atomic(folder / n, rng.integers(0, 255, (H, W, 3), dtype=np.uint8))


def _coco(names: list[str], anns: list[tuple[int, int, list[float]]], **image_extra) -> dict:
    """anns: (image index, category id, bbox)."""
    images = [{"id": 100 + i, "file_name": n, "width": W, "height": H, **image_extra.get(n, {})} for i, n in enumerate(names)]
    annotations = [
        {"id": k + 1, "image_id": 100 + i, "category_id": c, "bbox": list(b), "area": b[2] * b[3], "iscrowd": 0}
        for k, (i, c, b) in enumerate(anns)
    ]
    return {"images": images, "annotations": annotations, "categories": [dict(c) for c in CATS]}


@pytest.fixture
def coco_batch(tmp_path: Path) -> dict:
    """Three images (one in a subfolder), four boxes, manual PNG masks for two images."""
    img = tmp_path / "raw" / "images"
    names = ["a.png", "b.png", "sub/c.png"]
    _write_images(img, names)
    coco = _coco(names, [(0, 7, [2, 3, 10, 5]), (0, 3, [30, 20, 6, 6]), (1, 7, [0, 0, 48, 40]), (2, 3, [10.5, 11.25, 4, 3])])
    ann = tmp_path / "raw" / "ann.json"
    ann.write_text(json.dumps(coco))
    masks = tmp_path / "raw" / "masks"
    lm_a = np.zeros((H, W), np.uint8)
    lm_a[4:7, 2:12] = 7
    lm_a[20:26, 30:36] = 3
    lm_c = np.zeros((H, W), np.uint8)
    lm_c[12:14, 11:14] = 3
    write_png_atomic(masks / "a.png", lm_a)
    write_png_atomic(masks / "sub" / "c.png", lm_c)
    return {"root": tmp_path, "images": img, "coco": ann, "masks": masks, "dict": coco, "lm": {"a.png": lm_a, "sub/c.png": lm_c}}


def _cli(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def _import_args(b: dict, out: Path, classes: Path, masks: bool = True, batch: str = "b1") -> list:
    args = ["import", "--batch", batch, "--images", b["images"], "--coco", b["coco"], "--classes", classes, "--out", out]
    return args + (["--masks", b["masks"]] if masks else [])


# --- COCO ------------------------------------------------------------------------------------------------


def test_coco_import_cli_round_trip(coco_batch: dict, tmp_path: Path) -> None:
    out, classes = tmp_path / "imported" / "b1.json", tmp_path / "classes.json"
    r = _cli(*_import_args(coco_batch, out, classes))
    assert r.exit_code == 0, r.output
    assert load_class_list(classes).names == ("crack", "spot")  # created from the batch, COCO order
    batch = load_batch(out)
    assert batch.name == "b1" and [im.file_name for im in batch.images] == ["a.png", "b.png", "sub/c.png"]
    remap = {7: 1, 3: 2}
    by_name = {im.file_name: im for im in batch.images}
    expected: dict[str, list] = {}
    for a in coco_batch["dict"]["annotations"]:
        name = ["a.png", "b.png", "sub/c.png"][a["image_id"] - 100]
        expected.setdefault(name, []).append((remap[a["category_id"]], tuple(float(v) for v in a["bbox"])))
    for name, im in by_name.items():
        assert [(b.category_id, b.xywh) for b in im.boxes] == expected.get(name, [])
        assert im.path.is_file() and im.batch == "b1" and (im.width, im.height) == (W, H)
    # manual masks: PNG values are batch ids (7, 3) -> canonical (1, 2)
    for name, lm in coco_batch["lm"].items():
        im = by_name[name]
        assert im.has_manual_mask and im.split == "test"
        np.testing.assert_array_equal(im.manual_label_map(), np.vectorize(lambda v: remap.get(v, 0))(lm).astype(np.uint8))
    assert not by_name["b.png"].has_manual_mask and by_name["b.png"].manual_label_map() is None
    assert by_name["b.png"].split == SplitRule().split_of("b1", "b.png", False)
    info = json.loads(out.read_text())["info"]
    assert info["split_rule"] == {"val": 0.15, "test": 0.15, "salt": "b2p", "manual_masks": "test"}
    coco_src = next(s for s in info["sources"] if s["role"] == "coco")
    import hashlib

    assert coco_src["sha256"] == hashlib.sha256(coco_batch["coco"].read_bytes()).hexdigest()
    assert info["counts"]["images"] == 3 and info["counts"]["boxes"] == 4 and info["counts"]["manual_masks"] == 2


def test_coco_segmentation_polygons_rle_and_defect_free(tmp_path: Path) -> None:
    img = tmp_path / "images"
    names = ["p.png", "r.png", "u.png", "free.png"]
    _write_images(img, names)
    square = np.zeros((H, W), bool)
    square[10:20, 5:15] = True  # the polygon below, rasterised by pycocotools
    disc = np.zeros((H, W), bool)
    yy, xx = np.mgrid[:H, :W]
    disc[(yy - 25) ** 2 + (xx - 30) ** 2 <= 16] = True
    compressed = rle_encode(disc)
    # uncompressed RLE: column-major run lengths starting with background
    flat = disc.flatten(order="F").astype(np.uint8)
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])) != 0)
    counts = np.diff(np.concatenate([[0], change])).tolist()
    counts = [c for c in counts if c >= 0]
    uncompressed = {"size": [H, W], "counts": counts}
    coco = _coco(names, [(0, 7, [5, 10, 10, 10]), (1, 3, [26, 21, 9, 9]), (2, 3, [26, 21, 9, 9])], **{"free.png": {"has_manual_mask": True}})
    coco["annotations"][0]["segmentation"] = [[5, 10, 15, 10, 15, 20, 5, 20]]
    coco["annotations"][1]["segmentation"] = compressed
    coco["annotations"][2]["segmentation"] = uncompressed
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(coco))
    assert sum(uncompressed["counts"]) == H * W
    import_batch("seg", img, coco=ann, classes_path=tmp_path / "c.json", out=tmp_path / "seg.json")
    by = {im.file_name: im for im in load_batch(tmp_path / "seg.json").images}
    from b2p.masks import polygons_to_mask

    poly = polygons_to_mask([[5, 10, 15, 10, 15, 20, 5, 20]], H, W)
    assert poly.sum() > 0
    np.testing.assert_array_equal(by["p.png"].manual_label_map(), poly.astype(np.uint8) * 1)
    np.testing.assert_array_equal(by["r.png"].manual_label_map(), disc.astype(np.uint8) * 2)
    np.testing.assert_array_equal(by["u.png"].manual_label_map(), disc.astype(np.uint8) * 2)
    free = by["free.png"]
    assert free.has_manual_mask and free.split == "test" and not free.boxes
    assert not free.manual_label_map().any()


def test_box_tolerance_clips_half_pixel_and_refuses_more(coco_batch: dict, tmp_path: Path) -> None:
    d = coco_batch["dict"]
    d["annotations"][0]["bbox"] = [-0.4, 1, W + 0.8, 5]  # within 0.5 px: clipped to [0, W]
    coco_batch["coco"].write_text(json.dumps(d))
    r = import_batch("b1", coco_batch["images"], coco=coco_batch["coco"], classes_path=tmp_path / "c.json", out=tmp_path / "o.json")
    assert r.clipped_boxes == 1
    box = load_batch(tmp_path / "o.json").images[0].boxes[0]
    assert box.xywh == (0.0, 1.0, float(W), 5.0)
    d["annotations"][0]["bbox"] = [-0.6, 1, 10, 5]
    coco_batch["coco"].write_text(json.dumps(d))
    with pytest.raises(B2PError, match="outside"):
        import_batch("b1", coco_batch["images"], coco=coco_batch["coco"], classes_path=tmp_path / "c.json", out=tmp_path / "o2.json")


# --- YOLO ------------------------------------------------------------------------------------------------


@pytest.fixture
def yolo_batch(tmp_path: Path) -> dict:
    img, lab = tmp_path / "y" / "images", tmp_path / "y" / "labels"
    _write_images(img, ["a.png", "b.png", "nolabel.png"], seed=1)
    lab.mkdir(parents=True)
    # a: crack box x 12..36, y 10..30 ; b: spot box x 0..24, y 0..20
    (lab / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (lab / "b.txt").write_text("\n1 0.25 0.25 0.5 0.5\n")
    names = tmp_path / "y" / "classes.txt"
    names.write_text("crack\nspot\n")
    masks = tmp_path / "y" / "masks"
    lm = np.zeros((H, W), np.uint8)
    lm[15:18, 12:36] = 1  # YOLO class index 0 -> mask value 1
    write_png_atomic(masks / "a.png", lm)
    return {"images": img, "labels": lab, "names": names, "masks": masks, "lm": lm}


def test_yolo_import_function_and_cli(yolo_batch: dict, tmp_path: Path) -> None:
    out = tmp_path / "y.json"
    r = import_batch(
        "y", yolo_batch["images"], yolo_labels=yolo_batch["labels"], yolo_classes=yolo_batch["names"],
        masks_dir=yolo_batch["masks"], classes_path=tmp_path / "c.json", out=out,
    )
    assert (r.num_images, r.num_boxes, r.manual_masks) == (3, 2, 1)
    by = {im.file_name: im for im in load_batch(out).images}
    assert [(b.category_id, b.xywh) for b in by["a.png"].boxes] == [(1, (12.0, 10.0, 24.0, 20.0))]
    assert [(b.category_id, b.xywh) for b in by["b.png"].boxes] == [(2, (0.0, 0.0, 24.0, 20.0))]
    assert by["nolabel.png"].boxes == []  # no label file: a defect-free image
    np.testing.assert_array_equal(by["a.png"].manual_label_map(), yolo_batch["lm"])
    # the same through the CLI, with a data.yaml class list
    yaml_names = tmp_path / "data.yaml"
    yaml_names.write_text("names:\n  0: crack\n  1: spot\n")
    res = _cli(
        "import", "--batch", "y", "--images", yolo_batch["images"], "--yolo-labels", yolo_batch["labels"],
        "--yolo-classes", yaml_names, "--classes", tmp_path / "c.json", "--out", tmp_path / "y2.json",
    )
    assert res.exit_code == 0, res.output
    b2 = load_batch(tmp_path / "y2.json")
    assert [[(b.category_id, b.xywh) for b in im.boxes] for im in b2.images] == [
        [(b.category_id, b.xywh) for b in by[n].boxes] for n in ("a.png", "b.png", "nolabel.png")
    ]


# --- refused inputs: exit 1, the file named, nothing written, earlier outputs byte-identical ---------


def _bad_coco(mutate):
    def case(b: dict) -> tuple[list, str]:
        d = json.loads(json.dumps(b["dict"]))
        name = mutate(d, b)
        b["coco"].write_text(d["_raw"] if "_raw" in d else json.dumps(d))
        return [], name if isinstance(name, str) else b["coco"].name

    return case


def _raw(text):
    def m(d, b):
        d.clear()
        d["_raw"] = text

    return m


def _set_bbox(i, box):
    def m(d, b):
        d["annotations"][i]["bbox"] = box

    return m


def _image_file(what):
    def m(d, b):
        p = b["images"] / "b.png"
        if what == "missing":
            p.unlink()
        else:
            p.write_bytes(b"not a png at all")
        return "b.png"

    return m


def _file_name(name):
    def m(d, b):
        d["images"][1]["file_name"] = name

    return m


def _mask(write):
    def m(d, b):
        return write(b)

    return m


def _mask_wrong_size(b):
    write_png_atomic(b["masks"] / "a.png", np.zeros((H + 1, W), np.uint8))
    return "a.png"


def _mask_unknown_value(b):
    lm = np.zeros((H, W), np.uint8)
    lm[0, 0] = 5  # not a category id of the batch (7, 3)
    write_png_atomic(b["masks"] / "a.png", lm)
    return "a.png"


def _mask_without_image(b):
    write_png_atomic(b["masks"] / "ghost.png", np.zeros((H, W), np.uint8))
    return "ghost.png"


def _rle_wrong_size(d, b):
    d["annotations"][2]["segmentation"] = rle_encode(np.zeros((H, W + 2), bool))
    b["masks"] = None


def _dup_ids(d, b):
    d["images"][1]["id"] = d["images"][0]["id"]


def _dup_names(d, b):
    d["images"][1]["file_name"] = "a.png"


def _missing_key(key):
    def m(d, b):
        del d[key]

    return m


def _segmentation(i, seg):
    """Annotation i gets `seg`; the PNG masks are left out (a batch gives masks one way)."""

    def m(d, b):
        d["annotations"][i]["segmentation"] = seg
        b["masks"] = None

    return m


def _empty_png_mask(b):
    write_png_atomic(b["masks"] / "a.png", np.zeros((H, W), np.uint8))  # a.png has two boxes
    return "a.png"


def _truncated_rle() -> str:
    m = np.zeros((H, W), bool)
    m[5:9, 3:7] = True
    return rle_encode(m)["counts"] + "P"  # 'P' announces a continuation character that never comes


COCO_BAD = {
    "broken_json": (_bad_coco(_raw("{not json")), "not valid JSON"),
    "not_coco_missing_images": (_bad_coco(_missing_key("images")), "'images' is missing"),
    "not_coco_missing_categories": (_bad_coco(_missing_key("categories")), "'categories' is missing"),
    "top_level_list": (_bad_coco(_raw("[1, 2]")), "top level must be an object"),
    "bbox_wrong_type": (_bad_coco(_set_bbox(0, "1,2,3,4")), "'bbox' must be"),
    "bbox_three_numbers": (_bad_coco(_set_bbox(0, [1, 2, 3])), "'bbox' must be"),
    "image_missing": (_bad_coco(_image_file("missing")), "not found"),
    "image_undecodable": (_bad_coco(_image_file("corrupt")), "could not be decoded"),
    "box_zero_size": (_bad_coco(_set_bbox(0, [2, 3, 0, 5])), "zero or negative size"),
    "box_negative_size": (_bad_coco(_set_bbox(0, [2, 3, 5, -1])), "zero or negative size"),
    "box_outside": (_bad_coco(_set_bbox(0, [40, 3, 9, 5])), "box [x=40, y=3, w=9, h=5] lies outside the 48x40 image"),
    "box_far_outside": (_bad_coco(_set_bbox(0, [100, 100, 5, 5])), "outside"),
    "unknown_category": (_bad_coco(lambda d, b: d["annotations"][0].update(category_id=99)), "unknown category id 99"),
    "unknown_image_id": (_bad_coco(lambda d, b: d["annotations"][0].update(image_id=5)), "image id 5"),
    "duplicate_file_names": (_bad_coco(_dup_names), "duplicate image file name"),
    "duplicate_image_ids": (_bad_coco(_dup_ids), "duplicate image id"),
    "escaping_file_name": (_bad_coco(_file_name("../outside.png")), "escapes"),
    "absolute_file_name": (_bad_coco(_file_name("/etc/passwd")), "relative path"),
    "declared_size_differs": (_bad_coco(lambda d, b: d["images"][0].update(width=50)), "declared 50x40"),
    "mask_wrong_size": (_bad_coco(_mask(_mask_wrong_size)), "48x41"),
    "mask_unknown_value": (_bad_coco(_mask(_mask_unknown_value)), "mask value 5"),
    "mask_without_image": (_bad_coco(_mask(_mask_without_image)), "no image"),
    "rle_wrong_size": (_bad_coco(_rle_wrong_size), "RLE size"),
    # segmentation is ground truth: a corrupt or mis-scaled one must be refused, never painted
    "rle_counts_too_short": (_bad_coco(_segmentation(2, {"size": [H, W], "counts": "0"})), "RLE run lengths sum to 0"),
    "rle_counts_truncated": (_bad_coco(_segmentation(2, {"size": [H, W], "counts": _truncated_rle()})), "truncated"),
    "rle_counts_too_long": (_bad_coco(_segmentation(2, {"size": [H, W], "counts": rle_encode(np.zeros((H, W + 1), bool))["counts"]})), "not height*width"),
    "rle_counts_bad_character": (_bad_coco(_segmentation(2, {"size": [H, W], "counts": "0~~"})), "corrupt"),
    "rle_list_counts_wrong_sum": (_bad_coco(_segmentation(2, {"size": [H, W], "counts": [5, 10]})), "sum to 15"),
    "polygon_nan": (_bad_coco(_segmentation(2, [[1, 2, float("nan"), 4, 5, 6]])), "finite numbers"),
    "polygon_huge_int": (_bad_coco(_segmentation(2, [[1, 2, 10**400, 4, 5, 6]])), "finite numbers"),
    "polygon_outside": (_bad_coco(_segmentation(2, [[0, 0, 100, 0, 100, 30]])), "outside the 48x40 image"),
    "polygon_normalised": (_bad_coco(_segmentation(2, [[0.1, 0.1, 0.9, 0.1, 0.9, 0.9]])), "not normalised"),
    "segmentation_empty": (_bad_coco(_segmentation(2, rle_encode(np.zeros((H, W), bool)))), "covers no pixel"),
    "segmentation_outside_its_box": (_bad_coco(_segmentation(3, [[30, 30, 40, 30, 40, 38, 30, 38]])), "entirely outside its box"),
    "mask_png_empty_but_boxes": (_bad_coco(_mask(_empty_png_mask)), "mask is empty"),
    # numbers and files Python cannot read as they are: one clear error, not a traceback
    "bbox_huge_int": (_bad_coco(_set_bbox(0, [41, 50, 10**400, 3])), "'bbox' must be"),
    "bbox_nan": (_bad_coco(_set_bbox(0, [1, 2, float("nan"), 3])), "'bbox' must be"),
    "integer_over_digit_limit": (_bad_coco(_raw('{"images": [], "x": ' + "1" * 5000 + "}")), "number too long"),
    "nested_too_deeply": (_bad_coco(_raw("[" * 100000)), "nested too deeply"),
    "box_empty_once_rounded": (_bad_coco(_set_bbox(0, [10, 10, 0.0001, 5])), "rounded to 3 decimals"),
    "category_name_blank": (_bad_coco(lambda d, b: d["categories"][0].update(name="  ")), "non-empty string"),
    "partial_segmentation": (
        _bad_coco(lambda d, b: (d["annotations"][0].update(segmentation=[[2, 3, 12, 3, 12, 8]]), b.update(masks=None))),
        "has no segmentation",
    ),
}


def _snapshot(*paths: Path) -> dict:
    return {p: p.read_bytes() for p in paths}


@pytest.mark.parametrize("case", sorted(COCO_BAD))
def test_bad_coco_input_refused_and_nothing_written(case: str, coco_batch: dict, tmp_path: Path) -> None:
    out, classes = tmp_path / "imported" / "b1.json", tmp_path / "classes.json"
    assert _cli(*_import_args(coco_batch, out, classes)).exit_code == 0
    before = _snapshot(out, classes)
    make, message = COCO_BAD[case]
    _, file_named = make(coco_batch)
    fresh_out = tmp_path / "imported" / "fresh.json"
    for target in (out, fresh_out):
        args = _import_args(coco_batch, target, classes, masks=coco_batch["masks"] is not None)
        r = _cli(*args)
        assert r.exit_code == 1, r.output
        assert file_named in r.output and message in r.output, r.output
        assert "Traceback" not in r.output
    assert _snapshot(out, classes) == before
    assert not fresh_out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["b1.json"]  # no temp files left behind


def _yolo_case(write):
    def case(y: dict) -> str:
        return write(y)

    return case


def _label(text, name="a.txt"):
    def w(y):
        (y["labels"] / name).write_text(text)
        return name

    return w


YOLO_BAD = {
    "too_few_fields": (_label("0 0.5 0.5 0.5\n"), "expected 5 fields"),
    "too_many_fields": (_label("0 0.5 0.5 0.5 0.5 0.9\n"), "expected 5 fields"),
    "not_a_number": (_label("0 0.5 abc 0.5 0.5\n"), "must be numbers"),
    "class_not_int": (_label("x 0.5 0.5 0.5 0.5\n"), "not an integer"),
    "coordinate_above_one": (_label("0 1.2 0.5 0.5 0.5\n"), "outside [0, 1]"),
    "coordinate_negative": (_label("0 0.5 0.5 -0.1 0.5\n"), "outside [0, 1]"),
    "zero_size": (_label("0 0.5 0.5 0 0.5\n"), "zero or negative size"),
    "box_beyond_image": (_label("0 0.9 0.5 0.5 0.5\n"), "outside"),
    "class_beyond_list": (_label("2 0.5 0.5 0.5 0.5\n"), "class index 2 is beyond"),
    "label_without_image": (_label("0 0.5 0.5 0.5 0.5\n", "ghost.txt"), "has no image"),
    "label_without_image_upper_case": (_label("0 0.5 0.5 0.5 0.5\n", "ghost.TXT"), "has no image"),
    "two_label_files_one_stem": (_label("1 0.5 0.5 0.5 0.5\n", "a.TXT"), "two YOLO label files for one name"),
    "label_file_bom_then_garbage": (_label("\ufeffx 0.5 0.5 0.5 0.5\n"), "class index 'x' is not an integer"),
}


@pytest.mark.parametrize("case", sorted(YOLO_BAD))
def test_bad_yolo_input_refused_and_nothing_written(case: str, yolo_batch: dict, tmp_path: Path) -> None:
    out, classes = tmp_path / "y.json", tmp_path / "classes.json"
    args = ["import", "--batch", "y", "--images", yolo_batch["images"], "--yolo-labels", yolo_batch["labels"],
            "--yolo-classes", yolo_batch["names"], "--classes", classes, "--out", out]
    assert _cli(*args).exit_code == 0
    before = _snapshot(out, classes)
    write, message = YOLO_BAD[case]
    file_named = write(yolo_batch)
    r = _cli(*args)
    assert r.exit_code == 1 and file_named in r.output and message in r.output, r.output
    assert _snapshot(out, classes) == before
    with pytest.raises(B2PError, match=message.replace("[", r"\[").replace("]", r"\]")):
        import_batch("y", yolo_batch["images"], yolo_labels=yolo_batch["labels"], yolo_classes=yolo_batch["names"],
                     classes_path=tmp_path / "other_classes.json", out=tmp_path / "other.json")
    assert not (tmp_path / "other.json").exists() and not (tmp_path / "other_classes.json").exists()


# --- several batches: split stability, class list growth -------------------------------------------------


def test_second_batch_keeps_splits_and_class_ids(coco_batch: dict, tmp_path: Path) -> None:
    out1, classes = tmp_path / "imported" / "b1.json", tmp_path / "classes.json"
    names = [f"im_{i:02d}.png" for i in range(12)]
    _write_images(coco_batch["images"], names, seed=5)  # not the fixture's seed: other pixels than a.png's
    d = coco_batch["dict"]
    d["images"] += [{"id": 200 + i, "file_name": n, "width": W, "height": H} for i, n in enumerate(names)]
    coco_batch["coco"].write_text(json.dumps(d))
    rule = ["--val", "0.3", "--test", "0.3"]
    assert _cli(*_import_args(coco_batch, out1, classes), *rule).exit_code == 0
    first = {im.file_name: im.split for im in load_batch(out1).images}
    assert set(first.values()) == {"train", "val", "test"}
    b1_bytes = out1.read_bytes()

    # batch 2: other ids for the same names, plus a new class
    img2 = tmp_path / "raw2"
    _write_images(img2, ["x.png"], seed=5)
    coco2 = {
        "images": [{"id": 1, "file_name": "x.png", "width": W, "height": H}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]},
                        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [9, 9, 4, 4]},
                        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [20, 9, 4, 4]}],
        "categories": [{"id": 1, "name": "spot"}, {"id": 2, "name": "dent"}, {"id": 3, "name": "crack"}],
    }
    (tmp_path / "b2.json").write_text(json.dumps(coco2))
    args2 = ["import", "--batch", "b2", "--images", img2, "--coco", tmp_path / "b2.json", "--classes", classes,
             "--out", tmp_path / "imported" / "b2.json", *rule]
    classes_before = classes.read_bytes()
    r = _cli(*args2)
    assert r.exit_code == 1 and "dent" in r.output and "--add-classes" in r.output
    assert classes.read_bytes() == classes_before and not (tmp_path / "imported" / "b2.json").exists()
    r = _cli(*args2, "--add-classes")
    assert r.exit_code == 0, r.output
    assert load_class_list(classes).names == ("crack", "spot", "dent")  # existing ids kept, new appended
    b2 = load_batch(tmp_path / "imported" / "b2.json")
    assert [b.category_id for b in b2.images[0].boxes] == [2, 3, 1]  # matched by name
    assert out1.read_bytes() == b1_bytes

    # re-importing batch 1 with more images keeps every existing image in its split
    more = [f"new_{i}.png" for i in range(5)]
    _write_images(coco_batch["images"], more, seed=6)
    d["images"] += [{"id": 300 + i, "file_name": n, "width": W, "height": H} for i, n in enumerate(more)]
    coco_batch["coco"].write_text(json.dumps(d))
    assert _cli(*_import_args(coco_batch, out1, classes), *rule).exit_code == 0
    again = {im.file_name: im.split for im in load_batch(out1).images}
    assert {k: again[k] for k in first} == first and len(again) == len(first) + 5


def test_renamed_class_is_refused_with_hint(coco_batch: dict, tmp_path: Path) -> None:
    classes = tmp_path / "classes.json"
    import_batch("b1", coco_batch["images"], coco=coco_batch["coco"], classes_path=classes, out=tmp_path / "o.json")
    d = coco_batch["dict"]
    d["categories"][0]["name"] = "crak"
    coco_batch["coco"].write_text(json.dumps(d))
    with pytest.raises(B2PError, match="did you mean 'crack'"):
        import_batch("b1", coco_batch["images"], coco=coco_batch["coco"], classes_path=classes, out=tmp_path / "o.json")


def test_interrupted_write_leaves_old_file_intact(coco_batch: dict, tmp_path: Path, monkeypatch) -> None:
    out, classes = tmp_path / "imported" / "b1.json", tmp_path / "classes.json"
    import_batch("b1", coco_batch["images"], coco=coco_batch["coco"], classes_path=classes, out=out)
    before = _snapshot(out, classes)
    d = coco_batch["dict"]
    d["annotations"].append({"id": 99, "image_id": 101, "category_id": 3, "bbox": [1, 1, 3, 3]})
    coco_batch["coco"].write_text(json.dumps(d))
    import b2p.fileio

    def crash(fd):
        raise KeyboardInterrupt  # power cut / Ctrl-C after the bytes were written, before the rename

    monkeypatch.setattr(b2p.fileio.os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        import_batch("b1", coco_batch["images"], coco=coco_batch["coco"], classes_path=classes, out=out)
    monkeypatch.undo()
    assert _snapshot(out, classes) == before
    assert sorted(os.listdir(out.parent)) == ["b1.json"]
    assert len(load_batch(out).images[1].boxes) == 1


def test_source_choice_errors(coco_batch: dict, tmp_path: Path) -> None:
    r = _cli("import", "--batch", "b1", "--images", coco_batch["images"], "--classes", tmp_path / "c.json")
    assert r.exit_code == 1 and "exactly one box source" in r.output
    r = _cli("import", "--batch", "../evil", "--images", coco_batch["images"], "--coco", coco_batch["coco"])
    assert r.exit_code == 1 and "batch name" in r.output


def test_params_yaml_sets_split_and_cli_overrides(coco_batch: dict, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("import:\n  val: 0.0\n  test: 1.0\n  salt: s1\n")
    out = tmp_path / "o.json"
    base = ["import", "--batch", "b1", "--images", coco_batch["images"], "--coco", coco_batch["coco"],
            "--classes", tmp_path / "c.json", "--out", out, "--params", params]
    assert _cli(*base).exit_code == 0
    info = json.loads(out.read_text())["info"]["split_rule"]
    assert info == {"val": 0.0, "test": 1.0, "salt": "s1", "manual_masks": "test"}
    assert {im.split for im in load_batch(out).images} == {"test"}
    r = _cli(*base, "--test", "0", "--val", "0")
    assert r.exit_code == 0 and "moves images between splits" in r.output
    assert {im.split for im in load_batch(out).images} == {"train"}
    params.write_text("import:\n  tset: 0.3\n")
    r = _cli(*base)
    assert r.exit_code == 1 and "import.tset: unknown key (did you mean 'test'?)" in r.output and "params.yaml" in r.output


# --- audit findings: inputs that were read wrongly or silently ignored -----------------------------------


def _yolo_import(y: dict, tmp_path: Path, **kw):
    return import_batch("y", y["images"], yolo_labels=y["labels"], yolo_classes=y["names"],
                        classes_path=tmp_path / "c.json", out=tmp_path / "y.json", **kw)


def test_upper_case_label_and_mask_suffixes_are_read(yolo_batch: dict, tmp_path: Path) -> None:
    """`a.TXT` and `a.PNG` (Windows tools) are the image's label and mask, as `A.PNG` images are images."""
    (yolo_batch["labels"] / "a.txt").rename(yolo_batch["labels"] / "a.TXT")
    (yolo_batch["masks"] / "a.png").rename(yolo_batch["masks"] / "a.PNG")
    r = _yolo_import(yolo_batch, tmp_path, masks_dir=yolo_batch["masks"])
    assert (r.num_boxes, r.manual_masks) == (2, 1)
    by = {im.file_name: im for im in load_batch(tmp_path / "y.json").images}
    assert [(b.category_id, b.xywh) for b in by["a.png"].boxes] == [(1, (12.0, 10.0, 24.0, 20.0))]
    np.testing.assert_array_equal(by["a.png"].manual_label_map(), yolo_batch["lm"])
    write_png_atomic(yolo_batch["masks"] / "a.png", yolo_batch["lm"])  # two masks for one image: refused
    with pytest.raises(B2PError, match="two mask files for one name"):
        _yolo_import(yolo_batch, tmp_path, masks_dir=yolo_batch["masks"])


def test_empty_yolo_labels_folder_is_refused(yolo_batch: dict, tmp_path: Path) -> None:
    for p in yolo_batch["labels"].iterdir():
        p.unlink()
    (yolo_batch["labels"] / "notes.md").write_text("labels are elsewhere\n")
    r = _cli("import", "--batch", "y", "--images", yolo_batch["images"], "--yolo-labels", yolo_batch["labels"],
             "--yolo-classes", yolo_batch["names"], "--classes", tmp_path / "c.json", "--out", tmp_path / "y.json")
    assert r.exit_code == 1 and "no YOLO label file" in r.output and str(yolo_batch["labels"]) in r.output, r.output
    assert not (tmp_path / "y.json").exists() and not (tmp_path / "c.json").exists()


def test_decomposed_image_name_matches_composed_label_name(yolo_batch: dict, tmp_path: Path) -> None:
    """macOS writes 'é' decomposed (NFD); the label tool wrote it composed (NFC): one image, one label."""
    import unicodedata

    nfd, nfc = unicodedata.normalize("NFD", "défaut"), unicodedata.normalize("NFC", "défaut")
    assert nfd != nfc
    (yolo_batch["images"] / "a.png").rename(yolo_batch["images"] / f"{nfd}.png")
    (yolo_batch["labels"] / "a.txt").rename(yolo_batch["labels"] / f"{nfc}.txt")
    (yolo_batch["masks"] / "a.png").rename(yolo_batch["masks"] / f"{nfc}.png")
    r = _yolo_import(yolo_batch, tmp_path, masks_dir=yolo_batch["masks"])
    assert (r.num_images, r.num_boxes, r.manual_masks) == (3, 2, 1)


def test_class_list_bom_and_class_errors_name_the_class_file(yolo_batch: dict, tmp_path: Path) -> None:
    yolo_batch["names"].write_bytes("\ufeffcrack\nspot\n".encode())  # Windows Notepad's UTF-8
    _yolo_import(yolo_batch, tmp_path)
    assert load_class_list(tmp_path / "c.json").names == ("crack", "spot")
    yolo_batch["names"].write_text("crack\nspott\n")
    r = _cli("import", "--batch", "y", "--images", yolo_batch["images"], "--yolo-labels", yolo_batch["labels"],
             "--yolo-classes", yolo_batch["names"], "--classes", tmp_path / "c.json", "--out", tmp_path / "y.json")
    assert r.exit_code == 1 and f"{yolo_batch['names']}: batch introduces classes" in r.output, r.output


def test_coco_category_names_are_stripped_like_yolo_names(coco_batch: dict, tmp_path: Path) -> None:
    classes = tmp_path / "c.json"
    import_batch("b1", coco_batch["images"], coco=coco_batch["coco"], classes_path=classes, out=tmp_path / "o.json")
    d = coco_batch["dict"]
    d["categories"][0]["name"] = " crack\t"
    coco_batch["coco"].write_text(json.dumps(d))
    import_batch("b1", coco_batch["images"], coco=coco_batch["coco"], classes_path=classes, out=tmp_path / "o.json")
    assert load_class_list(classes).names == ("crack", "spot")  # not a third class " crack\t"


def test_annotation_without_id_is_named_by_position(coco_batch: dict, tmp_path: Path) -> None:
    d = coco_batch["dict"]
    del d["annotations"][1]["id"]  # [{id: 1}, {no id}, {id: 3}, ...]: no "duplicate annotation id 1"
    coco_batch["coco"].write_text(json.dumps(d))
    r = import_batch("b1", coco_batch["images"], coco=coco_batch["coco"], classes_path=tmp_path / "c.json", out=tmp_path / "o.json")
    assert r.num_boxes == 4
    d["annotations"][1]["bbox"] = [100, 100, 5, 5]
    coco_batch["coco"].write_text(json.dumps(d))
    with pytest.raises(B2PError, match=r"annotation #1 \(no id\).*outside"):
        import_batch("b1", coco_batch["images"], coco=coco_batch["coco"], classes_path=tmp_path / "c.json", out=tmp_path / "o.json")


@pytest.mark.parametrize("target", ["--out", "--classes"])
def test_output_over_the_coco_input_is_refused(coco_batch: dict, tmp_path: Path, target: str) -> None:
    before = coco_batch["coco"].read_bytes()
    out, classes = tmp_path / "o.json", tmp_path / "c.json"
    args = ["import", "--batch", "b1", "--images", coco_batch["images"], "--coco", coco_batch["coco"],
            "--out", coco_batch["coco"] if target == "--out" else out, "--classes", coco_batch["coco"] if target == "--classes" else classes]
    r = _cli(*args)
    assert r.exit_code == 1 and f"{target} is the --coco input file" in r.output and coco_batch["coco"].name in r.output, r.output
    assert coco_batch["coco"].read_bytes() == before and not out.exists() and not classes.exists()


def test_clipped_counts_only_boxes_that_overhang(coco_batch: dict, tmp_path: Path) -> None:
    d = coco_batch["dict"]
    d["annotations"][0]["bbox"] = [0.1, 0.1, 10.3, 5.7]  # inside the image: x1 - x0 differs from w in float
    d["annotations"][1]["bbox"] = [37.9, 34.3, 10.1, 5.7]  # ends at 48.0 and 40.0 (exactly the border)
    coco_batch["coco"].write_text(json.dumps(d))
    r = import_batch("b1", coco_batch["images"], coco=coco_batch["coco"], classes_path=tmp_path / "c.json", out=tmp_path / "o.json")
    assert r.clipped_boxes == 0
    assert [b.xywh for b in load_batch(tmp_path / "o.json").images[0].boxes] == [(0.1, 0.1, 10.3, 5.7), (37.9, 34.3, 10.1, 5.7)]
    d["annotations"][1]["bbox"] = [37.9, 34.3, 10.3, 5.7]  # 0.2 px over the right edge: clipped
    coco_batch["coco"].write_text(json.dumps(d))
    r = import_batch("b1", coco_batch["images"], coco=coco_batch["coco"], classes_path=tmp_path / "c.json", out=tmp_path / "o.json")
    assert r.clipped_boxes == 1


def test_batch_name_with_trailing_newline_is_refused(coco_batch: dict, tmp_path: Path) -> None:
    with pytest.raises(B2PError, match="batch name"):
        import_batch("b1\n", coco_batch["images"], coco=coco_batch["coco"], classes_path=tmp_path / "c.json", out=tmp_path / "o.json")
    assert not (tmp_path / "o.json").exists()


def test_symlinked_image_files_import_and_names_leaving_the_folder_do_not(coco_batch: dict, tmp_path: Path) -> None:
    """A folder of symlinks (DVC's cache.type symlink, a shared store) is a folder of images; a name with
    '..' still leaves the folder and is refused."""
    links = tmp_path / "links"
    for f in coco_batch["images"].rglob("*.png"):
        dst = links / f.relative_to(coco_batch["images"])
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(f.resolve())
    out, classes = tmp_path / "imported" / "b1.json", tmp_path / "classes.json"
    r = _cli("import", "--batch", "b1", "--images", links, "--coco", coco_batch["coco"], "--classes", classes, "--out", out)
    assert r.exit_code == 0, r.output
    assert [im.file_name for im in load_batch(out).images] == ["a.png", "b.png", "sub/c.png"]
    bad = dict(coco_batch["dict"])
    bad["images"] = [{**bad["images"][0], "file_name": "sub/../../a.png"}, *bad["images"][1:]]
    ann = tmp_path / "bad.json"
    ann.write_text(json.dumps(bad))
    r = _cli("import", "--batch", "b2", "--images", links, "--coco", ann, "--classes", classes, "--out", tmp_path / "imported" / "b2.json")
    assert r.exit_code == 1 and "escapes the" in r.output and not (tmp_path / "imported" / "b2.json").exists()


def test_exif_oriented_images_are_named_on_import(tmp_path: Path) -> None:
    """A JPEG whose EXIF tag turns it 90 degrees is read as displayed (48 wide, 64 high): the import warns
    and names the tag; a COCO file declaring the raw 64x48 size is refused with a message naming EXIF."""
    from PIL import Image

    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise
    Image.fromarray(np.full((48, 64, 3), 128, np.uint8)).save(img_dir / "r.jpg", exif=exif.tobytes())
    coco = {"images": [{"id": 1, "file_name": "r.jpg", "width": 48, "height": 64}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 10, 10]}],
            "categories": [{"id": 1, "name": "crack"}]}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(coco))
    out, classes = tmp_path / "imported" / "b1.json", tmp_path / "classes.json"
    r = _cli("import", "--batch", "b1", "--images", img_dir, "--coco", ann, "--classes", classes, "--out", out)
    assert r.exit_code == 0, r.output
    assert "EXIF orientation 6" in r.output and "'r.jpg'" in r.output and "displayed" in r.output
    assert (load_batch(out).images[0].width, load_batch(out).images[0].height) == (48, 64)
    # exported, the file keeps its tag beside masks drawn on the displayed image: the export says so
    from b2p.labels import label_map_path, write_label_map

    write_label_map(label_map_path(tmp_path / "masks", "b1", "r.jpg"), np.zeros((64, 48), np.uint8))
    r = _cli("export", "--imported", out.parent, "--source", "teacher", "--source-root", tmp_path / "masks", "--format", "semantic",
             "--out", tmp_path / "export", "--quiet")
    assert r.exit_code == 0, r.output
    assert "EXIF orientation tag" in r.output and "b1/r.jpg" in r.output
    assert json.loads((tmp_path / "export" / "semantic" / "export.json").read_text())["info"]["exif_oriented_images"] == ["b1/r.jpg"]
    coco["images"][0].update(width=64, height=48)  # the raw pixels' size
    ann.write_text(json.dumps(coco))
    r = _cli("import", "--batch", "b2", "--images", img_dir, "--coco", ann, "--classes", classes, "--out", tmp_path / "imported" / "b2.json")
    assert r.exit_code == 1 and "EXIF orientation 6" in r.output and "exiftool" in r.output
    assert not (tmp_path / "imported" / "b2.json").exists()
