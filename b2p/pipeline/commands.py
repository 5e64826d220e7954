"""Typer commands of the pipeline stage: `b2p add-batch` and `b2p bench-report` (thin wrappers)."""

from __future__ import annotations

from pathlib import Path

import typer

from b2p.errors import B2PError


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
    console.print(f"next: `dvc repro` (imports and teaches {r.name} only, then retrains and re-evaluates); "
                  f"to version the copied data: `dvc add {r.folder}` and commit {r.folder}.dvc", highlight=False)


def bench_report(
    eval_root: Path = typer.Argument(..., help="Evaluation folder: EVAL_ROOT/metrics.json or EVAL_ROOT/<teacher>/<student>/metrics.json."),
    models: Path = typer.Option(None, "--models", help="Model root laid out like EVAL_ROOT (train's metrics.json and model.pt)."),
    teach_root: Path = typer.Option(None, "--teach-root", help="Teacher root: <teacher>/<batch>/provenance.json (the main job: <batch>/...)."),
    imported: Path = typer.Option(None, "--imported", help="Canonical batch files; needed to time inference (--speed-images)."),
    split: str = typer.Option("test", "--split", help="Split whose images are timed."),
    speed_images: int = typer.Option(0, "--speed-images", min=0, help="Time each student on this many images (0: skip)."),
    device: str = typer.Option("auto", "--device", help="Device for the timing: auto, cpu or cuda."),
    out: Path = typer.Option(None, "--out", help="Write OUT/report.json and OUT/report.md (default: print only)."),
    title: str = typer.Option("b2p benchmark", "--title", help="Table title."),
    next_command: str = typer.Option(None, "--next", help="A command to suggest at the end (e.g. the `b2p browse` call)."),
) -> None:
    """Collect evaluated runs into one table: each teacher, the box-fill baseline, and every student.

    Reads the `metrics.json` of every run under EVAL_ROOT (written by `b2p evaluate`: the paper's mIoU,
    anomaly mIoU, binary IoU / precision / recall / F1) and, where given and present, training time and
    parameter counts (MODELS/<run>/metrics.json) and teacher time per image (TEACH_ROOT provenance).
    With --speed-images N, loads every MODELS/<run>/model.pt and times it on N images of IMPORTED's SPLIT.
    Prints the table; with --out writes OUT/report.json (every figure) and OUT/report.md.
    A figure that was not recorded shows as '-', never as a guess.
    """
    from b2p.pipeline.report import build_report, find_runs, measure_speed, print_report, write_report

    runs = find_runs(eval_root, models, teach_root)
    if speed_images:
        from b2p.pipeline.report import speed_images as pick_images

        if imported is None or models is None:
            raise B2PError("--speed-images needs --imported (the images) and --models (the students)")
        images = pick_images(imported, split, speed_images)
        for r in runs:
            if r.model_dir is None:
                raise B2PError(f"no model.pt for run {r.name} to time", models)
            r.speed = measure_speed(r.model_dir, images, device)
    report = build_report(runs, teach_root, title)
    where: dict[str, str] = {"metrics, per-image scores, plots, overlays": str(eval_root)}
    if models is not None:
        where["model(s)"] = str(models)
    if teach_root is not None:
        where["teacher masks"] = str(teach_root)
    if out is not None:
        j, m = write_report(report, out)
        where["this table"] = f"{m} and {j}"
    print_report(report, next_command, where)
