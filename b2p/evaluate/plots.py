"""Pictures of an evaluation: per-class IoU table, confusion heatmaps, summary bars, worst-image overlays.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch), rendered to
PNG bytes and written atomically. Files of an earlier run that this run did not produce (a source no
longer scored, fewer overlays) are removed, so the folders always describe one run.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from b2p.metrics import normalized_matrix
from b2p.fileio import read_image, write_bytes_atomic, write_text_atomic
from b2p.labels import class_color_hex, colorize, overlay_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from b2p.evaluate.sources import EvalResult

SUMMARY_METRICS = ("miou", "anomaly_miou", "binary_iou", "binary_precision", "binary_recall", "binary_f1")


def _new_figure(w: float, h: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path, tight: bool = False) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight" if tight else None)  # tight draws the figure twice
    write_bytes_atomic(path, buf.getvalue())


def _remove_stale(folder: Path, pattern: str, keep: set[Path]) -> None:
    for p in folder.glob(pattern):
        if p not in keep:
            p.unlink()


def per_class_iou_csv(result: EvalResult) -> str:
    """Tidy CSV `label,class,source,iou` for a DVC bar template (empty iou: class absent from truth and prediction).

    DVC colours by file and revision, not by a column, so `label` ("crack | student") gives every bar its own
    row on the axis: plot it with `x: iou, y: label`.
    """
    lines = ["label,class,source,iou"]
    for s in result.sources:
        for name, c in result.metrics[s.name]["per_class"].items():
            iou = "" if c["iou"] is None else f"{c['iou']:.6f}"
            lines.append(f"{name} | {s.name},{name},{s.name},{iou}")
    return "\n".join(lines) + "\n"


def confusion_figure(matrix: np.ndarray, labels: Sequence[str], title: str) -> Figure:
    """Heatmap of the row-normalised matrix (share of each true class's pixels per predicted class)."""
    n = normalized_matrix(matrix)
    # laid out in inches from the longest label (10 pt text is ~0.085 in a character) rather than by a
    # "tight" box, which draws the figure twice: an evaluation draws one of these per source
    cell, label_in = 0.55, 0.085 * max(len(str(x)) for x in labels)
    grid = cell * len(labels)
    left, bottom, top, bar = label_in + 0.6, 0.71 * label_in + 0.65, 0.45, 0.9
    w, h = max(left + grid + bar, 0.1 * len(title) + 0.4), bottom + grid + top
    fig = _new_figure(w, h)
    ax = fig.add_axes((left / w, bottom / h, grid / w, grid / h))
    cax = fig.add_axes(((left + grid + 0.12) / w, bottom / h, 0.15 / w, grid / h))
    im = ax.imshow(n, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    fig.colorbar(im, cax=cax)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("manual (truth)")
    fig.suptitle(title, x=0.5, y=1 - 0.12 / h, va="top", fontsize=11)
    if len(labels) <= 12:
        for i in range(n.shape[0]):
            for j in range(n.shape[1]):
                ax.text(j, i, f"{n[i, j]:.2f}", ha="center", va="center", fontsize=8, color="white" if n[i, j] > 0.5 else "black")
    return fig


def summary_figure(result: EvalResult) -> Figure:
    """Grouped bars: the main metrics (x) for every source (one colour each); undefined values left out."""
    names = [s.name for s in result.sources]
    fig = _new_figure(max(7.0, 1.2 * len(SUMMARY_METRICS) * max(1, len(names)) / 3), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(names)
    x = np.arange(len(SUMMARY_METRICS))
    for i, n in enumerate(names):
        vals = [result.metrics[n][m] for m in SUMMARY_METRICS]
        heights = [np.nan if v is None else v for v in vals]
        bars = ax.bar(x - 0.4 + width * (i + 0.5), heights, width, label=n)
        for b, v in zip(bars, vals):
            if v is not None and len(names) <= 4:
                ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, SUMMARY_METRICS, rotation=20)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("score")
    ax.set_title(f"{len(result.images)} manually masked images, split-level scores")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return fig


def write_plots(folder: str | Path, result: EvalResult) -> list[Path]:
    """per_class_iou.csv, confusion_<source>.png for every source, summary.png; returns the files."""
    folder = Path(folder)
    written = [folder / "per_class_iou.csv"]
    write_text_atomic(written[0], per_class_iou_csv(result))
    labels = ["background", *result.classes.names]
    for s in result.sources:
        p = folder / f"confusion_{s.name}.png"
        _save(confusion_figure(result.confusion[s.name], labels, f"{s.name}: confusion (rows sum to 1)"), p)
        written.append(p)
    p = folder / "summary.png"
    _save(summary_figure(result), p, tight=True)  # its legend sits outside the axes
    written.append(p)
    _remove_stale(folder, "confusion_*.png", set(written))
    return written


def overlay(image: np.ndarray, label_map: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """HxWx3 uint8 image with the class colours of `label_map` blended over its defect pixels."""
    out = image.astype(np.float32)
    fg = label_map > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * colorize(label_map)[fg].astype(np.float32)
    return out.round().clip(0, 255).astype(np.uint8)


def write_overlays(folder: str | Path, result: EvalResult, rank_source: str, worst: int, progress: bool = True) -> list[Path]:
    """Side-by-side PNGs (image, manual, teacher, student) of the `worst` images by `rank_source` binary IoU.

    Files are `NN_<batch>__<label map key>.png`, NN the rank (00 = worst).
    """
    from b2p.evaluate.sources import STUDENT, TEACHER, load_source_map

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)  # exists even with no overlay, for a DVC output
    ranked = [r for r in result.rows if r["source"] == rank_source][: max(0, worst)]
    by_key = {(im.batch, im.file_name): im for im in result.images}
    by_name = {s.name: s for s in result.sources}
    shown = [by_name[n] for n in (TEACHER, STUDENT) if n in by_name] or [by_name[rank_source]]
    iou_of = {(r["source"], r["batch"], r["file_name"]): r["binary_iou"] for r in result.rows}
    k = result.classes.num_classes
    written: list[Path] = []
    from rich.progress import track

    for rank, r in enumerate(track(ranked, description="overlays", disable=not progress, transient=True)):
        im = by_key[(r["batch"], r["file_name"])]
        image = read_image(im.path)
        if image.shape[:2] != (im.height, im.width):
            # the manual mask follows the record's size; show the image at that size rather than misalign
            import cv2

            image = cv2.resize(image, (im.width, im.height), interpolation=cv2.INTER_AREA)
        truth = im.manual_label_map()
        panels = [(image, f"{im.batch}/{im.file_name}"), (overlay(image, truth), "manual")]
        for s in shown:
            lm = load_source_map(s, im, k)
            panels.append((overlay(image, lm), f"{s.name}  IoU {iou_of[(s.name, im.batch, im.file_name)]:.3f}"))
        aspect = im.height / max(1, im.width)
        w, h = 3.2 * len(panels), 3.2 * aspect + 0.7
        fig = _new_figure(w, h)
        # fixed margins in inches (titles above, the legend below): a constrained layout measures every artist first
        fig.subplots_adjust(left=0.1 / w, right=1 - 0.1 / w, top=1 - 0.3 / h, bottom=0.4 / h, wspace=0.15)
        for i, (arr, title) in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), i + 1)
            ax.imshow(arr, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        handles = _class_legend(result.classes.names)
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False)
        p = folder / overlay_name(rank, im.batch, im.file_name)
        _save(fig, p)
        written.append(p)
    _remove_stale(folder, "*.png", set(written))
    return written


def _class_legend(names: Sequence[str]) -> list:
    from matplotlib.patches import Patch

    return [Patch(color=class_color_hex(i), label=n) for i, n in enumerate(names, start=1)]
