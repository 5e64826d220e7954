"""`b2p teach`: box annotations -> teacher pseudo-masks (thin CLI over b2p.teach.base.teach_batch)."""

from __future__ import annotations

from pathlib import Path

import typer

from b2p.scale import options as eo


def teach(
    batch_files: list[Path] = typer.Argument(..., help="Canonical batch file(s), e.g. data/imported/NAME.json."),
    out: Path = typer.Option(Path("data/teach"), "--out", help="Teacher root: writes OUT/<batch>/..."),
    teacher: str = typer.Option(None, "--teacher", help="grabcut (default, no weights) | box (baseline) | sam | auto (best per class on the calib split)."),
    choice: Path = typer.Option(None, "--choice", help="Teach each class with the teacher a `b2p choose-teacher` choice.json names (the recipe's way)."),
    candidate: list[str] = typer.Option(None, "--candidate", help="auto: also score NAME=ROOT, an earlier round's masks (ROOT/<batch>/labelmaps/<key>.png); repeatable."),
    params: Path = typer.Option(None, "--params", help="YAML file whose `teach:` and `engine:` sections set defaults."),
    sam_model: str = typer.Option(None, "--sam-model", help="SAM size: vit_b (default) | vit_l | vit_h."),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="Explicit SAM checkpoint file (a state dict)."),
    weights_dir: Path = typer.Option(None, "--weights-dir", help="Folder holding official SAM files [$B2P_WEIGHTS_DIR or weights/]."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="SAM embedding cache [data/cache/embeddings]."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the embedding cache."),
    device: str = typer.Option(None, "--device", help="auto (GPU when available) | cpu | cuda | cuda:N."),
    mask_select: str = typer.Option(None, "--mask-select", help="SAM candidate choice: box (best fit to the box) | iou | single."),
    clip_margin: int = typer.Option(None, "--clip-margin", help="SAM masks are clipped to the box grown by this many px [0]."),
    download: bool = typer.Option(None, "--download/--no-download", help="Download official SAM weights when missing [on]."),
    grabcut_iters: int = typer.Option(None, "--grabcut-iters", help="GrabCut iterations [5]."),
    grabcut_context: float = typer.Option(None, "--grabcut-context", help="GrabCut context around the box, fraction of its long side [0.5]."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Reuse images finished by an earlier run with the same settings."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    set_: list[str] = typer.Option(None, "--set", help="Any `teach:` key, KEY=VALUE (YAML value), e.g. grabcut.min_fill=0.1; repeatable."),
    engine: str = eo.ENGINE,
    workers: int = eo.WORKERS,
    address: str = eo.ADDRESS,
    gpus_per_worker: float = eo.GPUS_PER_WORKER,
) -> None:
    """Make one pseudo-mask per box with a teacher (GrabCut, filled box, or box-prompted SAM).

    Reads canonical batch files (`b2p import`) and teaches every image of every split.

    Writes OUT/<batch>/labelmaps/<key>.png (uint8 label maps; where masks overlap, the smaller one wins), OUT/<batch>/instances.json (COCO RLE per box, with box_id and score) and OUT/<batch>/provenance.json (teacher, settings, checkpoint path + sha256, versions, counts, time, per-box notes). An interrupted run continues where it stopped.

    --engine ray teaches the images on Ray workers (each loads the teacher once; --params's `engine:` section sets it too); the outputs are the same files, provenance.json records the engine.

    SAM weights: --checkpoint FILE, else the official file in --weights-dir, else a checksum-verified download from the official host (--no-download to forbid it).

    --choice FILE: each class is taught by the teacher FILE (`b2p choose-teacher`) chose for it, with the settings it was chosen with.

    --teacher auto: every available teacher (box; GrabCut with the configured settings and a small grid; SAM when its weights are on disk; each --candidate) labels the calib images (`b2p import --calib`), is scored per class against their manual masks (IoU), and each class is taught by its best teacher. The score table is printed and recorded with the choice in provenance.json. Without calib images it stops with an error.
    """
    from b2p.teach.config import build_config

    extra = _parse_candidates(candidate)

    cfg = build_config(
        params,
        sets=set_,
        teacher=teacher,
        sam_model=sam_model,
        checkpoint=str(checkpoint) if checkpoint else None,
        weights_dir=str(weights_dir) if weights_dir else None,
        cache_dir=str(cache_dir) if cache_dir else None,
        device=device,
        mask_select=mask_select,
        clip_margin=clip_margin,
        download=download,
        grabcut={"iterations": grabcut_iters, "context_frac": grabcut_context},
        candidates=extra,
    )
    if no_cache:
        cfg.cache_dir = None
    engine_cfg = eo.engine_from_options(params, engine, workers, address, gpus_per_worker)
    run_teach(cfg, batch_files, out, resume=resume, quiet=quiet, choice=choice, engine=engine_cfg)


def _parse_candidates(candidate: list[str] | None) -> dict[str, str]:
    from b2p.errors import B2PError

    extra = {}
    for item in candidate or []:
        name, sep, root = item.partition("=")
        if not sep or not name.strip() or not root.strip():
            raise B2PError(f"--candidate must be NAME=ROOT, got {item!r}")
        extra[name.strip()] = root.strip()
    return extra


def choose_teacher(
    imported: Path = typer.Option(Path("data/imported"), "--imported", help="Folder of canonical batch files: the calib images of all of them choose."),
    out: Path = typer.Option(Path("data/teachers"), "--out", help="Writes OUT/choice.json and OUT/<teacher>/<batch>/labelmaps (each candidate's test masks); replaced whole."),
    params: Path = typer.Option(None, "--params", help="YAML file whose `teach:` section sets the teacher, its fallback and the GrabCut settings."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    set_: list[str] = typer.Option(None, "--set", help="Any `teach:` key, KEY=VALUE (YAML value); repeatable."),
) -> None:
    """Choose the teacher of each class on the calib split of every imported batch (the recipe's `teachers` stage).

    Every available teacher (the filled box; GrabCut with the `teach.grabcut` settings and a small grid; SAM when its official weights are on disk) labels the calib images and is scored per class against their manual masks. With `teach.teacher: auto` each class takes its best; without calib masks every class takes `teach.fallback`; any other `teach.teacher` teaches every class. Writes OUT/choice.json (the decision, the calib score table, each candidate's settings), used by `b2p teach --choice`, and every candidate's masks of the manually masked test images (the teacher rows of `b2p evaluate`).
    """
    from rich.console import Console
    from rich.markup import escape

    from b2p.project import resolve_batch_files
    from b2p.teach.auto import AutoChoice, choose_teacher as run, score_table
    from b2p.teach.config import build_config

    cfg = build_config(params, sets=set_)
    rec = run(cfg, resolve_batch_files(imported, None), out, progress=not quiet)
    console = Console(stderr=True)
    if rec["iou_on_calib"]:
        scores = {c: {"per_class": {n: {"iou": v[n]} for n in rec["classes"]}, "anomaly_miou": v["anomaly_miou"], "binary_iou": v["binary_iou"]}
                  for c, v in rec["iou_on_calib"].items()}
        console.print(score_table(AutoChoice(rec["classes"], rec["calib_images"], scores, rec["choice"], rec["reason"])))
    for n, c in rec["choice"].items():
        console.print(f"  {escape(n)}: [bold]{escape(c)}[/] ({escape(rec['reason'][n])})", highlight=False)
    for c, why in rec["skipped"].items():
        console.print(f"  [yellow]{escape(c)} not available:[/] {escape(why)}", highlight=False)
    console.print(f"[green]wrote[/] {out}/choice.json and {len(rec['candidates'])} teachers' masks of {rec['test_images']} test images", highlight=False)


def run_teach(cfg, batch_files: list[Path], out: Path, resume: bool = True, quiet: bool = False, choice: Path | None = None, engine=None) -> None:
    """Teach `batch_files` into `out` with the teacher of `cfg` (a TeachConfig), or the per-class teacher of a
    `choice` file, on `engine` (an EngineConfig; default local), printing what `b2p teach` prints (for auto:
    the calib score table and the choice per class)."""
    from b2p.scale.engines import open_engine

    with open_engine(engine) as eng:  # an unreachable cluster is refused before anything is built or written
        _teach_with(cfg, batch_files, out, resume, quiet, eng, choice)


def _teach_with(cfg, batch_files: list[Path], out: Path, resume: bool, quiet: bool, eng, choice: Path | None = None) -> None:
    from rich.console import Console
    from rich.markup import escape

    from b2p.errors import B2PError
    from b2p.teach.base import teach_batch
    from b2p.teach.config import make_teacher

    console = Console(stderr=True)
    if choice is not None:
        from b2p.dataset import class_list_of, load_batches
        from b2p.teach.auto import teacher_from_choice

        classes = class_list_of(load_batches(batch_files))
        t = teacher_from_choice(cfg, choice, list(classes.names), {n: classes.id_of(n) for n in classes.names}, progress=not quiet)
        picked = ", ".join(f"{n}: {c}" for n, c in t.decision.choice.items())
        console.print(f"teachers from {choice}: {escape(picked)}", highlight=False)
    elif cfg.teacher == "auto":
        from b2p.teach.auto import build_auto_teacher, score_table

        t = build_auto_teacher(cfg, batch_files, cfg.candidates, progress=not quiet)
        console.print(score_table(t.decision))
        for n, c in t.decision.choice.items():
            console.print(f"  {escape(n)}: [bold]{escape(c)}[/] ({escape(t.decision.reason[n])})", highlight=False)
        for c, why in t.decision.skipped.items():
            console.print(f"  [yellow]{escape(c)} not scored:[/] {escape(why)}", highlight=False)
    else:
        if cfg.candidates:
            raise B2PError("--candidate goes with --teacher auto")
        t = make_teacher(cfg, progress=not quiet)
    for f in batch_files:
        r = teach_batch(f, out, t, resume=resume, progress=not quiet, engine=eng)
        console.print(
            f"[green]taught[/] {r.batch}: {r.images} images, {r.boxes} boxes with {t.name} "
            f"({r.taught} taught, {r.reused} reused{'' if eng.name == 'local' else f' on {eng.workers} {eng.name} workers'}) in {r.seconds:.1f} s -> {r.out_dir} (see preview.png)"
            + (f"; [yellow]{len(r.notes)} boxes with notes[/] (see provenance.json)" if r.notes else ""),
            highlight=False,
        )
