"""Inference with a trained student: label maps at each image's original size (+ optional probabilities).

The sliding window (windows, blending, flips, softmax) is b2p/student/windows.py, numpy only, shared with the
ONNX runtime (b2p/deploy): here the torch network is the `forward` it calls. The network is fully
convolutional, so a window larger than the training tile sees the same scale with fewer borders and costs
fewer pixels than many overlapping tiles; an image smaller than a tile is padded, never stretched.

A model folder holding rule.json (b2p/student/rules.py: the decision rule chosen on calib and the settings it
was chosen with) has its rule applied to the label maps, its settings taken where the caller gives none.

LEGACY: models saved before issue 12 (model.pt version 1) were trained on images squashed to an
`input_size` square; they are still predicted that way (`_legacy_square_logits`), with their own statistics.

Box-guided masks (`within_boxes`): for images that carry box annotations the student can also turn each box
into a mask, the way a teacher does: the student's defect pixels inside the box, painted with the box's
class; outside every box, background. This is b2p's answer to "boxes in, pixel masks out" for the
annotated images themselves, and it is scored like a teacher (both see the same boxes).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from b2p.errors import B2PError
from b2p.fileio import sha256_file, write_bytes_atomic
from b2p.labels import label_map_key, label_map_path
from b2p.student.data import load_batch_files_for_inference
from b2p.scale.engine import Engine
from b2p.student.predict_job import ImagePrediction, PredictJob, PredictTally
from b2p.student.manifest import MANIFEST, PREDICT_FORMAT, merged_manifest, prediction_model, read_prediction_manifest, run_key  # noqa: F401 (re-exported)
from b2p.student.outputs import (  # noqa: F401 (re-exported: PredictItem, the probs files, the folder items)
    IMAGE_EXTS,
    MAP_OF,
    PROBS_SCALE,
    ROOT_OUTPUTS,
    encode_probs,
    PredictItem,
    check_roots_apart,
    commit_roots,
    default_roots,
    items_from_folder,
    outputs_of,
    read_probs,
    relative_to_root,
    staged_roots,
    write_probs,
)
from b2p.student.rules import DeploySettings, read_deploy_settings
from b2p.student.snap import GMM_COMPONENTS, SnapSettings, check_snap
from b2p.student.windows import (  # noqa: F401 (re-exported)
    DEFAULT_OVERLAP,
    DEFAULT_TILE_BATCH,
    DEFAULT_WINDOW,
    TTA_MODES,
    blend_window,
    check_overlap,
    check_tta,
    overlap_px,
)

from b2p.student.infer import (  # noqa: F401 (re-exported: the network on one image)
    PRECISIONS,
    check_precision,
    geometry_of,
    image_logits,
    inference_setup,
    predict_image,
    predict_images,
    torch_forward,
    window_for,
    window_model,
    window_of,
)


def settings_with_rule(
    deploy: DeploySettings | None, overlap: float | None, window: int | None, tta: str | None, console: Console
) -> tuple[float, int | None, str]:
    """(overlap, window, tta) of a run: those given, else rule.json's (`deploy`), else the defaults. A given one
    that differs from rule.json's is used, and said: the rule was chosen on probabilities made with rule.json's."""
    if deploy is None:
        return (DEFAULT_OVERLAP if overlap is None else overlap), window, ("none" if tta is None else tta)
    for name, given, chosen in (("overlap", overlap, deploy.overlap), ("window", window, deploy.window), ("tta", tta, deploy.tta)):
        if given is not None and given != chosen:
            console.print(f"[yellow]{name} {given} given, but the model's rule.json was chosen with {name} {chosen}: its rule may fit these probabilities less well[/]")
    return (deploy.overlap if overlap is None else overlap), (deploy.window if window is None else window), (deploy.tta if tta is None else tta)


def check_inputs(items: list[PredictItem]) -> None:
    """Every image exists and, where it was imported, is still the imported one (sha256): all are checked
    before anything is written, so a replaced image is never predicted with its old boxes."""
    from b2p.dataset import check_image_unchanged  # the check teach makes

    for it in items:
        if it.record is not None:
            check_image_unchanged(it.record)
        elif not Path(it.image_path).is_file():
            raise B2PError("image file not found", it.image_path)


def run_prediction(
    model_dir: str | Path,
    items: list[PredictItem],
    tile_batch: int = DEFAULT_TILE_BATCH,
    device: str = "auto",
    console: Console | None = None,
    progress: bool = True,
    box_threshold: float = 0.5,
    overlap: float | None = None,
    window: int | None = None,
    tta: str | None = None,
    snap: str = "none",
    snap_settings: SnapSettings | None = None,
    roots: dict[str, Path] | None = None,
    inputs: dict | None = None,
    precision: str = "float32",
    engine: Engine | None = None,
) -> dict:
    """Predict every item and write its label map (and probabilities when `probs_out` is set, the
    box-guided label map when `boxed_out` is set, and the label map snapped to the image by `snap` when
    `snapped_out` is set: snap.py; with snap "none" that map is the student's own). With a snap, the
    box-guided maps are cut from the snapped mask too. Images one at a time, `tile_batch` tiles per pass.

    `roots` ("student", "boxes", "snapped" -> folder; default: the nearest folder holding each kind's
    outputs) get their files all at once at the end, and a MANIFEST naming the model, the settings, the
    maps and `inputs` (what was predicted). Every image is checked (exists, unchanged since import) first.

    A rule.json beside the model (rules.py) gives the label maps its decision rule (recorded in the
    manifest), and the window, overlap and TTA it was chosen with where these are None; without one they
    default to DEFAULT_WINDOW / DEFAULT_OVERLAP / no TTA and the label map is the argmax.
    `engine` (b2p/scale/engine.py; default local) runs the images, each worker loading the model once.
    """
    from b2p.student.checkpoint import load_student
    from b2p.student.model import describe_backbone
    from b2p.student.train import pick_device

    console = console or Console(stderr=True)
    engine = engine or Engine()
    if tile_batch < 1:
        raise B2PError(f"tiles per forward pass must be at least 1, got {tile_batch}")
    deploy = read_deploy_settings(model_dir)
    overlap, window, tta = settings_with_rule(deploy, overlap, window, tta, console)
    check_overlap(overlap)  # refuse a bad overlap or TTA before loading anything
    check_tta(tta)
    check_snap(snap)
    check_precision(precision)
    snap_settings = snap_settings or SnapSettings()
    roots = {k: Path(v) for k, v in (roots or default_roots(items)).items()}
    for it in items:  # every output inside its root, before anything is written
        for kind in roots:
            for p in outputs_of(it, kind):
                relative_to_root(p, roots[kind])
    check_inputs(items)
    dev = pick_device(device)
    model, ck = load_student(model_dir, dev)
    model_rec = {"path": ck["path"], "sha256": sha256_file(ck["path"])}
    c = model.config
    rule = None
    if deploy is not None:
        read_deploy_settings(model_dir, ck["class_names"])  # made for this model's classes
        rule = deploy.rule
    arithmetic, used = inference_setup(model, dev, precision)
    nominal = None if c.legacy_input_size is not None else window_of(model, window)
    how = _describe_settings(c, nominal, overlap, tta, precision, used, snap, snap_settings, rule, items)
    where = dev if engine.in_process else f"{engine.workers} {engine.name} workers"
    console.print(f"student from {ck['path']}: backbone {describe_backbone(model)}; {len(items)} images on {where}; {how}")
    job = PredictJob(
        str(model_dir), device, precision, used, overlap, tile_batch, window, tta, snap, snap_settings, box_threshold,
        ["background", *ck["class_names"]], rule, loaded=(model, dev, arithmetic),
    )
    settings = _settings_by_kind(c, nominal, overlap, tta, used, rule, snap, snap_settings, box_threshold)
    tally, manifests = _predict_into_roots(engine, job, items, roots, settings, model_rec, inputs, console, progress)
    _report_run(console, tally, manifests, roots, nominal, snap, box_threshold)
    return {
        "images": len(items), "defect_pixels": tally.defect_pixels, "model": ck["path"], "boxes": tally.boxes, "boxes_rescued": tally.rescued,
        "snapped": tally.snapped, "unsnapped": tally.unsnapped, "windows": sorted(tally.windows),
    }


def _describe_settings(c, nominal: int | None, overlap: float, tta: str, precision: str, used: str, snap: str,
                       snap_settings: SnapSettings, rule, items: list[PredictItem]) -> str:
    """The run's settings in words, for its opening line."""
    how = (
        f"LEGACY square {c.legacy_input_size} px (version-1 model)"
        if c.legacy_input_size is not None
        else f"windows up to {nominal} px (trained on {c.tile_size} px tiles), overlap {overlap:g}, scale {c.scale:g}" + (f", max side {c.max_side}" if c.max_side else "")
    ) + ("" if tta == "none" else f"; TTA {tta} (x{len(TTA_MODES[tta])} the time)")
    if precision != "float32":  # what auto became, said
        how += f"; {used}" + (" (precision auto)" if precision == "auto" else " autocast")
    if snap != "none":
        how += f"; snapped to the image: {snap} (sure at p >= {snap_settings.sure:g})"
    elif any(it.snapped_out is not None for it in items):
        how += "; snap none: the snapped maps are the student's own"
    if rule is not None:
        how += f"; decision rule {rule.describe()} (rule.json)"
    return how


def _settings_by_kind(c, nominal: int | None, overlap: float, tta: str, used: str, rule, snap: str, snap_settings: SnapSettings,
                      box_threshold: float) -> dict[str, dict]:
    """The settings each root's manifest records ("student", "snapped", "boxes"): what makes their maps what they are."""
    student = {"window": nominal, "overlap": overlap, "tta": tta} if c.legacy_input_size is None else {"legacy_input_size": c.legacy_input_size, "tta": tta}
    if used != "float32":  # float32 unnamed: manifests written before the option stay the same run
        student["precision"] = used
    if rule is not None:
        student["rule"] = rule.to_dict()
    snapping = {"snap": snap, **({"snap_sure": snap_settings.sure} if snap != "none" else {})}
    return {"student": student, "snapped": {**student, **snapping}, "boxes": {**student, **snapping, "box_threshold": box_threshold}}


def _predict_into_roots(engine: Engine, job: PredictJob, items: list[PredictItem], roots: dict[str, Path], settings: dict,
                        model_rec: dict, inputs: dict | None, console: Console, progress: bool) -> tuple[PredictTally, dict]:
    """Every item predicted by the engine, its files written into the staged roots, the roots committed with their
    manifests; returns the tally and the manifests."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    tally = PredictTally()
    kind_of = {attr: kind for kind, attrs in ROOT_OUTPUTS.items() for attr in attrs}
    with staged_roots(roots) as stages:

        def write(i: int, p: ImagePrediction) -> None:
            it = items[i]
            for attr, data in p.files.items():
                path = getattr(it, attr)
                write_bytes_atomic(stages[kind_of[attr]] / relative_to_root(path, roots[kind_of[attr]]), data)
            tally.add(p)
            bar.advance(task)

        with Progress(TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, disable=not progress) as bar:
            task = bar.add_task("predict", total=len(items))
            engine.map(job, items, write)
        runs = {
            kind: {
                "model": model_rec, "settings": settings[kind], "inputs": inputs or {}, "engine": engine.record(),
                **({"probs": any(it.probs_out is not None for it in items)} if kind == "student" else {}),
                "maps": sorted(relative_to_root(getattr(it, MAP_OF[kind]), root).as_posix() for it in items if getattr(it, MAP_OF[kind]) is not None),
            }
            for kind, root in roots.items()
        }
        manifests = commit_roots(roots, stages, runs)
    return tally, manifests


def _report_run(console: Console, tally: PredictTally, manifests: dict, roots: dict[str, Path], nominal: int | None, snap: str, box_threshold: float) -> None:
    """The closing notes: windows other than asked, roots now mixing runs, rescued boxes, images left unsnapped."""
    used_windows = tally.windows
    if used_windows and used_windows != {nominal}:
        console.print(
            f"windows used: {', '.join(str(w) for w in sorted(used_windows))} px (a window never exceeds the image's "
            f"padded side at model scale; asked {nominal} px)"
        )
    for kind, m in manifests.items():
        if len({run_key(r) for r in m["runs"]}) > 1:
            console.print(
                f"[yellow]{roots[kind]} now holds maps of {len(m['runs'])} predict runs with different models or settings: "
                "predict every split again with one model before using it[/]"
            )
    if tally.boxes:
        console.print(
            f"box-guided masks for {tally.boxes} boxes; {tally.rescued} boxes had no pixel above p(defect) {box_threshold} "
            "and kept the student's best pixels in them"
        )
    if tally.unsnapped:
        console.print(
            f"snap {snap}: {tally.unsnapped} of {tally.snapped + tally.unsnapped} images kept the student's own map (fewer than "
            f"{GMM_COMPONENTS} defect or background pixels: no colour model to snap with)"
        )


def items_from_batches(
    batch_files: list[Path],
    split: str,
    out_root: str | Path,
    probs: bool,
    boxed_root: str | Path | None = None,
    snapped_root: str | Path | None = None,
) -> list[PredictItem]:
    """One item per image of `split` (all, one of splits.SPLITS or a comma-separated list of them):
    ROOT/<batch>/labelmaps/<key>.png (+ probs/<key>.npz, + BOXED_ROOT/<batch>/labelmaps/<key>.png, +
    SNAPPED_ROOT/<batch>/labelmaps/<key>.png)."""
    from b2p.splits import parse_splits

    parse_splits(split)  # refuse a bad split before reading any batch
    out = []
    for rec in load_batch_files_for_inference(batch_files, split):
        lp = label_map_path(out_root, rec.batch, rec.file_name)
        pp = Path(out_root) / rec.batch / "probs" / f"{label_map_key(rec.file_name)}.npz" if probs else None
        bp = label_map_path(boxed_root, rec.batch, rec.file_name) if boxed_root is not None else None
        sp = label_map_path(snapped_root, rec.batch, rec.file_name) if snapped_root is not None else None
        out.append(PredictItem(rec.path, lp, pp, rec.boxes_xyxy(), rec.box_class_ids(), bp, sp, record=rec))
    return out
