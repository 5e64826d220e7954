"""`b2p finalize`: thin Typer command over `b2p.finalize.final.finalize`."""

from __future__ import annotations

from pathlib import Path

import typer

from b2p.scale import options as eo


def finalize(
    imported: Path = typer.Option(Path("data/imported"), "--imported", help="Folder of canonical batch files."),
    batch: list[str] = typer.Option(None, "--batch", help="Batch name(s), repeatable or comma-separated; default all."),
    probs: Path = typer.Option(Path("data/predict"), "--probs", help="Root of the student's probabilities (`b2p predict --probs` over --split and calib)."),
    teacher_root: Path = typer.Option(None, "--teacher-root", help="Also blend in this teacher's label maps (alpha < 1 becomes possible); `none`: no teacher (as not giving it)."),
    out: Path = typer.Option(Path("data/final"), "--out", help="Output root (teacher layout: OUT/<batch>/labelmaps/<key>.png), replaced whole once complete: not an input's folder (round 2: another folder than round 1's)."),
    split: str = typer.Option("all", "--split", help="Images that get output masks: all, or a comma-separated list of splits (calib,test); OUT then holds these only. Calib probabilities are read in any case."),
    student_out: Path = typer.Option(None, "--student-out", help="Also write the student alone, its decision rule (argmax, a p(defect) threshold, the map snapped to the image, or the argmax with per-class offsets fitted on calib) chosen on calib by binary IoU + anomaly mIoU, here (no boxes used)."),
    student_snap: bool = typer.Option(None, "--student-snap/--no-student-snap", help="With --student-out: the maps snapped to the image (GrabCut seeded by the student, `b2p predict --snap`) are candidates too (about 3 GrabCut runs per calib image) [params finalize.student_snap, else on]."),
    params: Path = typer.Option(None, "--params", help="YAML file whose `finalize:` and `engine:` sections set defaults."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    engine: str = eo.ENGINE,
    workers: int = eo.WORKERS,
    address: str = eo.ADDRESS,
) -> None:
    """Final pixel masks of every box-annotated image, with settings chosen on the calib split.

    Each box of class c keeps its pixels where alpha * p_student(defect) + (1 - alpha) * T_c is above t (T_c = 1 where the teacher labels the pixel c, else 0), painted with c (smaller mask wins; a box with no such pixel keeps its best ones). (alpha, t) is chosen per class on the calib images' manual masks (IoU) from a small grid; without calib images alpha 1, t 0.5. Writes OUT/<batch>/labelmaps/<key>.png (train round 2 with `b2p train --teacher-root OUT`), OUT/<batch>/provenance.json and OUT/thresholds.json (the choice and the calib scores).
    """
    from rich.console import Console
    from rich.table import Table

    from b2p.finalize.final import finalize as run
    from b2p.project import resolve_batch_files

    from b2p.schema import resolve

    cfg = resolve("finalize", params, {"student_snap": student_snap})
    student_snap = cfg.student_snap
    if teacher_root is not None and str(teacher_root) == "none":  # the recipe's oracle: nothing to blend with
        teacher_root = None
    from b2p.scale.engines import open_engine

    console = Console(stderr=True)
    engine_cfg = eo.engine_from_options(params, engine, workers, address, None)
    files = resolve_batch_files(imported, batch)
    with open_engine(engine_cfg) as eng:  # --engine ray: the masks are made on Ray workers (the same files)
        r = run(files, probs, out, teacher_root, progress=not quiet, splits=split, student_out=student_out, student_snap=student_snap, engine=eng)
    t = Table(title=f"final masks: settings per class ({r.calib_images} calib images)")
    for col in ("class", "alpha", "t", "calib IoU", "default IoU", "reason"):
        t.add_column(col, justify="left" if col in ("class", "reason") else "right")
    for n, c in r.choice.items():
        f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        t.add_row(n, f"{c['alpha']:g}", f"{c['t']:g}", f(c["calib_iou"]), f(c["default_iou"]), c["reason"])
    console.print(t)
    if r.calib_scores is not None:
        cs, ds = r.calib_scores, r.default_scores
        console.print(
            f"calib: binary IoU {cs['binary_iou'] or 0:.4f} (default {ds['binary_iou'] or 0:.4f}), "
            f"anomaly mIoU {cs['anomaly_miou'] or 0:.4f} (default {ds['anomaly_miou'] or 0:.4f})",
            highlight=False,
        )
    else:
        console.print("[yellow]no calib images:[/] default settings (alpha 1, t 0.5) for every class", highlight=False)
    if r.student is not None:
        st = r.student
        calib = "" if st["calib"] is None else (
            f" (calib binary IoU {st['calib']['binary_iou'] or 0:.4f}, argmax {st['default_calib']['binary_iou'] or 0:.4f})")
        unsnapped = "" if not st.get("unsnapped") else f"; {st['unsnapped']} images kept the argmax (nothing to snap: no colour model)"
        console.print(f"student alone: {st['rule']}, {st['reason']}{calib}{unsnapped}; masks under {student_out}", highlight=False)
    console.print(f"wrote {r.images} label maps ({r.boxes} boxes, {r.rescued} rescued) under {r.out}", highlight=False)


def combine(
    imported: Path = typer.Option(Path("data/imported"), "--imported", help="Folder of canonical batch files."),
    base: list[str] = typer.Option(None, "--base", help="A mask root that competes besides the pools, NAME=ROOT (teacher layout); repeatable. It comes first: a tie goes to it."),
    pool: list[str] = typer.Option(None, "--pool", help="KEY=DIR: the students of params list KEY compete with their final masks DIR/<name>/final; repeatable."),
    params: Path = typer.Option(Path("params.yaml"), "--params", help="The params file holding the pools' lists."),
    out: Path = typer.Option(..., "--out", help="Output root (teacher layout: OUT/<batch>/labelmaps/<key>.png) + OUT/choice.json."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Per class the best mask source on the calib split: the --base roots and every pool member's final masks.

    Every source labels each box of the calib images with its pixels of the box's class inside the box and is scored per class against the manual masks (IoU, one confusion matrix); every box of every image is then taken from its class's winner (ties: the earlier source). Without calib masks every class takes the first pool member. Writes what `b2p teach` writes (train on it with `--teacher-root OUT`) and OUT/choice.json (the calib scores and the choice).
    """
    from rich.console import Console
    from rich.markup import escape

    from b2p.errors import B2PError
    from b2p.finalize.combine import combine as run
    from b2p.recipe import pool_sources
    from b2p.project import resolve_batch_files
    from b2p.teach.auto import AutoChoice, score_table

    sources: dict[str, Path] = {}
    for item in base or []:
        name, sep, root = item.partition("=")
        if not sep or not name.strip() or not root.strip():
            raise B2PError(f"--base must be NAME=ROOT, got {item!r}")
        sources[name.strip()] = Path(root.strip())
    members = pool_sources(params, pool or [])
    clash = sorted(set(sources) & set(members))
    if clash:
        raise B2PError(f"--base name(s) {clash} are also pool members: rename them")
    if not members:
        raise B2PError("--pool names no student: at least one pool member is needed (the fallback without calib masks)", params)
    sources.update(members)
    rec = run(resolve_batch_files(imported, None), sources, out, fallback=next(iter(members)), progress=not quiet)
    console = Console(stderr=True)
    if rec["iou_on_calib"]:
        scores = {c: {"per_class": {n: {"iou": v[n]} for n in rec["choice"]}, "anomaly_miou": v["anomaly_miou"], "binary_iou": v["binary_iou"]}
                  for c, v in rec["iou_on_calib"].items()}
        console.print(score_table(AutoChoice(list(rec["choice"]), rec["calib_images"], scores, rec["choice"], rec["reason"])))
    for n, c in rec["choice"].items():
        console.print(f"  {escape(n)}: [bold]{escape(c)}[/] ({escape(rec['reason'][n])})", highlight=False)
    console.print(f"[green]wrote[/] {out} (choice.json)", highlight=False)


def deploy(
    imported: Path = typer.Option(Path("data/imported"), "--imported", help="Folder of canonical batch files (their class list is recorded)."),
    pool: list[str] = typer.Option(None, "--pool", help="KEY=DIR: the students of params list KEY, each in DIR/<name>/ (model/, predict/, alone/); repeatable, the first pool first on ties."),
    params: Path = typer.Option(Path("params.yaml"), "--params", help="The params file holding the pools' lists."),
    out: Path = typer.Option(Path("data/model"), "--out", help="The shipped model's folder: model.pt, rule.json, choice.json, masks/ (replaced whole)."),
) -> None:
    """Choose the model b2p ships: the best student alone on calib (binary IoU + anomaly mIoU), with its decision rule.

    Every pool member's calibrated student alone (`b2p finalize --student-out`) competes; the winner's model.pt, its rule (rule.json: the argmax, a p(defect) threshold, class offsets or a snap, and the prediction settings) and its masks of every image are written to OUT, with every candidate's calib scores in choice.json. Without calib masks the first member of the first pool ships, with the plain argmax.
    """
    from b2p.dataset import class_list_of, load_batches
    from b2p.recipe import pool_sources
    from b2p.finalize.deploy import deploy as run
    from b2p.project import resolve_batch_files

    names = list(class_list_of(load_batches(resolve_batch_files(imported, None))).names)
    sources = {n: p.parent for n, p in pool_sources(params, pool or [], leaf="model").items()}
    rec = run(sources, out, names)
    c = rec["candidates"][rec["chosen"]]
    calib = "" if c["calib"] is None else f": calib binary IoU {c['calib']['binary_iou'] or 0:.4f}, anomaly mIoU {c['calib']['anomaly_miou'] or 0:.4f}"
    typer.echo(f"shipping {rec['chosen']} ({c['rule'] or 'argmax'}){calib} ({rec['reason']}) -> {out}")
