"""`b2p export`: a thin Typer command over b2p.export.export.export_dataset."""

from __future__ import annotations

from pathlib import Path

import typer


def _names(values) -> list[str]:
    """`--format a --format b`, `--format a,b` and a YAML list all mean the same."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for v in values:
        out += [t.strip() for t in str(v).split(",") if t.strip()]
    return list(dict.fromkeys(out))


def export(
    imported: Path = typer.Option(Path("data/imported"), "--imported", help="Folder of canonical batch files."),
    batch: list[str] = typer.Option(None, "--batch", help="Batch name(s), repeatable or comma-separated; default all."),
    out: Path = typer.Option(Path("data/export"), "--out", help="Export root: one sub-folder per format."),
    fmt: list[str] = typer.Option(None, "--format", help="coco, yolo (YOLO-seg) or semantic; repeatable or comma-separated; default all three."),
    source: str = typer.Option(None, "--source", help="Masks to export: final (default: the recipe's final masks), combined, teacher, student (the shipped student alone), boxes or snapped (b2p predict)."),
    source_root: Path = typer.Option(None, "--source-root", help="Read the masks from this root instead of the source's default folder."),
    unboxed: str = typer.Option(None, "--unboxed", help="Masks of the images without any box from another source: student (the shipped student's; the recipe's choice, params export.unboxed), or none (default: the main source's)."),
    unboxed_root: Path = typer.Option(None, "--unboxed-root", help="Read those from this root instead of the source's default folder."),
    split: list[str] = typer.Option(None, "--split", help="Split(s) to export, repeatable or comma-separated; default every split."),
    images: str = typer.Option(None, "--images", help="copy (default), symlink or hardlink the images into the export."),
    coco_masks: str = typer.Option(None, "--coco-masks", help="COCO segmentation as rle (exact, default) or polygons."),
    teacher_root: Path = typer.Option(Path("data/teach"), "--teacher-root", help="Teacher root, for the provenance record."),
    model: Path = typer.Option(Path("data/model"), "--model", help="Student model folder, for the provenance record of student masks read from their default root without a predict.json."),
    params: Path = typer.Option(None, "--params", help="YAML file whose `export:` section sets the options above."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Export the pixel dataset as COCO instance segmentation, YOLO-seg and/or semantic PNGs.

    Writes OUT/coco/ (images/, annotations/instances_<split>.json: one annotation per annotated box with
    its box_id, class, score where the source has one, RLE or polygon mask), OUT/yolo/ (images/<split>/,
    labels/<split>/*.txt, data.yaml) and OUT/semantic/ (img_dir/<split>/, ann_dir/<split>/*.png label
    maps, splits/<split>.txt, classes.txt: the MMSegmentation layout), each with export.json (provenance,
    counts, how well polygons rasterise back). The formats of one run replace the old ones together, all or
    none, even when the run is killed; a re-run gives the same bytes.
    """
    from rich.console import Console

    from b2p.export.export import DEFAULT_SOURCE, FORMATS, ExportOptions, export_dataset
    from b2p.project import resolve_batch_files

    from b2p.schema import resolve

    cfg = resolve("export", params, {"formats": _names(fmt) or None, "source": source, "unboxed": unboxed, "splits": _names(split) or None,
                                     "images": images, "coco_masks": coco_masks})
    opts = ExportOptions(
        formats=tuple(_names(cfg.formats) or FORMATS),
        source=cfg.source or DEFAULT_SOURCE,
        source_root=source_root,
        splits=tuple(_names(cfg.splits)),
        images=cfg.images,
        coco_masks=cfg.coco_masks,
        unboxed=cfg.unboxed,
        unboxed_root=unboxed_root,
    )
    console = Console()
    report = export_dataset(
        resolve_batch_files(imported, batch), out, opts,
        teacher_root=teacher_root, model_dir=model, progress=not quiet,
    )
    _print_report(console, report)


def _print_report(console, report) -> None:
    """Each format's folder and counts, then the warnings (empty boxes, pixels outside every box, EXIF tags) and the provenance."""
    for fmt_name, m in report.formats.items():
        n_img = sum(c.get("images", 0) for c in m["counts"].values())
        line = f"[green]{fmt_name}[/]: {report.out / fmt_name}  {n_img} images"
        if "boxes" in m:
            n_inst = sum(c.get("instances", 0) for c in m["counts"].values())
            line += f", {n_inst} instances"
        if "polygon_iou" in m and m["polygon_iou"]["pooled_iou"] is not None:
            line += f", polygons rasterise back at IoU {m['polygon_iou']['pooled_iou']:.4f} (worst {m['polygon_iou']['min_iou']:.4f})"
        console.print(line, highlight=False)
    first = next(iter(report.formats.values()))
    boxes = next((m["boxes"] for m in report.formats.values() if "boxes" in m), None)
    if boxes and boxes["empty_boxes"]:
        console.print(f"[yellow]{boxes['empty_boxes']} of {boxes['boxes']} boxes have an empty mask in this source and are left out[/]")
    if boxes and boxes["unboxed_pixels"]:
        console.print(
            f"[yellow]{boxes['unboxed_pixels']} defect pixels lie outside every box of their class: in no instance "
            "(the semantic export keeps them)[/]"
        )
    info = first["info"]
    if info.get("exif_oriented_images"):
        names = info["exif_oriented_images"]
        console.print(
            f"[yellow]{len(names)} exported image(s) carry an EXIF orientation tag ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''}): "
            "their masks follow the image as displayed; train with a loader that applies the tag (PIL ImageOps.exif_transpose, "
            "OpenCV imread) or remove the tags first[/]", highlight=False,
        )
    console.print(
        f"masks: {info['source']} ({info['source_root']}); teacher recorded: {'yes' if info['teacher'] else 'no'}; "
        f"model: {info['model']['path'] if info['model'] else 'not recorded'}",
        highlight=False,
    )
