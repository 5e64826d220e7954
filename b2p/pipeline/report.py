"""`b2p bench-report`: collect evaluated runs into one comparison table (JSON + Markdown).

A run is a folder holding the `metrics.json` that `b2p evaluate` wrote. Runs are found under an eval root:
`EVAL_ROOT/metrics.json` (the main job: one run) or `EVAL_ROOT/<teacher>/<student>/metrics.json` (the
benchmark suite, pipelines/*/dvc.yaml). Beside each run the report looks for (all optional, and it says
in the table when a figure is missing rather than inventing one):

- `MODELS_ROOT/<run>/metrics.json`: what `b2p train` recorded (training time, parameter counts, epochs);
- `MODELS_ROOT/<run>/model.pt`: timed here on a few test images for the inference speed (`measure_speed`);
- `TEACH_ROOT/<teacher>/<batch>/provenance.json`: the teacher's time per image.

Rows: one per teacher (its pseudo-masks scored against the manual masks), the box-fill baseline, and one
per trained student, plus one for its box-guided masks and one for its masks snapped to the image when
evaluate scored them (sections `student_boxes`, `student_snap`).
Metrics are the paper's (mIoU, anomaly mIoU, binary IoU / precision / recall / F1), all pooled over the
evaluated split (see b2p/evaluate/metrics.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from b2p.errors import B2PError
from b2p.fileio import read_json, write_json_atomic, write_text_atomic

METRICS = ("miou", "anomaly_miou", "binary_iou", "binary_precision", "binary_recall", "binary_f1")
METRIC_HEADS = ("mIoU", "anomaly mIoU", "binary IoU", "binary P", "binary R", "binary F1")
MAIN_RUN = "main"
# evaluate's section for the student's box-guided masks (`b2p predict --boxes-out`, `--source student_boxes=...`)
BOXED_SOURCE = "student_boxes"
# evaluate's sections of a student's other masks -> (row kind, suffix of the row's name), in table order:
# box-guided, and snapped to the image (`b2p predict --snap-out`, `--source student_snap=...`)
STUDENT_EXTRAS = {BOXED_SOURCE: ("student+boxes", " (+ boxes)"), "student_snap": ("student+snap", " (snapped to the image)")}


@dataclass
class Run:
    """One evaluated (teacher, student) pair."""

    name: str  # "grabcut/b2p", or "main" for a single run at the eval root
    teacher: str
    student: str
    eval_dir: Path
    metrics: dict  # evaluate's metrics.json
    model_dir: Path | None = None  # the trained student, when found
    train: dict = field(default_factory=dict)  # train's metrics.json ({} when not found)
    speed: dict = field(default_factory=dict)  # measure_speed() result ({} when not measured)


def _teacher_of_main_run(teach_root: Path | None) -> str:
    """The teacher named in the provenance files of a teacher root (the main job's single teacher)."""
    if teach_root is None:
        return "teacher"
    names = {str(_first(read_json(p, "teacher provenance"), "teacher") or "?") for p in sorted(teach_root.glob("*/provenance.json"))}
    return "+".join(sorted(names)) if names else "teacher"


def find_runs(eval_root: str | Path, models_root: str | Path | None = None, teach_root: str | Path | None = None) -> list[Run]:
    """Every evaluated run under `eval_root` (see the module docstring), sorted by teacher then student."""
    eval_root = Path(eval_root)
    if not eval_root.is_dir():
        raise B2PError("evaluation folder not found (run `b2p evaluate` first)", eval_root)
    found: list[tuple[str, str, str, Path]] = []
    if (eval_root / "metrics.json").is_file():
        found.append((MAIN_RUN, _teacher_of_main_run(Path(teach_root) if teach_root else None), "student", eval_root))
    for m in sorted(eval_root.glob("*/*/metrics.json")):
        teacher, student = m.parent.parent.name, m.parent.name
        found.append((f"{teacher}/{student}", teacher, student, m.parent))
    if not found:
        raise B2PError("no metrics.json here, nor in <teacher>/<student>/ folders below it", eval_root)
    runs = []
    for name, teacher, student, d in found:
        metrics = read_json(d / "metrics.json", "evaluation metrics")
        _check_eval_metrics(metrics, d / "metrics.json")
        sub = "" if name == MAIN_RUN else name
        run = Run(name, teacher, student, d, metrics)
        if models_root is not None:
            mdir = Path(models_root) / sub
            if (mdir / "metrics.json").is_file():
                run.train = read_json(mdir / "metrics.json", "training metrics")
                if not isinstance(run.train, dict):
                    raise B2PError(f"training metrics must be a JSON object, not {type(run.train).__name__} (not written by `b2p train`?)", mdir / "metrics.json")
            if (mdir / "model.pt").is_file():
                run.model_dir = mdir
        runs.append(run)
    return runs


def _check_eval_metrics(metrics: Any, path: Path) -> None:
    """Refuse, naming the file, an evaluate metrics.json whose sections the report reads are not what
    `b2p evaluate` writes (a section per source: {metric: number or null, "images": int})."""
    if not isinstance(metrics, dict) or "student" not in metrics:
        raise B2PError("not a `b2p evaluate` metrics file (no `student` section)", path)
    for name in ("student", "teacher", "box", *STUDENT_EXTRAS):
        sec = metrics.get(name)
        if name != "student" and sec is None:
            continue
        if not isinstance(sec, dict):
            raise B2PError(f"section {name!r} must be an object of scores, not {type(sec).__name__} (not written by `b2p evaluate`?)", path)
        for key in (*METRICS, "images"):
            v = sec.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise B2PError(f"{name}.{key} must be a number or null, got {v!r} (not written by `b2p evaluate`?)", path)


def _first(d: dict, *keys: str) -> Any:
    """The first of `keys` present in `d` (nested keys as 'a.b'), else None."""
    for k in keys:
        v: Any = d
        for part in k.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        if v is not None:
            return v
    return None


def teacher_seconds_per_image(teach_dir: Path) -> float | None:
    """Mean teaching time per image over the batches of one teacher root (None when unknown)."""
    secs = images = 0.0
    for p in sorted(teach_dir.glob("*/provenance.json")):
        prov = read_json(p, "teacher provenance")
        n = _first(prov, "counts.taught_this_run")
        s = _first(prov, "time.seconds")
        if n and s is not None:
            secs += float(s)
            images += float(n)
    return secs / images if images else None


def build_report(runs: list[Run], teach_root: str | Path | None = None, title: str = "b2p benchmark") -> dict:
    """The comparison as a JSON-able dict: {"title", "metrics", "rows": [...]}, rows in display order."""
    rows: list[dict] = []
    seen_teachers: dict[str, dict] = {}
    box_row = None
    for r in runs:
        for src, kind in (("teacher", "teacher"), ("box", "baseline")):
            if src not in r.metrics:
                continue
            if kind == "teacher" and r.teacher not in seen_teachers:
                row = {"kind": "teacher", "name": f"teacher: {r.teacher}", "teacher": r.teacher, "student": None,
                       "metrics": {m: r.metrics[src].get(m) for m in METRICS}, "images": r.metrics[src].get("images")}
                if teach_root is not None:
                    d = Path(teach_root) if r.name == MAIN_RUN else Path(teach_root) / r.teacher
                    row["seconds_per_image"] = teacher_seconds_per_image(d)
                seen_teachers[r.teacher] = row
            elif kind == "baseline" and box_row is None:
                box_row = {"kind": "baseline", "name": "box fill (no learning)", "teacher": None, "student": None,
                           "metrics": {m: r.metrics[src].get(m) for m in METRICS}, "images": r.metrics[src].get("images")}
    rows += list(seen_teachers.values())
    if box_row is not None:
        rows.append(box_row)
    for r in runs:
        rows.append(_student_row(r, "student"))
        rows += [_student_row(r, src) for src in STUDENT_EXTRAS if src in r.metrics]
    return {"title": title, "metrics": list(METRICS), "rows": rows}


def _student_row(r: Run, section: str) -> dict:
    """A student's row: its plain predictions (`student`) or other masks of it (STUDENT_EXTRAS)."""
    s = r.metrics[section]
    name = r.student if r.name == MAIN_RUN else f"{r.student} <- {r.teacher}"
    kind, suffix = STUDENT_EXTRAS.get(section, ("student", ""))
    return {
        "kind": kind,
        "name": name + suffix,
        "run": r.name,
        "teacher": r.teacher,
        "student": r.student,
        "metrics": {m: s.get(m) for m in METRICS},
        "images": s.get("images"),
        "train_seconds": _first(r.train, "train_seconds", "seconds", "time.seconds"),
        "epochs": _first(r.train, "epochs_run", "epochs"),
        "params_total": _first(r.train, "params.total", "params_total"),
        "params_trainable": _first(r.train, "params.trainable", "params_trainable"),
        "ms_per_image": _first(r.speed, "ms_per_image"),
        "speed_device": _first(r.speed, "device"),
        "train_device": _first(r.train, "device"),
    }


def speed_images(imported: str | Path, split: str, n: int) -> list[Path]:
    """The first `n` images of `split` over the batches in `imported` (sorted by batch, then file name)."""
    from b2p.dataset import load_batch
    from b2p.project import resolve_batch_files

    paths: list[Path] = []
    for f in resolve_batch_files(imported):
        b = load_batch(f)
        recs = b.images if split == "all" else b.split(split)
        paths += [im.path for im in sorted(recs, key=lambda im: im.file_name)]
    if not paths:
        raise B2PError(f"no {split} images to time inference on", imported)
    return paths[:n]


def measure_speed(model_dir: Path, images: list[Path], device: str = "auto", warmup: int = 3) -> dict:
    """Student inference time per image: one image per forward pass, after `warmup` untimed passes
    (the first passes pay for allocator and kernel set-up, which a deployed model pays once).

    Times `b2p.student.predict.predict_images` (preprocessing, forward, resize to the image, argmax),
    the images decoded beforehand. Returns {"ms_per_image", "images", "device", "threads"}.
    """
    import time

    import torch

    from b2p.fileio import read_image
    from b2p.student.checkpoint import load_student
    from b2p.student.predict import predict_images
    from b2p.student.train import pick_device

    dev = pick_device(device)
    model, _ = load_student(model_dir, dev)
    arrays = [read_image(p) for p in images]
    for i in range(warmup):
        predict_images(model, [arrays[i % len(arrays)]], dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for a in arrays:
        predict_images(model, [a], dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    ms = 1000.0 * (time.perf_counter() - t0) / len(arrays)
    return {"ms_per_image": round(ms, 3), "images": len(arrays), "device": str(dev), "threads": torch.get_num_threads()}


def _num(v: Any, fmt: str = "{:.4f}") -> str:
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        return "-"  # not recorded (or not as a number: a hand-edited file)
    return fmt.format(v)


def report_markdown(report: dict) -> str:
    """The report as a Markdown table (a '-' marks a figure that was not recorded)."""
    heads = ["model", *METRIC_HEADS, "images", "train s", "ms / image", "trainable / total params"]
    lines = [f"# {report['title']}", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for row in report["rows"]:
        m = row["metrics"]
        speed = row.get("ms_per_image")
        if speed is None and row.get("seconds_per_image") is not None:
            speed = 1000.0 * row["seconds_per_image"]
        params = "-"
        if row.get("params_total"):
            params = f"{_num(row.get('params_trainable'), '{:,}')} / {_num(row['params_total'], '{:,}')}"
        cells = [row["name"], *(_num(m[k]) for k in METRICS), _num(row.get("images"), "{}"),
                 _num(row.get("train_seconds"), "{:.1f}"), _num(speed, "{:.1f}"), params]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Metrics are pooled over every manually masked image of the evaluated split (one confusion matrix per row). "
        "Teacher rows score the pseudo-masks the students were trained on; `ms / image` is the teacher's time per "
        "image for teacher rows and the student's inference time for student rows.",
    ]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: str | Path) -> tuple[Path, Path]:
    """OUT/report.json and OUT/report.md (atomic writes)."""
    out = Path(out)
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", report_markdown(report))
    return out / "report.json", out / "report.md"


def print_report(report: dict, next_command: str | None = None, locations: dict[str, str] | None = None) -> None:
    """A rich table on stdout (wide enough for CI / `dvc repro` logs), then where things are."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=140)
    t = Table(title=report["title"], box=box.SIMPLE_HEAD)
    t.add_column("model", no_wrap=True)
    for h in METRIC_HEADS:
        t.add_column(h, justify="right")
    t.add_column("train s", justify="right")
    t.add_column("ms/img", justify="right")
    for row in report["rows"]:
        speed = row.get("ms_per_image")
        if speed is None and row.get("seconds_per_image") is not None:
            speed = 1000.0 * row["seconds_per_image"]
        t.add_row(row["name"], *(_num(row["metrics"][k], "{:.3f}") for k in METRICS),
                  _num(row.get("train_seconds"), "{:.1f}"), _num(speed, "{:.1f}"))
    console.print(t)
    for what, where in (locations or {}).items():
        console.print(f"{what}: {where}", highlight=False, soft_wrap=True)
    if next_command:
        console.print(f"Look at teacher vs student masks in FiftyOne: [bold]{next_command}[/]", highlight=False, soft_wrap=True)
