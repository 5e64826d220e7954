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

import contextlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from b2p.errors import B2PError
from b2p.fileio import sha256_file, write_bytes_atomic
from b2p.labels import label_map_key, label_map_path
from b2p.student import windows
from b2p.student.data import load_batch_files_for_inference, prepare_image
from b2p.student.geometry import Geometry
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
from b2p.student.rules import DecisionRule, DeploySettings, read_deploy_settings
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

# inference arithmetic: float32 (the default; the README's figures unless said), bfloat16 autocast, or auto:
# bfloat16 where a CPU has it in hardware (AMX / AVX512-BF16), float32 elsewhere. On such a CPU bfloat16
# predicts 1.4-1.9x faster than float32 and moves under 0.1 % of the argmax labels
# (benchmarks/results_bench_inference_cpu.txt)
PRECISIONS = ("float32", "bfloat16", "auto")


def within_boxes(
    p_defect: np.ndarray,
    boxes_xyxy: np.ndarray,
    class_ids: np.ndarray,
    threshold: float = 0.5,
    relative: float = 0.5,
    defect: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Box-guided label map from an HxW defect probability map; returns (label map, boxes rescued).

    Each box keeps its pixels with p(defect) > `threshold`, painted with the box's class (overlaps: the
    smaller mask wins, as for teachers). A box is an annotator's statement that a defect is there, so a box
    where the student finds nothing is never left empty: it keeps its pixels with p(defect) >= `relative`
    x the box's highest p(defect) (the student's best guess), and is counted as rescued.
    `defect` (HxW bool, e.g. the student's mask snapped to the image) replaces p(defect) > `threshold` as
    the pixels a box keeps; the rescue still ranks by p(defect).
    """
    from b2p.labels import paint_label_map
    from b2p.teach.base import box_pixel_bounds  # the same box pixels as the box teacher and box fill

    h, w = p_defect.shape
    masks, rescued = [], 0
    for box in np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4):
        xa, ya, xb, yb = box_pixel_bounds(box, (h, w))
        m = np.zeros((h, w), dtype=bool)
        inside = p_defect[ya:yb, xa:xb]
        keep = defect[ya:yb, xa:xb] if defect is not None else inside > threshold
        if inside.size and not keep.any():
            keep = inside >= relative * float(inside.max())
            rescued += 1
        m[ya:yb, xa:xb] = keep
        masks.append(m)
    return paint_label_map((h, w), masks, [int(c) for c in class_ids]), rescued


def window_model(model: torch.nn.Module) -> windows.WindowModel:
    return windows.WindowModel.of_config(model.config)


def window_of(model: torch.nn.Module, window: int | None = None) -> int:
    """The prediction window side (model px) of `model`: windows.WindowModel.nominal_window."""
    return window_model(model).nominal_window(window)


def window_for(model: torch.nn.Module, window: int | None, height: int, width: int) -> int:
    """The window an HxW image is predicted in: windows.WindowModel.window_for."""
    return window_model(model).window_for(window, height, width)


def geometry_of(model: torch.nn.Module, height: int, width: int) -> Geometry:
    """The geometry `model` was trained in, for an HxW image."""
    return window_model(model).geometry(height, width)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise B2PError(f"inference precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def inference_setup(model: torch.nn.Module, device: torch.device, precision: str = "float32") -> tuple[contextlib.AbstractContextManager, str]:
    """(the context to run the model in, the precision it runs at: float32 or bfloat16) for `precision`.

    On a CPU the model goes NHWC (channels_last): oneDNN's convolutions are faster in that layout and give the
    same logits up to float rounding (about 1e-5). bfloat16 where it would be emulated (a CPU without it in
    hardware: slower than float32) or unsupported (an older GPU) is refused; `auto` takes float32 there."""
    from b2p.student.train import cpu_native_bf16

    check_precision(precision)
    if device.type == "cpu":
        model.to(memory_format=torch.channels_last)
        native = cpu_native_bf16()
        where = "this CPU has no native bfloat16 (AMX or AVX512-BF16)"
    else:
        native = device.type == "cuda" and torch.cuda.is_bf16_supported()
        where = f"{device} has no bfloat16"
    if precision == "bfloat16" and not native:
        raise B2PError(f"bfloat16 inference asked for, but {where}; use float32 or auto")
    if precision == "float32" or (precision == "auto" and (device.type != "cpu" or not native)):
        return contextlib.nullcontext(), "float32"
    return torch.autocast(device.type, dtype=torch.bfloat16), "bfloat16"


def torch_forward(model: torch.nn.Module, device: torch.device | str) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """The network as windows.py calls it: normalised windows (+ their edge distances) in, fine logits out."""

    @torch.no_grad()
    def forward(tiles: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(tiles).to(device)
        edges = (torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device))
        return model(x, edges=edges)["fine"].float().cpu().numpy()

    return forward


def image_logits(
    model: torch.nn.Module,
    img: np.ndarray,
    device: torch.device | str = "cpu",
    overlap: float = DEFAULT_OVERLAP,
    tile_batch: int = DEFAULT_TILE_BATCH,
    window: int | None = None,
    tta: str = "none",
) -> np.ndarray:
    """Fine-head logits (K+1)xHxW float32 of an HxWx3 uint8 RGB image, at the image's size (windows.image_logits;
    a version-1 model: its square input)."""
    c = model.config
    if c.legacy_input_size is None:
        return windows.image_logits(torch_forward(model, device), img, window_model(model), overlap, tile_batch, window, tta)
    windows.check_image(img)
    views = TTA_MODES[check_tta(tta)]
    acc = _legacy_square_logits(model, img, device)
    for axes in views[1:]:
        acc += np.flip(_legacy_square_logits(model, np.ascontiguousarray(np.flip(img, axis=axes)), device), axis=tuple(a + 1 for a in axes))
    if len(views) > 1:
        acc /= np.float32(len(views))
    return acc


@torch.no_grad()
def _legacy_square_logits(model: torch.nn.Module, img: np.ndarray, device: torch.device | str) -> np.ndarray:
    """LEGACY (model.pt version 1): the image squashed to the `legacy_input_size` square (data.prepare_image),
    as those models were trained, logits resized back to the image (bilinear). Kept only so old models
    still predict as trained; new models never take this path."""
    from b2p.student.geometry import resize_bilinear

    c = model.config
    x = prepare_image(img, c.legacy_input_size, c.mean, c.std)[None].to(device)
    lg = model(x)["fine"].float()[0].cpu().numpy()
    return resize_bilinear(lg, img.shape[:2])


def _torch_exp_(x: np.ndarray) -> None:
    torch.from_numpy(x).exp_()  # in place on the numpy array: the exp b2p predict has always used


def predict_image(
    model: torch.nn.Module,
    img: np.ndarray,
    device: torch.device | str = "cpu",
    overlap: float = DEFAULT_OVERLAP,
    tile_batch: int = DEFAULT_TILE_BATCH,
    window: int | None = None,
    tta: str = "none",
    rule: DecisionRule | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(label map HxW uint8, class probabilities (K+1)xHxW float32) of an HxWx3 uint8 RGB image; the label map
    is the argmax, or `rule`'s (rules.py)."""
    p = windows.softmax_(image_logits(model, img, device, overlap, tile_batch, window, tta), exp=_torch_exp_)
    labels = windows.class_map(p) if rule is None else rule.label_map(p, img)[0]
    return labels, p


def predict_images(
    model: torch.nn.Module,
    images: list[np.ndarray],
    device: torch.device | str = "cpu",
    overlap: float = DEFAULT_OVERLAP,
    tile_batch: int = DEFAULT_TILE_BATCH,
    window: int | None = None,
    tta: str = "none",
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Predict HxWx3 uint8 RGB images of any sizes, one after the other (see `predict_image`).

    Returns (label maps HxW uint8, class probabilities (K+1)xHxW float32), at each image's own size.
    """
    out = [predict_image(model, im, device, overlap, tile_batch, window, tta) for im in images]
    return [o[0] for o in out], [o[1] for o in out]


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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
    legacy = c.legacy_input_size is not None
    nominal = None if legacy else window_of(model, window)
    how = (
        f"LEGACY square {c.legacy_input_size} px (version-1 model)"
        if legacy
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
    where = dev if engine.in_process else f"{engine.workers} {engine.name} workers"
    console.print(f"student from {ck['path']}: backbone {describe_backbone(model)}; {len(items)} images on {where}; {how}")
    job = PredictJob(
        str(model_dir), device, precision, used, overlap, tile_batch, window, tta, snap, snap_settings, box_threshold,
        ["background", *ck["class_names"]], rule, loaded=(model, dev, arithmetic),
    )
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
        n_defect_px, n_boxes, rescued, n_snapped, n_unsnapped = tally.defect_pixels, tally.boxes, tally.rescued, tally.snapped, tally.unsnapped
        used_windows = tally.windows
        student = {"window": nominal, "overlap": overlap, "tta": tta} if not legacy else {"legacy_input_size": c.legacy_input_size, "tta": tta}
        if used != "float32":  # float32 unnamed: manifests written before the option stay the same run
            student["precision"] = used
        if rule is not None:
            student["rule"] = rule.to_dict()
        snapping = {"snap": snap, **({"snap_sure": snap_settings.sure} if snap != "none" else {})}
        settings = {"student": student, "snapped": {**student, **snapping}, "boxes": {**student, **snapping, "box_threshold": box_threshold}}
        runs = {
            kind: {
                "model": model_rec, "settings": settings[kind], "inputs": inputs or {}, "engine": engine.record(),
                **({"probs": any(it.probs_out is not None for it in items)} if kind == "student" else {}),
                "maps": sorted(relative_to_root(getattr(it, MAP_OF[kind]), root).as_posix() for it in items if getattr(it, MAP_OF[kind]) is not None),
            }
            for kind, root in roots.items()
        }
        manifests = commit_roots(roots, stages, runs)
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
    if n_boxes:
        console.print(
            f"box-guided masks for {n_boxes} boxes; {rescued} boxes had no pixel above p(defect) {box_threshold} "
            "and kept the student's best pixels in them"
        )
    if n_unsnapped:
        console.print(
            f"snap {snap}: {n_unsnapped} of {n_snapped + n_unsnapped} images kept the student's own map (fewer than "
            f"{GMM_COMPONENTS} defect or background pixels: no colour model to snap with)"
        )
    return {
        "images": len(items), "defect_pixels": n_defect_px, "model": ck["path"], "boxes": n_boxes, "boxes_rescued": rescued,
        "snapped": n_snapped, "unsnapped": n_unsnapped, "windows": sorted(used_windows),
    }


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
