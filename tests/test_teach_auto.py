"""`b2p teach --teacher auto`: per class, the teacher that is best on the calib masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import make_synthetic_batch
from typer.testing import CliRunner

from b2p.cli import app
from b2p.dataset import load_batch
from b2p.labels import label_map_path, read_label_map, write_label_map
from b2p.masks import rle_encode
from b2p.teach.auto import choose

runner = CliRunner()


def _generous_spot_masks(batch_file: Path, truth: dict[str, np.ndarray]) -> None:
    """Hand-made calib masks: the annotator drew each spot (class 2) 2 px wider than its dark disc, inside
    its box (which the import grew to match); the truth dict follows."""
    import cv2

    data = json.loads(batch_file.read_text())
    names = {im["id"]: im["file_name"] for im in data["images"]}
    for fname, lm in truth.items():
        wide = cv2.dilate((lm == 2).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        lm[wide & (lm == 0)] = 2
    for a in data["annotations"]:
        if a["category_id"] == 2:
            ys, xs = np.nonzero(truth[names[a["image_id"]]] == 2)
            a["bbox"] = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
    for m in data["manual_masks"]:
        lm = truth[names[m["image_id"]]]
        m["segmentation"] = rle_encode(lm == m["category_id"])
    batch_file.write_text(json.dumps(data))


def _planted_round(root: Path, batch_file: Path, truth: dict[str, np.ndarray]) -> None:
    """An "earlier round" whose spots (class 2) are exact and whose cracks (class 1) are their filled boxes."""
    batch = load_batch(batch_file)
    for im in batch.images:
        lm = np.zeros((im.height, im.width), np.uint8)
        for b in im.boxes:
            if b.category_id == 1:
                x, y, w, h = (int(v) for v in b.xywh)
                lm[y : y + h, x : x + w] = 1
        lm[truth[im.file_name] == 2] = 2
        write_label_map(label_map_path(root, batch.name, im.file_name), lm)


def test_auto_picks_per_class_the_teacher_best_on_calib_masks(tmp_path):
    batch_file, truth = make_synthetic_batch(tmp_path, n_images=6, size=64, seed=3, manual_every=2, calib=1.0)
    _generous_spot_masks(batch_file, truth)
    batch = load_batch(batch_file)
    calib = [im for im in batch.images if im.split == "calib"]
    assert len(calib) == 3 and all(im.has_manual_mask for im in calib)
    _planted_round(tmp_path / "round1", batch_file, truth)
    out = tmp_path / "teach"
    r = runner.invoke(app, ["teach", str(batch_file), "--out", str(out), "--teacher", "auto", "--candidate", f"round1={tmp_path / 'round1'}", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "teacher IoU on the calib split" in r.output and "round1" in r.output
    prov = json.loads((out / "b1" / "provenance.json").read_text())
    assert prov["teacher"] == "auto"
    auto = prov["auto"]
    # thin cracks: GrabCut beats the box fill (and the round whose cracks are boxes); spots: the exact round
    assert auto["choice"]["crack"].startswith("grabcut"), auto
    assert auto["choice"]["spot"] == "round1"
    table = auto["iou_on_calib"]
    assert table["round1"]["spot"] == 1.0 and table["grabcut"]["spot"] < 0.9  # GrabCut follows the dark disc
    assert table[auto["choice"]["crack"]]["crack"] > table["box"]["crack"] + 0.3
    assert table[auto["choice"]["crack"]]["crack"] == max(t["crack"] for t in table.values())
    assert set(table) >= {"box", "grabcut", "round1"} and "sam" in auto["skipped"]
    assert auto["calib_images"] == 3
    # every box is taught by its class's choice: spots exactly as the round had them, cracks by GrabCut
    for im in batch.images:
        lm = read_label_map(label_map_path(out, "b1", im.file_name))
        np.testing.assert_array_equal(lm == 2, truth[im.file_name] == 2)
        crack_box = next(b for b in im.boxes if b.category_id == 1)
        x, y, w, h = (int(v) for v in crack_box.xywh)
        assert (lm[y : y + h, x : x + w] == 1).mean() < 0.6  # not the filled box


def test_auto_without_calib_masks_is_a_clear_error(tmp_path):
    batch_file, _ = make_synthetic_batch(tmp_path, n_images=3, size=48, manual_every=3)  # manual masks are test
    r = runner.invoke(app, ["teach", str(batch_file), "--out", str(tmp_path / "t"), "--teacher", "auto", "--quiet"])
    assert r.exit_code == 1
    assert "calib" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "t" / "b1" / "provenance.json").exists()
    r = runner.invoke(app, ["teach", str(batch_file), "--out", str(tmp_path / "t"), "--candidate", "x=y", "--quiet"])
    assert r.exit_code == 1 and "--teacher auto" in r.output


def test_choose_ties_and_classes_without_calib_pixels():
    def s(crack, spot, b, a):
        return {"per_class": {"crack": {"iou": crack}, "spot": {"iou": spot}}, "binary_iou": b, "anomaly_miou": a}

    scores = {"box": s(0.5, None, 0.3, 0.5), "grabcut": s(0.5, None, 0.6, 0.4), "sam": s(0.4, None, 0.5, 0.55)}
    choice, reason = choose(scores, ["crack", "spot"])
    assert choice == {"crack": "box", "spot": "sam"}  # tie -> the earlier (simpler) one; no pixels -> best mean
    assert "anomaly mIoU" in reason["spot"]


def test_combine_command_refuses_a_missing_source_root_and_writes_nothing(tmp_path):
    """`b2p combine`: a pool member without final masks is one error naming it, exit 1, nothing written; with
    it, every class is taught by its best source on calib."""
    import yaml

    batch_file, truth = make_synthetic_batch(tmp_path, n_images=6, size=64, seed=3, manual_every=2, calib=1.0)
    batch = load_batch(batch_file)
    for root in ("teach", "students/b2p/final"):  # unet's final masks are missing
        for im in batch.images:
            write_label_map(label_map_path(tmp_path / root, im.batch, im.file_name), truth[im.file_name] if "b2p" in root else np.zeros_like(truth[im.file_name]))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"candidates": ["b2p", "unet"]}))
    args = ["combine", "--imported", str(batch_file.parent), "--base", f"teacher={tmp_path / 'teach'}", "--pool", f"candidates={tmp_path / 'students'}",
            "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "out"), "--quiet"]
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "unet" in r.output and "mask root not found" in r.output and not (tmp_path / "out").exists(), r.output
    for im in batch.images:
        write_label_map(label_map_path(tmp_path / "students/unet/final", im.batch, im.file_name), np.zeros_like(truth[im.file_name]))
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "out" / "choice.json").read_text())
    assert set(rec["iou_on_calib"]) == {"teacher", "students.b2p", "students.unet"}
    assert rec["choice"] == {"crack": "students.b2p", "spot": "students.b2p"}  # exact masks win every class
    for im in batch.images:
        np.testing.assert_array_equal(read_label_map(label_map_path(tmp_path / "out", im.batch, im.file_name), (im.height, im.width)), truth[im.file_name])


