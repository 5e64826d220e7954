"""`b2p finalize`: thin Typer command over `b2p.finalize.final.finalize`."""

from __future__ import annotations

from pathlib import Path

import typer

from b2p.scale import options as eo


def finalize(
    imported: Path = typer.Option(Path("data/imported"), "--imported", help="Folder of canonical batch files."),
    batch: list[str] = typer.Option(None, "--batch", help="Batch name(s), repeatable or comma-separated; default all."),
    probs: Path = typer.Option(Path("data/predict"), "--probs", help="Root of the student's probabilities (`b2p predict --probs` over --split and calib)."),
    teacher_root: Path = typer.Option(None, "--teacher-root", help="Also blend in this teacher's label maps (alpha < 1 becomes possible)."),
    out: Path = typer.Option(Path("data/final"), "--out", help="Output root (teacher layout: OUT/<batch>/labelmaps/<key>.png), replaced whole once complete: not an input's folder (round 2: another folder than round 1's)."),
    split: str = typer.Option("all", "--split", help="Images that get output masks: all, or a comma-separated list of splits (calib,test); OUT then holds these only. Calib probabilities are read in any case."),
    student_out: Path = typer.Option(None, "--student-out", help="Also write the student alone, its decision rule (argmax, a p(defect) threshold, the map snapped to the image, or the argmax with per-class offsets fitted on calib) chosen on calib by binary IoU + anomaly mIoU, here (no boxes used)."),
    student_snap: bool = typer.Option(True, "--student-snap/--no-student-snap", help="With --student-out: the maps snapped to the image (GrabCut seeded by the student, `b2p predict --snap`) are candidates too (about 3 GrabCut runs per calib image)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    engine: str = eo.ENGINE,
    workers: int = eo.WORKERS,
    address: str = eo.ADDRESS,
    engine_params: Path = eo.ENGINE_PARAMS,
) -> None:
    """Final pixel masks of every box-annotated image, with settings chosen on the calib split.

    Each box of class c keeps its pixels where alpha * p_student(defect) + (1 - alpha) * T_c is above t (T_c = 1 where the teacher labels the pixel c, else 0), painted with c (smaller mask wins; a box with no such pixel keeps its best ones). (alpha, t) is chosen per class on the calib images' manual masks (IoU) from a small grid; without calib images alpha 1, t 0.5. Writes OUT/<batch>/labelmaps/<key>.png (train round 2 with `b2p train --teacher-root OUT`), OUT/<batch>/provenance.json and OUT/thresholds.json (the choice and the calib scores).
    """
    from rich.console import Console
    from rich.table import Table

    from b2p.finalize.final import finalize as run
    from b2p.project import resolve_batch_files

    from b2p.scale.engine import open_engine

    console = Console(stderr=True)
    engine_cfg = eo.engine_from_options(engine_params, engine, workers, address, None)
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
