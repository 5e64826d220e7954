"""Typer commands of the ingest stage: demo-data, masks-to-boxes, import (thin wrappers)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


console = Console()


def import_batch(
    batch: str = typer.Option(..., "--batch", help="Batch name: the canonical file is <out>/NAME.json and split hashes use it."),
    images: Path = typer.Option(..., "--images", help="Folder of the batch's images (file names in the labels are relative to it)."),
    coco: Path = typer.Option(None, "--coco", help="COCO JSON with images, categories and boxes (optional segmentation)."),
    yolo_labels: Path = typer.Option(None, "--yolo-labels", help="Folder of YOLO .txt labels (same relative names as the images)."),
    yolo_classes: Path = typer.Option(None, "--yolo-classes", help="YOLO class names: one per line, or a data.yaml with 'names'."),
    masks: Path = typer.Option(None, "--masks", help="Folder of manual-mask PNG label maps (same relative name, .png; values = batch class ids)."),
    classes: Path = typer.Option(Path("data/classes.json"), "--classes", help="Canonical class list, shared by all batches (created if missing)."),
    add_classes: bool = typer.Option(False, "--add-classes", help="Allow this batch to append new class names to the class list."),
    val: float = typer.Option(None, "--val", help="Validation fraction of the hashed split (default 0.15)."),
    test: float = typer.Option(None, "--test", help="Test fraction of the hashed split (default 0.15)."),
    manual_masks_split: str = typer.Option(None, "--manual-masks-split", help="Where images with a manual mask go: test (default) or hash."),
    calib: float = typer.Option(None, "--calib", help="Share of the manually masked images (outside the hashed test split) that go to the calib split, used only to choose settings (default 0)."),
    salt: str = typer.Option(None, "--salt", help="Salt of the split hash (default b2p)."),
    out: Path = typer.Option(None, "--out", help="Canonical file to write (default data/imported/NAME.json)."),
    params: Path = typer.Option(None, "--params", help="params.yaml: its 'import' section sets val, test, salt, manual_masks_split, calib."),
    set_: list[str] = typer.Option(None, "--set", help="Any `import:` key, KEY=VALUE; repeatable; wins over everything."),
) -> None:
    """Import one box-annotated batch into a canonical annotation file.

    Input: an image folder plus either a COCO JSON (--coco) or YOLO labels (--yolo-labels + --yolo-classes); optional manual masks as PNG label maps (--masks) or as COCO `segmentation` (polygons or RLE; an image with "has_manual_mask": true and no annotations is a defect-free manual mask). Output: data/imported/NAME.json (--out) and, on first use or with --add-classes, the class list (--classes). Classes are matched by name.

    Everything is checked before anything is written: JSON structure, every image decoded, file names inside the image folder, box size > 0, boxes inside the image (boxes overhanging by at most 0.5 px are clipped; further out is an error), category ids, YOLO fields and [0, 1] coordinates, mask sizes and values. Any problem stops the import with a message naming the file; existing outputs stay unchanged. An image without a YOLO label file has no defects; a label file without an image, or a labels folder without any, is an error (suffixes .txt / .png in any case). Manual masks must agree with the boxes: mask pixels of a class outside every box of that class (by more than 0.5 px), a box holding no pixel of its class, a segmentation mostly outside its own box, an RLE whose runs do not fill the image, or a polygon outside the image is refused, every problem of the batch listed at once. Also refused: one image content under two names of the batch, names whose derived output files would be too long for the file system, a batch name differing only in case from an imported one, outputs inside an input folder, and files b2p wrote itself (an export, a teacher's instances.json, a canonical file: their masks are not manual). An image another imported batch holds too is a warning.

    Splits: a hash of batch name + file name (fractions --val/--test), so adding batches never moves an image; images with a manual mask go to test unless --manual-masks-split hash; with --calib F, a share F of them (outside the hashed test split) go to calib instead: never trained on, never in the test scores, used to choose settings (`b2p teach --teacher auto`, `b2p finalize`).
    """
    from b2p.ingest.importer import import_batch as run_import
    from b2p.schema import resolve

    options = {"val": val, "test": test, "salt": salt, "manual_masks_split": manual_masks_split, "calib": calib}
    rule = resolve("import", params, options, set_).split_rule()
    from b2p.params import read_params_file

    if params is not None and "candidates" in read_params_file(params):  # a recipe's params: refuse a bad one before any work
        from b2p.schema import check_recipe

        check_recipe(params)
    r = run_import(
        batch,
        images,
        coco=coco,
        yolo_labels=yolo_labels,
        yolo_classes=yolo_classes,
        masks_dir=masks,
        classes_path=classes,
        add_classes=add_classes,
        rule=rule,
        out=out,
    )
    for w in r.warnings:
        console.print(f"[bold yellow]warning:[/] {w}", highlight=False)
    t = Table(title=f"batch {batch!r} -> {r.out}")
    t.add_column("class")
    t.add_column("id", justify="right")
    t.add_column("boxes", justify="right")
    for i, n in enumerate(r.classes.names, 1):
        t.add_row(n + (" (new)" if n in r.new_classes else ""), str(i), str(r.boxes_per_class[n]))
    console.print(t)
    console.print(
        f"{r.num_images} images, {r.num_boxes} boxes, {r.manual_masks} with manual masks; "
        f"splits: " + ", ".join(f"{s} {n}" for s, n in r.splits.items()),
        highlight=False,
    )
    calib_n, test_n = r.splits.get("calib", 0), r.splits.get("test", 0)
    if not r.manual_masks:
        console.print("note: no manual mask in this batch: nothing of it chooses a setting or is scored "
                      "(settings without calib masks take their documented defaults)", highlight=False)
    if r.manual_masks and rule.calib and (calib_n == 0 or test_n == 0):
        missing = "calib: settings this batch could choose take their defaults" if calib_n == 0 else "test: nothing of this batch is scored"
        console.print(f"[yellow]only {r.manual_masks} manual mask(s), too few for both calib ({calib_n}) and test ({test_n}); none in {missing}. "
                      "Mask more images, or set import.calib (0 = all to test, 1 = all to calib).[/]", highlight=False)
    if r.clipped_boxes:
        console.print(f"[yellow]{r.clipped_boxes} boxes overhung their image by <= 0.5 px and were clipped[/]")
    if r.unlisted_images:
        console.print(f"note: {r.unlisted_images} image files under {images} are not in the COCO file and were not imported")
    if r.classes_written:
        console.print(f"class list written: {r.classes_path} ({r.classes.num_classes} classes)")


def demo_data(
    out: Path = typer.Option(Path("data/raw/demo"), "--out", help="Output folder."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives byte-identical files."),
    images: int = typer.Option(64, "--images", help="Number of images."),
    size: int = typer.Option(192, "--size", help="Image side in pixels (square)."),
    mask_fraction: float = typer.Option(0.3, "--mask-fraction", help="Fraction of images that get a manual mask (the recipe splits them into calib and test)."),
    all_masks: bool = typer.Option(False, "--all-masks", help="Write a manual mask for every image (for measuring teachers)."),
) -> None:
    """Write a small synthetic inspection dataset (textured surfaces, cracks / spots / erosion, distractors).

    Output: OUT/images/*.png, OUT/annotations.json (COCO, one tight box per defect), OUT/masks/*.png (exact manual label maps with COCO category ids, for --mask-fraction of the images), OUT/classes.txt, and OUT/preview.png (a contact sheet with masks and boxes overlaid). Import it with `b2p import --batch demo --images OUT/images --coco OUT/annotations.json --masks OUT/masks`.
    """
    from b2p.ingest.demo import make_demo_data

    r = make_demo_data(out, seed=seed, images=images, size=size, mask_fraction=mask_fraction, all_masks=all_masks)
    console.print(
        f"{r.images} images ({r.defect_free_images} defect-free), {r.masks} manual masks -> {r.out}; instances: "
        + ", ".join(f"{n} {c}" for n, c in r.instances_per_class.items())
        + f"; defect pixels {100 * r.defect_pixel_fraction:.2f} %; preview: {r.out / 'preview.png'}",
        highlight=False,
    )


def masks_to_boxes(
    root: Path = typer.Argument(..., help="Dataset root: ROOT/<CLASS>/Imgs/NAME.jpg with the mask NAME.png beside it."),
    out: Path = typer.Option(..., "--out", help="COCO JSON to write."),
    batch: str = typer.Option(..., "--batch", help="Batch name you will import it under (the test split hashes it)."),
    strip_prefix: str = typer.Option(None, "--strip-prefix", help="Prefix removed from folder names before lower-casing (e.g. MT_); 'auto': the prefix all class folders share."),
    threshold: int = typer.Option(None, "--threshold", help="Mask pixels >= this are defect (default 128)."),
    min_area: int = typer.Option(None, "--min-area", help="Components smaller than this many pixels are dropped as noise (default 10)."),
    free_images: int = typer.Option(None, "--free-images", help="Keep at most N defect-free images (deterministic hash choice) (default all)."),
    val: float = typer.Option(None, "--val", help="Validation fraction (must match `b2p import`) (default 0.15)."),
    test: float = typer.Option(None, "--test", help="Test fraction (must match `b2p import`) (default 0.15)."),
    salt: str = typer.Option(None, "--salt", help="Split salt (must match `b2p import`) (default b2p)."),
    folder: list[str] = typer.Option(None, "--folder", help="Only these class folders (repeatable or comma-separated) (default all)."),
    calib: float = typer.Option(None, "--calib", help="Share of the non-test images that keep their manual masks as the calib split (must match `b2p import --calib`) (default 0)."),
    params: Path = typer.Option(None, "--params", help="params.yaml: its 'masks_to_boxes' section sets the options above."),
    set_: list[str] = typer.Option(None, "--set", help="Any `masks_to_boxes:` key, KEY=VALUE; repeatable; wins over everything."),
    oracle_out: Path = typer.Option(None, "--oracle-out", help="Also write every image's manual mask as a teacher root (the oracle: train on it for the fully supervised ceiling)."),
    masked: float = typer.Option(None, "--masked", help="Keep the manual masks of this hashed share of the images instead (a user who masked a few; `b2p import` splits them into calib and test)."),
) -> None:
    """Simulate box annotation for a dataset with manual masks (one box per connected defect component).

    Each class folder's connected mask components (8-connectivity, mask >= --threshold) become tight boxes of that class (folder name minus --strip-prefix, lower-cased); components under --min-area pixels are dropped (no box, not in the manual mask) and counted. Folders whose masks are all empty (e.g. MT_Free) give defect-free images. Output: a COCO JSON with file names relative to ROOT and boxes for every image; manual masks (RLE segmentation per component, "has_manual_mask": true) only for the images the split rule puts in test (and calib), or, with --masked F, for a hashed share F of the images (then `b2p import` splits them into calib and test by its own rule). Importing with the same batch name and fractions gives the same split, so manual masks never reach training.
    """
    from b2p.ingest.from_masks import masks_to_boxes as run
    from b2p.schema import resolve

    options = dict(strip_prefix=strip_prefix, threshold=threshold, min_area=min_area, free_images=free_images, val=val, test=test, salt=salt, calib=calib, masked=masked)
    p = resolve("masks_to_boxes", params, options, set_)
    r = run(
        root,
        out,
        batch,
        strip_prefix=p.strip_prefix,
        threshold=p.threshold,
        min_area=p.min_area,
        free_images=p.free_images,
        rule=p.split_rule(),
        folders=[f.strip() for item in folder or [] for f in item.split(",") if f.strip()] or None,
        oracle_out=oracle_out,
        masked=p.masked,
    )
    t = Table(title=f"{root} -> {r.out}")
    for col in ("folder", "class", "images", "boxes", "dropped (< min area)"):
        t.add_column(col, justify="left" if col in ("folder", "class") else "right")
    for f, cls in r.folders.items():
        if cls == "defect-free":
            t.add_row(f, cls, f"{r.free_kept} of {r.free_total}", "0", "-")
        else:
            t.add_row(f, cls, str(r.images_per_class.get(cls, 0)), str(r.boxes_per_class[cls]), str(r.dropped_per_class[cls]))
    console.print(t)
    console.print(
        f"{r.images} images, {sum(r.boxes_per_class.values())} boxes, {sum(r.dropped_per_class.values())} components dropped; "
        + (f"{r.masked_images} images carry their manual mask" if p.masked is not None else
         f"{r.test_images} test images carry their manual mask" + (f", {r.calib_images} calib images too" if r.calib_images else "")),
        highlight=False,
    )
