"""Typer commands of the project as a whole: `b2p add-batch`, `b2p summary`, the benchmark suite (`b2p suite`,
`b2p suite-readme`): thin wrappers."""

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


def suite(
    root: Path = typer.Option(None, "--root", help="A dataset with manual masks, ROOT/<CLASS>/Imgs/NAME.jpg + NAME.png: boxes simulated (`b2p masks-to-boxes`)."),
    coco: Path = typer.Option(None, "--coco", help="Or a user's batch: COCO boxes (with manual-mask segmentations for some images)."),
    yolo_labels: Path = typer.Option(None, "--yolo-labels", help="Or a user's YOLO batch: its labels folder (with --yolo-classes)."),
    yolo_classes: Path = typer.Option(None, "--yolo-classes", help="The YOLO class names file."),
    images: Path = typer.Option(None, "--images", help="The user's batch's image folder (with --coco or --yolo-labels)."),
    masks: Path = typer.Option(None, "--masks", help="The user's batch's manual-mask PNG folder, if not in the COCO file."),
    name: str = typer.Option(None, "--name", help="Dataset name: pipelines/suite/<name>/, reports/<name>/ and the batch name (default: the folder's name)."),
    jobs: int = typer.Option(3, "--jobs", min=1, help="Stages run side by side, one torch thread each (more than the cores: the last long stages still share them)."),
    threads: int = typer.Option(1, "--threads", min=1, help="Torch threads per stage (OMP_NUM_THREADS)."),
    set_: list[str] = typer.Option(None, "--set", help="KEY=VALUE over pipelines/suite/params.yaml, repeatable: seeds=[1,2], recipe.train.epochs=4, masks_to_boxes.masked=0.3."),
    project: Path = typer.Option(Path("."), "--project", help="The b2p project (its dvc.yaml and params.yaml are the recipe)."),
) -> None:
    """Run the recipe (this project's dvc.yaml) on a benchmark dataset over several seeds; write reports/<name>/.

    One workspace per seed under pipelines/suite/<name>/ is a b2p project: the recipe's dvc.yaml, the project's params.yaml with pipelines/suite/params.yaml's `recipe:` overrides and that seed, and the dataset added by `b2p add-batch` (from --root through `b2p masks-to-boxes`, which keeps the manual masks of a share of the images and every mask for the oracle rows; or the --coco / --yolo-labels batch as given). Out-of-date stages of all workspaces run up to --jobs at once; stages that read no seed run once. Afterwards `dvc repro` in a workspace is a no-op. The report: every row mean ± standard deviation over the seeds, per-class IoU, what calib chose, the machine, the commit, every stage's time (reports/<name>/results.md, .json, history/).
    """
    from rich.console import Console

    from b2p.pipeline.suite import BatchSource, dataset_name_of, run_suite

    if root is not None:
        if not root.is_dir():
            raise B2PError("dataset root not found", root)
        if any(v is not None for v in (coco, yolo_labels, images, masks)):
            raise B2PError("--root simulates the boxes: give it alone, or a batch (--images with --coco or --yolo-labels)")
        batch = None
    else:
        if images is None or (coco is None) == (yolo_labels is None):
            raise B2PError("give --root DIR, or a batch: --images DIR with --coco FILE or --yolo-labels DIR --yolo-classes FILE")
        batch = BatchSource(images=images, coco=coco, yolo_labels=yolo_labels, yolo_classes=yolo_classes, masks=masks)
    name = name or dataset_name_of(root if root is not None else images)
    console = Console()
    console.print(f"suite on {name}: {jobs} stage(s) at a time, {threads} thread(s) each", highlight=False)
    record = run_suite(project, name, source_root=root, batch=batch, overrides=set_ or [], jobs=jobs, threads=threads)
    console.print(f"done in {record['total_seconds']:.0f} s ({record['stages_run']} stages run); results: "
                  f"{project / 'reports' / name}/results.md and results.json", highlight=False)


def suite_readme(
    results: list[Path] = typer.Argument(..., help="reports/<name>/results.json file(s)."),
    readme: list[Path] = typer.Option([Path("README.md")], "--readme", help="The Markdown file(s) whose generated sections are rewritten (README.md, docs pages); repeatable."),
    check: bool = typer.Option(False, "--check", help="Only check that every generated section matches reports/ (exit 1 if not)."),
) -> None:
    """Rewrite the generated results tables of the README (and docs pages) from reports/<name>/results.json.

    A dataset's table lies between `<!-- b2p-results:NAME begin -->` and `<!-- b2p-results:NAME end -->`; --check compares instead of writing.
    """
    from b2p.fileio import read_json, write_text_atomic
    from b2p.pipeline.results import check_text, update_text

    if check:
        roots = list(dict.fromkeys(f.parent.parent for f in results))
        problems = [p for md in readme for r in roots for p in check_text(md, r)]
        if problems:
            raise B2PError("; ".join(problems))
        typer.echo("generated sections match reports/")
        return
    by_name = {f.parent.name: read_json(f, "suite results") for f in results}
    for md in readme:
        text, done = update_text(md.read_text(), by_name)
        write_text_atomic(md, text)
        typer.echo(f"{md}: rewrote {', '.join(done) or 'nothing (no markers)'}")


def summary(
    eval_dir: Path = typer.Option(Path("data/eval"), "--eval", help="The recipe's evaluate output (metrics/<source>.json)."),
    teachers: Path = typer.Option(Path("data/teachers"), "--teachers", help="`b2p choose-teacher` output (choice.json)."),
    model: Path = typer.Option(Path("data/model"), "--model", help="`b2p deploy` output (the shipped model)."),
    export: Path = typer.Option(None, "--export", help="`b2p export` output, to say where the pixel dataset is."),
) -> None:
    """Print what the recipe made: the teacher per class, the shipped student and its backbone, every row's scores, where each result lies."""
    from b2p.pipeline.summary import print_summary

    print_summary(eval_dir, teachers, model, export)
