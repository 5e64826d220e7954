"""`b2p evaluate`: thin Typer command over `b2p.evaluate.evaluate.evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from b2p.errors import B2PError
def _size_bins(value: Any) -> list[float]:
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        bins = [float(v) for v in items]
    except (TypeError, ValueError):
        raise B2PError(f"size bins must be numbers like 0.001,0.01, got {value!r}") from None
    if not bins or sorted(bins) != bins or any(not 0 < b < 1 for b in bins):
        raise B2PError(f"size bins must be increasing fractions of the image area in (0, 1), got {value!r}")
    return bins


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def print_summary(result: Any) -> None:
    """A rich table of the main metrics (and teacher-noise figures) per source."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from b2p.evaluate.evaluate import MAIN_METRICS

    t = Table(title=f"b2p evaluate: {len(result.images)} manually masked images (split-level)", box=box.SIMPLE_HEAD)
    t.add_column("source", no_wrap=True)
    for head in ("mIoU", "anom mIoU", "bin IoU", "bin P", "bin R", "bin F1"):
        t.add_column(head, justify="right")
    t.add_column("halluc", justify="right")
    t.add_column("miss", justify="right")
    for s in result.sources:
        sec = result.metrics[s.name]
        nz = result.metrics["noise"][s.name]
        t.add_row(s.name, *[_fmt(sec[m]) for m in MAIN_METRICS], _fmt(nz["hallucination"]), _fmt(nz["miss_rate"]))
    console = Console()
    if not console.is_terminal:  # logs (dvc repro, CI) are not 80 columns wide; keep the table whole
        console = Console(width=120)
    console.print(t)
    rec = result.metrics["noise"].get("student_vs_teacher")
    if rec:
        console.print(
            f"student recovered {_fmt(rec['recovered_of_teacher_missed'])} of the defect pixels the teacher missed "
            f"and removed {_fmt(rec['removed_of_teacher_hallucination'])} of the teacher's hallucinated pixels "
            f"(lost {_fmt(rec['lost_of_teacher_hits'])} of the teacher's hits)"
        )


def evaluate(
    imported: Path = typer.Option(Path("data/imported"), help="Folder of canonical batch files."),
    batch: list[str] = typer.Option(None, "--batch", help="Batch name(s), repeatable or comma-separated; default all."),
    teacher_root: Path = typer.Option(Path("data/teach"), help="Teacher label maps: ROOT/<batch>/labelmaps/<key>.png."),
    pred_root: Path = typer.Option(Path("data/predict"), help="Student label maps: ROOT/<batch>/labelmaps/<key>.png."),
    no_teacher: bool = typer.Option(False, "--no-teacher", help="Do not score the teacher root."),
    no_student: bool = typer.Option(False, "--no-student", help="Do not score the prediction root."),
    no_box: bool = typer.Option(False, "--no-box", help="Do not score the box-fill baseline."),
    source: list[str] = typer.Option(
        None, "--source", help="Extra mask root to score, NAME=ROOT (repeatable), e.g. grabcut=data/bench/grabcut."
    ),
    teachers: Path = typer.Option(None, "--teachers", help="Also score every candidate teacher of this `b2p choose-teacher` folder (rows teachers.<name>)."),
    pool: list[str] = typer.Option(None, "--pool", help="KEY=DIR: also score every student of params list KEY (DIR/<name>/: alone, argmax, final masks); repeatable; needs --params."),
    empty_ok: bool = typer.Option(False, "--empty-ok", help="No manually masked image in the split: say so and write empty metrics instead of failing (the recipe without manual masks)."),
    out: Path = typer.Option(Path("data/eval"), help="Output folder."),
    split: str = typer.Option(None, help="Split whose manually masked images are scored: test (default), val, train, calib (only on request), all (every split but calib)."),
    worst: int = typer.Option(None, min=0, help="Overlays of this many worst images by student binary IoU (default 8)."),
    size_bins: str = typer.Option(None, help="Defect size-bin edges, fractions of the image area (default 0.001,0.01)."),
    min_cover: float = typer.Option(
        None, min=0.0, max=1.0, help="A true defect counts as detected when this share of it is covered (default 0.5)."
    ),
    params: Path = typer.Option(None, help="YAML file whose `evaluate:` section sets defaults (CLI options win)."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Skip plots and overlays (metrics and CSV only)."),
    set_: list[str] = typer.Option(None, "--set", help="Any `evaluate:` key, KEY=VALUE; repeatable; wins over everything."),
) -> None:
    """Score student predictions, teacher pseudo-masks, the box-fill baseline and --source roots against the manual masks.

    One confusion matrix per source over the split's manually masked images (test by default).

    Reads: IMPORTED/<batch>.json; TEACHER_ROOT and PRED_ROOT label maps (each must cover every scored image).

    Writes to OUT: metrics.json (the headline scores of each source); details.json (per-class scores of each source, and `noise`: hallucination and miss rate by class and by defect size, and what the student recovered of the teacher's errors); confusion.json; per_image.csv (each source's worst images first); plots/ (per_class_iou.csv, confusion_<source>.png, summary.png); overlays/ (worst images: image, manual, teacher, student).
    """
    from b2p.evaluate.evaluate import evaluate as run_evaluate
    from b2p.evaluate.evaluate import parse_source, recipe_sources, select_images
    from b2p.project import resolve_batch_files
    from b2p.schema import resolve

    cfg = resolve("evaluate", params, {"split": split, "worst": worst, "size_bins": size_bins, "min_cover": min_cover}, set_)
    files = resolve_batch_files(imported, batch)
    if empty_ok:
        from b2p.dataset import load_batches
        from b2p.evaluate.evaluate import METRICS_DIR, write_source_metrics

        try:
            select_images(load_batches(files), cfg.split)
        except B2PError as e:
            write_source_metrics(out / METRICS_DIR, {})
            typer.echo(f"nothing scored: {e}")
            return
    if pool and params is None:
        raise B2PError("--pool reads its students from the params file: give --params")
    from b2p.recipe import parse_pool

    extra = recipe_sources(teachers, [parse_pool(p) for p in pool or []], params) + [parse_source(s) for s in source or []]
    result = run_evaluate(
        files,
        out,
        teacher_root=None if no_teacher else teacher_root,
        pred_root=None if no_student else pred_root,
        extra_sources=extra,
        split=cfg.split,
        box_baseline=not no_box,
        worst=cfg.worst,
        size_bins=_size_bins(cfg.size_bins),
        min_cover=cfg.min_cover,
        plots=not no_plots,
    )
    print_summary(result)
    typer.echo(f"wrote {out}/metrics.json, details.json, per_image.csv" + ("" if no_plots else ", plots/ and overlays/"))
