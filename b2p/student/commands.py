"""`b2p train` and `b2p predict`: thin Typer commands over b2p.student.train / b2p.student.predict."""

from __future__ import annotations

from pathlib import Path

import typer

from b2p.errors import B2PError
from b2p.scale import options as eo


def _taps(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise B2PError(f"--taps must be comma-separated block indices like 1,2,4,7, got {text!r}") from None


def train(
    imported: Path = typer.Option(Path("data/imported"), "--imported", help="Folder of canonical batch files."),
    batch: list[str] = typer.Option(None, "--batch", help="Batch name(s), repeatable or comma-separated; default all."),
    teacher_root: Path = typer.Option(Path("data/teach"), "--teacher-root", help="Root of teacher label maps."),
    out: Path = typer.Option(Path("data/models/student"), "--out", help="Output model folder."),
    params: list[Path] = typer.Option(
        None, "--params", help="YAML file whose `train:` section sets parameters; repeatable, later files win."
    ),
    student: str = typer.Option(None, "--student", help="A student variant of the params files (`students.NAME.train`, layered over `train:`)."),
    arch: str = typer.Option(None, "--arch", help="b2p (Boxes2Pixels student) or unet (from-scratch baseline)."),
    backbone: str = typer.Option(None, "--backbone", help="efficientnet_lite0 (embedded, default) or dinov2_s/b/l/g."),
    weights: str = typer.Option(None, "--weights", help="Backbone weights: HF folder, hub id, .pth file, or 'random'."),
    allow_download: bool = typer.Option(None, "--allow-download/--offline", help="Let a hub id download weights."),
    adaptation: str = typer.Option(None, "--adaptation", help="bitfit (paper), frozen, or full."),
    taps: str = typer.Option(None, "--taps", help="Tapped backbone blocks, e.g. 1,2,4,7."),
    detail_branch: bool = typer.Option(None, "--detail/--no-detail", help="Detail branch on the raw image."),
    binary_head: bool = typer.Option(None, "--binary-head/--no-binary-head", help="Binary defect head."),
    tile_size: int = typer.Option(None, "--tile-size", help="Training tile side in px at model scale (a multiple of the backbone's stride)."),
    input_size: int = typer.Option(None, "--input-size", hidden=True, help="Old name of --tile-size."),
    scale: float = typer.Option(None, "--scale", help="Model px per image px (1.0 = native resolution)."),
    max_side: int = typer.Option(None, "--max-side", help="Cap on the longer side at model scale (huge images)."),
    select: str = typer.Option(None, "--select", help="Saved epoch: box (teacher-free), pseudo or last."),
    epochs: int = typer.Option(None, "--epochs", help="Maximum epochs (paper 200)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Images per step (paper 1)."),
    lr: float = typer.Option(None, "--lr", help="AdamW learning rate (5e-4)."),
    patience: int = typer.Option(None, "--patience", help="Early-stopping patience in epochs (25)."),
    seed: int = typer.Option(None, "--seed", help="Random seed (42)."),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda."),
    feature_cache: str = typer.Option(None, "--feature-cache", help="auto, memory, disk or off (frozen backbone only)."),
    self_correction_region: str = typer.Option(None, "--self-correction-region", help="all (paper) or boxes."),
    warmup_epochs: int = typer.Option(None, "--warmup-epochs", help="Epochs before self-correction starts."),
    processes: int = typer.Option(
        None, "--processes", min=1, help="Train on N processes (torch.distributed: gloo on a CPU, NCCL on one GPU each); batch_size is the global batch. torchrun's WORLD_SIZE, when set, is used instead."
    ),
    set_: list[str] = typer.Option(None, "--set", help="Any `train:` key, KEY=VALUE (YAML value); repeatable; wins over everything."),
) -> None:
    """Train the student on teacher pseudo-masks.

    Reads IMPORTED/<batch>.json (train and val splits) and TEACHER_ROOT/<batch>/labelmaps/*.png; writes
    OUT/model.pt (config, class list, backbone provenance, EMA weights), OUT/metrics.json (best val
    metrics against pseudo-masks, epochs, parameter counts, seconds, backbone) and OUT/curves.csv.

    Parameters: defaults < each --params file < the --student variant < the options above < --set KEY=VALUE. Every `train:` key
    (b2p/schema.py) can be given with --set, e.g. --set tau=0.8 --set augment=flips; types and ranges are
    checked and every problem is reported at once.

    --processes N trains data-parallel on N processes (b2p/scale/distributed.py): each builds its share of
    every global batch, the loss and BatchNorm statistics are those of the global batch, rank 0 validates and
    writes; the curves match one process's within float rounding. Or launch it with torchrun.
    """
    from b2p.project import resolve_batch_files
    from b2p.schema import train_params
    from b2p.student.train import train_student

    cli = dict(
        arch=arch, backbone=backbone, weights=weights, allow_download=allow_download, adaptation=adaptation,
        taps=_taps(taps), detail_branch=detail_branch, binary_head=binary_head, tile_size=tile_size,
        input_size=input_size, scale=scale, max_side=max_side, select=select,
        epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, seed=seed, device=device,
        feature_cache=feature_cache, self_correction_region=self_correction_region, warmup_epochs=warmup_epochs,
        processes=processes,
    )
    # defaults < each --params file (e.g. the dataset's params.yaml, then a student variant's) < options < --set
    tp = train_params(params, cli, set_, student=student)
    files = resolve_batch_files(imported, batch)
    train_student(files, teacher_root, out, tp)


def predict(
    model: Path = typer.Option(Path("data/models/student"), "--model", help="Trained model folder (or model.pt)."),
    imported: Path = typer.Option(Path("data/imported"), "--imported", help="Folder of canonical batch files."),
    batch: list[str] = typer.Option(None, "--batch", help="Batch name(s); default all."),
    split: str = typer.Option("test", "--split", help="test, val, train, calib, a comma-separated list of them (calib,test) or all."),
    images: Path = typer.Option(None, "--images", help="Predict every image in this folder instead of batches."),
    out: Path = typer.Option(Path("data/predict"), "--out", help="Prediction root (batches) or output folder (--images)."),
    probs: bool = typer.Option(False, "--probs", help="Also write per-image class probabilities (npz: uint8, p x 255)."),
    params: Path = typer.Option(None, "--params", help="YAML file whose `predict:` and `engine:` sections set the defaults of the options below."),
    student: str = typer.Option(None, "--student", help="A student variant of --params: its `students.NAME.predict` keys win over `predict:`."),
    batch_size: int = typer.Option(None, "--batch-size", help="Windows per forward pass (sliding window) [4]."),
    window: int = typer.Option(
        None, "--window", min=1, help="Sliding-window side, px at the model's scale (default: the training tile for a strip-context model, else 512; rounded up to the model's multiple, at least its training tile)."
    ),
    overlap: float = typer.Option(None, "--overlap", min=0.0, max=0.9, help="Sliding-window overlap, a fraction of the window (default: params, else the model's rule.json, else 0.25)."),
    tta: str = typer.Option(None, "--tta", help="Test-time augmentation: none, or flips (the mean logits of the image and its 3 flips: 4x the time); default: params, else the model's rule.json, else none."),
    device: str = typer.Option(None, "--device", help="auto (default), cpu or cuda."),
    precision: str = typer.Option(
        None, "--precision",
        help="float32 (default); bfloat16 (autocast: a GPU with it, or a CPU with AMX / AVX512-BF16; faster on such a CPU, a few labels move: measure with benchmarks/bench_inference_cpu.py); auto: bfloat16 where a CPU has it natively, else float32.",
    ),
    boxes_out: Path = typer.Option(
        None, "--boxes-out", help="Also write box-guided label maps here: the student's defect pixels inside each annotated box, with the box's class."
    ),
    box_threshold: float = typer.Option(None, "--box-threshold", min=0.0, max=1.0, help="p(defect) a pixel needs inside a box (--boxes-out) [0.5]."),
    snap: str = typer.Option(None, "--snap", help="grabcut: the student's mask snapped to the image by GrabCut seeded with its own probabilities (no boxes), written to --snap-out; box-guided masks (--boxes-out) are then cut from it. none: no snapping."),
    snap_out: Path = typer.Option(None, "--snap-out", help="Also write the snapped label maps here (same layout as --out)."),
    snap_sure: float = typer.Option(None, "--snap-sure", help="--snap grabcut: p(defect) >= this is fixed defect, <= 1 - this fixed background; GrabCut settles the rest [0.9]."),
    set_: list[str] = typer.Option(None, "--set", help="Any `predict:` key, KEY=VALUE (YAML value); repeatable; wins over everything."),
    engine: str = eo.ENGINE,
    workers: int = eo.WORKERS,
    address: str = eo.ADDRESS,
    gpus_per_worker: float = eo.GPUS_PER_WORKER,
) -> None:
    """Predict defect label maps with a trained student.

    Batches: reads IMPORTED/<batch>.json, writes OUT/<batch>/labelmaps/<key>.png for the images of SPLIT,
    at each image's original size (+ OUT/<batch>/probs/<key>.npz with --probs). Folder: with --images DIR,
    writes OUT/<key>.png for every image in DIR (+ OUT/probs/<key>.npz).

    With --boxes-out ROOT (batches only), also ROOT/<batch>/labelmaps/<key>.png: every annotated box turned
    into a mask by the student (its pixels above --box-threshold, or the box's most likely pixels when none
    is), background outside the boxes: the student used as a better teacher for the annotated images.

    With --snap-out ROOT, also the label maps snapped to the image (--snap grabcut: b2p/student/snap.py), in
    the layout of --out; --out always holds the student's own maps. With --snap grabcut, the box-guided
    masks keep the snapped mask's pixels inside each box.

    A model folder with a rule.json (the deployable student, b2p/student/rules.py) gives the label maps of --out
    its decision rule (recorded in predict.json) and --window / --overlap / --tta where they are not given.

    Every image is checked first (it exists and, for batches, is the one imported); no output folder may lie
    in, or hold, the images. Each output root gets its new files only once all are built, then predict.json
    (the model's path and sha256, the settings, the maps written), so a failed run changes nothing.

    --engine ray predicts the images on Ray workers, each loading the model once (--params's `engine:` section
    sets it too); the maps are the same files, predict.json records the engine.
    """
    from b2p.student.predict import run_prediction
    from b2p.student.snap import SnapSettings, check_snap

    cfg = _predict_config(params, set_, student, batch_size, window, overlap, tta, device, precision, box_threshold, snap, snap_sure)
    batch_size, device, precision = cfg.batch_size, cfg.device, cfg.precision
    # not set anywhere: None, so that a model's rule.json (the shipped student) decides, else the defaults
    window, overlap, tta = (getattr(cfg, k) if k in cfg.model_fields_set else None for k in ("window", "overlap", "tta"))
    box_threshold, snap, snap_sure = cfg.box_threshold, cfg.snap, cfg.snap_sure
    engine_cfg = eo.engine_from_options(params, engine, workers, address, gpus_per_worker)
    check_snap(snap)
    if snap != "none" and snap_out is None and boxes_out is None:
        raise B2PError(f"--snap {snap} writes its maps to --snap-out ROOT (or shapes the box-guided ones of --boxes-out): give one")
    snap_settings = SnapSettings(sure=snap_sure)
    named = _output_roots(out, boxes_out, snap_out)
    if images is not None:
        items, inputs = _folder_items(images, out, probs, boxes_out, snap_out, named)
    else:
        items, inputs = _batch_items(model, imported, batch, split, out, probs, boxes_out, snap_out, named)
    kinds = {"--out": "student", "--boxes-out": "boxes", "--snap-out": "snapped"}
    from b2p.scale.engines import open_engine

    with open_engine(engine_cfg) as eng:
        res = run_prediction(
            model, items, tile_batch=batch_size, device=device, box_threshold=box_threshold, overlap=overlap, window=window, tta=tta,
            snap=snap, snap_settings=snap_settings, roots={kinds[opt]: r for opt, r in named.items()}, inputs=inputs,
            precision=precision, engine=eng,
        )
    typer.echo(
        f"wrote {res['images']} label maps under {out}" + (f", box-guided ones under {boxes_out}" if boxes_out else "")
        + (f", snapped ones ({snap}) under {snap_out}" if snap_out else "")
    )


def _predict_config(params, set_, student, batch_size, window, overlap, tta, device, precision, box_threshold, snap, snap_sure):
    """The `predict:` settings: defaults < --params (and its --student variant) < the options < --set; the floats given must be finite."""
    from b2p.schema import check_finite, resolve

    for value, flag in ((box_threshold, "--box-threshold"), (snap_sure, "--snap-sure"), (overlap, "--overlap")):
        if value is not None:
            check_finite(value, flag)
    return resolve(
        "predict", params,
        {"batch_size": batch_size, "window": window, "overlap": overlap, "tta": tta, "device": device, "precision": precision,
         "box_threshold": box_threshold, "snap": snap, "snap_sure": snap_sure},
        set_, student=student,
    )


def _output_roots(out: Path, boxes_out: Path | None, snap_out: Path | None) -> dict[str, Path]:
    """The output roots given, by option; each must be a folder (or not exist yet), none inside another."""
    from b2p.fileio import check_separate_folders

    named = {opt: r for opt, r in (("--out", out), ("--boxes-out", boxes_out), ("--snap-out", snap_out)) if r is not None}
    for root in named.values():
        if root.exists() and not root.is_dir():
            raise B2PError("is a file; predictions are written into a folder here", root)
    # one root inside another would read its maps as a batch folder of the other (and DVC tracks each whole)
    check_separate_folders(named, {})
    return named


def _folder_items(images: Path, out: Path, probs: bool, boxes_out: Path | None, snap_out: Path | None, named: dict[str, Path]) -> tuple[list, dict]:
    """The items of every image in the folder --images, and the inputs record; no output root may be, hold or lie in it."""
    from b2p.fileio import check_separate_folders
    from b2p.ingest.source import list_images
    from b2p.labels import check_label_map_keys
    from b2p.student.predict import items_from_folder

    if boxes_out is not None:
        raise B2PError("--boxes-out needs box annotations: use it with batches (--imported), not --images")
    check_separate_folders(named, {"--images": images})  # else the maps overwrite the images, or are read as images
    check_label_map_keys(list_images(images) if images.is_dir() else [], images)
    return items_from_folder(images, out, probs, snap_out), {"images": str(images)}


def _batch_items(model: Path, imported: Path, batch, split: str, out: Path, probs: bool, boxes_out: Path | None, snap_out: Path | None,
                 named: dict[str, Path]) -> tuple[list, dict]:
    """The items of the split's images of the chosen batches, and the inputs record; the model's classes must be the
    batches', the split not empty, no output root be, hold or lie in an input."""
    from b2p.dataset import class_list_of, input_folders, load_batches
    from b2p.fileio import check_separate_folders
    from b2p.project import resolve_batch_files
    from b2p.student.checkpoint import check_class_lists, read_checkpoint
    from b2p.student.predict import items_from_batches

    files = resolve_batch_files(imported, batch)
    ck = read_checkpoint(model)
    batches = load_batches(files)
    check_class_lists(ck["class_names"], list(class_list_of(batches).names), ck["path"])
    items = items_from_batches(files, split, out, probs, boxes_out, snap_out)
    if not items:
        raise B2PError(f"the {split} split of the chosen batches holds no images: nothing to predict")
    check_separate_folders(named, input_folders(batches), [it.image_path for it in items])
    return items, {"imported": str(imported), "batches": [f.stem for f in files], "split": split}
