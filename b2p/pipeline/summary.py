"""`b2p summary`: what the recipe made, in one screen (the last stage of dvc.yaml; writes nothing).

Reads evaluate's one-file-per-source metrics (EVAL/metrics/<source>.json), the teacher choice
(`b2p choose-teacher`), the shipped model's choice and training record (`b2p deploy`) and the export's
record, and prints: which teacher taught each class, which student ships with which rule and backbone,
the headline rows (box fill, teacher, final masks, shipped student) and then every other row, and where
each result lies.
"""

from __future__ import annotations

from pathlib import Path

from b2p.fileio import read_json

HEADLINE = ("box", "teacher", "combined", "final", "student")  # in this order, then every other row
HEADS = {"miou": "mIoU", "anomaly_miou": "anomaly mIoU", "binary_iou": "binary IoU", "binary_precision": "binary P",
         "binary_recall": "binary R", "binary_f1": "binary F1"}
ROW_NAMES = {"box": "box fill (the boxes themselves)", "teacher": "teacher (per class, see above)",
             "combined": "combined masks (what the distilled students learnt)", "final": "final masks (exported)",
             "student": "shipped student alone"}


def read_rows(eval_dir: Path) -> dict[str, dict]:
    """{source: its headline scores} from EVAL/metrics/*.json ({} when nothing was scored)."""
    from b2p.errors import B2PError

    rows = {}
    for p in sorted((Path(eval_dir) / "metrics").glob("*.json")):
        row = read_json(p, "evaluate metrics")
        if not isinstance(row, dict) or not all(v is None or isinstance(v, (int, float)) for v in row.values()):
            raise B2PError("not a metrics file of `b2p evaluate` (a mapping of metric -> number)", p)
        rows[p.stem] = row
    return rows


def ordered(rows: dict[str, dict]) -> list[str]:
    return [n for n in HEADLINE if n in rows] + [n for n in rows if n not in HEADLINE]


def summarize(eval_dir: Path, teachers: Path, model: Path, export: Path | None) -> list[str]:
    """The lines of facts above the table (teacher per class, the shipped model, the calib state)."""
    lines = []
    choice = read_json(Path(teachers) / "choice.json", "teacher choice")
    scores = read_json(Path(teachers) / "scores.json", "teacher scores")
    picked = ", ".join(f"{c}: {t}" for c, t in choice["choice"].items())
    how = f"chosen on {scores['calib_images']} calib images" if scores.get("calib_images") else "no calib masks: teach.fallback"
    lines.append(f"teacher per class ({how}): {picked}")
    dep = read_json(Path(model) / "choice.json", "deploy choice")
    rule = read_json(Path(model) / "rule.json", "deploy rule")["rule"]
    metrics = Path(model) / "metrics.json"
    backbone = read_json(metrics, "training record").get("backbone", {}) if metrics.is_file() else {}
    weights = "pretrained" if backbone.get("pretrained") else "RANDOM weights"
    lines.append(f"shipped student: {dep['chosen']} (rule: {rule['kind']}; {dep['reason']}); backbone "
                 f"{backbone.get('backbone', '?')} ({weights}{', ' + backbone['source'] if backbone.get('source') else ''})")
    if not scores.get("calib_images"):
        lines.append("no calib masks anywhere: every setting the recipe chooses on calib took its documented default")
    if export is not None and Path(export).is_dir():
        lines.append(f"pixel dataset: {', '.join(sorted(p.name for p in Path(export).iterdir() if p.is_dir()))} under {export}")
    return lines


def print_summary(eval_dir: Path, teachers: Path, model: Path, export: Path | None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # DVC / CI logs: keep the table whole
        console = Console(width=130)
    for line in summarize(eval_dir, teachers, model, export):
        console.print(line, highlight=False)
    rows = read_rows(eval_dir)
    if not rows:
        console.print("[yellow]no manually masked test image: nothing was scored[/] (give some images masks: `b2p add-batch --masks`)")
    else:
        n = next(iter(rows.values())).get("images")
        t = Table(title=f"b2p recipe on {n} manually masked test images (one confusion matrix per source)", box=box.SIMPLE_HEAD)
        t.add_column("source", no_wrap=True)
        for h in HEADS.values():
            t.add_column(h, justify="right")
        for name in ordered(rows):
            style = "bold" if name in HEADLINE else None
            t.add_row(ROW_NAMES.get(name, name), *[_fmt(rows[name].get(k)) for k in HEADS], style=style)
        console.print(t)
    console.print(f"scores: {eval_dir}/metrics/ (`dvc metrics show`), per image: {eval_dir}/per_image.csv, worst images: "
                  f"{eval_dir}/overlays/; shipped model: {model}; teachers: {teachers}/choice.json", highlight=False)
    console.print("browse: b2p browse --recipe   (FiftyOne: boxes, manual, teacher, final and student masks side by side)", highlight=False)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"
