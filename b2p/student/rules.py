"""The student-alone decision rules (probabilities -> label map) and `rule.json`, the deployable student's
choice of rule and prediction settings: numpy only, shared by `b2p finalize` (which chooses the rule on
calib), `b2p predict` and the ONNX runtime (which apply it).

Rules, on (K+1)xHxW class probabilities p (background first):
  argmax     the most likely class (what `b2p predict` writes without a rule);
  threshold  defect where p(defect) = 1 - p(background) >= t, there the most likely defect class;
  offsets    the argmax of log(max(p, 1e-6)) + offsets (one per class, background first);
  snap       b2p/student/snap.py: GrabCut seeded by p(defect), sure at `snap_sure` (reads the image).

rule.json (written beside model.pt by the pipeline's `deploy` stage; `b2p export-onnx` copies it into the
ONNX model's metadata):
  {"format": 1, "rule": {"kind": ..., "t": float|null, "offsets": [float, ...]|null, "snap_sure": float|null},
   "tta": "none"|"flips", "window": int|null, "overlap": float, "class_names": [defect classes], "source": str}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from b2p.errors import B2PError

ARGMAX = None  # the threshold of the argmax rule
RULE_KINDS = ("argmax", "threshold", "offsets", "snap")
RULE_FILE = "rule.json"
RULE_FORMAT = 1
LOG_FLOOR = 1e-6  # probs files hold 1/255 steps: 0 is "below 1/510", and log 0 would be -inf


def student_label_map(probs: np.ndarray, t: float | None) -> np.ndarray:
    """The student alone: the argmax (t None), or the most likely defect class where p(defect) >= t."""
    from b2p.student.windows import class_map

    if t is ARGMAX:
        return class_map(probs)
    defect = (1.0 - probs[0]) >= t
    return np.where(defect, 1 + class_map(probs[1:]), 0).astype(np.uint8)


def log_probs(probs: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(probs, LOG_FLOOR, dtype=np.float32))


def offset_label_map(probs: np.ndarray, offsets: tuple[float, ...] | np.ndarray) -> np.ndarray:
    """The argmax of log p + offsets over the class axis (offsets: one per class, background first)."""
    o = np.asarray(offsets, np.float32).reshape(-1, *([1] * (probs.ndim - 1)))
    return (log_probs(probs) + o).argmax(0).astype(np.uint8)


def _finite(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise B2PError(f"{what} must be a finite number, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class DecisionRule:
    """One student-alone rule (module docstring); only the field of its kind is set."""

    kind: str = "argmax"
    t: float | None = None
    offsets: tuple[float, ...] | None = None
    snap_sure: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in RULE_KINDS:
            raise B2PError(f"decision rule kind must be one of {', '.join(RULE_KINDS)}, got {self.kind!r}")
        need = {"argmax": None, "threshold": "t", "offsets": "offsets", "snap": "snap_sure"}[self.kind]
        for f in ("t", "offsets", "snap_sure"):
            if (getattr(self, f) is not None) != (f == need):
                raise B2PError(f"a {self.kind} rule {'needs' if f == need else 'takes no'} {f}")
        if self.kind == "threshold" and not 0.0 < _finite(self.t, "the rule's t") < 1.0:
            raise B2PError(f"the rule's t is a p(defect) threshold in (0, 1), got {self.t}")
        if self.kind == "snap" and not 0.5 < _finite(self.snap_sure, "the rule's snap_sure") < 1.0:
            raise B2PError(f"the rule's snap_sure must be in (0.5, 1), got {self.snap_sure}")
        if self.kind == "offsets":
            if not isinstance(self.offsets, (list, tuple)) or len(self.offsets) < 2:
                raise B2PError(f"the rule's offsets are one number per class, background first, got {self.offsets!r}")
            object.__setattr__(self, "offsets", tuple(_finite(o, "each offset") for o in self.offsets))

    @classmethod
    def of_choice(cls, t: float | None = None, snap_sure: float | None = None, offsets=None) -> DecisionRule:
        """From finalize's student-alone choice (threshold.json "t", "snap_sure", "offsets")."""
        if snap_sure is not None:
            return cls("snap", snap_sure=snap_sure)
        if offsets is not None:
            return cls("offsets", offsets=tuple(offsets))
        return cls("argmax") if t is ARGMAX else cls("threshold", t=t)

    def check_classes(self, num_classes: int, where: str | Path | None = None) -> None:
        """Offsets must be one per class of the model (K + 1, background included)."""
        if self.offsets is not None and len(self.offsets) != num_classes:
            raise B2PError(f"the rule has {len(self.offsets)} class offsets but the model {num_classes} classes (background included)", where)

    def label_map(self, probs: np.ndarray, image: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
        """(HxW uint8 label map, snapped): `image` (HxWx3 uint8 RGB) is read only by a snap rule; a snap that
        finds no colour model (snap.py) keeps the argmax and says so (False)."""
        if self.kind == "offsets":
            return offset_label_map(probs, self.offsets), False
        if self.kind != "snap":
            return student_label_map(probs, self.t), False
        from b2p.student.snap import SnapSettings, snap_grabcut

        if image is None:
            raise B2PError("a snapped decision rule needs the image")
        return snap_grabcut(image, probs, SnapSettings(sure=self.snap_sure))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "t": self.t, "offsets": None if self.offsets is None else list(self.offsets), "snap_sure": self.snap_sure}

    @classmethod
    def from_dict(cls, d: object, where: str | Path | None = None) -> DecisionRule:
        if not isinstance(d, dict) or set(d) - {"kind", "t", "offsets", "snap_sure"} or "kind" not in d:
            raise B2PError(f"a decision rule is {{kind, t, offsets, snap_sure}}, got {d!r}", where)
        try:
            return cls(d["kind"], d.get("t"), d.get("offsets"), d.get("snap_sure"))
        except B2PError as e:
            raise B2PError(e.problem, where) from None

    def describe(self) -> str:
        if self.kind == "threshold":
            return f"p(defect) >= {self.t:g}"
        if self.kind == "offsets":
            return "argmax with class offsets [" + ", ".join(f"{o:g}" for o in self.offsets[1:]) + "]"
        if self.kind == "snap":
            return f"snapped to the image (GrabCut, sure {self.snap_sure:g})"
        return "argmax"


@dataclass(frozen=True)
class DeploySettings:
    """rule.json: the rule chosen on calib and the prediction settings it was chosen with."""

    rule: DecisionRule = field(default_factory=DecisionRule)
    tta: str = "none"
    window: int | None = None
    overlap: float = 0.25
    class_names: tuple[str, ...] = ()
    source: str = ""

    def __post_init__(self) -> None:
        from b2p.student.windows import check_overlap, check_tta

        check_tta(self.tta)
        check_overlap(_finite(self.overlap, "overlap"))
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1):
            raise B2PError(f"window must be a positive number of pixels or null, got {self.window!r}")
        names = tuple(self.class_names)
        if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise B2PError(f"class_names must be the model's distinct defect class names, got {list(names)}")
        object.__setattr__(self, "class_names", names)
        self.rule.check_classes(len(names) + 1)

    def to_dict(self) -> dict:
        return {"format": RULE_FORMAT, "rule": self.rule.to_dict(), "tta": self.tta, "window": self.window,
                "overlap": self.overlap, "class_names": list(self.class_names), "source": self.source}

    @classmethod
    def from_dict(cls, d: object, where: str | Path | None = None) -> DeploySettings:
        keys = {"format", "rule", "tta", "window", "overlap", "class_names", "source"}
        if not isinstance(d, dict) or d.get("format") != RULE_FORMAT:
            raise B2PError(f"not a b2p rule file of format {RULE_FORMAT}", where)
        if set(d) != keys:
            missing, extra = sorted(keys - set(d)), sorted(set(d) - keys)
            raise B2PError(f"rule file keys: missing {missing}, unknown {extra}", where)
        if not isinstance(d["class_names"], list) or not isinstance(d["source"], str):
            raise B2PError("class_names must be a list and source a string", where)
        try:
            return cls(DecisionRule.from_dict(d["rule"], where), d["tta"], d["window"], d["overlap"], tuple(d["class_names"]), d["source"])
        except B2PError as e:
            raise B2PError(e.problem, where) from None


def rule_path(model_dir: str | Path) -> Path:
    """Where a model folder (or the folder of a model file) keeps its rule.json."""
    p = Path(model_dir)
    return (p if p.is_dir() else p.parent) / RULE_FILE


def write_deploy_settings(path: str | Path, settings: DeploySettings) -> None:
    """Write rule.json atomically (`path`: the file, or the model folder)."""
    from b2p.fileio import write_json_atomic

    p = Path(path)
    write_json_atomic(p / RULE_FILE if p.is_dir() else p, settings.to_dict())


def read_deploy_settings(model_dir: str | Path, class_names: list[str] | None = None) -> DeploySettings | None:
    """The rule.json beside a model (folder or model file), None where there is none; refused when malformed
    or, given the model's `class_names`, made for another class list."""
    from b2p.fileio import read_json

    p = rule_path(model_dir)
    if not p.is_file():
        return None
    s = DeploySettings.from_dict(read_json(p, "rule file"), p)
    if class_names is not None and list(s.class_names) != list(class_names):
        raise B2PError(f"the rule was chosen for classes {list(s.class_names)}, the model predicts {list(class_names)}: write rule.json again for this model", p)
    return s
