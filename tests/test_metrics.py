"""The metric definitions against confusion matrices and scores worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from b2p.errors import B2PError
from b2p.metrics import (
    ConfusionMatrix,
    binary_counts,
    binary_counts_from_matrix,
    binary_iou,
    confusion_matrix,
    f1_from_iou,
    image_binary_scores,
    normalized_matrix,
    scores,
)

NAMES = ["crack", "spot"]


def test_hand_matrix_with_class_confused_for_another_is_binary_hit() -> None:
    truth = np.array([[0, 1], [2, 0]], np.uint8)
    pred = np.array([[0, 2], [2, 1]], np.uint8)
    cm = ConfusionMatrix(3)
    cm.update(pred, truth)
    # (t0,p0) (t1,p2) (t2,p2) (t0,p1)
    np.testing.assert_array_equal(cm.matrix, [[1, 1, 0], [0, 0, 1], [0, 0, 1]])
    assert cm.matrix.dtype == np.int64
    s = scores(cm.matrix, NAMES)
    pc = s["per_class"]
    # background: TP 1, FP 0, FN 1
    assert pc["background"] == {"iou": 0.5, "precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
    # crack: TP 0, FP 1, FN 1
    assert pc["crack"] == {"iou": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    # spot: TP 1, FP 1, FN 0
    assert pc["spot"] == {"iou": 0.5, "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1}
    assert s["miou"] == pytest.approx((0.5 + 0 + 0.5) / 3)
    assert s["anomaly_miou"] == pytest.approx(0.25)
    # binary: the crack predicted as spot is a hit: TP 2 (crack->spot, spot->spot), FP 1, FN 0
    assert binary_counts_from_matrix(cm.matrix) == (2, 1, 0, 1)
    assert s["binary_iou"] == pytest.approx(2 / 3)
    assert s["binary_precision"] == pytest.approx(2 / 3)
    assert s["binary_recall"] == 1.0
    assert s["binary_f1"] == pytest.approx(0.8)


def test_class_absent_everywhere_is_null_and_excluded_from_means() -> None:
    names = ["crack", "spot", "dent"]  # dent never appears
    truth = np.array([[0, 0, 1, 1], [0, 0, 2, 2]], np.uint8)
    pred = np.array([[0, 1, 1, 0], [0, 0, 2, 2]], np.uint8)
    m = confusion_matrix(pred, truth, 4)
    s = scores(m, names)
    assert s["per_class"]["dent"] == {"iou": None, "precision": None, "recall": None, "f1": None, "support": 0}
    # background: TP 3, FP 1 (crack->bg), FN 1 (bg->crack) -> 3/5; crack: TP 1, FP 1, FN 1 -> 1/3; spot 1
    assert s["per_class"]["background"]["iou"] == pytest.approx(3 / 5)
    assert s["per_class"]["crack"]["iou"] == pytest.approx(1 / 3)
    assert s["per_class"]["spot"]["iou"] == 1.0
    assert s["miou"] == pytest.approx((3 / 5 + 1 / 3 + 1) / 3)
    assert s["anomaly_miou"] == pytest.approx((1 / 3 + 1) / 2)


def test_class_only_predicted_counts_as_zero() -> None:
    truth = np.zeros((2, 2), np.uint8)
    pred = np.array([[0, 2], [0, 0]], np.uint8)
    s = scores(confusion_matrix(pred, truth, 3), NAMES)
    assert s["per_class"]["spot"]["iou"] == 0.0
    assert s["per_class"]["spot"]["recall"] is None  # nothing true
    assert s["per_class"]["crack"]["iou"] is None
    assert s["anomaly_miou"] == 0.0
    assert s["binary_iou"] == 0.0 and s["binary_precision"] == 0.0 and s["binary_recall"] is None


def test_images_without_any_defect_and_correct_background() -> None:
    cm = ConfusionMatrix(3)
    for _ in range(3):
        z = np.zeros((5, 7), np.uint8)
        cm.update(z, z)
    np.testing.assert_array_equal(cm.matrix, [[105, 0, 0], [0, 0, 0], [0, 0, 0]])
    s = scores(cm.matrix, NAMES)
    assert s["miou"] == 1.0
    assert s["anomaly_miou"] is None
    assert all(s[k] is None for k in ("binary_iou", "binary_precision", "binary_recall", "binary_f1"))


def test_prediction_all_background() -> None:
    truth = np.zeros((4, 4), np.uint8)
    truth[0, :3] = 1
    truth[3, 3] = 2
    pred = np.zeros_like(truth)
    s = scores(confusion_matrix(pred, truth, 3), NAMES)
    # background: TP 12, FN 0, FP 4
    assert s["per_class"]["background"]["iou"] == pytest.approx(12 / 16)
    assert s["per_class"]["crack"] == {"iou": 0.0, "precision": None, "recall": 0.0, "f1": 0.0, "support": 3}
    assert s["binary_iou"] == 0.0 and s["binary_recall"] == 0.0 and s["binary_f1"] == 0.0
    assert s["binary_precision"] is None  # nothing predicted
    assert s["miou"] == pytest.approx(12 / 16 / 3)


def test_binary_f1_identity_on_random_matrices() -> None:
    rng = np.random.default_rng(1)
    for k in range(1, 6):
        for _ in range(20):
            m = rng.integers(0, 50, (k + 1, k + 1))
            m[rng.random((k + 1, k + 1)) < 0.3] = 0
            s = scores(m, [f"c{i}" for i in range(k)])
            if s["binary_iou"] is None:
                assert s["binary_f1"] is None
            else:
                assert s["binary_f1"] == pytest.approx(2 * s["binary_iou"] / (1 + s["binary_iou"]))
                assert s["binary_f1"] == pytest.approx(f1_from_iou(s["binary_iou"]))
            for c in s["per_class"].values():
                if c["iou"] is not None:
                    assert c["f1"] == pytest.approx(2 * c["iou"] / (1 + c["iou"]))
            # binary IoU by brute force over the merged 2x2 matrix
            tp, fp, fn = m[1:, 1:].sum(), m[0, 1:].sum(), m[1:, 0].sum()
            if tp + fp + fn:
                assert s["binary_iou"] == pytest.approx(tp / (tp + fp + fn))


def test_accumulation_over_images_equals_one_big_matrix() -> None:
    rng = np.random.default_rng(2)
    preds = [rng.integers(0, 4, (rng.integers(3, 20), 11)).astype(np.uint8) for _ in range(7)]
    truths = [rng.integers(0, 4, p.shape).astype(np.uint8) for p in preds]
    cm = ConfusionMatrix(4)
    for p, t in zip(preds, truths):
        cm.update(p, t)
    big = confusion_matrix(np.concatenate(preds), np.concatenate(truths), 4)
    np.testing.assert_array_equal(cm.matrix, big)
    # brute force: count every (truth, pred) pair
    brute = np.zeros((4, 4), np.int64)
    for p, t in zip(preds, truths):
        for a, b in zip(t.ravel(), p.ravel()):
            brute[a, b] += 1
    np.testing.assert_array_equal(cm.matrix, brute)
    # pooled scores are not the mean of per-image scores (the paper pools)
    pooled = scores(cm.matrix, ["a", "b", "c"])["binary_iou"]
    per_image = np.mean([binary_iou(p, t) for p, t in zip(preds, truths)])
    assert pooled == pytest.approx(scores(big, ["a", "b", "c"])["binary_iou"])
    assert not math.isclose(pooled, per_image, rel_tol=1e-9)
    other = ConfusionMatrix(4)
    other.update(preds[0], truths[0])
    cm.merge(other)
    np.testing.assert_array_equal(cm.matrix, brute + confusion_matrix(preds[0], truths[0], 4))
    cm.reset()
    assert cm.matrix.sum() == 0


def test_bad_inputs_raise_clear_errors() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(B2PError, match="shape"):
        cm.update(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8))
    with pytest.raises(B2PError, match="class id 3"):
        cm.update(np.full((2, 2), 3, np.uint8), np.zeros((2, 2), np.uint8))
    with pytest.raises(B2PError, match="integer"):
        cm.update(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.uint8))
    with pytest.raises(B2PError, match="2 classes"):
        scores(np.zeros((4, 4)), NAMES)


def test_per_image_binary_helpers() -> None:
    z = np.zeros((3, 3), np.uint8)
    assert binary_iou(z, z) == 1.0  # no defect, none predicted: correct
    assert binary_iou(z, z, empty=float("nan")) != binary_iou(z, z, empty=float("nan"))
    truth = z.copy()
    truth[0, 0:2] = 1
    pred = z.copy()
    pred[0, 1:3] = 2  # the wrong class still overlaps as a defect
    assert binary_counts(pred, truth) == (1, 1, 1, 6)
    assert binary_iou(pred, truth) == pytest.approx(1 / 3)
    s = image_binary_scores(pred, truth)
    assert s["precision"] == 0.5 and s["recall"] == 0.5 and s["f1"] == 0.5
    s = image_binary_scores(z, truth)
    assert s["precision"] == 1.0 and s["recall"] == 0.0 and s["iou"] == 0.0  # nothing predicted: no FP
    assert f1_from_iou(None) is None


def test_torch_tensors_accepted() -> None:
    torch = pytest.importorskip("torch")
    t = torch.tensor([[0, 1], [2, 2]])
    p = torch.tensor([[0, 1], [1, 2]])
    np.testing.assert_array_equal(confusion_matrix(p, t, 3), [[1, 0, 0], [0, 1, 0], [0, 1, 1]])


def test_normalized_matrix_rows() -> None:
    m = np.array([[3, 1, 0], [0, 0, 0], [1, 1, 2]])
    n = normalized_matrix(m)
    np.testing.assert_allclose(n, [[0.75, 0.25, 0], [0, 0, 0], [0.25, 0.25, 0.5]])
