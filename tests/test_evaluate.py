"""`b2p evaluate` end to end on the synthetic batch, checked against numbers computed here independently."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from b2p.cli import app
from b2p.dataset import load_batch
from b2p.evaluate.evaluate import MAIN_METRICS, box_fill_label_map, evaluate, parse_source
from b2p.errors import B2PError
from b2p.labels import label_map_path, write_label_map

runner = CliRunner()
K = 2  # crack, spot


def _naive_matrix(pred: np.ndarray, truth: np.ndarray, n: int = K + 1) -> np.ndarray:
    return np.array([[int(((truth == i) & (pred == j)).sum()) for j in range(n)] for i in range(n)])


def _iou(m: np.ndarray, c: int) -> float | None:
    den = m[c, :].sum() + m[:, c].sum() - m[c, c]
    return None if den == 0 else m[c, c] / den


def _box_fill(coco: dict, image_id: int, h: int, w: int) -> np.ndarray:
    """Boxes filled, larger boxes painted first so smaller ones win (the documented overlap rule)."""
    anns = sorted((a for a in coco["annotations"] if a["image_id"] == image_id), key=lambda a: -a["bbox"][2] * a["bbox"][3])
    out = np.zeros((h, w), np.uint8)
    for a in anns:
        x, y, bw, bh = a["bbox"]
        out[y : y + bh, x : x + bw] = a["category_id"]
    return out


@pytest.fixture
def project(synthetic_batch, tmp_path: Path) -> dict:
    """Teacher / student / extra label maps with known errors for every image of the synthetic batch."""
    path, truth = synthetic_batch
    batch = load_batch(path)
    maps: dict[str, dict[str, np.ndarray]] = {"teacher": {}, "student": {}, "extra": {}}
    for i, im in enumerate(batch.images):
        t = truth[im.file_name]
        teacher = t.copy()
        teacher[0:3, 0:10] = 1  # hallucinated crack in the corner
        if i == 0:
            teacher[t == 2] = 0  # the spot of image 0 missed entirely
        student = t.copy()
        student[t == 1] = 2  # every crack called a spot: wrong class, still a binary hit
        student[0:3, 0:4] = 1  # less hallucination than the teacher
        if i == 3:
            student[:] = 0  # predicts nothing on image 3
        extra = np.zeros_like(t)
        for name, lm in (("teacher", teacher), ("student", student), ("extra", extra)):
            maps[name][im.file_name] = lm
            write_label_map(label_map_path(tmp_path / name, im.batch, im.file_name), lm)
    test_ims = [im for im in batch.images if im.split == "test" and im.has_manual_mask]
    assert [im.file_name for im in test_ims] == ["img_000.png", "img_003.png"]
    coco = json.loads(path.read_text())
    maps["box"] = {im.file_name: _box_fill(coco, im.id, im.height, im.width) for im in batch.images}
    return {"root": tmp_path, "batch": batch, "truth": truth, "maps": maps, "test": test_ims}


def _run(p: dict, *extra: str):
    root = p["root"]
    args = ["evaluate", "--imported", str(root / "imported"), "--teacher-root", str(root / "teacher"),
            "--pred-root", str(root / "student"), "--out", str(root / "eval"), *extra]  # fmt: skip
    return runner.invoke(app, args)


def test_evaluate_cli_values_csv_plots(project: dict) -> None:
    p = project
    res = _run(p, "--source", f"extra={p['root'] / 'extra'}", "--worst", "2")
    assert res.exit_code == 0, res.output
    assert "student" in res.output and "anom mIoU" in res.output
    out = p["root"] / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    # metrics.json: the headline scores only (a readable `dvc metrics show`); details.json the rest
    assert list(metrics) == ["student", "teacher", "box", "extra"]
    assert all(set(metrics[s]) == {*MAIN_METRICS, "images"} for s in metrics)
    details = json.loads((out / "details.json").read_text())
    assert list(details) == ["student", "teacher", "box", "extra", "noise"]
    metrics = {**{s: {**metrics[s], **details[s]} for s in metrics}, "noise": details["noise"]}

    truths = [p["truth"][im.file_name] for im in p["test"]]
    for src in ("student", "teacher", "box", "extra"):
        preds = [p["maps"][src][im.file_name] for im in p["test"]]
        m = sum(_naive_matrix(pr, t) for pr, t in zip(preds, truths))
        sec = metrics[src]
        ious = [_iou(m, c) for c in range(K + 1)]
        defined = [v for v in ious if v is not None]
        assert sec["miou"] == pytest.approx(np.mean(defined)), src
        anom = [v for v in ious[1:] if v is not None]
        assert sec["anomaly_miou"] == (pytest.approx(np.mean(anom)) if anom else None), src
        tp = sum(int(((pr > 0) & (t > 0)).sum()) for pr, t in zip(preds, truths))
        fp = sum(int(((pr > 0) & (t == 0)).sum()) for pr, t in zip(preds, truths))
        fn = sum(int(((pr == 0) & (t > 0)).sum()) for pr, t in zip(preds, truths))
        assert sec["binary_iou"] == pytest.approx(tp / (tp + fp + fn)), src
        assert sec["binary_recall"] == pytest.approx(tp / (tp + fn)), src
        assert sec["binary_precision"] == (pytest.approx(tp / (tp + fp)) if tp + fp else None), src
        assert sec["images"] == 2
        for c, name in enumerate(["background", "crack", "spot"]):
            assert sec["per_class"][name]["support"] == int(m[c].sum())
        assert json.loads((out / "confusion.json").read_text())["matrices"][src] == m.tolist()

    # student: every crack became a spot, so the crack IoU is 0 but binary recall counts those pixels
    assert metrics["student"]["per_class"]["crack"]["iou"] == 0.0
    # the all-background extra source: nothing predicted, precision undefined
    assert metrics["extra"]["binary_iou"] == 0.0 and metrics["extra"]["binary_precision"] is None

    # teacher noise, computed here pixel by pixel
    te = [p["maps"]["teacher"][im.file_name] for im in p["test"]]
    st = [p["maps"]["student"][im.file_name] for im in p["test"]]
    noise = metrics["noise"]["teacher"]
    fg = sum(int((x > 0).sum()) for x in te)
    outside = sum(int(((x > 0) & (t == 0)).sum()) for x, t in zip(te, truths))
    true_fg = sum(int((t > 0).sum()) for t in truths)
    missed = sum(int(((x == 0) & (t > 0)).sum()) for x, t in zip(te, truths))
    assert noise["hallucination"] == pytest.approx(outside / fg)
    assert noise["miss_rate"] == pytest.approx(missed / true_fg)
    spot_true = sum(int((t == 2).sum()) for t in truths)
    assert noise["by_class"]["spot"]["miss_rate"] == pytest.approx(int((truths[0] == 2).sum()) / spot_true)
    assert noise["by_class"]["crack"]["miss_rate"] == 0.0
    n_comp = sum(cv2.connectedComponents((t == c).astype(np.uint8), connectivity=8)[0] - 1 for t in truths for c in (1, 2))
    bins = noise["by_size"]
    assert set(bins) == {"small", "medium", "large"}
    assert sum(b["components"] for b in bins.values()) == n_comp
    assert sum(b["pixels"] for b in bins.values()) == true_fg
    assert sum(b["detected"] for b in bins.values()) == n_comp - 1  # only the spot of image 0 is missed
    # what the student did with the teacher's errors
    rec = metrics["noise"]["student_vs_teacher"]
    t_missed = [(x == 0) & (t > 0) for x, t in zip(te, truths)]
    recovered = sum(int((mm & (s > 0)).sum()) for mm, s in zip(t_missed, st))
    assert rec["recovered_of_teacher_missed"] == pytest.approx(recovered / missed)
    assert rec["recovered_of_teacher_missed"] > 0  # the spot of image 0, found by the student
    hall = [(x > 0) & (t == 0) for x, t in zip(te, truths)]
    removed = sum(int((h & (s == 0)).sum()) for h, s in zip(hall, st))
    assert rec["removed_of_teacher_hallucination"] == pytest.approx(removed / outside)

    # per-image CSV: one row per image and source, each source's worst image first
    with open(out / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 2
    assert [r["source"] for r in rows] == ["student"] * 2 + ["teacher"] * 2 + ["box"] * 2 + ["extra"] * 2
    for src in ("student", "teacher", "box"):
        ious = [float(r["binary_iou"]) for r in rows if r["source"] == src]
        assert ious == sorted(ious)
    stu = {r["file_name"]: r for r in rows if r["source"] == "student"}
    assert rows[0]["file_name"] == "img_003.png"  # the student predicted nothing there
    assert float(stu["img_003.png"]["binary_iou"]) == 0.0 and stu["img_003.png"]["predicted_pixels"] == "0"
    t0, s0 = p["truth"]["img_000.png"], p["maps"]["student"]["img_000.png"]
    inter, union = int(((t0 > 0) & (s0 > 0)).sum()), int(((t0 > 0) | (s0 > 0)).sum())
    assert float(stu["img_000.png"]["binary_iou"]) == pytest.approx(inter / union, abs=1e-6)
    assert stu["img_000.png"]["truth_classes"] == "crack;spot"
    assert stu["img_000.png"]["pred_classes"] == "crack;spot"
    assert int(stu["img_000.png"]["anomaly_pixels"]) == int((t0 > 0).sum())
    assert int(stu["img_000.png"]["predicted_pixels"]) == int((s0 > 0).sum())

    # plots and overlays
    lines = (out / "plots" / "per_class_iou.csv").read_text().splitlines()
    assert lines[0] == "label,class,source,iou" and len(lines) == 1 + 4 * 3
    assert "crack | student,crack,student,0.000000" in lines
    for name in ("confusion_student", "confusion_teacher", "confusion_box", "confusion_extra", "summary"):
        img = cv2.imread(str(out / "plots" / f"{name}.png"))
        assert img is not None and img.shape[0] > 100 and img.shape[1] > 100
    overlays = sorted((out / "overlays").glob("*.png"))
    assert [o.name for o in overlays] == ["00_b1__img_003.png", "01_b1__img_000.png"]
    assert cv2.imread(str(overlays[0])).shape[1] > 3 * 64

    # a re-run with fewer overlays and without the extra source leaves no stale file behind
    res = _run(p, "--worst", "1")
    assert res.exit_code == 0, res.output
    assert [o.name for o in (out / "overlays").glob("*.png")] == ["00_b1__img_003.png"]
    assert not (out / "plots" / "confusion_extra.png").exists()
    assert "extra" not in json.loads((out / "metrics.json").read_text())


def test_box_baseline_matches_filled_boxes(project: dict) -> None:
    for im in project["batch"].images:
        np.testing.assert_array_equal(box_fill_label_map(im), project["maps"]["box"][im.file_name])


def test_missing_prediction_file_is_named(project: dict) -> None:
    p = project
    victim = label_map_path(p["root"] / "student", "b1", "img_003.png")
    victim.unlink()
    res = _run(p)
    assert res.exit_code == 1
    assert "img_003.png" in res.output and "student" in res.output and "missing" in res.output
    assert not (p["root"] / "eval" / "metrics.json").exists()  # nothing half-written


def test_missing_root_and_bad_sources(project: dict) -> None:
    p = project
    res = _run(p, "--source", f"sam={p['root'] / 'nowhere'}")
    assert res.exit_code == 1 and "nowhere" in res.output and "'sam'" in res.output
    res = _run(p, "--source", "no_equals_sign")
    assert res.exit_code == 1 and "NAME=ROOT" in res.output
    res = _run(p, "--source", f"teacher={p['root'] / 'extra'}")
    assert res.exit_code == 1 and "reserved" in res.output
    with pytest.raises(B2PError, match="letters"):
        parse_source("a/b=x")


def test_wrong_size_prediction_refused(project: dict) -> None:
    p = project
    write_label_map(label_map_path(p["root"] / "student", "b1", "img_000.png"), np.zeros((32, 64), np.uint8))
    res = _run(p)
    assert res.exit_code == 1
    assert "img_000.png" in res.output and "64x32" in res.output and "image-size" in res.output


def test_no_manual_masks_in_split(project: dict) -> None:
    res = _run(project, "--split", "val")
    assert res.exit_code == 1 and "nothing to score" in res.output


def test_params_file_and_cli_override(project: dict) -> None:
    p = project
    params = p["root"] / "params.yaml"
    params.write_text("evaluate:\n  worst: 0\n  size_bins: [0.005]\n  min_cover: 0.9\n")
    res = _run(p, "--params", str(params))
    assert res.exit_code == 0, res.output
    out = p["root"] / "eval"
    assert list((out / "overlays").glob("*.png")) == []
    assert set(json.loads((out / "details.json").read_text())["noise"]["teacher"]["by_size"]) == {"size0", "size1"}
    res = _run(p, "--params", str(params), "--worst", "1")
    assert res.exit_code == 0 and len(list((out / "overlays").glob("*.png"))) == 1
    params.write_text("evaluate:\n  wrost: 1\n")
    res = _run(p, "--params", str(params))
    assert res.exit_code == 1 and "wrost" in res.output


def test_function_without_student(project: dict) -> None:
    """Teacher only (e.g. before training): no recovery section; overlays ranked by the teacher."""
    p = project
    r = evaluate(
        [p["root"] / "imported" / "b1.json"],
        p["root"] / "ev2",
        teacher_root=p["root"] / "teacher",
        pred_root=None,
        box_baseline=False,
        worst=1,
        progress=False,
    )
    assert [s.name for s in r.sources] == ["teacher"]
    assert set(r.metrics) == {"teacher", "noise"} and "student_vs_teacher" not in r.metrics["noise"]
    def teacher_iou(name: str) -> float:
        t, x = p["truth"][name], p["maps"]["teacher"][name]
        return ((t > 0) & (x > 0)).sum() / ((t > 0) | (x > 0)).sum()

    worst = min(("img_000.png", "img_003.png"), key=teacher_iou)
    assert worst == "img_000.png"  # its spot is missed
    assert [o.name for o in r.overlays] == ["00_b1__img_000.png"]
    assert r.metrics["teacher"]["per_class"]["crack"]["recall"] == 1.0


def test_noise_by_size_and_recovery_by_hand() -> None:
    from b2p.evaluate.noise import NoiseAccumulator, RecoveryAccumulator

    truth = np.zeros((100, 100), np.uint8)
    truth[0, 0:5] = 1  # small: 5 px = 0.05 %
    truth[10:15, 10:20] = 2  # medium: 50 px = 0.5 %
    truth[50:70, 50:70] = 1  # large: 400 px = 4 %
    pred = np.zeros_like(truth)
    pred[10:13, 10:20] = 1  # 30 of the medium spot (wrong class: still covered)
    pred[50:55, 50:70] = 1  # 100 of the large crack
    pred[90:100, 90:100] = 2  # 100 px hallucinated
    acc = NoiseAccumulator(["crack", "spot"])
    acc.update(truth, pred)
    r = acc.result()
    assert r["by_size"]["small"] == {"components": 1, "detected": 0, "component_recall": 0.0, "pixels": 5, "miss_rate": 1.0}
    assert r["by_size"]["medium"] == {"components": 1, "detected": 1, "component_recall": 1.0, "pixels": 50, "miss_rate": 0.4}
    assert r["by_size"]["large"] == {"components": 1, "detected": 0, "component_recall": 0.0, "pixels": 400, "miss_rate": 0.75}
    assert r["hallucination"] == pytest.approx(100 / 230)
    assert r["miss_rate"] == pytest.approx((5 + 20 + 300) / 455)
    assert r["component_recall"] == pytest.approx(1 / 3)
    assert r["by_class"]["spot"]["hallucination"] == 1.0  # all pixels labelled spot are outside defects
    assert r["by_class"]["crack"]["hallucination"] == 0.0
    assert r["by_class"]["crack"]["miss_rate"] == pytest.approx(305 / 405)

    student = np.zeros_like(truth)
    student[50:70, 50:70] = 1  # recovers the 300 the teacher missed of the large crack
    student[90:95, 90:100] = 1  # keeps half the hallucination
    student[30, 30] = 1  # adds one new false pixel
    rec = RecoveryAccumulator()
    rec.update(truth, pred, student)
    r = rec.result()
    assert r["recovered_of_teacher_missed"] == pytest.approx(300 / 325)
    assert r["removed_of_teacher_hallucination"] == pytest.approx(50 / 100)
    assert r["lost_of_teacher_hits"] == pytest.approx(30 / 130)  # the medium spot's 30 px dropped
    assert r["added_hallucination_pixels"] == 1
