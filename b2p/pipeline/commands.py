"""Typer commands of the pipeline stage: `b2p add-batch` and `b2p bench-report` (thin wrappers)."""

from __future__ import annotations

from pathlib import Path

import typer


def add_batch(
    source: Path = typer.Argument(..., help="Folder of the batch's images (as `b2p import --images`)."),
    name: str = typer.Option(..., "--name", help="Batch name: folder data/raw/NAME, DVC stages import@NAME, teach@NAME."),
    coco: Path = typer.Option(None, "--coco", help="COCO JSON with images, categories and boxes."),
    yolo_labels: Path = typer.Option(None, "--yolo-labels", help="Folder of YOLO .txt labels (same relative names as the images)."),
    yolo_classes: Path = typer.Option(None, "--yolo-classes", help="YOLO class names: one per line, or a data.yaml with 'names'."),
    masks: Path = typer.Option(None, "--masks", help="Folder of manual-mask PNG label maps (values = the batch's class ids)."),
    add_classes: bool = typer.Option(False, "--add-classes", help="Allow new class names (appended to the class list)."),
    params: Path = typer.Option(Path("params.yaml"), "--params", help="The pipeline's params file (its `batches:` gets the entry)."),
    raw_root: Path = typer.Option(Path("data/raw"), "--raw-root", help="Where batches are copied: RAW_ROOT/NAME."),
    classes: Path = typer.Option(Path("data/classes.json"), "--classes", help="Canonical class list shared by all batches."),
) -> None:
    """Add a new box-annotated batch to the project: validate, copy, register; then run `dvc repro`.

    Validates SOURCE and its boxes exactly as `b2p import` does (every image decoded, every box and mask
    checked, classes matched by name against CLASSES), copies them into RAW_ROOT/NAME/ (images/,
    annotations.json or labels/ + classes file, masks/), and appends NAME to the `batches:` section of
    PARAMS (comments kept). `dvc repro` then imports and teaches only this batch, retrains and
    re-evaluates. Bad input (or a name already used) changes nothing and exits with code 1.
    """
    from rich.console import Console

    from b2p.pipeline.batches import add_batch as run_add_batch

    r = run_add_batch(
        source, name, coco=coco, yolo_labels=yolo_labels, yolo_classes=yolo_classes, masks=masks,
        add_classes=add_classes, params=params, raw_root=raw_root, classes=classes,
    )
    console = Console()
    console.print(
        f"[green]added[/] batch {r.name}: {r.num_images} images, {r.num_boxes} boxes, {r.manual_masks} manual masks "
        f"(splits {r.splits}) -> {r.folder}; registered in {params}",
        highlight=False,
    )
    if r.new_classes:
        console.print(f"[yellow]new classes appended to {classes}:[/] {', '.join(r.new_classes)} "
                      "(every batch is re-imported on the next `dvc repro`)", highlight=False)
    for w in r.warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    console.print(f"next: `dvc repro` (imports and teaches {r.name} only, then retrains and re-evaluates)", highlight=False)


def bench_report(
    eval_root: Path = typer.Argument(..., help="Evaluation folder: EVAL_ROOT/metrics.json or EVAL_ROOT/<teacher>/<student>/metrics.json."),
    models: Path = typer.Option(None, "--models", help="Model root laid out like EVAL_ROOT (train's metrics.json: time, params)."),
    pred_root: Path = typer.Option(None, "--pred-root", help="Prediction root laid out like EVAL_ROOT (predict's timing.json)."),
    teach_root: Path = typer.Option(None, "--teach-root", help="Teacher root (<teacher>/<batch>/provenance.json; the main job: <batch>/...)."),
    out: Path = typer.Option(None, "--out", help="Write OUT/report.json and OUT/report.md (default: print only)."),
    title: str = typer.Option("b2p benchmark", "--title", help="Table title."),
    next_command: str = typer.Option(None, "--next", help="A command to suggest at the end (e.g. the `b2p browse` call)."),
) -> None:
    """Collect evaluated runs into one table: each teacher, the box-fill baseline, and every student.

    Reads the `metrics.json` of every run under EVAL_ROOT (written by `b2p evaluate`), plus, where given
    and present, training figures (MODELS), inference timing (PRED_ROOT) and teacher time (TEACH_ROOT).
    Prints the table; with --out writes OUT/report.json (rows with every figure) and OUT/report.md.
    A figure that was not recorded shows as '-', never as a guess.
    """
    from b2p.pipeline.report import build_report, find_runs, print_report, write_report

    runs = find_runs(eval_root, models, pred_root, teach_root)
    report = build_report(runs, teach_root, title)
    where: dict[str, str] = {"metrics, per-image scores, plots, overlays": str(eval_root)}
    if models is not None:
        where["model(s)"] = str(models)
    if pred_root is not None:
        where["student masks"] = str(pred_root)
    if teach_root is not None:
        where["teacher masks"] = str(teach_root)
    if out is not None:
        j, m = write_report(report, out)
        where["this table"] = f"{m} and {j}"
    print_report(report, next_command, where)

