"""`b2p finalize`: the pixel masks b2p delivers for the box-annotated images, settings chosen on calib.

Inputs per image: the student's class probabilities (`b2p predict --probs`: PROBS/<batch>/probs/<key>.npz),
its boxes, and optionally a teacher's label maps (TEACHER/<batch>/labelmaps/<key>.png). Each box of class
c becomes the pixels inside it where

    s = alpha * p_student(defect) + (1 - alpha) * [the teacher labels the pixel c]

is above t, painted with c; overlaps: the smaller mask wins; a box where no pixel passes keeps its pixels
with s >= half its best s (rescued: the annotator says a defect is there). This is `within_boxes` of
b2p/boxes.py with s in place of p(defect). alpha 1 is the student alone, alpha 0 the teacher.

(alpha, t) is chosen per class on the calib images (`b2p import --calib`): every grid point of ALPHAS x
THRESHOLDS (ALPHAS only 1.0 without a teacher) gives label maps for all calib images, scored against their
manual masks with one confusion matrix (b2p/metrics.py); each class takes the point with its best
IoU (ties: the earlier point; the grid starts with the default). A class without calib pixels keeps the
default, and so does everything when there is no calib image: alpha 1, t 0.5 (the student alone, at
even odds). Calib images are only measured here: their manual masks never become output.

The student alone, calibrated (`student_out`, our addition): the plain prediction is the argmax of the fine
head, which calls a pixel background whenever background beats each defect class singly, even when the
defect classes together are more likely: a student trained on noisy masks misses many defect pixels so.
On the calib images we choose, by binary IoU + anomaly mIoU (the benchmark's two headline figures), between
that argmax, "defect where p(defect) >= t, then the most likely defect class" for t in STUDENT_THRESHOLDS,
the student's map snapped to the image (b2p/student/snap.py: GrabCut seeded by p(defect), sure at
SNAP_SURES; `student_snap=False` leaves it out), and the argmax of log p + a per-class offset fitted on
calib (ties: the argmax, then the earlier rule). The offsets correct the class priors the student learnt
from its pseudo-masks (class weights, a teacher that paints one class too wide or too thin): a rare class
it calls too seldom gets a positive offset, one it paints too widely a negative one. They are fitted by
coordinate ascent over OFFSET_GRID, class by class, two rounds, from all zero (the argmax), on the same
score (on at most OFFSET_FIT_PIXELS calib pixels, a fixed stride of them on larger calib sets).
Why the snap is a candidate here: it pays on some surfaces (the demo's dark marks) and costs on others
(Magnetic-Tile's faint grey regions), so it is measured per dataset instead of set by hand. No box is used:
these are the masks the student gives an image nobody annotated.

`splits` limits which images get output masks (default all; calib probabilities are read in any case).

All or nothing: every input is checked first (each probs file's size and class names, the teacher root is
this batch's, `b2p.teach.base.check_teacher_root`), and OUT (and STUDENT_OUT) are built in hidden folders
beside them that replace them whole once complete: a failure or a kill leaves the previous outputs intact,
and an output root always holds one run's masks (images outside `splits`, batches not given: none). So an
output may not be, hold or lie inside an input (round 2 writes beside round 1, never over it).

Outputs (the teacher layout, so `b2p train --teacher-root OUT` trains round 2 on them):
  OUT/<batch>/labelmaps/<key>.png   every image of the batches (of `splits`) (background outside boxes);
  OUT/<batch>/provenance.json       teacher "final", settings, counts;
  OUT/thresholds.json               per class alpha, t, reason and calib IoU (chosen and default), the
                                    calib scores of every grid point (and the student-alone choice);
  STUDENT_OUT/<batch>/labelmaps/<key>.png, STUDENT_OUT/threshold.json   the calibrated student alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from b2p.dataset import Batch, ImageRecord, class_list_of, load_batches
from b2p.errors import B2PError
from b2p.fileio import write_bytes_atomic, write_json_atomic
from b2p.labels import encode_label_map, label_map_key, label_map_path, paint_label_map, read_label_map
from b2p.scale.engine import Engine
# the decision rules themselves: one implementation, shared with `b2p predict` and the ONNX runtime
from b2p.student.rules import log_probs as _log_probs, offset_label_map, student_label_map  # noqa: F401 (re-exported)

DEFAULT = (1.0, 0.5)  # (alpha, t) without calib
ALPHAS = (1.0, 0.75, 0.5, 0.25, 0.0)
THRESHOLDS = (0.5, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8)
RESCUE_RELATIVE = 0.5
ARGMAX = None  # the student-alone rule "argmax of the fine head" (the default, as `b2p predict` writes it)
STUDENT_THRESHOLDS = (ARGMAX, 0.5, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9)
# the snapped candidates' `sure` (snap.py; `b2p predict --snap-sure`): the demo's choice and its neighbours
SNAP_SURES = (0.9, 0.8, 0.95)
# the per-class offsets tried on log p (module docstring): up to e^1.5 = 4.5x a class's odds, down to e^-1 = 0.37x
OFFSET_GRID = (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 1.5)
OFFSET_ROUNDS = 2
OFFSET_FIT_PIXELS = 4_000_000  # a fit costs about 80 argmaxes over these: a few seconds


@dataclass(frozen=True)
class StudentRule:
    """One student-alone decision rule: t (ARGMAX or a p(defect) threshold), or a snap to the image."""

    t: float | None = ARGMAX
    snap_sure: float | None = None  # set: snap.py's GrabCut at this `sure` (t is then unused)
    offsets: tuple[float, ...] | None = None  # set: the argmax of log p + offsets (background first; t unused)

    @property
    def name(self) -> str:
        if self.snap_sure is not None:
            return f"snapped to the image (GrabCut, sure {self.snap_sure:g})"
        if self.offsets is not None:
            return "argmax with class offsets [" + ", ".join(f"{o:g}" for o in self.offsets[1:]) + "]"
        return _rule_name(self.t)

    def label_map(self, probs: np.ndarray, image: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
        """(HxW label map, snapped): `image` (HxWx3 uint8 RGB) is read only by a snap rule; a snap that
        finds no colour model (snap.py) keeps the argmax and says so (False)."""
        if self.offsets is not None:
            return offset_label_map(probs, self.offsets), False
        if self.snap_sure is None:
            return student_label_map(probs, self.t), False
        from b2p.student.snap import SnapSettings, snap_grabcut

        if image is None:
            raise B2PError("a snapped student-alone rule needs the image")
        return snap_grabcut(image, probs, SnapSettings(sure=self.snap_sure))


def student_rules(snap: bool = True) -> list[StudentRule]:
    """The candidates, in tie-break order: the argmax first (the default)."""
    return [StudentRule(t) for t in STUDENT_THRESHOLDS] + ([StudentRule(snap_sure=s) for s in SNAP_SURES] if snap else [])


@dataclass
class FinalResult:
    out: Path
    images: int
    boxes: int
    rescued: int
    calib_images: int
    choice: dict[str, dict]  # class -> {"alpha", "t", "reason", "calib_iou", "default_iou"}
    calib_scores: dict | None = None  # metrics.scores of the chosen settings on calib
    default_scores: dict | None = None
    grid_scores: list[dict] = field(default_factory=list)
    student: dict | None = None  # the calibrated student alone: {"t", "snap_sure", "rule", "reason", "calib", "grid", "unsnapped"}


def probs_path(root: str | Path, batch: str, file_name: str) -> Path:
    """Where `b2p predict --probs` writes an image's class probabilities."""
    return Path(root) / batch / "probs" / f"{label_map_key(file_name)}.npz"


def existing_probs_path(root: str | Path, im: ImageRecord) -> Path:
    """The image's probs file, or one clear error naming it and the command that writes it."""
    p = probs_path(root, im.batch, im.file_name)
    if not p.is_file():
        raise B2PError(f"student probabilities missing for this {im.split} image: run `b2p predict --probs` over its split into this root first", p)
    return p


def read_class_probabilities(root: str | Path, im: ImageRecord) -> np.ndarray:
    """(K+1)xHxW float32 class probabilities of the student, from its probs file."""
    from b2p.student.outputs import read_probs  # torch-free (b2p.student.predict imports torch)

    p = existing_probs_path(root, im)
    probs = read_probs(p)
    if probs.ndim != 3 or probs.shape[1:] != (im.height, im.width):
        raise B2PError(f"probabilities are {probs.shape}, expected (K+1)x{im.height}x{im.width}", p)
    return probs


def probs_header(path: Path) -> tuple[tuple[int, ...], list[str] | None]:
    """(shape, class names) of a probs file without decompressing its probabilities; names None in the
    older files that lack them (`write_probs` stores ["background", *the model's classes])."""
    import zipfile

    fmt = np.lib.format
    try:
        with zipfile.ZipFile(path) as z:
            with z.open("probs.npy") as f:
                version = fmt.read_magic(f)
                shape = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(f)[0]
            if "class_names.npy" not in z.namelist():
                return shape, None
            with z.open("class_names.npy") as f:
                return shape, [str(n) for n in fmt.read_array(f, allow_pickle=False).tolist()]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise B2PError(f"unreadable probabilities file ({e})", path) from None


def check_probs_file(root: str | Path, im: ImageRecord, class_names: list[str]) -> None:
    """Refuse, before any output is written, a probs file that is missing, not of the image's size, or of
    a model whose class ids mean other classes than the batches' (`check_class_lists`)."""
    from b2p.labels import check_class_lists

    p = existing_probs_path(root, im)
    shape, names = probs_header(p)
    if len(shape) != 3 or shape[1:] != (im.height, im.width):
        raise B2PError(f"probabilities are {shape}, expected (K+1)x{im.height}x{im.width}: predict this image again", p)
    if names is None:  # an older file: only its class count can be checked
        if not 2 <= shape[0] <= len(class_names) + 1:
            raise B2PError(f"probabilities of {shape[0] - 1} classes, but the batches have {len(class_names)}: predict again with a model trained on these batches", p)
        return
    if len(names) != shape[0] or names[:1] != ["background"]:
        raise B2PError(f"probabilities have {shape[0]} channels but the class names {names} (background first expected): predict again", p)
    check_class_lists(names[1:], class_names, p)


def _read_image_of(im: ImageRecord) -> np.ndarray:
    """The image's pixels (a snap reads them), refused when the file no longer has the imported size."""
    from b2p.fileio import read_image

    img = read_image(im.path)
    if img.shape[:2] != (im.height, im.width):
        raise B2PError(f"the image is {img.shape[1]}x{img.shape[0]} px, imported as {im.width}x{im.height}: re-import its batch", im.path)
    return img


def fit_class_offsets(samples: list[tuple[np.ndarray, np.ndarray]], names: list[str], k1: int) -> tuple[tuple[float, ...], dict]:
    """Per-class offsets on log p maximising binary IoU + anomaly mIoU over `samples` ((K+1)xN log p, N truth
    labels; module docstring); returns (offsets with background 0, the scores they reach)."""
    from b2p.metrics import ConfusionMatrix

    lp = np.concatenate([a for a, _ in samples], axis=1)
    truth = np.concatenate([t for _, t in samples])

    def score(pred: np.ndarray) -> tuple[float, dict]:
        cm = ConfusionMatrix(k1)
        cm.update(pred, truth)
        s = _summary(cm.scores(names))
        return (s["binary_iou"] or 0.0) + (s["anomaly_miou"] or 0.0), s

    off = np.zeros(k1, np.float32)
    best, best_s = score(lp.argmax(0))
    for _ in range(OFFSET_ROUNDS):
        for c in range(1, k1):
            # the best of the other classes once; each trial offset of c then costs one comparison
            others = lp + off[:, None]
            others[c] = -np.inf
            am = others.argmax(0)
            mx = np.take_along_axis(others, am[None], 0)[0]
            for v in OFFSET_GRID:
                z = lp[c] + v
                pred = np.where((z > mx) | ((z == mx) & (c < am)), c, am)  # ties to the lower index, as argmax
                sc, s = score(pred)
                if sc > best + 1e-6:  # strictly better: ties keep the smaller change
                    best, best_s = sc, s
                    off = off.copy()
                    off[c] = v
    return tuple(float(o) for o in off), best_s


def _rule_name(t: float | None) -> str:
    return "argmax" if t is ARGMAX else f"p(defect) >= {t:g}"


def final_label_map(
    p_defect: np.ndarray,
    boxes_xyxy: np.ndarray,
    class_ids: np.ndarray,
    settings: dict[int, tuple[float, float]],
    teacher_lm: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """HxW uint8 label map of one image and the number of rescued boxes; `settings` maps a class id to
    its (alpha, t). Without `teacher_lm` alpha must be 1."""
    from b2p.boxes import within_boxes

    h, w = p_defect.shape
    masks, rescued = [], 0
    for box, c in zip(np.asarray(boxes_xyxy, np.float64).reshape(-1, 4), np.asarray(class_ids).reshape(-1)):
        alpha, t = settings.get(int(c), DEFAULT)
        if teacher_lm is None:
            if alpha != 1.0:
                raise B2PError(f"alpha {alpha} blends in a teacher, but no teacher label maps were given")
            s = p_defect
        else:
            s = alpha * p_defect + (1.0 - alpha) * (teacher_lm == int(c))
        lm, r = within_boxes(s, box[None], np.array([int(c)]), threshold=t, relative=RESCUE_RELATIVE)
        masks.append(lm > 0)
        rescued += r
    return paint_label_map((h, w), masks, [int(c) for c in class_ids]), rescued


def _grid(with_teacher: bool) -> list[tuple[float, float]]:
    alphas = ALPHAS if with_teacher else (1.0,)
    points = [DEFAULT] + [(a, t) for a in alphas for t in THRESHOLDS if (a, t) != DEFAULT]
    # alpha 0 is the teacher alone: every t in (0, 1) gives the same masks; keep one
    seen_teacher = False
    out = []
    for a, t in points:
        if a == 0.0:
            if seen_teacher:
                continue
            seen_teacher = True
        out.append((a, t))
    return out


@dataclass
class FinalMasks:
    """One image's outputs as PNG bytes (`alone`: the student alone, when asked), its rescued boxes, whether
    its snap found no colour model, and its final label map when it is a calib image (scored here)."""

    final: bytes
    alone: bytes | None
    rescued: int
    unsnapped: int
    calib_map: np.ndarray | None


@dataclass
class FinalMaskJob:
    """The final (and student-alone) masks of one image, as an engine runs them (b2p/scale/engine.py)."""

    probs_root: str
    teacher_root: str | None
    num_classes: int
    settings: dict[int, tuple[float, float]]
    student_rule: StudentRule | None

    def setup(self) -> None:
        pass

    def cost(self, im: ImageRecord) -> float:
        return float(im.width * im.height)

    def run(self, im: ImageRecord) -> FinalMasks:
        probs = read_class_probabilities(self.probs_root, im)
        tl = None if self.teacher_root is None else read_label_map(label_map_path(self.teacher_root, im.batch, im.file_name), (im.height, im.width), self.num_classes)
        lm, r = final_label_map(1.0 - probs[0], im.boxes_xyxy(), im.box_class_ids(), self.settings, tl)
        alone, unsnapped = None, 0
        if self.student_rule is not None:
            img = _read_image_of(im) if self.student_rule.snap_sure is not None else None
            alone_map, ok = self.student_rule.label_map(probs, img)
            alone, unsnapped = encode_label_map(alone_map), int(img is not None and not ok)
        calib = lm if im.split == "calib" and im.has_manual_mask else None
        return FinalMasks(encode_label_map(lm), alone, r, unsnapped, calib)


def finalize(
    batch_files: list[Path],
    probs_root: str | Path,
    out: str | Path,
    teacher_root: str | Path | None = None,
    progress: bool = True,
    splits: str = "all",
    student_out: str | Path | None = None,
    student_snap: bool = True,
    engine: Engine | None = None,
) -> FinalResult:
    """Choose (alpha, t) per class on calib, then write the final masks of every image of `splits` (and, with
    `student_out`, the calibrated student alone, snapped candidates included unless `student_snap` is
    False), the masks on `engine` (b2p/scale/engine.py; default local); see the module docstring."""
    from b2p.fileio import staged_dirs
    from b2p.splits import parse_splits

    out = Path(out)
    engine = engine or Engine()
    student_out = None if student_out is None else Path(student_out)
    batches: list[Batch] = load_batches(batch_files)
    _check_output_roots(batches, out, student_out, probs_root, teacher_root)
    wanted = parse_splits(splits)
    classes = class_list_of(batches)
    names = list(classes.names)
    k1 = classes.num_classes + 1
    calib = [im for b in batches for im in b.split("calib") if im.has_manual_mask]
    model = _check_inputs(batches, calib, wanted, probs_root, teacher_root, names)
    rules = student_rules(student_snap)
    if calib:
        cached, student_maps, offset_samples = _read_calib(calib, probs_root, teacher_root, classes, student_out, student_snap, rules, progress)
        choice, grid_scores, default_scores = _calibrate(cached, names, k1, teacher_root is not None, progress)
    else:
        cached, student_maps, offset_samples, grid_scores, default_scores = [], [], [], [], None
        choice = {n: {"alpha": DEFAULT[0], "t": DEFAULT[1], "reason": "no calib images: default", "calib_iou": None, "default_iou": None} for n in names}
    student = student_rule = None
    if student_out is not None:
        student, student_rule = _choose_student(student_maps, offset_samples, cached, probs_root, names, k1, rules)
    settings = {classes.id_of(n): (c["alpha"], c["t"]) for n, c in choice.items()}

    if student is not None and student_rule.snap_sure is not None:
        for im in (im for b in batches for im in b.split(*wanted)):  # an image that changed stops the run before any mask is written
            _read_image_of(im)
    sources = {"probs": str(probs_root), "model": model, "teacher": None if teacher_root is None else str(teacher_root)}
    # each output root is built hidden beside it and swapped in whole once complete: it always holds one
    # run's output (images outside `splits` and batches not given included: they are no longer there)
    with staged_dirs([out] if student_out is None else [out, student_out]) as stages:
        new_out, new_student_out = stages[0], stages[-1]
        todo = [im for b in batches for im in b.split(*wanted)]
        job = FinalMaskJob(str(probs_root), None if teacher_root is None else str(teacher_root), classes.num_classes, settings, student_rule)
        rescued_of, unsnapped, cm_chosen = _write_masks(engine, job, todo, new_out, new_student_out, k1, progress)
        counts = _write_provenances(new_out, batches, wanted, rescued_of, choice, sources, engine)
        calib_scores = cm_chosen.scores(names) if calib else None
        result = FinalResult(out, counts["images"], counts["boxes"], counts["rescued"], len(calib), choice, calib_scores, default_scores, grid_scores, student)
        if student is not None:
            student["unsnapped"] = unsnapped if student_rule.snap_sure is not None else None
            write_json_atomic(new_student_out / "threshold.json", {**student, "splits": list(wanted), "sources": {"probs": str(probs_root), "model": model}})
        write_json_atomic(
            new_out / "thresholds.json",
            {
                "per_class": choice,
                "calib_images": len(calib),
                "default": {"alpha": DEFAULT[0], "t": DEFAULT[1]},
                "grid": {"alphas": list(ALPHAS) if teacher_root is not None else [1.0], "thresholds": sorted(THRESHOLDS)},
                "calib_chosen": _summary(calib_scores),
                "calib_default": _summary(default_scores),
                "calib_grid": grid_scores,
                "sources": sources,
                "counts": counts,
                "splits": list(wanted),
                "student_alone": student,
            },
        )
    return result


def _check_output_roots(batches: list[Batch], out: Path, student_out: Path | None, probs_root, teacher_root) -> None:
    """The outputs are replaced whole: neither may be, hold or lie inside an input or the other, nor hold anything
    finalize does not write (the batch files, images, a teacher root's other files)."""
    from b2p.dataset import input_folders
    from b2p.fileio import check_separate_folders

    check_separate_folders({"--out": out, "--student-out": student_out},
                           {"--probs": probs_root, "--teacher-root": teacher_root, **input_folders(batches)})
    _check_replaceable(out, "thresholds.json", {"labelmaps", "provenance.json"})
    if student_out is not None:
        _check_replaceable(student_out, "threshold.json", {"labelmaps"})


def _check_inputs(batches: list[Batch], calib: list[ImageRecord], wanted, probs_root, teacher_root, names: list[str]) -> dict:
    """Every input the run reads, before any work (probs files, one predict run's model, the teacher root and its
    label maps); returns that model's record."""
    from b2p.student.manifest import prediction_model
    from b2p.teach.base import check_teacher_root

    # cheap checks: a bad input must stop the run before any work, and the outputs are built in hidden
    # folders that replace the old ones only once complete, so a late failure loses nothing
    needed = list({id(im): im for im in [*calib, *(im for b in batches for im in b.split(*wanted))]}.values())
    for im in needed:
        check_probs_file(probs_root, im, names)
    # one finished predict run's model behind every probability read (not a root a killed re-run mixed)
    model = prediction_model(probs_root, [label_map_path(probs_root, im.batch, im.file_name) for im in needed], probs=True)
    if teacher_root is not None:
        for b in batches:
            check_teacher_root(teacher_root, b)
        for im in needed:
            tp = label_map_path(teacher_root, im.batch, im.file_name)
            if not tp.is_file():
                raise B2PError(f"teacher label map missing for this {im.split} image (--teacher-root {teacher_root}): teach its batch into this root first", tp)
    return model


def _read_calib(calib: list[ImageRecord], probs_root, teacher_root, classes, student_out, student_snap: bool, rules: list[StudentRule], progress: bool) -> tuple:
    """Per calib image (im, p(defect), teacher map, manual map); with `student_out` also every student-alone rule's
    map and the offsets' fit sample (a fixed stride of the pixels, at most OFFSET_FIT_PIXELS in all)."""
    from b2p.progress import Progress

    k1 = classes.num_classes + 1
    cached, student_maps, offset_samples = [], [], []
    stride = max(1, -(-sum(im.width * im.height for im in calib) // OFFSET_FIT_PIXELS))
    with Progress(progress and student_out is not None and student_snap, "finalize: student-alone rules", len(calib)) as advance:
        for im in calib:
            probs = read_class_probabilities(probs_root, im)
            cached.append((im, 1.0 - probs[0], _teacher_map(teacher_root, im, classes.num_classes), im.manual_label_map()))
            if student_out is not None:
                img = _read_image_of(im) if student_snap else None
                student_maps.append({r: r.label_map(probs, img)[0] for r in rules})
                offset_samples.append((_log_probs(probs.reshape(k1, -1)[:, ::stride]), cached[-1][3].ravel()[::stride].astype(np.int64)))
            del probs
            advance(1)
    return cached, student_maps, offset_samples


def _teacher_map(teacher_root, im: ImageRecord, num_classes: int) -> np.ndarray | None:
    """The teacher's label map of the image (None without a teacher)."""
    if teacher_root is None:
        return None
    return read_label_map(label_map_path(teacher_root, im.batch, im.file_name), (im.height, im.width), num_classes)


def _calibrate(cached: list, names: list[str], k1: int, with_teacher: bool, progress: bool) -> tuple[dict[str, dict], list[dict], dict]:
    """Every (alpha, t) of the grid scored on the calib images; per class the point of best IoU (ties: the earlier).
    Returns the choice, the grid's scores and the default point's scores."""
    from b2p.metrics import ConfusionMatrix
    from b2p.progress import Progress

    grid = _grid(with_teacher)
    grid_scores: list[dict] = []
    per_point = []
    with Progress(progress, "finalize: calibrating", len(grid)) as advance:
        for a, t in grid:
            cm = ConfusionMatrix(k1)
            settings = dict.fromkeys(range(1, k1), (a, t))
            for im, pd, tl, truth in cached:
                lm, _ = final_label_map(pd, im.boxes_xyxy(), im.box_class_ids(), settings, tl)
                cm.update(lm, truth)
            s = cm.scores(names)
            per_point.append(s)
            grid_scores.append({"alpha": a, "t": t, **{n: s["per_class"][n]["iou"] for n in names}, "binary_iou": s["binary_iou"], "anomaly_miou": s["anomaly_miou"]})
            advance(1)
    default_scores = per_point[0]
    choice: dict[str, dict] = {}
    for n in names:
        ious = [(s["per_class"][n]["iou"], -i) for i, s in enumerate(per_point) if s["per_class"][n]["iou"] is not None]
        d_iou = default_scores["per_class"][n]["iou"]
        if ious:
            best, neg_i = max(ious)
            a, t = grid[-neg_i]
            choice[n] = {"alpha": a, "t": t, "reason": "best IoU on calib", "calib_iou": best, "default_iou": d_iou}
        else:
            choice[n] = {"alpha": DEFAULT[0], "t": DEFAULT[1], "reason": "no calib pixels of this class: default", "calib_iou": None, "default_iou": None}
    return choice, grid_scores, default_scores


def _choose_student(student_maps: list[dict], offset_samples: list, cached: list, probs_root, names: list[str], k1: int,
                    rules: list[StudentRule]) -> tuple[dict, StudentRule]:
    """The student-alone rule of best calib score, the offset rule fitted on calib among the candidates; its record and the rule."""
    if offset_samples:
        offsets, _ = fit_class_offsets(offset_samples, names, k1)
        fitted = StudentRule(offsets=offsets)
        # the probabilities read again: holding every calib image's would cost memory on a large calib set
        for m, (im, *_) in zip(student_maps, cached):
            m[fitted] = fitted.label_map(read_class_probabilities(probs_root, im))[0]
        rules = [*rules, fitted]
    offset_samples.clear()  # the fit's pixels are no longer needed
    student = _choose_student_rule(student_maps, [c[3] for c in cached], names, k1, rules)
    return student, StudentRule(student["t"], student["snap_sure"], None if student["offsets"] is None else tuple(student["offsets"]))


def _write_masks(engine: Engine, job: FinalMaskJob, todo: list[ImageRecord], new_out: Path, new_student_out: Path, k1: int, progress: bool) -> tuple:
    """Every image's final (and student-alone) label map written as the engine returns it; (rescued boxes per image,
    images whose snap found no colour model, the confusion matrix of the calib images' final maps)."""
    from b2p.metrics import ConfusionMatrix
    from b2p.progress import Progress

    cm_chosen = ConfusionMatrix(k1)
    rescued_of: dict[tuple[str, int], int] = {}
    unsnapped = 0

    def write(i: int, r: FinalMasks) -> None:
        nonlocal unsnapped
        im = todo[i]
        write_bytes_atomic(label_map_path(new_out, im.batch, im.file_name), r.final)
        if r.alone is not None:
            write_bytes_atomic(label_map_path(new_student_out, im.batch, im.file_name), r.alone)
        unsnapped += r.unsnapped
        if r.calib_map is not None:
            cm_chosen.update(r.calib_map, im.manual_label_map())
        rescued_of[(im.batch, im.id)] = r.rescued
        advance(1)

    with Progress(progress, "finalize: masks", len(todo)) as advance:
        engine.map(job, todo, write)
    return rescued_of, unsnapped, cm_chosen


def _write_provenances(new_out: Path, batches: list[Batch], wanted, rescued_of: dict, choice: dict, sources: dict, engine: Engine) -> dict[str, int]:
    """OUT/<batch>/provenance.json of every batch; the images, boxes and rescued boxes of them all."""
    n_images = n_boxes = rescued = 0
    for b in batches:
        b_boxes = sum(len(im.boxes) for im in b.split(*wanted))
        b_rescued = sum(rescued_of[(b.name, im.id)] for im in b.split(*wanted))
        write_json_atomic(
            new_out / b.name / "provenance.json",
            {
                "batch": b.name,
                "teacher": "final",
                "settings": {"per_class": {n: {"alpha": c["alpha"], "t": c["t"]} for n, c in choice.items()}, "rescue_relative": RESCUE_RELATIVE},
                "sources": sources,
                "splits": list(wanted),
                "engine": engine.record(),
                "counts": {"images": len(b.split(*wanted)), "boxes": b_boxes, "rescued": b_rescued},
                "image_sha256": {im.file_name: im.sha256 for im in b.split(*wanted)},  # check_teacher_root (round 2)
            },
        )
        n_images += len(b.split(*wanted))
        n_boxes += b_boxes
        rescued += b_rescued
    return {"images": n_images, "boxes": n_boxes, "rescued": rescued}


def _check_replaceable(root: Path, top_file: str, batch_entries: set[str]) -> None:
    """finalize replaces its output folder whole: refuse one that holds anything else than what finalize
    writes there (`top_file`, and <batch>/ folders of `batch_entries`), e.g. a teacher root or `data`."""
    if not root.exists():
        return
    if not root.is_dir():
        raise B2PError("output is a file, not a folder", root)

    def ours(p: Path, allowed: set[str]) -> bool:
        return p.name in allowed or (p.name.startswith(".") and p.name.endswith(".tmp"))  # atomic_write's leftovers

    for e in sorted(root.iterdir()):
        foreign = next((f for f in sorted(e.iterdir()) if not ours(f, batch_entries)), None) if e.is_dir() else (None if ours(e, {top_file}) else e)
        if foreign is not None:
            raise B2PError(
                f"finalize replaces this output folder whole, but it holds {foreign.relative_to(root)}, which finalize does not write: "
                "give an empty folder, or one an earlier finalize wrote", root)


def _choose_student_rule(maps: list[dict], truths: list[np.ndarray], names: list[str], k1: int, rules: list[StudentRule]) -> dict:
    """The student-alone rule with the best binary IoU + anomaly mIoU on calib (module docstring); the argmax
    without calib.
    `maps[i][rule]`: calib image i's label map under that rule; `truths[i]`: its manual label map."""
    from b2p.metrics import ConfusionMatrix

    if not truths:
        return {"t": ARGMAX, "snap_sure": None, "offsets": None, "rule": _rule_name(ARGMAX), "reason": "no calib images: default", "calib": None, "grid": []}
    grid, best = [], None
    for i, rule in enumerate(rules):
        cm = ConfusionMatrix(k1)
        for m, truth in zip(maps, truths):
            cm.update(m[rule], truth)
        s = _summary(cm.scores(names))
        offsets = None if rule.offsets is None else dict(zip(["background", *names], rule.offsets))
        grid.append({"t": rule.t, "snap_sure": rule.snap_sure, "offsets": offsets, "rule": rule.name, **s})
        if best is None or _both(s) > _both(grid[best]):
            best = i
    chosen = grid[best]
    offsets = None if chosen["offsets"] is None else list(chosen["offsets"].values())
    return {"t": chosen["t"], "snap_sure": chosen["snap_sure"], "offsets": offsets, "rule": chosen["rule"],
            "reason": "best binary IoU + anomaly mIoU on calib",
            "calib": {k: chosen[k] for k in ("binary_iou", "anomaly_miou", "per_class_iou")},
            "default_calib": {k: grid[0][k] for k in ("binary_iou", "anomaly_miou", "per_class_iou")}, "grid": grid}


def _both(s: dict) -> float:
    return (s["binary_iou"] or 0.0) + (s["anomaly_miou"] or 0.0)


def _summary(s: dict | None) -> dict | None:
    if s is None:
        return None
    return {"binary_iou": s["binary_iou"], "anomaly_miou": s["anomaly_miou"], "per_class_iou": {n: v["iou"] for n, v in s["per_class"].items()}}
