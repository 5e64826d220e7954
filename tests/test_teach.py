"""Weight-free teachers (box, GrabCut), the batch loop's outputs, overlap rule, resume, bad input, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, make_synthetic_batch
from typer.testing import CliRunner

from b2p.cli import app
from b2p.dataset import load_batch, save_batch_dict, to_coco_dict
from b2p.errors import B2PError
from b2p.fileio import read_image, sha256_file, write_png_atomic
from b2p.labels import label_map_path, paint_label_map, read_label_map
from b2p.masks import rle_decode
from b2p.boxes import clip_to_box
from b2p.teach.base import settings_hash, teach_batch
from b2p.teach.box import BoxTeacher
from b2p.teach.grabcut import GrabCutTeacher

runner = CliRunner()


def _mean_iou(out_dir: Path, truth: dict[str, np.ndarray]) -> float:
    inst = json.loads((out_dir / "instances.json").read_text())
    names = {im["id"]: im["file_name"] for im in inst["images"]}
    ious = []
    for a in inst["annotations"]:
        m = rle_decode(a["segmentation"])
        t = truth[names[a["image_id"]]] == a["category_id"]
        ious.append((m & t).sum() / (m | t).sum())
    return float(np.mean(ious))


def _one_image_batch(root: Path, img: np.ndarray, boxes: list[tuple[int, list[float]]], name: str = "one") -> Path:
    """A canonical batch of one image with boxes [(category_id, [x, y, w, h]), ...]."""
    img_dir = root / "raw" / name
    write_png_atomic(img_dir / "a.png", img)
    h, w = img.shape[:2]
    images = [{"id": 1, "file_name": "a.png", "width": w, "height": h, "sha256": sha256_file(img_dir / "a.png"), "batch": name, "split": "train", "has_manual_mask": False}]
    anns = [{"id": 100 + i, "image_id": 1, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0} for i, (c, b) in enumerate(boxes)]
    path = root / "imported" / f"{name}.json"
    save_batch_dict(path, to_coco_dict(name, CLASSES, images, anns, [], image_root=os.path.relpath(img_dir, path.parent)))
    return path


# --- outputs -------------------------------------------------------------------------------------------------


def test_grabcut_beats_box_baseline_on_planted_defects(tmp_path):
    batch, truth = make_synthetic_batch(tmp_path, n_images=6, size=64, seed=3)
    teach_batch(batch, tmp_path / "box", BoxTeacher(), progress=False)
    teach_batch(batch, tmp_path / "gc", GrabCutTeacher(), progress=False)
    box_iou = _mean_iou(tmp_path / "box" / "b1", truth)
    gc_iou = _mean_iou(tmp_path / "gc" / "b1", truth)
    assert box_iou < 0.5  # thin cracks fill little of their box
    assert gc_iou > 0.85 and gc_iou > box_iou + 0.3


def test_grabcut_on_noisy_texture_beats_box_on_blobs(tmp_path):
    """Blob-like defects (stains, pits) on a noisy surface. (Thin 2-3 px cracks on strong noise are where
    GrabCut's smoothness term fails: it then finds nothing and the box fill is noted, see below.)"""
    rng = np.random.default_rng(7)
    img = (140 + rng.normal(0, 18, (96, 96))).clip(0, 255)
    truth = np.zeros((96, 96), np.uint8)
    yy, xx = np.mgrid[:96, :96]
    truth[((yy - 30) ** 2 / 100 + (xx - 50) ** 2 / 30) <= 1] = 2  # an upright ellipse
    rot = ((xx - 30) + (yy - 70)) ** 2 / 200 + ((xx - 30) - (yy - 70)) ** 2 / 30
    truth[rot <= 1] = 1  # a diagonal elongated blob: its box holds much background
    img[truth > 0] -= 70
    rgb = np.repeat(img.clip(0, 255).astype(np.uint8)[..., None], 3, 2)
    boxes = []
    for c in (1, 2):
        ys, xs = np.nonzero(truth == c)
        boxes.append((c, [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]))
    batch = _one_image_batch(tmp_path, rgb, boxes)
    teach_batch(batch, tmp_path / "box", BoxTeacher(), progress=False)
    teach_batch(batch, tmp_path / "gc", GrabCutTeacher(), progress=False)
    t = {"a.png": truth}
    gc, box = _mean_iou(tmp_path / "gc" / "one", t), _mean_iou(tmp_path / "box" / "one", t)
    assert gc > 0.85 and gc > box + 0.15


def test_outputs_instances_labelmaps_provenance(tmp_path):
    batch_file, truth = make_synthetic_batch(tmp_path, n_images=4)
    r = teach_batch(batch_file, tmp_path / "teach", GrabCutTeacher(), progress=False)
    batch = load_batch(batch_file)
    assert (r.images, r.boxes, r.taught, r.reused) == (4, 8, 4, 0)
    assert {im.split for im in batch.images} >= {"test", "train"}  # all splits are taught
    inst = json.loads((tmp_path / "teach" / "b1" / "instances.json").read_text())
    box_ids = sorted(b.id for im in batch.images for b in im.boxes)
    assert sorted(a["box_id"] for a in inst["annotations"]) == box_ids
    for im in batch.images:
        lm = read_label_map(label_map_path(tmp_path / "teach", "b1", im.file_name), shape=(im.height, im.width))
        anns = [a for a in inst["annotations"] if a["image_id"] == im.id]
        masks = [rle_decode(a["segmentation"]) for a in anns]
        for a, m, b in zip(anns, masks, im.boxes, strict=True):
            assert a["box_id"] == b.id and a["category_id"] == b.category_id
            assert a["area"] == int(m.sum()) and 0 <= a["score"] <= 1
            x, y, w, h = a["bbox"]
            assert m[y : y + h, x : x + w].sum() == m.sum()
        expected = paint_label_map((im.height, im.width), masks, [a["category_id"] for a in anns], [a["score"] for a in anns])
        assert np.array_equal(lm, expected)
    prov = json.loads((tmp_path / "teach" / "b1" / "provenance.json").read_text())
    assert prov["teacher"] == "grabcut" and prov["settings"]["iterations"] == 5
    assert prov["counts"]["images"] == 4 and prov["counts"]["boxes"] == 8
    assert prov["counts"]["images_by_split"]["test"] == sum(im.split == "test" for im in batch.images)
    assert "numpy" in prov["versions"] and prov["time"]["seconds"] >= 0
    preview = read_image(tmp_path / "teach" / "b1" / "preview.png")
    assert preview.shape == (256, 4 * 256, 3) and preview.std() > 0


def test_label_map_overlap_rule_smaller_mask_wins(tmp_path):
    img = np.full((40, 40, 3), 128, np.uint8)
    # class 1: a big box; class 2: a small box inside it; class 1 again, small, overlapping nothing
    batch = _one_image_batch(tmp_path, img, [(1, [2, 2, 30, 30]), (2, [10, 10, 6, 6]), (1, [34, 34, 4, 4])])
    teach_batch(batch, tmp_path / "t", BoxTeacher(), progress=False)
    lm = read_label_map(label_map_path(tmp_path / "t", "one", "a.png"))
    assert (lm[10:16, 10:16] == 2).all()  # smaller wins inside the overlap
    assert lm[5, 5] == 1 and lm[20, 25] == 1 and lm[0, 0] == 0 and (lm[34:38, 34:38] == 1).all()
    # ties in area: higher score wins, whichever order the masks come in
    a = np.zeros((8, 8), bool)
    a[2:5, 2:5] = True
    for order in ((0, 1), (1, 0)):
        masks, ids, scores = [a, a.copy()], [1, 2], [0.3, 0.9]
        lm2 = paint_label_map((8, 8), [masks[i] for i in order], [ids[i] for i in order], [scores[i] for i in order])
        assert (lm2[a] == 2).all()


def test_clip_to_box_and_box_teacher_pixels():
    m = np.ones((20, 20), bool)
    c = clip_to_box(m, np.array([5, 6, 10, 9.5]))
    assert c.sum() == 5 * 4 and c[6:10, 5:10].all()
    c2 = clip_to_box(m, np.array([5, 6, 10, 9.5]), margin=2)
    assert c2.sum() == 9 * 8
    out = BoxTeacher().predict(np.zeros((20, 20, 3), np.uint8), np.array([[0, 0, 3, 2], [19, 19, 20, 20]], np.float32))
    assert out.masks.shape == (2, 20, 20) and out.masks[0].sum() == 6 and out.masks[1].sum() == 1


# --- GrabCut degenerate boxes: handled and recorded, never silently -----------------------------------------------


def test_grabcut_degenerate_boxes_are_noted(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(100, 140, (48, 48, 3)).astype(np.uint8)
    img[20:30, 20:30] = 30
    boxes = [(1, [20, 5, 2, 20]), (2, [0, 0, 48, 48]), (1, [18, 18, 14, 14])]
    batch = _one_image_batch(tmp_path, img, boxes)
    teach_batch(batch, tmp_path / "t", GrabCutTeacher(), progress=False)
    prov = json.loads((tmp_path / "t" / "one" / "provenance.json").read_text())
    notes = {n["box_id"]: n["note"] for n in prov["notes"]}
    assert "thinner than min_side" in notes[100] and "whole image" in notes[101] and 102 not in notes
    inst = json.loads((tmp_path / "t" / "one" / "instances.json").read_text())
    by_id = {a["box_id"]: a for a in inst["annotations"]}
    assert by_id[100]["area"] == 40 and by_id[100]["score"] == 0.0 and by_id[100]["note"] == notes[100]
    assert by_id[101]["area"] == 48 * 48 and by_id[102]["score"] == 1.0
    m = rle_decode(by_id[102]["segmentation"])
    assert m[20:30, 20:30].all() and m.sum() < 14 * 14  # found the dark square, not the whole box


def test_grabcut_empty_result_policy():
    img = np.full((40, 40, 3), 120, np.uint8)  # nothing to separate: GrabCut finds no foreground
    box = np.array([[10, 10, 25, 25]], np.float32)
    filled = GrabCutTeacher().predict(img, box)
    kept = GrabCutTeacher(empty="keep").predict(img, box)
    assert filled.masks[0].sum() == 15 * 15 and "box filled" in filled.notes[0] and filled.scores[0] == 0
    assert kept.masks[0].sum() == 0 and "left empty" in kept.notes[0]
    with pytest.raises(B2PError):
        GrabCutTeacher(empty="maybe")


# --- resume ------------------------------------------------------------------------------------------------------


class _CountingBox(BoxTeacher):
    """Same name and settings as BoxTeacher (so resume may reuse its work); counts images, may crash."""

    def __init__(self, crash_after: int | None = None):
        self.seen: list[tuple[int, int]] = []
        self.crash_after = crash_after

    def predict(self, image, boxes):
        if self.crash_after is not None and len(self.seen) >= self.crash_after:
            raise RuntimeError("simulated crash")
        self.seen.append(image.shape[:2])
        return super().predict(image, boxes)


def test_resume_after_crash_skips_finished_images(tmp_path):
    batch_file, _ = make_synthetic_batch(tmp_path, n_images=5)
    out = tmp_path / "teach"
    crashing = _CountingBox(crash_after=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        teach_batch(batch_file, out, crashing, progress=False)
    assert len(crashing.seen) == 2
    # nothing final was written: no label maps, instances or provenance
    assert not (out / "b1" / "instances.json").exists() and not (out / "b1" / "provenance.json").exists()
    assert not (out / "b1" / "labelmaps").exists()
    assert len(list((out / "b1" / ".parts").glob("*.json"))) == 2

    second = _CountingBox()
    r = teach_batch(batch_file, out, second, progress=False)
    assert len(second.seen) == 3 and (r.taught, r.reused) == (3, 2)
    prov = json.loads((out / "b1" / "provenance.json").read_text())
    assert prov["counts"]["taught_this_run"] == 3 and prov["counts"]["reused_from_earlier_run"] == 2
    assert len(list((out / "b1" / "labelmaps").glob("*.png"))) == 5

    third = _CountingBox()
    assert teach_batch(batch_file, out, third, progress=False).taught == 0 and third.seen == []
    # a settings change redoes every image
    assert settings_hash(GrabCutTeacher()) != settings_hash(GrabCutTeacher(iterations=3))
    r = teach_batch(batch_file, out, GrabCutTeacher(), progress=False)
    assert (r.taught, r.reused) == (5, 0)
    r = teach_batch(batch_file, out, GrabCutTeacher(iterations=3), progress=False)
    assert (r.taught, r.reused) == (5, 0)
    # --no-resume redoes everything even with equal settings
    fourth = _CountingBox()
    teach_batch(batch_file, out, fourth, progress=False)
    fifth = _CountingBox()
    teach_batch(batch_file, out, fifth, resume=False, progress=False)
    assert len(fifth.seen) == 5


def test_changed_boxes_redo_only_that_image(tmp_path):
    batch_file, _ = make_synthetic_batch(tmp_path, n_images=3)
    out = tmp_path / "teach"
    teach_batch(batch_file, out, BoxTeacher(), progress=False)
    data = json.loads(batch_file.read_text())
    data["annotations"][0]["bbox"][2] += 1  # image 1's first box grows
    batch_file.write_text(json.dumps(data))
    r = teach_batch(batch_file, out, BoxTeacher(), progress=False)
    assert (r.taught, r.reused) == (1, 2)


# --- bad input ---------------------------------------------------------------------------------------------------


def test_undecodable_image_fails_clearly_and_keeps_previous_outputs(tmp_path):
    batch_file, _ = make_synthetic_batch(tmp_path, n_images=3)
    out = tmp_path / "teach"
    teach_batch(batch_file, out, BoxTeacher(), progress=False)
    before = {p: p.read_bytes() for p in (out / "b1").rglob("*") if p.is_file() and ".parts" not in p.parts}
    bad = tmp_path / "raw" / "b1" / "images" / "img_001.png"
    bad.write_bytes(b"garbage, not a png")
    with pytest.raises(B2PError) as e:
        teach_batch(batch_file, out, GrabCutTeacher(), progress=False)
    assert "img_001.png" in str(e.value) and "changed since `b2p import`" in str(e.value)
    after = {p: p.read_bytes() for p in (out / "b1").rglob("*") if p.is_file() and ".parts" not in p.parts}
    assert after == before


def test_cli_missing_batch_file(tmp_path):
    r = runner.invoke(app, ["teach", str(tmp_path / "imported" / "nope.json"), "--out", str(tmp_path / "t"), "--quiet"])
    assert r.exit_code == 1 and "never imported" in r.output
    assert not (tmp_path / "t").exists()


# --- CLI -----------------------------------------------------------------------------------------------------------


def test_cli_default_grabcut_params_and_overrides(tmp_path):
    batch_file, truth = make_synthetic_batch(tmp_path, n_images=3)
    out = tmp_path / "teach"
    r = runner.invoke(app, ["teach", str(batch_file), "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "b1" / "provenance.json").read_text())["teacher"] == "grabcut"
    assert len(list((out / "b1" / "labelmaps").glob("*.png"))) == 3

    params = tmp_path / "params.yaml"
    params.write_text("train: {epochs: 3}\nteach:\n  teacher: box\n  grabcut: {iterations: 2}\n")
    r = runner.invoke(app, ["teach", str(batch_file), "--out", str(tmp_path / "t2"), "--params", str(params), "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "t2" / "b1" / "provenance.json").read_text())["teacher"] == "box"
    # CLI beats params.yaml; params' grabcut section still applies
    r = runner.invoke(app, ["teach", str(batch_file), "--out", str(tmp_path / "t3"), "--params", str(params), "--teacher", "grabcut", "--quiet"])
    assert r.exit_code == 0, r.output
    prov = json.loads((tmp_path / "t3" / "b1" / "provenance.json").read_text())
    assert prov["teacher"] == "grabcut" and prov["settings"]["iterations"] == 2

    params.write_text("teach:\n  techer: box\n")
    r = runner.invoke(app, ["teach", str(batch_file), "--out", str(tmp_path / "t4"), "--params", str(params)])
    assert r.exit_code == 1 and "techer" in r.output and not (tmp_path / "t4").exists()
    r = runner.invoke(app, ["teach", str(batch_file), "--out", str(tmp_path / "t5"), "--teacher", "magic"])
    assert r.exit_code == 1 and "--teacher: teach.teacher: must be one of" in r.output


def test_cli_sam_without_weights_offline_message(tmp_path, monkeypatch):
    batch_file, _ = make_synthetic_batch(tmp_path, n_images=2)
    r = runner.invoke(
        app,
        ["teach", str(batch_file), "--out", str(tmp_path / "t"), "--teacher", "sam", "--weights-dir", str(tmp_path / "w"), "--no-download", "--quiet"],
    )
    assert r.exit_code == 1
    assert "sam_vit_b_01ec64.pth" in r.output and not (tmp_path / "t").exists()


def test_grabcut_min_context_ratio_fills_boxes_with_too_little_context():
    """A box covering most of the image leaves a thin context border: with min_context_ratio the box is
    filled and noted; a small box with ample context is still cut by GrabCut."""
    rng = np.random.default_rng(0)
    img = rng.integers(100, 140, size=(64, 64, 3), dtype=np.uint8)
    img[20:30, 20:30] = 20  # a dark blob inside the small box
    big = np.array([[2.0, 2.0, 62.0, 62.0]])
    small = np.array([[16.0, 16.0, 34.0, 34.0]])
    out = GrabCutTeacher(min_context_ratio=1.0).predict(img, big)
    assert out.masks[0].sum() == 60 * 60 and out.scores[0] == 0.0
    assert "min_context_ratio" in out.notes[0]
    off = GrabCutTeacher().predict(img, big)  # default off: GrabCut runs and does not fill the whole box
    assert off.masks[0].sum() < 60 * 60
    cut = GrabCutTeacher(min_context_ratio=1.0).predict(img, small)
    assert cut.scores[0] == 1.0 and cut.masks[0][20:30, 20:30].mean() > 0.9 and cut.masks[0].sum() < 18 * 18
    with pytest.raises(B2PError):
        GrabCutTeacher(min_context_ratio=-1)


def test_grabcut_rim_keeps_the_box_inside_and_cuts_only_its_rim():
    """With `rim`, the inside of the box is foreground whatever its colour, and GrabCut decides the rim only:
    a bright ring with a background-coloured hole, in a box whose corners are background, keeps the hole
    (plain GrabCut cuts it out) and loses the corners; nothing outside the box."""
    yy, xx = np.mgrid[:80, :80]
    r2 = (yy - 40) ** 2 + (xx - 40) ** 2
    img = np.full((80, 80, 3), 60, np.uint8)
    img[(r2 <= 18**2) & (r2 > 6**2)] = 200  # a ring of radius 6-18 in a 40 px box
    box = np.array([[20.0, 20.0, 60.0, 60.0]])
    hole = r2 <= 4**2
    plain = GrabCutTeacher().predict(img, box).masks[0]
    assert not plain[hole].any()  # plain GrabCut: the hole has the background's colour
    out = GrabCutTeacher(rim=0.5).predict(img, box)
    m = out.masks[0]
    assert out.scores[0] == 1.0 and out.notes[0] is None
    assert m[30:50, 30:50].all()  # rim 0.5 of the 20 px half-side = 10 px: the inner 20x20 is fixed foreground
    assert not m[20:24, 20:24].any() and not m[56:60, 56:60].any()  # the corners (background colour) are cut
    assert not m[:20].any() and not m[60:].any() and not m[:, :20].any() and not m[:, 60:].any()
    assert GrabCutTeacher(rim=1.0).predict(img, box).masks[0][hole].sum() == 0  # rim 1: no inside left, as plain
    with pytest.raises(B2PError, match="rim"):
        GrabCutTeacher(rim=1.5)
    with pytest.raises(B2PError, match="rim"):
        GrabCutTeacher(rim=-0.1)


def test_cli_grabcut_rim_out_of_range_is_refused_before_writing(tmp_path):
    """A rim outside [0, 1] in params.yaml or --set: exit 1, the message names the file / option and the key,
    and no output folder is created (an earlier one is left as it was)."""
    batch_file, _ = make_synthetic_batch(tmp_path, n_images=2)
    params = tmp_path / "params.yaml"
    params.write_text("teach:\n  grabcut: {rim: 2}\n")
    r = runner.invoke(app, ["teach", str(batch_file), "--out", str(tmp_path / "t"), "--params", str(params), "--quiet"])
    assert r.exit_code == 1 and str(params) in r.output and "teach.grabcut.rim" in r.output
    assert not (tmp_path / "t").exists()
    old = tmp_path / "old"
    assert runner.invoke(app, ["teach", str(batch_file), "--out", str(old), "--teacher", "box", "--quiet"]).exit_code == 0
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    r = runner.invoke(app, ["teach", str(batch_file), "--out", str(old), "--set", "grabcut.rim=-1", "--quiet"])
    assert r.exit_code == 1 and "--set grabcut.rim=-1" in r.output and "teach.grabcut.rim" in r.output
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before


def test_grabcut_min_fill_treats_a_collapsed_mask_as_empty(monkeypatch):
    """GrabCut keeping a few pixels of a large box is a collapse: with min_fill it is handled like an
    empty result (box filled or kept empty, noted); without it the few pixels are returned."""
    import cv2

    def collapse(img, mask, rect, bgd, fgd, iters, mode):  # GrabCut that keeps one pixel of the box
        fg = np.argwhere(mask == cv2.GC_PR_FGD)[0]
        mask[mask == cv2.GC_PR_FGD] = cv2.GC_PR_BGD
        mask[tuple(fg)] = cv2.GC_FGD

    monkeypatch.setattr(cv2, "grabCut", collapse)
    img = np.full((64, 64, 3), 120, np.uint8)
    box = np.array([[20.0, 20.0, 40.0, 40.0]])
    assert GrabCutTeacher().predict(img, box).masks[0].sum() == 1
    filled = GrabCutTeacher(min_fill=0.02).predict(img, box)
    assert filled.masks[0].sum() == 400 and filled.scores[0] == 0.0 and "min_fill" in filled.notes[0]
    kept = GrabCutTeacher(min_fill=0.02, empty="keep").predict(img, box)
    assert kept.masks[0].sum() == 0 and "min_fill" in kept.notes[0]
    with pytest.raises(B2PError):
        GrabCutTeacher(min_fill=1.5)
