"""Manual masks must agree with their boxes (issue 40, items 1 and 2), PNG and COCO alike: every hostile case
exits 1 naming the image, the box or the class and the file at fault, lists every problem of the batch at
once, and leaves the earlier outputs byte-identical. Masks that boxes were made from always pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from b2p.cli import app
from b2p.dataset import load_batch
from b2p.fileio import write_png_atomic
from b2p.ingest.agreement import tolerant_bounds
from b2p.masks import rle_encode

runner = CliRunner()
S = 32  # square images, so that a transposed mask still has the image's size
CATS = [{"id": 7, "name": "crack"}, {"id": 3, "name": "spot"}]  # not 1..K: the remapping is exercised
BOXES = {"a.png": [(7, [2, 2, 8, 5])], "b.png": [(3, [20, 12, 6, 6])], "c.png": [(7, [4, 20, 10, 3]), (3, [24, 2, 4, 4])]}


def _truth(name: str) -> np.ndarray:
    """The exact mask of each image's boxes, in the batch's own class ids (what a PNG mask holds)."""
    lm = np.zeros((S, S), np.uint8)
    for cid, (x, y, w, h) in BOXES[name]:
        lm[y : y + h, x : x + w] = cid
    return lm


def _coco(boxes: dict = BOXES, cats: list = CATS) -> dict:
    names = sorted(boxes)
    return {
        "images": [{"id": i + 1, "file_name": n, "width": S, "height": S} for i, n in enumerate(names)],
        "annotations": [
            {"id": 10 * (i + 1) + k, "image_id": i + 1, "category_id": c, "bbox": b}
            for i, n in enumerate(names) for k, (c, b) in enumerate(boxes[n])
        ],
        "categories": cats,
    }


def _snapshot(*paths: Path) -> dict:
    return {p: p.read_bytes() for p in paths}


@pytest.fixture
def batch(tmp_path: Path) -> dict:
    """Three images with agreeing PNG masks, imported once: the earlier outputs a bad mask must not touch."""
    rng = np.random.default_rng(3)
    img, masks = tmp_path / "images", tmp_path / "masks"
    for n in BOXES:
        write_png_atomic(img / n, rng.integers(0, 255, (S, S, 3), dtype=np.uint8))
        write_png_atomic(masks / n, _truth(n))
    coco = tmp_path / "ann.json"
    coco.write_text(json.dumps(_coco()))
    b = {"images": img, "masks": masks, "coco": coco, "out": tmp_path / "imported" / "b1.json", "classes": tmp_path / "classes.json"}
    r = _import(b)
    assert r.exit_code == 0, r.output
    b["before"] = _snapshot(b["out"], b["classes"])
    return b


def _import(b: dict, masks: bool = True):
    args = ["import", "--batch", "b1", "--images", b["images"], "--coco", b["coco"], "--classes", b["classes"], "--out", b["out"]]
    return runner.invoke(app, [str(a) for a in [*args, *(["--masks", b["masks"]] if masks else [])]])


def _refused(b: dict, *expect: str, masks: bool = True) -> str:
    r = _import(b, masks)
    assert r.exit_code == 1, r.output
    for text in expect:
        assert text in r.output, r.output
    assert "Traceback" not in r.output
    assert _snapshot(b["out"], b["classes"]) == b["before"]
    assert sorted(p.name for p in b["out"].parent.iterdir()) == ["b1.json"]
    return r.output


# --- 1. PNG label maps -------------------------------------------------------------------------------------


def test_agreeing_masks_import_exactly(batch):
    by = {im.file_name: im for im in load_batch(batch["out"]).images}
    remap = np.zeros(256, np.uint8)
    remap[7], remap[3] = 1, 2
    for n in BOXES:
        np.testing.assert_array_equal(by[n].manual_label_map(), remap[_truth(n)])


def test_masks_of_two_images_swapped(batch):
    a, b = (batch["masks"] / "a.png").read_bytes(), (batch["masks"] / "b.png").read_bytes()
    (batch["masks"] / "a.png").write_bytes(b)
    (batch["masks"] / "b.png").write_bytes(a)
    out = _refused(batch, "4 problems in this batch", "a.png", "b.png",
                   "annotation id 10 (image 'a.png') (box [2, 2, 8, 5], class 'crack') holds no 'crack' pixel",
                   "pixel(s) of class 'spot'", "but the image has no 'spot' box")
    assert str(batch["masks"] / "a.png") in out and str(batch["masks"] / "b.png") in out


def test_transposed_mask(batch):
    write_png_atomic(batch["masks"] / "c.png", _truth("c.png").T.copy())
    _refused(batch, str(batch["masks"] / "c.png"), "image 'c.png'", "holds no 'crack' pixel", "lie outside every 'crack' box")


def test_400_mask_pixels_outside_every_box(batch):
    lm = _truth("a.png")
    lm[12:32, 12:32] = 7  # 400 crack pixels, far from a.png's only box
    write_png_atomic(batch["masks"] / "a.png", lm)
    _refused(batch, "a.png", "400 manual-mask pixel(s) of class 'crack' at x 12..31, y 12..31 lie outside every 'crack' box")


def test_mask_class_with_no_box_of_that_class(batch):
    lm = _truth("b.png")
    lm[lm == 3] = 7  # crack where b.png's only box is a spot
    write_png_atomic(batch["masks"] / "b.png", lm)
    _refused(batch, "b.png", "of class 'crack'", "but the image has no 'crack' box; are the mask values this batch's class ids?",
             "(box [20, 12, 6, 6], class 'spot') holds no 'spot' pixel of the manual mask; it holds only 'crack' pixels")


def test_categories_renumbered_without_remapping_the_png_values(batch):
    # crack is now category 3 and spot 7, the boxes follow, the PNGs still paint crack as 7 and spot as 3
    swap = {7: 3, 3: 7}
    renumbered = {n: [(swap[c], b) for c, b in boxes] for n, boxes in BOXES.items()}
    batch["coco"].write_text(json.dumps(_coco(renumbered, cats=[{"id": 3, "name": "crack"}, {"id": 7, "name": "spot"}])))
    _refused(batch, "problems in this batch", "holds no 'crack' pixel", "holds no 'spot' pixel", "but the image has no")


def test_every_mask_problem_of_a_batch_is_listed_at_once(tmp_path):
    rng = np.random.default_rng(4)
    names = [f"m{i:02d}.png" for i in range(25)]
    boxes = {n: [(7, [2, 2, 8, 5])] for n in names}
    for n in names:
        write_png_atomic(tmp_path / "images" / n, rng.integers(0, 255, (S, S, 3), dtype=np.uint8))
        lm = np.zeros((S, S), np.uint8)
        lm[20:24, 20:24] = 7  # outside the box: the box holds no crack pixel, 16 pixels have no box
        write_png_atomic(tmp_path / "masks" / n, lm)
    (tmp_path / "ann.json").write_text(json.dumps(_coco(boxes)))
    b = {"images": tmp_path / "images", "masks": tmp_path / "masks", "coco": tmp_path / "ann.json",
         "out": tmp_path / "imported" / "b1.json", "classes": tmp_path / "classes.json"}
    r = _import(b)
    assert r.exit_code == 1 and "50 problems in this batch" in r.output and "... and 30 more" in r.output, r.output
    assert r.output.count("holds no 'crack' pixel") == 10 and r.output.count("lie outside every 'crack' box") == 10
    assert not (tmp_path / "imported").exists() and not (tmp_path / "classes.json").exists()


def test_half_pixel_tolerance_takes_one_pixel_around_an_integer_box(batch):
    """Box [2, 2, 8, 5] covers pixels x 2..9, y 2..6; a pixel whose centre is within 0.5 px of it counts."""
    assert tolerant_bounds((2, 2, 8, 5), (S, S)) == (1, 1, 11, 8)
    lm = np.zeros((S, S), np.uint8)
    lm[1:8, 1:11] = 7  # one pixel larger on every side: accepted
    write_png_atomic(batch["masks"] / "a.png", lm)
    assert _import(batch).exit_code == 0
    lm[8, 5] = 7  # two pixels below the box: refused
    write_png_atomic(batch["masks"] / "a.png", lm)
    batch["before"] = _snapshot(batch["out"], batch["classes"])
    _refused(batch, "1 manual-mask pixel(s) of class 'crack' at x 5..5, y 8..8 lie outside every 'crack' box")


def test_empty_mask_of_an_image_with_boxes_and_a_defect_free_image(batch):
    write_png_atomic(batch["masks"] / "a.png", np.zeros((S, S), np.uint8))
    _refused(batch, "a.png", "mask is empty (all 0) but the image has 1 box(es)")


# --- 2. COCO segmentations -----------------------------------------------------------------------------------


def _with_segmentation(batch: dict, name: str, k: int, seg) -> None:
    d = _coco()
    image_id = sorted(BOXES).index(name) + 1
    anns = [a for a in d["annotations"] if a["image_id"] == image_id]
    for a in anns:  # a manual mask covers every defect of its image: the others get their exact masks
        x, y, w, h = a["bbox"]
        m = np.zeros((S, S), bool)
        m[y : y + h, x : x + w] = True
        a["segmentation"] = rle_encode(m)
    anns[k]["segmentation"] = seg
    batch["coco"].write_text(json.dumps(d))


def test_rle_covering_the_whole_image_for_a_small_box(batch):
    boxes = {**BOXES, "b.png": [(3, [20, 12, 3, 3])]}
    d = _coco(boxes)
    d["annotations"][1]["segmentation"] = rle_encode(np.ones((S, S), bool))
    batch["coco"].write_text(json.dumps(d))
    _refused(batch, "ann.json", "annotation id 20 (image 'b.png') (box [20, 12, 3, 3], class 'spot'): 999 of the segmentation's 1024 pixels (98 %) lie outside its box",
             masks=False)


def test_full_image_polygon_for_a_small_box(batch):
    _with_segmentation(batch, "c.png", 1, [[0, 0, S, 0, S, S, 0, S]])
    _refused(batch, "ann.json", "annotation id 31 (image 'c.png') (box [24, 2, 4, 4], class 'spot'): 988 of the segmentation's 1024 pixels (96 %) lie outside its box", masks=False)


def test_instance_mostly_outside_its_box_but_inside_another_box_of_its_class(tmp_path):
    """Two crack boxes side by side: a segmentation of the first that lies mostly in the second is refused
    (pixel check alone would pass it); one that spills over by a third is accepted."""
    rng = np.random.default_rng(5)
    write_png_atomic(tmp_path / "images" / "a.png", rng.integers(0, 255, (S, S, 3), dtype=np.uint8))
    boxes = {"a.png": [(7, [2, 2, 6, 6]), (7, [8, 2, 12, 6])]}
    d = _coco(boxes)

    def seg(x0, x1):
        m = np.zeros((S, S), bool)
        m[2:8, x0:x1] = True
        return rle_encode(m)

    b = {"images": tmp_path / "images", "coco": tmp_path / "ann.json", "out": tmp_path / "imported" / "b1.json", "classes": tmp_path / "c.json"}
    d["annotations"][0]["segmentation"], d["annotations"][1]["segmentation"] = seg(4, 12), seg(8, 20)  # 3 of 8 columns outside (the tolerance takes column 8)
    b["coco"].write_text(json.dumps(d))
    assert _import(b, masks=False).exit_code == 0
    b["before"] = _snapshot(b["out"], b["classes"])
    d["annotations"][0]["segmentation"] = seg(5, 16)  # 7 of 11 columns outside its box, all inside the other crack box
    b["coco"].write_text(json.dumps(d))
    _refused(b, "annotation id 10 (image 'a.png') (box [2, 2, 6, 6], class 'crack'): 42 of the segmentation's 66 pixels (64 %) lie outside its box",
             masks=False)


def test_segmentation_entirely_outside_its_box(batch):
    m = np.zeros((S, S), bool)
    m[28:31, 28:31] = True
    _with_segmentation(batch, "a.png", 0, rle_encode(m))
    _refused(batch, "segmentation lies entirely outside its box", masks=False)


# --- masks boxes were made from always agree ------------------------------------------------------------------


def test_demo_data_and_masks_to_boxes_import_cleanly(tmp_path):
    """The demo (tight boxes around exact masks) and `masks-to-boxes` (a box per connected component of an
    anti-aliased mask, thresholded) pass the check; the test images keep their masks."""
    from b2p.ingest.demo import make_demo_data

    make_demo_data(tmp_path / "demo", seed=3, images=12, size=64, mask_fraction=1.0)
    r = runner.invoke(app, ["import", "--batch", "demo", "--images", str(tmp_path / "demo/images"), "--coco",
                            str(tmp_path / "demo/annotations.json"), "--masks", str(tmp_path / "demo/masks"),
                            "--classes", str(tmp_path / "classes.json"), "--out", str(tmp_path / "imported/demo.json")])
    assert r.exit_code == 0, r.output
    assert sum(im.has_manual_mask for im in load_batch(tmp_path / "imported/demo.json").images) == 12

    import cv2

    root = tmp_path / "mt"
    rng = np.random.default_rng(0)
    for i in range(6):
        (root / "MT_Crack" / "Imgs").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "MT_Crack" / "Imgs" / f"e{i}.jpg"), rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
        mask = np.zeros((40, 48), np.uint8)
        cv2.circle(mask, (12 + i, 14), 5, 255, -1, lineType=cv2.LINE_AA)  # anti-aliased rim: values 1..254
        cv2.line(mask, (25, 30), (44, 33 - i), 255, 2, lineType=cv2.LINE_AA)
        cv2.imwrite(str(root / "MT_Crack" / "Imgs" / f"e{i}.png"), mask)
    args = ["--batch", "mt", "--val", "0", "--test", "1"]
    r = runner.invoke(app, ["masks-to-boxes", str(root), "--out", str(tmp_path / "boxes.json"), *args])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["import", "--images", str(root), "--coco", str(tmp_path / "boxes.json"), *args,
                            "--classes", str(tmp_path / "mtc.json"), "--out", str(tmp_path / "imported2/mt.json")])
    assert r.exit_code == 0, r.output
    assert all(im.has_manual_mask and len(im.boxes) == 2 for im in load_batch(tmp_path / "imported2/mt.json").images)
