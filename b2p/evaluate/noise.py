"""How wrong a mask source is, pixel by pixel and defect by defect (teacher-noise analysis).

Terms, for a source S (a teacher, the student, the box fill) against the manual masks, with "foreground"
meaning any defect class (id > 0):
- hallucination = S-foreground pixels outside every true defect / all S-foreground pixels;
- miss rate = true defect pixels that S left as background / all true defect pixels (1 - binary recall);
- by class: hallucination of the pixels S labelled c, miss rate of the pixels truly of class c;
- by size: true defects are the connected components (8-connectivity) of each class's manual mask, binned
  by their area as a fraction of the image (`size_bins`, default small < 0.1 %, medium < 1 %, large);
  per bin: miss rate of their pixels and component detection recall, a component counting as detected
  when S's foreground covers at least `min_cover` of its pixels.
- recovery (student vs teacher): of the true defect pixels the teacher missed, the fraction the student
  found; of the teacher's hallucinated pixels, the fraction the student left as background; and, so the
  picture is fair, what the student broke: true pixels the teacher had and the student lost, and new
  hallucination where the teacher had none.
All ratios are pooled over the split (pixel and component counts summed first), None when undefined.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from b2p.metrics import ratio

DEFAULT_SIZE_BINS = (0.001, 0.01)  # fractions of the image area: small < 0.1 % <= medium < 1 % <= large
DEFAULT_MIN_COVER = 0.5


def size_bin_names(size_bins: Sequence[float]) -> list[str]:
    """Names of the bins: small/medium/large for two edges, else size0, size1, ..."""
    if len(size_bins) == 2:
        return ["small", "medium", "large"]
    return [f"size{i}" for i in range(len(size_bins) + 1)]


@dataclass
class ClassComponents:
    """Connected components (8-connectivity) of one class of a manual label map."""

    class_id: int
    labels: np.ndarray  # HxW int32: 0 outside the class, 1..n its components
    areas: np.ndarray  # (n,) int64 pixel count of components 1..n


def true_components(truth: np.ndarray, num_classes: int) -> list[ClassComponents]:
    """The true defects of a manual HxW label map: each class's connected components."""
    import cv2

    out = []
    for c in range(1, num_classes + 1):
        m = (truth == c).astype(np.uint8)
        if not m.any():
            continue
        n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        out.append(ClassComponents(c, labels, stats[1:, cv2.CC_STAT_AREA].astype(np.int64)))
    return out


class NoiseAccumulator:
    """Pools the hallucination / miss counts of one mask source over many images."""

    def __init__(
        self,
        class_names: Sequence[str],
        size_bins: Sequence[float] = DEFAULT_SIZE_BINS,
        min_cover: float = DEFAULT_MIN_COVER,
    ):
        self.class_names = list(class_names)
        self.k = len(self.class_names)
        self.size_bins = [float(b) for b in size_bins]
        if sorted(self.size_bins) != self.size_bins or any(not 0 < b < 1 for b in self.size_bins):
            raise ValueError(f"size bins must be increasing fractions in (0, 1), got {list(size_bins)}")
        self.bin_names = size_bin_names(self.size_bins)
        self.min_cover = float(min_cover)
        self.pred_fg = 0
        self.pred_fg_outside = 0
        self.true_fg = 0
        self.true_fg_missed = 0
        # per class id 1..K (index 0 unused)
        self.pred_c = np.zeros(self.k + 1, np.int64)
        self.pred_c_outside = np.zeros(self.k + 1, np.int64)
        self.true_c = np.zeros(self.k + 1, np.int64)
        self.true_c_missed = np.zeros(self.k + 1, np.int64)
        nb = len(self.bin_names)
        self.bin_components = np.zeros(nb, np.int64)
        self.bin_detected = np.zeros(nb, np.int64)
        self.bin_pixels = np.zeros(nb, np.int64)
        self.bin_missed = np.zeros(nb, np.int64)

    def update(self, truth: np.ndarray, pred: np.ndarray, components: list[ClassComponents] | None = None) -> None:
        """Add one image: HxW label maps of the same shape. `components`: reuse `true_components(truth)`."""
        t = np.asarray(truth)
        p = np.asarray(pred)
        t_fg = t > 0
        p_fg = p > 0
        outside = p_fg & ~t_fg
        missed = t_fg & ~p_fg
        self.pred_fg += int(p_fg.sum())
        self.pred_fg_outside += int(outside.sum())
        self.true_fg += int(t_fg.sum())
        self.true_fg_missed += int(missed.sum())
        n = self.k + 1
        self.pred_c += np.bincount(p.ravel(), minlength=n)[:n]
        self.pred_c_outside += np.bincount(p[outside], minlength=n)[:n]
        self.true_c += np.bincount(t.ravel(), minlength=n)[:n]
        self.true_c_missed += np.bincount(t[missed], minlength=n)[:n]
        if components is None:
            components = true_components(t, self.k)
        for cc in components:
            n = len(cc.areas)
            # pixels of each component covered by the source's foreground, in one pass over the image
            covered = np.bincount(cc.labels[p_fg], minlength=n + 1)[1:]
            bins = np.searchsorted(self.size_bins, cc.areas / t.size, side="right")
            np.add.at(self.bin_components, bins, 1)
            np.add.at(self.bin_pixels, bins, cc.areas)
            np.add.at(self.bin_missed, bins, cc.areas - covered)
            np.add.at(self.bin_detected, bins, (covered >= self.min_cover * cc.areas).astype(np.int64))

    def result(self) -> dict:
        """{"hallucination", "miss_rate", "pred_pixels", "true_pixels", "by_class": {name: {...}},
        "by_size": {bin: {"components", "detected", "component_recall", "pixels", "miss_rate"}}}"""
        by_class = {
            name: {
                "hallucination": ratio(self.pred_c_outside[c], self.pred_c[c]),
                "miss_rate": ratio(self.true_c_missed[c], self.true_c[c]),
                "pred_pixels": int(self.pred_c[c]),
                "true_pixels": int(self.true_c[c]),
            }
            for c, name in enumerate(self.class_names, start=1)
        }
        by_size = {
            name: {
                "components": int(self.bin_components[i]),
                "detected": int(self.bin_detected[i]),
                "component_recall": ratio(self.bin_detected[i], self.bin_components[i]),
                "pixels": int(self.bin_pixels[i]),
                "miss_rate": ratio(self.bin_missed[i], self.bin_pixels[i]),
            }
            for i, name in enumerate(self.bin_names)
        }
        return {
            "hallucination": ratio(self.pred_fg_outside, self.pred_fg),
            "miss_rate": ratio(self.true_fg_missed, self.true_fg),
            "component_recall": ratio(self.bin_detected.sum(), self.bin_components.sum()),
            "pred_pixels": int(self.pred_fg),
            "true_pixels": int(self.true_fg),
            "by_class": by_class,
            "by_size": by_size,
        }


class RecoveryAccumulator:
    """Pools what the student fixed (and broke) of the teacher's errors, over many images."""

    def __init__(self) -> None:
        self.teacher_missed = 0
        self.recovered = 0
        self.teacher_hallucinated = 0
        self.removed = 0
        self.teacher_hit = 0
        self.lost = 0
        self.teacher_true_bg = 0  # background pixels the teacher got right
        self.added_hallucination = 0

    def update(self, truth: np.ndarray, teacher: np.ndarray, student: np.ndarray) -> None:
        """Add one image: three same-shape HxW label maps."""
        t = np.asarray(truth) > 0
        te = np.asarray(teacher) > 0
        st = np.asarray(student) > 0
        missed = t & ~te
        halluc = te & ~t
        hit = t & te
        true_bg = ~t & ~te
        self.teacher_missed += int(missed.sum())
        self.recovered += int((missed & st).sum())
        self.teacher_hallucinated += int(halluc.sum())
        self.removed += int((halluc & ~st).sum())
        self.teacher_hit += int(hit.sum())
        self.lost += int((hit & ~st).sum())
        self.teacher_true_bg += int(true_bg.sum())
        self.added_hallucination += int((true_bg & st).sum())

    def result(self) -> dict:
        return {
            "recovered_of_teacher_missed": ratio(self.recovered, self.teacher_missed),
            "removed_of_teacher_hallucination": ratio(self.removed, self.teacher_hallucinated),
            "lost_of_teacher_hits": ratio(self.lost, self.teacher_hit),
            "added_hallucination_of_teacher_background": ratio(self.added_hallucination, self.teacher_true_bg),
            "teacher_missed_pixels": self.teacher_missed,
            "recovered_pixels": self.recovered,
            "teacher_hallucinated_pixels": self.teacher_hallucinated,
            "removed_pixels": self.removed,
            "lost_pixels": self.lost,
            "added_hallucination_pixels": self.added_hallucination,
        }
