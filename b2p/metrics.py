"""Every metric definition in b2p: the confusion matrix, IoU, precision, recall, F1 and the binary merge.

Evaluation (`b2p evaluate`), the student's validation (`b2p/student`) and FiftyOne (`b2p/browse`) all
call this module, so one number means the same thing everywhere.

How the paper counts (docs METHOD.md "Metrics"): ONE confusion matrix accumulated over every pixel of
the whole split, then scores from it; never a mean of per-image scores.

- Matrix: (K+1)x(K+1) int64, rows = truth, columns = prediction, index 0 = background, 1..K = classes.
- Per class c: TP = M[c, c], FP = column sum - TP, FN = row sum - TP, support = row sum (true pixels).
  IoU = TP / (TP + FP + FN); precision = TP / (TP + FP); recall = TP / (TP + FN); F1 = 2TP / (2TP + FP + FN).
- mIoU: mean IoU over all K+1 classes, background included. Anomaly mIoU: mean over the K defect classes.
- Binary: all defect classes merged against background, so a defect predicted as the wrong defect class
  still counts as a hit: TP = sum M[1:, 1:], FP = sum M[0, 1:], FN = sum M[1:, 0]. Binary F1 therefore
  always equals 2 IoU / (1 + IoU).

Undefined values (the convention, the same in every score): a ratio whose denominator is 0 is None
(JSON null), never 0 or 1. So a class absent from both truth and prediction has IoU/F1 None and is left
out of the mIoU / anomaly-mIoU means (it says nothing about the model); a class predicted but never
present has IoU 0 (a pure false positive, it counts); precision is None when nothing was predicted,
recall is None when nothing was true. A mean over no defined value is None.

Per-image helpers (`binary_counts`, `binary_iou`, ...) exist for rankings and per-sample fields, where a
number is wanted for every image: there an image with no defect in truth nor prediction has binary IoU
`empty` (default 1.0: "no defect" was answered correctly). Split-level scores never use that rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from b2p.errors import B2PError

SCORE_KEYS = ("miou", "anomaly_miou", "binary_iou", "binary_precision", "binary_recall", "binary_f1")
CLASS_KEYS = ("iou", "precision", "recall", "f1", "support")


def _as_numpy(x: Any) -> np.ndarray:
    """numpy view of a numpy array or a torch tensor (any device), without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def confusion_matrix(pred: Any, truth: Any, num_classes: int) -> np.ndarray:
    """(num_classes x num_classes) int64 matrix (rows truth, columns prediction) of two label maps.

    `pred`, `truth`: same-shape integer arrays (HxW label maps, or any shape, or a batch NxHxW; numpy or
    torch) with values in 0..num_classes-1; `num_classes` counts background (K + 1).
    """
    p = _as_numpy(pred)
    t = _as_numpy(truth)
    if p.shape != t.shape:
        raise B2PError(f"prediction shape {p.shape} differs from truth shape {t.shape}")
    n = int(num_classes)
    if p.size == 0:
        return np.zeros((n, n), dtype=np.int64)
    for name, a in (("prediction", p), ("truth", t)):
        if a.dtype.kind not in "ui" and a.dtype != bool:
            raise B2PError(f"{name} label map must hold integer class ids, got dtype {a.dtype}")
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= n:
            raise B2PError(f"{name} label map holds class id {hi if hi >= n else lo}; valid ids are 0..{n - 1}")
    # one bincount over a combined index is much faster than per-class comparisons
    idx = t.astype(np.intp, copy=False).ravel() * n + p.astype(np.intp, copy=False).ravel()
    return np.bincount(idx, minlength=n * n).reshape(n, n).astype(np.int64, copy=False)


class ConfusionMatrix:
    """Pixel confusion matrix accumulated over many images.

    `num_classes` is K + 1 (background included); `matrix` is (K+1)x(K+1) int64, rows = truth,
    columns = prediction, index 0 = background.
    """

    def __init__(self, num_classes: int):
        if int(num_classes) < 1:
            raise B2PError(f"a confusion matrix needs at least 1 class (background), got {num_classes}")
        self.num_classes = int(num_classes)
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred: Any, truth: Any) -> None:
        """Add the pixels of one label map (or a batch of them): same-shape integer arrays."""
        self.matrix += confusion_matrix(pred, truth, self.num_classes)

    def merge(self, other: ConfusionMatrix) -> None:
        """Add another matrix of the same size (e.g. from another worker)."""
        if other.matrix.shape != self.matrix.shape:
            raise B2PError(f"cannot merge confusion matrices of shapes {other.matrix.shape} and {self.matrix.shape}")
        self.matrix += other.matrix

    def reset(self) -> None:
        self.matrix[:] = 0

    def scores(self, class_names: Sequence[str]) -> dict:
        return scores(self.matrix, class_names)


def ratio(num: float, den: float) -> float | None:
    """num / den as a float, or None when den is 0 (the one rule for undefined scores)."""
    return float(num) / float(den) if den > 0 else None


def _mean(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def binary_from_counts(tp: int, fp: int, fn: int) -> dict[str, float | None]:
    """{"iou", "precision", "recall", "f1"} from defect-vs-background pixel counts (None when undefined)."""
    return {
        "iou": ratio(tp, tp + fp + fn),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
    }


def binary_counts_from_matrix(matrix: np.ndarray) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) of the binary merge (all defect classes vs background) of a confusion matrix."""
    m = np.asarray(matrix, dtype=np.int64)
    tp = int(m[1:, 1:].sum())
    fp = int(m[0, 1:].sum())
    fn = int(m[1:, 0].sum())
    return tp, fp, fn, int(m[0, 0])


def scores(matrix: np.ndarray, class_names: Sequence[str]) -> dict:
    """Split-level scores of a (K+1)x(K+1) confusion matrix; `class_names` are the K defect names.

    Returns {"miou", "anomaly_miou", "binary_iou", "binary_precision", "binary_recall", "binary_f1",
    "per_class": {name: {"iou", "precision", "recall", "f1", "support"}}} with floats, None where
    undefined (see the module docstring) and integer supports. `per_class` also holds "background".
    """
    m = np.asarray(matrix, dtype=np.int64)
    k = len(class_names)
    if m.shape != (k + 1, k + 1):
        raise B2PError(f"confusion matrix is {m.shape} but {k} classes + background need {(k + 1, k + 1)}")
    tp = np.diag(m)
    support = m.sum(axis=1)
    predicted = m.sum(axis=0)
    fp = predicted - tp
    fn = support - tp
    names = ["background", *class_names]
    per_class: dict[str, dict] = {}
    ious: list[float | None] = []
    for c, name in enumerate(names):
        iou = ratio(tp[c], tp[c] + fp[c] + fn[c])
        ious.append(iou)
        per_class[name] = {
            "iou": iou,
            "precision": ratio(tp[c], tp[c] + fp[c]),
            "recall": ratio(tp[c], tp[c] + fn[c]),
            "f1": ratio(2 * tp[c], 2 * tp[c] + fp[c] + fn[c]),
            "support": int(support[c]),
        }
    b = binary_from_counts(*binary_counts_from_matrix(m)[:3])
    return {
        "miou": _mean(ious),
        "anomaly_miou": _mean(ious[1:]),
        "binary_iou": b["iou"],
        "binary_precision": b["precision"],
        "binary_recall": b["recall"],
        "binary_f1": b["f1"],
        "per_class": per_class,
    }


def normalized_matrix(matrix: np.ndarray) -> np.ndarray:
    """Row-normalised float64 matrix (each truth row sums to 1; rows with no pixels stay 0)."""
    m = np.asarray(matrix, dtype=np.float64)
    rows = m.sum(axis=1, keepdims=True)
    return np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)


# --- per-image helpers ------------------------------------------------------------------------------------


def binary_counts(pred: Any, truth: Any) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) pixel counts of defect (id > 0) vs background between two same-shape label maps."""
    p = _as_numpy(pred) > 0
    t = _as_numpy(truth) > 0
    if p.shape != t.shape:
        raise B2PError(f"prediction shape {p.shape} differs from truth shape {t.shape}")
    # bincount of 2*t + p gives TN, FP, FN, TP in one pass
    c = np.bincount(2 * t.ravel().astype(np.intp) + p.ravel(), minlength=4)
    return int(c[3]), int(c[1]), int(c[2]), int(c[0])


def binary_iou(pred: Any, truth: Any, empty: float = 1.0) -> float:
    """Binary (defect vs background) IoU of one image; `empty` when neither map has a defect pixel."""
    tp, fp, fn, _ = binary_counts(pred, truth)
    den = tp + fp + fn
    return float(tp) / den if den else float(empty)


def image_binary_scores(pred: Any, truth: Any, empty: float = 1.0) -> dict[str, float | int]:
    """Per-image binary scores {"iou", "precision", "recall", "f1", "tp", "fp", "fn", "tn"}.

    Numbers for every image (for rankings, CSVs, FiftyOne fields): a ratio with a zero denominator means
    there was nothing to get wrong on that side (no predicted / no true defect pixel) and is `empty`.
    """
    tp, fp, fn, tn = binary_counts(pred, truth)
    out = {k: (v if v is not None else float(empty)) for k, v in binary_from_counts(tp, fp, fn).items()}
    return {**out, "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def f1_from_iou(iou: float | None) -> float | None:
    """F1 (Dice) equivalent of an IoU computed from the same counts: 2 IoU / (1 + IoU)."""
    return None if iou is None else 2.0 * iou / (1.0 + iou)
