"""Typer commands of the pipeline stage: `b2p add-batch`, `b2p bench-report` and the benchmark suite (`b2p suite`,
`b2p suite-report`, `b2p suite-readme`): thin wrappers."""

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


def suite(
    root: Path = typer.Option(None, "--root", help="Dataset root, ROOT/<CLASS>/Imgs/NAME.jpg|bmp + NAME.png (default: dataset.root of the params)."),
    name: str = typer.Option(None, "--name", help="Dataset name for reports/<name>/ (default: the root folder's name)."),
    suite_dir: Path = typer.Option(Path("pipelines/suite"), "--suite", help="The suite's folder (dvc.yaml + params.yaml)."),
    jobs: int = typer.Option(3, "--jobs", min=1, help="Stages run side by side, one torch thread each (on a 2-core CPU 3 beat 2: the last long stages share both cores instead of one running alone)."),
    threads: int = typer.Option(1, "--threads", min=1, help="Torch threads per stage (OMP_NUM_THREADS)."),
    set_: list[str] = typer.Option(None, "--set", help="KEY=VALUE written into the suite's params.yaml first, repeatable (e.g. train.epochs=8, seeds=[1,2])."),
) -> None:
    """Run the benchmark suite on one dataset: boxes from its masks, teachers, students x seeds, the oracle, the report.

    Sets dataset.root / dataset.name (--root / --name) and any --set KEY=VALUE in SUITE/params.yaml, asks DVC for the resolved stages of SUITE/dvc.yaml and runs them, up to --jobs at once in dependency order, each timed (logs in SUITE/work/logs/). The report stage writes reports/<name>/results.json and results.md: every row's mean and standard deviation over the seeds, per-class IoU, the machine, the git commit, this command and every stage's wall time. `dvc repro SUITE/dvc.yaml` runs the same stages one at a time (no stage times); after this command, `dvc commit SUITE/dvc.yaml` records the outputs in dvc.lock.
    """
    from rich.console import Console

    from b2p.pipeline.suite import run_suite, set_dataset

    if not (suite_dir / "dvc.yaml").is_file():
        raise B2PError("no dvc.yaml in the suite folder (--suite)", suite_dir)
    ds_root, ds_name = set_dataset(suite_dir, root, name, set_ or [])
    console = Console()
    console.print(f"suite {suite_dir} on {ds_name} ({ds_root}), {jobs} stage(s) at a time, {threads} thread(s) each", highlight=False)
    record = run_suite(suite_dir, jobs=jobs, threads=threads, dataset=ds_name)
    out = (suite_dir / "../../reports" / ds_name).resolve()
    console.print(f"done in {record['total_seconds']:.0f} s; results: {out}/results.md and results.json", highlight=False)


def suite_combine(
    work: Path = typer.Argument(..., help="The suite's work folder (imported/, final/)."),
    params: Path = typer.Option(..., "--params", help="The suite's params.yaml (students, round2, boxes_only, `teach:` section)."),
    teacher: str = typer.Option(..., "--teacher", help="The suite teacher whose students' final masks compete."),
    seed: str = typer.Option(..., "--seed", help="The seed whose final masks compete."),
    out: Path = typer.Option(..., "--out", help="Output root (teacher layout: OUT/<batch>/labelmaps/<key>.png)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Per class the best mask source on calib: `b2p teach --teacher auto` with every final mask of this teacher and seed as a candidate.

    The candidates: the box, the GrabCut settings (SAM when its weights are on disk), and the final masks (WORK/final/...) of every student in `students:` and `round2:` trained on TEACHER with SEED and of every `boxes_only:` student with SEED; never the oracle's. Each is scored per class on the calib split's manual masks; every box is taught by its class's winner. Writes what `b2p teach` writes (provenance.json records the scores and the choice).
    """
    import yaml

    from b2p.params import read_params_section
    from b2p.pipeline.combine import combine_candidates
    from b2p.project import resolve_batch_files
    from b2p.teach.commands import run_teach
    from b2p.teach.config import build_config

    read_params_section(params, "teach")  # a missing or malformed file: one clear error
    suite_params = yaml.safe_load(Path(params).read_text()) or {}
    cands = combine_candidates(work, suite_params, teacher, seed)
    cfg = build_config(params, teacher="auto", candidates=cands)
    run_teach(cfg, resolve_batch_files(work / "imported", None), out, resume=False, quiet=quiet)


def suite_select(
    model: Path = typer.Argument(..., help="A trained model folder (metrics.json lists each rule's epoch; rules/<rule>.pt)."),
    imported: Path = typer.Option(..., "--imported", help="Folder of imported batch files."),
    out: Path = typer.Option(..., "--out", help="Write the scores here (JSON)."),
    split: str = typer.Option("test", "--split", help="Whose manual masks score the rules."),
    window: int = typer.Option(None, "--window", help="Prediction window, as the suite's `b2p predict` of this model uses it."),
    device: str = typer.Option("auto", "--device"),
    precision: str = typer.Option("float32", "--precision", help="Inference precision, as the suite's `b2p predict` of this model uses it (float32, bfloat16, auto)."),
    tta: str = typer.Option("none", "--tta", help="Test-time augmentation, as the suite's `b2p predict` of this model uses it (none, flips)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Which epoch is kept, and what it scores: every `train.select` rule's epoch of MODEL predicted on SPLIT and scored (student alone).

    Rules that keep the same epoch share one prediction; a rule with its own epoch needs MODEL/rules/<rule>.pt (`train.keep_rule_models: true`). `b2p suite-report` puts the result in its "Which epoch is kept" table.
    """
    from b2p.fileio import write_json_atomic
    from b2p.project import resolve_batch_files
    from b2p.pipeline.rule_scores import score_rules

    res = score_rules(model, resolve_batch_files(imported, None), split, window, device, progress=not quiet, precision=precision, tta=tta)
    write_json_atomic(out, res)
    line = ", ".join(f"{r} epoch {v['epoch']}: binary IoU {v[split]['binary_iou']:.3f}" for r, v in res["rules"].items())
    typer.echo(f"{model} ({res['images']} {split} images): {line}")


def suite_report(
    work: Path = typer.Argument(..., help="The suite's work folder (eval/, models/, teach/, imported/)."),
    name: str = typer.Option(..., "--name", help="Dataset name (its batch file is WORK/imported/NAME.json)."),
    root: str = typer.Option(..., "--root", help="Dataset root (recorded)."),
    params: Path = typer.Option(..., "--params", help="The suite's params.yaml (seeds, students, `report:` section)."),
    out: Path = typer.Option(..., "--out", help="Write OUT/results.json and OUT/results.md."),
    times: Path = typer.Option(None, "--times", help="Stage wall times and command, as `b2p suite` records them."),
) -> None:
    """Collect the suite's evaluated runs into results.json + results.md, mean and standard deviation over seeds.

    Rows: the box fill, every teacher, every student trained on every teacher (alone and each further source evaluate scored, e.g. its box-guided masks), and the oracle. Also per-class IoU, the machine (CPU, cores, GPU), the git commit, the command and stage wall times (--times), training seconds and student inference ms per image (`report.speed_images` test images, batch 1).
    """
    from b2p.fileio import read_json
    from b2p.params import read_params_section
    from b2p.pipeline.results import collect_results, results_markdown, write_results

    rep = read_params_section(params, "report", ("title", "speed_images", "device"))
    results = collect_results(
        work, name, root, params, times=read_json(times, "suite stage times") if times is not None else None,
        speed_n=int(rep.get("speed_images", 0)), device=str(rep.get("device", "auto")), title=str(rep.get("title", "b2p benchmark")),
        out=out,
    )
    j, m = write_results(results, out)
    typer.echo(results_markdown(results))
    typer.echo(f"wrote {j} and {m}")


def suite_readme(
    results: list[Path] = typer.Argument(..., help="reports/<name>/results.json file(s)."),
    readme: Path = typer.Option(Path("README.md"), "--readme", help="The README whose generated sections are rewritten."),
    check: bool = typer.Option(False, "--check", help="Only check that every generated section matches reports/ (exit 1 if not)."),
) -> None:
    """Rewrite the README's results tables from the suite's results.json (between the dataset's markers).

    Each dataset's section lies between `<!-- b2p-results:NAME begin ... -->` and `<!-- b2p-results:NAME end -->`; a missing pair is an error that shows the two lines to add. --check compares instead of writing (every section against reports/NAME/results.json beside the given files).
    """
    from b2p.pipeline.results import check_readme, update_readme

    if check:
        problems = [p for d in dict.fromkeys(f.parent.parent for f in results) for p in check_readme(readme, d)]
        if problems:
            raise B2PError("; ".join(problems), readme)
        typer.echo(f"{readme}: generated sections match")
        return
    names = update_readme(readme, results)
    typer.echo(f"{readme}: rewrote the results of {', '.join(names)}")
