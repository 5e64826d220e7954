"""`b2p evaluate`: score mask sources (student, teacher, box fill, extra roots) against the manual masks.

Inputs: canonical batch files; the images scored are those of the chosen split that carry a manual mask.
Every mask source is a root in the standard layout (`<root>/<batch>/labelmaps/<key>.png`), except the
box-fill baseline, which is painted here from the boxes. A source given must be complete: a missing root
or label map, or one whose size is not its image's, is an error naming the file.

Outputs in `out` (all written atomically):
- `metrics.json`: one section per source with the headline scores (`MAIN_METRICS`) and `images`;
- `details.json`: per source its `per_class` scores, and `noise` (hallucination / miss rates, recovery);
- `confusion.json`: the raw pooled confusion matrix of every source (rows truth, columns prediction);
- `per_image.csv`: one row per image and source, each source's worst images first;
- `plots/per_class_iou.csv`, `plots/confusion_<source>.png`, `plots/summary.png`;
- `overlays/NN_<batch>__<key>.png`: the worst images side by side (image, manual, teacher, student).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from b2p.dataset import ImageRecord, class_list_of, input_folders, load_batches
from b2p.errors import B2PError
from b2p.metrics import ConfusionMatrix, image_binary_scores, scores
from b2p.evaluate.noise import DEFAULT_MIN_COVER, DEFAULT_SIZE_BINS, NoiseAccumulator, RecoveryAccumulator, true_components
from b2p.fileio import check_separate_folders, write_json_atomic, write_text_atomic
from b2p.evaluate.sources import (  # noqa: F401 (re-exported)
    BOX,
    RESERVED,
    SOURCE_NAME,
    STUDENT,
    TEACHER,
    EvalResult,
    MaskSource,
    box_fill_label_map,
    load_source_map,
    parse_source,
)
from b2p.labels import ClassList, label_map_key

SPLIT_CHOICES = ("test", "val", "train", "calib", "all")  # all: every split but calib (scored only on request)
METRICS_DIR = "metrics"  # OUT/metrics/<source>.json: one file per source, so `dvc metrics show` prints a row each
MAIN_METRICS = ("miou", "anomaly_miou", "binary_iou", "binary_precision", "binary_recall", "binary_f1")
CSV_FIELDS = (
    "source", "batch", "file_name", "label_map_key", "binary_iou", "binary_precision", "binary_recall",
    "binary_f1", "truth_classes", "pred_classes", "anomaly_pixels", "predicted_pixels", "tp", "fp", "fn", "pixels",
)  # fmt: skip


def write_source_metrics(folder: Path, metrics: dict[str, dict]) -> None:
    """FOLDER/<source>.json with each source's headline scores (earlier files of sources no longer scored go)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.json"):
        if old.stem not in metrics:
            old.unlink()
    for name, sec in metrics.items():
        write_json_atomic(folder / f"{name}.json", {k: v for k, v in sec.items() if k != "per_class"})


def recipe_sources(teachers: str | Path | None, pools: Sequence[tuple[str, Path]], params: str | Path | None) -> list[MaskSource]:
    """The recipe's rows besides student / teacher / box: every candidate teacher of `teachers`
    (`b2p choose-teacher`: TEACHERS/<name>) as `teachers.<name>`, and for each pool (params list KEY, its
    models in DIR/<name>/) every member alone with its calibrated rule (`<dir>.<name>`), its plain argmax
    (`<dir>.<name>.argmax`) and its final masks (`<dir>.<name>.final`)."""
    from b2p.fileio import read_json

    out: list[MaskSource] = []
    if teachers is not None:
        rec = read_json(Path(teachers) / "choice.json", "teacher choice")
        out += [MaskSource(f"teachers.{n}", Path(teachers) / n) for n in rec.get("candidates", {})]
    if pools:
        from b2p.recipe import ALONE, FINAL, PREDICT, pool_members

        for key, root in pools:
            for m in pool_members(params, key):
                group = f"{root.name}.{m}"
                out += [MaskSource(group, root / m / ALONE), MaskSource(f"{group}.argmax", root / m / PREDICT),
                        MaskSource(f"{group}.final", root / m / FINAL)]
    return out


def select_images(batches: Sequence, split: str) -> list[ImageRecord]:
    """Images of `split` ("all": any split but calib) that carry a manual mask, in batch then file order."""
    if split not in SPLIT_CHOICES:
        raise B2PError(f"--split must be one of {list(SPLIT_CHOICES)}, got {split!r}")
    ims = [im for b in batches for im in b.images if im.has_manual_mask and ((split == "all" and im.split != "calib") or im.split == split)]
    if not ims:
        names = [b.name for b in batches]
        raise B2PError(
            f"no image of split {split!r} in batches {names} has a manual mask, so there is nothing to score "
            "(manual masks come with `b2p import --masks`)"
        )
    return sorted(ims, key=lambda im: (im.batch, im.file_name))


def check_sources_complete(sources: Sequence[MaskSource], images: Sequence[ImageRecord], batches: Sequence = ()) -> None:
    """Fail before any work when a root or a label map of a given source is missing (naming it), or when a
    root was made for other images of one of `batches` (`check_teacher_root`: any root that records them)."""
    from b2p.student.manifest import prediction_model
    from b2p.teach.base import check_teacher_root

    for s in sources:
        if s.root is None:
            continue
        if not s.root.is_dir():
            raise B2PError(f"mask root of source {s.name!r} not found", s.root)
        for b in batches:
            check_teacher_root(s.root, b)
        missing = [s.label_map_file(im) for im in images if not s.label_map_file(im).is_file()]
        if not missing:  # a root `b2p predict` wrote: its maps from one finished run of one model
            prediction_model(s.root, [s.label_map_file(im) for im in images])
        if missing:
            more = f" (and {len(missing) - 1} more of {len(images)} images)" if len(missing) > 1 else ""
            raise B2PError(
                f"label map of source {s.name!r} is missing{more}; every evaluated image needs one "
                f"(run the stage that writes {s.root})",
                missing[0],
            )


def _class_presence(lm: np.ndarray, classes: ClassList) -> str:
    ids = np.flatnonzero(np.bincount(lm.ravel(), minlength=classes.num_classes + 1)[1:]) + 1
    return ";".join(classes.name_of(int(i)) for i in ids)


def _fmt(v: float | int | str | None) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6f}"
    return str(v)


def per_image_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r[k]) for k in CSV_FIELDS})
    return buf.getvalue()


def evaluate(
    batch_files: Sequence[str | Path],
    out: str | Path,
    teacher_root: str | Path | None = "data/teach",
    pred_root: str | Path | None = "data/predict",
    extra_sources: Sequence[MaskSource] = (),
    split: str = "test",
    box_baseline: bool = True,
    worst: int = 8,
    size_bins: Sequence[float] = DEFAULT_SIZE_BINS,
    min_cover: float = DEFAULT_MIN_COVER,
    plots: bool = True,
    progress: bool = True,
) -> EvalResult:
    """Score every source on the split's manually masked images and write the outputs to `out`.

    `teacher_root` / `pred_root` None leave that source out. The noise analysis covers every source; the
    student-vs-teacher recovery needs both. Overlays show the `worst` images by student binary IoU (by the
    first source's when there is no student); 0 writes none.
    """
    batches = load_batches(list(batch_files))
    classes = class_list_of(batches)
    images = select_images(batches, split)
    sources = _sources(pred_root, teacher_root, box_baseline, extra_sources)
    roots = {("--pred-root" if s.name == STUDENT else "--teacher-root" if s.name == TEACHER else f"--source {s.name}"): s.root for s in sources}
    check_separate_folders({"--out": Path(out)}, {**roots, **input_folders(batches)})
    check_sources_complete(sources, images, batches)

    cms, noise, recovery, rows = _score_images(images, sources, classes, size_bins, min_cover, progress)
    order = {s.name: i for i, s in enumerate(sources)}
    # each source's worst images first; ties by fewest true pixels found, then by name (stable output)
    rows.sort(key=lambda r: (order[r["source"]], r["binary_iou"], -r["fn"], r["batch"], r["file_name"]))

    metrics: dict = {}
    for s in sources:
        sc = scores(cms[s.name].matrix, classes.names)
        metrics[s.name] = {**{m: sc[m] for m in MAIN_METRICS}, "images": len(images), "per_class": sc["per_class"]}
    metrics["noise"] = {s.name: noise[s.name].result() for s in sources}
    if recovery is not None:
        metrics["noise"]["student_vs_teacher"] = recovery.result()

    out = Path(out)
    _write_scores(out, metrics, cms, rows, images, sources, classes, split)
    result = EvalResult(metrics, {n: cm.matrix for n, cm in cms.items()}, rows, images, sources, classes)
    if plots:
        from b2p.evaluate.plots import write_overlays, write_plots

        write_plots(out / "plots", result)
        rank_source = STUDENT if STUDENT in {s.name for s in sources} else sources[0].name
        result.overlays = write_overlays(out / "overlays", result, rank_source, worst, progress=progress)
    return result


def _sources(pred_root, teacher_root, box_baseline: bool, extra_sources: Sequence[MaskSource]) -> list[MaskSource]:
    """The sources to score, in order: student, teacher, box fill, then the extra ones (their names unique, none reserved)."""
    sources: list[MaskSource] = []
    if pred_root is not None:
        sources.append(MaskSource(STUDENT, Path(pred_root)))
    if teacher_root is not None:
        sources.append(MaskSource(TEACHER, Path(teacher_root)))
    if box_baseline:
        sources.append(MaskSource(BOX, None))
    for s in extra_sources:
        if s.name in {x.name for x in sources} or s.name in RESERVED:
            raise B2PError(f"source name {s.name!r} is given twice or is reserved")
        sources.append(s)
    if not sources:
        raise B2PError("nothing to evaluate: no student, teacher, box baseline or --source given")
    return sources


def _score_images(images, sources: list[MaskSource], classes: ClassList, size_bins, min_cover: float, progress: bool) -> tuple:
    """Every source's label map of every image against its manual mask: the confusion matrices, the noise (and
    student-vs-teacher recovery) accumulators, and the per-image rows."""
    from rich.progress import Progress

    k = classes.num_classes
    cms = {s.name: ConfusionMatrix(k + 1) for s in sources}
    noise = {s.name: NoiseAccumulator(classes.names, size_bins, min_cover) for s in sources}
    recovery = RecoveryAccumulator() if {STUDENT, TEACHER} <= {s.name for s in sources} else None
    rows: list[dict] = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"evaluating {len(sources)} sources", total=len(images))
        for im in images:
            truth = im.manual_label_map()
            assert truth is not None
            comps = true_components(truth, k)
            maps = {s.name: load_source_map(s, im, k) for s in sources}
            for s in sources:
                lm = maps[s.name]
                cms[s.name].update(lm, truth)
                noise[s.name].update(truth, lm, comps)
                rows.append(_image_row(s.name, im, lm, truth, classes))
            if recovery is not None:
                recovery.update(truth, maps[TEACHER], maps[STUDENT])
            bar.advance(task)
    return cms, noise, recovery, rows


def _image_row(source: str, im: ImageRecord, lm: np.ndarray, truth: np.ndarray, classes: ClassList) -> dict:
    """One per_image.csv row: a source's binary scores and pixel counts on one image."""
    b = image_binary_scores(lm, truth)
    return {
        "source": source,
        "batch": im.batch,
        "file_name": im.file_name,
        "label_map_key": label_map_key(im.file_name),
        "binary_iou": b["iou"],
        "binary_precision": b["precision"],
        "binary_recall": b["recall"],
        "binary_f1": b["f1"],
        "truth_classes": _class_presence(truth, classes),
        "pred_classes": _class_presence(lm, classes),
        "anomaly_pixels": int(b["tp"] + b["fn"]),
        "predicted_pixels": int(b["tp"] + b["fp"]),
        "tp": b["tp"],
        "fp": b["fp"],
        "fn": b["fn"],
        "pixels": int(truth.size),
    }


def _write_scores(out: Path, metrics: dict, cms: dict, rows: list[dict], images, sources: list[MaskSource], classes: ClassList, split: str) -> None:
    """OUT/metrics.json, OUT/metrics/, OUT/details.json, OUT/confusion.json and OUT/per_image.csv."""
    # metrics.json holds the headline figures only (what `dvc metrics show` tabulates); the per-class scores
    # and the noise analysis go to details.json
    write_json_atomic(out / "metrics.json", {n: {k: v for k, v in sec.items() if k != "per_class"} for n, sec in metrics.items() if n != "noise"})
    write_source_metrics(out / METRICS_DIR, {n: sec for n, sec in metrics.items() if n != "noise"})
    write_json_atomic(out / "details.json", {**{s.name: {"per_class": metrics[s.name]["per_class"]} for s in sources}, "noise": metrics["noise"]})
    write_json_atomic(
        out / "confusion.json",
        {
            "split": split,
            "classes": ["background", *classes.names],
            "images": [im.key for im in images],
            "sources": {s.name: str(s.root) if s.root is not None else "box fill (from the boxes)" for s in sources},
            "matrices": {n: cm.matrix.tolist() for n, cm in cms.items()},
        },
    )
    write_text_atomic(out / "per_image.csv", per_image_csv(rows))
