"""Training the student on teacher pseudo-masks (METHOD.md "Training").

AdamW (lr 5e-4, wd 1e-2) over the trainable parameters, cosine schedule over all steps, gradient clipping
1.0, an EMA of the weights (0.999) used for validation and saved, mixed precision on a GPU (and, with
cpu_bf16, bfloat16 on a CPU that has it in hardware; on a CPU the model and its inputs are NHWC). Training
sees square tiles at the training scale (data.py, geometry.py); validation sees whole val images in the
same geometry, scored at each image's own size. The saved epoch follows `select` (selection.py; default `box`,
a teacher-free score), and early stopping watches the same score. With a frozen backbone, the features of
each whole (flipped) model-space image are computed once and cached; a tile cuts its share out of them,
so an epoch costs only the decoder.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from b2p.errors import B2PError
from b2p.fileio import check_separate_folders, staged_dirs, write_bytes_atomic, write_json_atomic
from b2p.student.checkpoint import MODEL_FILE, save_checkpoint
from b2p.student.data import (
    AUGMENTATIONS,
    FeatureCache,
    StudentDataset,
    TileSampling,
    backbone_fingerprint,
    collate,
    crop_features,
    feature_view_key,
    gather_samples,
    same_size_batches,
)
from b2p.student import windows
from b2p.student.geometry import IGNORE, Geometry
from b2p.student.losses import LossParams, StudentLoss
from b2p.student.model import StudentConfig, build_model, class_map, count_params, describe_backbone
from b2p.student.selection import RULES_DIR, SELECT_RULES, BoxFitScore, rule_score


@dataclass
class TrainParams:
    """The `train:` section of params.yaml (CLI options override)."""

    arch: str = "b2p"  # b2p (the Boxes2Pixels student) | unet (the paper's from-scratch baseline)
    backbone: str = "efficientnet_lite0"  # efficientnet_lite0 (embedded weights) | dinov2_s / _b / _l / _g (the paper's: dinov2_s)
    weights: str | None = None  # backbone weight source; "random" only when asked (tests, ablations)
    allow_download: bool = False  # let a hub id download backbone weights (offline by default)
    adaptation: str = "bitfit"  # bitfit (only bias / norm parameters train: the paper) | frozen (features cached) | full
    taps: list[int] | None = None  # backbone blocks the decoder taps (null: the backbone's default)
    detail_branch: bool = True  # the CNN on the raw image beside the decoder
    binary_head: bool = True  # the binary defect head (asymmetric Dice) beside the fine head
    scale: float = 1.0  # model px per image px (1.0 = native resolution: a 2 px crack stays 2 px)
    max_side: int | None = None  # a cap on the longer scaled side, for huge frames (null: none)
    tile_size: int | None = None  # the square training tile at model scale (null: 256 rounded to the backbone's multiple; at most the largest image)
    box_crop_fraction: float = 0.5  # share of the tiles centred (with jitter) on a random box; the rest anywhere
    crops_per_image: int = 1  # tiles per image per epoch
    decoder_dim: int | None = None  # decoder channels (null: 256 for DINOv2, the paper's; 128 for EfficientNet-Lite0)
    decoder: str = "full"  # full (the paper's) | lite (about a quarter of its cost; model.py)
    refine: bool = False  # a full-resolution correction of the logits from the image (thin defects; model.py)
    context: str = "none"  # none (the paper's) | strip (row / column / image means join the decoder; model.py)
    edges: bool = False  # with a strip context: distances to the image's edges join it (model.py StripContext)
    unet_base: int = 32  # the U-Net's first-level channels
    dinov2_config: dict | None = None  # tiny random DINOv2 for tests
    epochs: int = 200  # training epochs (the paper: 200)
    batch_size: int = 1  # tiles per step, the global batch (the paper: 1)
    lr: float = 5e-4  # AdamW learning rate, cosine schedule
    weight_decay: float = 1e-2  # AdamW weight decay
    grad_clip: float = 1.0  # gradient norm clip
    ema_decay: float = 0.999  # EMA of the weights (validated and saved)
    ema_warmup: bool = True  # decay min(d, (1+t)/(10+t)): short runs still get a useful EMA
    patience: int = 25  # stop after this many epochs without a better kept-epoch score
    select: str = "box"  # box (teacher-free, default) | pseudo (val mIoU vs pseudo-masks) | last (selection.py)
    # also write OUT/rules/<rule>.pt for every other rule that keeps a different epoch; metrics.json lists
    # every rule's epoch in any case
    keep_rule_models: bool = False
    seed: int = 42  # the training seed (the recipe passes base.seed)
    amp: bool = True  # only on a GPU
    cpu_bf16: bool = False  # bfloat16 autocast on a CPU that has it natively (AMX / AVX512-BF16: cpu_native_bf16)
    device: str = "auto"  # auto | cpu | cuda
    feature_cache: str = "auto"  # auto (frozen backbone -> memory) | memory | disk | off
    cache_dir: str | None = None  # where `disk` keeps features (default data/cache/features)
    num_workers: int = 0  # data-loader worker processes
    # training processes (torch.distributed, b2p/scale/distributed.py): the global batch is batch_size, cut
    # among them; 1 = this process (torchrun's WORLD_SIZE, when set, says how many instead)
    processes: int = 1
    augment: str = "none"  # none | flips (random left-right and up-down flips of the training images)
    dice_beta: float = 0.4  # asymmetric Dice of the binary head: false positives cost beta (the paper: 0.4)
    bg_weight: float = 0.4  # cross-entropy weight of background (the paper's code: 0.4)
    defect_weight: float = 4.0  # cross-entropy weight of each defect class (the paper's code: 4.0)
    # per defect class: defect_weight x (mean share / class share) ** class_balance, the shares counted in the
    # train split's teacher masks (0 = every defect class alike, the paper; 0.5 = inverse square root)
    class_balance: float = 0.0
    tau: float = 0.9  # self-correction: a background label flips to a defect class the student is this sure of
    self_correction: bool = True  # one-sided online self-correction of the fine head's targets
    warmup_epochs: int = 0  # epochs before self-correction starts
    self_correction_region: str = "all"  # all (the paper) | boxes (only inside boxes: outside them is background)
    outside_box_bg_weight: float = 1.0  # weight of background pixels outside every box
    w_binary: float = 0.5  # weight of the binary head's loss
    w_fine: float = 0.5  # weight of the fine head's loss
    pseudo_labels: str = "teacher"  # teacher | partial (boxes only: inside a box "background or its class")
    proj_weight: float = 0.0  # BoxInst projection loss: the mask touches every row and column of its box
    pairwise_weight: float = 0.0  # BoxInst pairwise loss: similar-colour neighbours inside a box agree
    pairwise_threshold: float = 0.3  # CIELab similarity exp(-||dLab||/2) from which a pair counts
    pairwise_dilation: int = 2  # neighbour distance (px, model space)
    pairwise_warmup: int = 0  # epochs over which the pairwise weight ramps up from 0

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path | None = None) -> TrainParams:
        known = {f.name for f in fields(cls)}
        d = dict(d)
        if "input_size" in d:  # params and checkpoints from before tiles: the square side becomes the tile side
            if d.get("tile_size") is not None:
                raise B2PError("train.input_size (old name) and train.tile_size are both set; keep only tile_size", source)
            d["tile_size"] = d.pop("input_size")
        unknown = sorted(set(d) - known)
        if unknown:
            raise B2PError(f"unknown train parameters {unknown}; known: {sorted(known)}", source)
        try:
            return cls(**d)
        except B2PError as e:  # name the params files
            raise B2PError(e.problem, source) from None

    def __post_init__(self) -> None:
        # checked here, before any model is built
        if self.augment not in AUGMENTATIONS:
            raise B2PError(f"train.augment must be one of {list(AUGMENTATIONS)}, got {self.augment!r}")
        if self.select not in SELECT_RULES:
            raise B2PError(f"train.select must be one of {list(SELECT_RULES)}, got {self.select!r}")
        if not 0.0 <= self.box_crop_fraction <= 1.0:
            raise B2PError(f"train.box_crop_fraction must be in [0, 1], got {self.box_crop_fraction}")
        if self.crops_per_image < 1:
            raise B2PError(f"train.crops_per_image must be at least 1, got {self.crops_per_image}")

    def loss_params(self) -> LossParams:
        names = {f.name for f in fields(LossParams)}
        return LossParams(**{k: v for k, v in asdict(self).items() if k in names})

    def student_config(self, num_classes: int) -> StudentConfig:
        names = {f.name for f in fields(StudentConfig)} - {"num_classes"}
        return StudentConfig(num_classes=num_classes, **{k: v for k, v in asdict(self).items() if k in names})


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise B2PError("device 'cuda' asked for, but no CUDA GPU is available here")
    return torch.device(name)


def cpu_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (Linux /proc/cpuinfo flags amx_bf16 / avx512_bf16).
    Elsewhere torch emulates it, slower than float32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split(":", 1)[-1].split()}
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def cpu_layout(x, device: torch.device):
    """A tensor (or a list of them, or None) in NHWC layout on a CPU, where oneDNN's convolutions are faster in
    it (about 10% of a training step: benchmarks/bench_cpu_step.py); unchanged on a GPU. The model is
    converted alike (train_student)."""
    if device.type != "cpu" or x is None:
        return x
    if isinstance(x, (list, tuple)):
        return [cpu_layout(t, device) for t in x]
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


class EMA:
    """Exponential moving average of the trainable parameters and all buffers of a model."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self._pairs = [
            (pe, p) for pe, p in zip(self.model.parameters(), model.parameters()) if p.requires_grad
        ]
        self._buffers = list(zip(self.model.buffers(), model.buffers()))

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        if self._pairs:  # one call for all parameters, not hundreds of small ones
            torch._foreach_lerp_([pe for pe, _ in self._pairs], [p.detach() for _, p in self._pairs], 1.0 - d)
        for be, b in self._buffers:
            if be.dtype.is_floating_point:
                be.lerp_(b, 1.0 - d)
            else:
                be.copy_(b)


def balanced_class_weights(samples, num_classes: int, bg_weight: float, defect_weight: float, power: float) -> torch.Tensor:
    """Cross-entropy weights [bg, c1..cK]: defect class c gets defect_weight x (mean share / share_c) ** power, its
    share of the defect pixels in the samples' teacher label maps, the ratio clipped to [1/10, 10] and the weights
    rescaled so that their pixel-weighted mean stays defect_weight (the defect / background balance is kept).
    Classes without a pixel keep defect_weight. Why: on Magnetic-Tile "uneven" is about 90 % of the defect
    pixels and a student with equal weights never predicts crack, blowhole or fray."""
    from b2p.labels import read_label_map

    counts = np.zeros(num_classes, np.int64)
    for smp in samples:
        lm = read_label_map(smp.label_path, (smp.record.height, smp.record.width), num_classes - 1)
        counts += np.bincount(lm.ravel(), minlength=num_classes)[:num_classes]
    defect = counts[1:].astype(np.float64)
    w = np.full(num_classes - 1, float(defect_weight))
    present = defect > 0
    if present.sum() > 1:
        share = defect[present] / defect[present].sum()
        ratio = np.clip((share.mean() / share) ** power, 0.1, 10.0)
        ratio /= (ratio * share).sum()  # pixel-weighted mean 1
        w[present] = defect_weight * ratio
    return torch.tensor([float(bg_weight), *w.tolist()], dtype=torch.float32)


def train_student(
    batch_files: list[Path],
    teacher_root: str | Path,
    out_dir: str | Path,
    params: TrainParams,
    console: Console | None = None,
    progress: bool = True,
) -> dict | None:
    """Train, validate, and write OUT/model.pt, OUT/metrics.json, OUT/curves.csv (and OUT/rules/); returns
    metrics.json's dict. OUT is replaced whole once they are all written (`_check_model_folder`).

    On several processes (`params.processes`, started here; or torchrun's): b2p/scale/distributed.py. Rank 0
    writes and returns the metrics, the other ranks return None."""
    from b2p.scale import distributed as D

    ranks = D.torchrun_ranks()
    if ranks is not None and ranks.world > 1:
        if params.processes not in (1, ranks.world):
            raise B2PError(f"train.processes is {params.processes}, but the launcher started {ranks.world} processes")
        device = D.rank_device(pick_device(params.device), ranks)
        with D.process_group(ranks, device):
            return _train(batch_files, teacher_root, out_dir, params, console, progress, ranks, device)
    if params.processes > 1:
        from b2p.scale.engine import cpu_count, oversubscription_warning

        D.check_global_batches(0, params.batch_size, params.processes)  # before any process starts

        device = pick_device(params.device)
        if device.type == "cpu":
            text = oversubscription_warning(params.processes, 1, cpu_count(), "training processes")
            if text:
                (console or Console(stderr=True)).print(f"[bold yellow]warning:[/] {text}", highlight=False)
        elif torch.cuda.device_count() < params.processes:
            raise B2PError(f"train.processes {params.processes} on GPUs needs as many GPUs, this machine has {torch.cuda.device_count()}")
        return D.spawn(_spawned_rank, params.processes, (batch_files, teacher_root, out_dir, params, progress))
    return _train(batch_files, teacher_root, out_dir, params, console, progress, D.Ranks(), pick_device(params.device))


def _spawned_rank(ranks, init_method: str, batch_files, teacher_root, out_dir, params: TrainParams, progress: bool) -> dict | None:
    """One process that `train_student` started: its share of the CPU threads, its GPU, the process group."""
    from b2p.scale import distributed as D
    from b2p.scale.engine import cpu_count

    device = D.rank_device(pick_device(params.device), ranks)
    if device.type == "cpu":
        torch.set_num_threads(max(1, cpu_count() // ranks.world))
    with D.process_group(ranks, device, init_method):
        return _train(batch_files, teacher_root, out_dir, params, None, progress, ranks, device)


def _train(batch_files, teacher_root, out_dir, params: TrainParams, console: Console | None, progress: bool, ranks, device: torch.device) -> dict | None:
    """train_student on this process: alone, or as rank `ranks.rank` of a process group."""
    console = console or Console(stderr=True, quiet=not ranks.main)
    progress = progress and ranks.main
    out_dir = Path(out_dir)
    run = _set_up(batch_files, teacher_root, out_dir, params, console, ranks, device)
    kept = _fit(run, progress)
    if not ranks.main:
        return None
    seconds = time.perf_counter() - run.t_start
    metrics = _metrics(run, kept, seconds)
    _save(run, kept, metrics, out_dir)
    _report_saved(run, kept, metrics, out_dir, seconds)
    return metrics


@dataclass
class _Run:
    """One training's pieces, from its setup (`_set_up`) through its epochs (`_fit`) to its saving (`_save`)."""

    params: TrainParams
    config: StudentConfig
    ranks: Any
    device: torch.device
    console: Console
    t_start: float
    train_samples: list
    val_samples: list
    num_classes: int
    class_names: list[str]
    model: torch.nn.Module
    provenance: dict
    loss_fn: StudentLoss
    val_loss_fn: StudentLoss
    cache: FeatureCache | None
    ds_train: StudentDataset
    ds_val: StudentDataset
    dl_train: Any
    dl_val: Any
    trainable: list
    opt: torch.optim.Optimizer
    sched: Any
    ema: EMA
    use_amp: bool
    amp_dtype: torch.dtype
    precision: str
    scaler: Any

    def features(self, batch: dict, ds: StudentDataset) -> list[torch.Tensor] | None:
        """Cached backbone features of the batch's tiles (None without a cache: the model computes them)."""
        if self.cache is None:
            return None
        size = tuple(batch["target"].shape[-2:])
        per = []
        for i, code, (oy, ox) in zip(batch["index"].tolist(), batch["flip"].tolist(), batch["origin"].tolist()):
            geo = ds.geometry(i)
            key = feature_view_key(ds.samples[i].record.sha256, geo, ds.min_side, code)
            whole = self.cache.get(key)
            if whole is None:
                with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                    fresh = self.model.backbone_features(ds.model_image(i, code)[None].to(self.device))
                self.cache.put(key, [f[0] for f in fresh])
                whole = self.cache.get(key)
            per.append(crop_features(whole, (oy, ox), size, geo.padded_size(ds.min_side)))
        return [torch.stack([p[t] for p in per]).to(self.device, torch.float32) for t in range(len(per[0]))]


def _set_up(batch_files, teacher_root, out_dir: Path, params: TrainParams, console: Console, ranks, device: torch.device) -> _Run:
    """The checks, the seed, the splits, the model, its losses, feature cache, loaders and optimiser, in that order."""
    from b2p.dataset import input_folders, load_batches

    check_separate_folders({"--out": out_dir}, {"--teacher-root": teacher_root, **input_folders(load_batches(batch_files))})
    _check_model_folder(out_dir)
    t_start = time.perf_counter()
    seed_everything(params.seed)
    train_samples, val_samples, num_classes, class_names = _splits(batch_files, teacher_root, console)
    config = params.student_config(num_classes)
    model, provenance = _build_student(config, params, train_samples, val_samples, ranks, device, console)
    loss_fn, val_loss_fn = _losses(params, config, num_classes, train_samples, ranks, console)
    _check_select(params.select, val_samples)
    if params.loss_params().uses_boxes:
        lp = params.loss_params()
        console.print(f"box supervision: pseudo_labels {lp.pseudo_labels}, projection x{lp.proj_weight}, pairwise x{lp.pairwise_weight}")
    cache = _feature_cache(model, params, config, console)
    ds_train, ds_val, dl_train, dl_val = _loaders(params, config, num_classes, train_samples, val_samples, cache, ranks)
    trainable, opt, sched, ema = _optimiser(model, params, len(dl_train))
    use_amp, amp_dtype, precision = _precision(params, device, console)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    return _Run(
        params, config, ranks, device, console, t_start, train_samples, val_samples, num_classes, class_names,
        model, provenance, loss_fn, val_loss_fn, cache, ds_train, ds_val, dl_train, dl_val,
        trainable, opt, sched, ema, use_amp, amp_dtype, precision, scaler,
    )


def _splits(batch_files, teacher_root, console: Console) -> tuple[list, list, int, list[str]]:
    """The train and val samples, the class count and names; an empty train split is an error."""
    from b2p.dataset import class_list_of, load_batches

    train_samples, num_classes = gather_samples(batch_files, teacher_root, ("train",))
    val_samples, _ = gather_samples(batch_files, teacher_root, ("val",))
    class_names = list(class_list_of(load_batches(batch_files)).names)
    if not train_samples:
        raise B2PError(f"the train split of batches {[p.stem for p in batch_files]} is empty: nothing to train on")
    if not val_samples:
        console.print(
            "[bold yellow]warning:[/] the val split is empty: no validation, no early stopping; "
            "the EMA model after the last epoch is saved"
        )
    return train_samples, val_samples, num_classes, class_names


def _build_student(config: StudentConfig, params: TrainParams, train_samples, val_samples, ranks, device: torch.device, console: Console) -> tuple[torch.nn.Module, dict]:
    """The model on its device (tiles no larger than the largest image, BatchNorm across ranks, NHWC on a CPU) and its provenance."""
    from b2p.scale import distributed as D

    largest = max(max(Geometry.for_image(s.record.height, s.record.width, config.scale, config.max_side, config.multiple).padded_size()) for s in train_samples)
    if largest < config.tile_size:  # a tile larger than every image is mostly padding: the same images, less work
        console.print(f"tiles of {largest} px instead of {config.tile_size}: no training image is larger at this scale")
        config.tile_size = largest
    model = build_model(config, weights=params.weights, allow_download=params.allow_download).to(device)
    if ranks.active:  # BatchNorm on the global batch's statistics (what one process would see)
        model = D.convert_batchnorm(model)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)  # the inputs follow (cpu_layout)
    provenance = dict(model.provenance)
    pc = count_params(model)
    console.print(f"[bold]student[/]: {config.arch}, backbone {describe_backbone(model)}")
    if not provenance.get("pretrained", False) and config.arch == "b2p":
        console.print("[bold yellow]warning:[/] the backbone has RANDOM weights (explicitly requested); results are not those of a pretrained model")
    geom = f"scale {config.scale:g}" + (f", longer side <= {config.max_side}" if config.max_side else "")
    console.print(
        f"parameters: {pc['total'] / 1e6:.2f} M total, {pc['trainable'] / 1e6:.2f} M trainable "
        f"({config.adaptation}); {len(train_samples)} train / {len(val_samples)} val images at {geom}, "
        f"{config.tile_size} px tiles x {params.crops_per_image} per image, on {device}"
    )
    return model, provenance


def _losses(params: TrainParams, config: StudentConfig, num_classes: int, train_samples, ranks, console: Console) -> tuple[StudentLoss, StudentLoss]:
    """The training loss (summed across ranks; class weights with class_balance) and rank 0's validation loss."""
    from b2p.scale import distributed as D

    loss_fn = StudentLoss(params.loss_params(), num_classes, config.mean, config.std, reduce=D.sum_across if ranks.active else None)
    if params.class_balance > 0:
        loss_fn.class_weights = balanced_class_weights(train_samples, num_classes, params.bg_weight, params.defect_weight, params.class_balance)
        console.print("class weights (balanced x" + f"{params.class_balance:g}): " + ", ".join(f"{w:.2f}" for w in loss_fn.class_weights.tolist()))
    val_loss_fn = copy.copy(loss_fn)  # rank 0 validates alone: its loss is summed over its own images only
    val_loss_fn.reduce = None
    if params.loss_params().self_correction_region == "boxes":
        console.print("self-correction restricted to pixels inside boxes")
    return loss_fn, val_loss_fn


def _check_select(select: str, val_samples) -> None:
    """The `box` rule scores val images against their boxes: refuse a val split without any."""
    if select == "box" and val_samples and not any(len(s.record.boxes) for s in val_samples):
        raise B2PError("train.select 'box' scores val images against their boxes, but the val split has no box; use select: pseudo or last")


def _feature_cache(model: torch.nn.Module, params: TrainParams, config: StudentConfig, console: Console) -> FeatureCache | None:
    """With a frozen backbone, the cache of whole-image features (once per view, tiles cut from them); else None."""
    mode = params.feature_cache
    if mode not in ("auto", "memory", "disk", "off"):
        raise B2PError(f"feature_cache must be auto, memory, disk or off, got {mode!r}")
    if getattr(model, "backbone_frozen", False) and mode != "off":
        disk = (params.cache_dir or "data/cache/features") if mode == "disk" else None
        cache = FeatureCache(backbone_fingerprint(model), disk)
        console.print(f"frozen backbone: features are cached ({'disk ' + str(disk) if disk else 'memory'})")
        return cache
    if mode in ("memory", "disk"):
        console.print(f"[yellow]note:[/] feature cache {mode!r} ignored: the backbone is not frozen (adaptation={config.adaptation})")
    return None


def _loaders(params: TrainParams, config: StudentConfig, num_classes: int, train_samples, val_samples, cache, ranks) -> tuple:
    """The train dataset of random tiles and the val dataset of whole images, and their loaders (this rank's share on several)."""
    from b2p.scale import distributed as D

    g = torch.Generator().manual_seed(params.seed)
    # cached features are cut exactly only on the backbone's stride grid; without a cache any origin will do
    sampling = TileSampling(config.tile_size, params.box_crop_fraction, params.crops_per_image, config.multiple if cache else 1)
    view = dict(mean=config.mean, std=config.std, num_classes=num_classes, scale=config.scale, max_side=config.max_side, multiple=config.multiple)
    ds_train = StudentDataset(train_samples, sampling=sampling, augment=params.augment, **view)
    ds_val = StudentDataset(val_samples, min_side=config.tile_size, **view)
    if ranks.active:  # the global batches of one process; this rank builds its share of each
        D.check_global_batches(len(ds_train), params.batch_size, ranks.world)
        if params.loss_params().proj_weight > 0 or params.loss_params().pairwise_weight > 0:
            raise B2PError("the box projection and pairwise losses train on one process only: set train.processes 1")
        global_batches = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(ds_train, generator=g), params.batch_size, drop_last=False)
        dl_train = torch.utils.data.DataLoader(
            ds_train, batch_sampler=D.RankBatches(global_batches, ds_train.draw, ranks), generator=g, num_workers=params.num_workers, collate_fn=collate
        )
    else:
        dl_train = torch.utils.data.DataLoader(
            ds_train, batch_size=params.batch_size, shuffle=True, generator=g, num_workers=params.num_workers, collate_fn=collate
        )
    dl_val = torch.utils.data.DataLoader(
        ds_val, batch_sampler=same_size_batches(ds_val, params.batch_size), num_workers=params.num_workers, collate_fn=collate
    )
    return ds_train, ds_val, dl_train, dl_val


def _optimiser(model: torch.nn.Module, params: TrainParams, steps_per_epoch: int) -> tuple:
    """The trainable parameters, AdamW over them, its cosine schedule over all steps, and the EMA of the weights."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    # foreach: a few calls per step for all parameters, not a few per parameter (torch picks it only on a GPU)
    opt = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay, foreach=True)
    total_steps = max(1, params.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    ema = EMA(model, params.ema_decay, params.ema_warmup)
    return trainable, opt, sched, ema


def _precision(params: TrainParams, device: torch.device, console: Console) -> tuple[bool, torch.dtype, str]:
    """Whether to autocast, to which dtype, and its name: mixed precision on a GPU, bfloat16 on a CPU with cpu_bf16 where native."""
    use_amp = params.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and params.cpu_bf16:
        if cpu_native_bf16():
            use_amp, amp_dtype = True, torch.bfloat16
        else:  # emulated bfloat16 is slower than float32: say so rather than crawl
            console.print("[yellow]note:[/] train.cpu_bf16 ignored: this CPU has no native bfloat16 (AMX or AVX512-BF16); float32")
    precision = ("bfloat16" if amp_dtype == torch.bfloat16 else "float16") + " autocast" if use_amp else "float32"
    if use_amp and device.type == "cpu":
        console.print(f"precision: {precision} (train.cpu_bf16)")
    return use_amp, amp_dtype, precision


@dataclass
class _Kept:
    """What the epochs keep: the curves, the selected epoch (its val scores and EMA weights), every other rule's epoch."""

    select: str
    curves: list[dict] = field(default_factory=list)
    best: dict | None = None
    best_state: dict | None = None
    best_score: float | None = None
    best_epoch: int = -1
    since_best: int = 0
    epochs_run: int = 0
    # what every other rule would keep: {rule: {"epoch", "score", "state"}} (state only with keep_rule_models)
    others: dict[str, dict] = field(default_factory=dict)

    def note_other_rules(self, epoch: int, val: dict | None, ema_model: torch.nn.Module, keep_rule_models: bool) -> None:
        """Each other rule's best epoch so far (and its EMA weights with keep_rule_models)."""
        if val is None:
            return
        for rule in (r for r in SELECT_RULES if r != self.select):
            sc, o = rule_score(rule, val), self.others.get(rule)
            if o is None or sc is None or sc > o["score"]:
                keep = keep_rule_models and rule != "last"  # `last`: the final EMA state, taken at the end
                state = _state(ema_model) if keep else None
                self.others[rule] = {"epoch": epoch + 1, "score": sc, "state": state}

    def note_epoch(self, epoch: int, row: dict, val: dict | None, score: float | None, ema_model: torch.nn.Module) -> None:
        """The epoch's curves row; its weights when its score beats the best (or there is no score)."""
        self.curves.append(row)
        self.epochs_run = epoch + 1
        if score is None or self.best_score is None or score > self.best_score:
            self.best, self.best_score, self.best_epoch, self.since_best = val, score, epoch + 1, 0
            self.best_state = _state(ema_model)
        else:
            self.since_best += 1


def _fit(run: _Run, progress: bool) -> _Kept:
    """The epochs: train, validate (rank 0), keep the selected epoch and each rule's, stop early when the score stalls."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from b2p.scale import distributed as D

    params, select = run.params, run.params.select
    val_truth = [run.ds_val.read(i)[1] for i in range(len(run.ds_val))] if run.ranks.main else []  # teacher label maps at each image's own size
    kept = _Kept(select)
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=run.console, disable=not progress, transient=False) as bar:
        task = bar.add_task("train", total=params.epochs, info="")
        for epoch in range(params.epochs):
            t_ep = time.perf_counter()
            row = _train_epoch(run, epoch, t_ep)
            val = _validate_epoch(run, val_truth, row)
            score = rule_score(select, val)
            kept.note_other_rules(epoch, val, run.ema.model, params.keep_rule_models)
            row["select_score"] = score
            row["seconds"] = time.perf_counter() - t_ep  # train + val
            kept.note_epoch(epoch, row, val, score, run.ema.model)
            info = f"loss {row.get('train_loss', float('nan')):.4f}" + (f"  val {select} {score:.4f}" if score is not None else "")
            bar.update(task, advance=1, info=info)
            if D.broadcast_object(score is not None and kept.since_best >= params.patience, run.ranks):  # rank 0 decides
                run.console.print(f"early stop after epoch {epoch + 1}: no val {select} score gain for {params.patience} epochs")
                break
    return kept


def _train_epoch(run: _Run, epoch: int, t_ep: float) -> dict[str, Any]:
    """One pass over the training tiles; the epoch's curves row so far (mean losses, train scores, lr, seconds)."""
    from b2p.metrics import ConfusionMatrix, scores
    from b2p.scale import distributed as D

    run.model.train()
    sums: dict[str, float] = {}
    n_steps = 0
    cm_train = ConfusionMatrix(run.num_classes)
    for batch in run.dl_train:
        batch = _to_device(batch, run.device)
        out, parts = _step(run, batch, epoch)
        keep = batch["target"] != IGNORE
        cm_train.update(class_map(out["fine"].detach(), 1)[keep].cpu().numpy(), batch["target"][keep].cpu().numpy())
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        n_steps += 1
    row: dict[str, Any] = {"epoch": epoch + 1}
    row.update({f"train_{k}": v / max(n_steps, 1) for k, v in sums.items()})
    tr = scores(D.sum_array(cm_train.matrix, run.ranks), run.class_names)
    row["train_anomaly_miou"] = tr.get("anomaly_miou")
    row["train_binary_iou"] = tr.get("binary_iou")
    row["lr"] = run.opt.param_groups[0]["lr"]
    row["train_seconds"] = time.perf_counter() - t_ep
    return row


def _step(run: _Run, batch: dict, epoch: int) -> tuple[dict, dict]:
    """One optimiser step on a batch (forward, loss, backward, gradients averaged across ranks, clipped); the outputs and loss parts."""
    from b2p.scale import distributed as D

    device = run.device
    feats = run.features(batch, run.ds_train)
    with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.use_amp):
        out = run.model(cpu_layout(batch["image"], device), cpu_layout(feats, device), (batch["edge_rows"], batch["edge_cols"]))
    loss, parts = run.loss_fn(out, batch, epoch)
    if not torch.isfinite(loss):
        raise B2PError(f"training diverged (loss {float(loss)} at epoch {epoch + 1}); lower lr or check the inputs")
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    D.average_gradients(run.trainable)  # several processes: the global loss's gradient on every rank
    run.scaler.unscale_(run.opt)
    torch.nn.utils.clip_grad_norm_(run.trainable, run.params.grad_clip)
    run.scaler.step(run.opt)
    run.scaler.update()
    run.sched.step()
    run.ema.update()
    return out, parts


def _validate_epoch(run: _Run, val_truth: list, row: dict) -> dict | None:
    """Rank 0 scores the EMA model on the val images (their scores join the row); None without a val split or on another rank."""
    if run.val_samples and not run.ranks.main:
        # a DataLoader without a generator draws its base seed from torch's global generator when it is
        # iterated: the ranks that leave validation to rank 0 draw it too, so that every rank's tile
        # draws stay those of one process
        iter(run.dl_val)
    if not (run.val_samples and run.ranks.main):
        return None
    val = _validate(
        run.ema.model, run.dl_val, run.ds_val, val_truth, run.features, run.val_loss_fn, run.device, run.use_amp, run.amp_dtype,
        run.num_classes, run.class_names,
    )
    row.update({f"val_{k}": val[k] for k in ("loss", "miou", "anomaly_miou", "binary_iou", "binary_f1", "box_dice", "outside_share", "box_score")})
    return val


def _metrics(run: _Run, kept: _Kept, seconds: float) -> dict:
    """metrics.json's dict, but for its `rules` (`_save` adds them)."""
    config = run.config
    return {
        "best_epoch": kept.best_epoch,
        "epochs_run": kept.epochs_run,
        "select": {"rule": kept.select, "score": kept.best_score, "epoch": kept.best_epoch},
        "val": _jsonable(kept.best) if kept.best is not None else None,
        "val_note": None if run.val_samples else "val split empty: no validation, last epoch saved",
        "final_train": {k: v for k, v in kept.curves[-1].items() if k.startswith("train_")} if kept.curves else {},
        "params": count_params(run.model),
        "train_seconds": round(seconds, 2),
        "backbone": run.provenance,
        "device": str(run.device),
        "precision": run.precision,
        "processes": run.ranks.world,
        "images": {"train": len(run.train_samples), "val": len(run.val_samples)},
        "geometry": {"scale": config.scale, "max_side": config.max_side, "tile_size": config.tile_size, "multiple": config.multiple},
        "feature_cache": None if run.cache is None else {"hits": run.cache.hits, "misses": run.cache.misses},
    }


def _save(run: _Run, kept: _Kept, metrics: dict, out_dir: Path) -> None:
    """OUT/model.pt, OUT/rules/ (keep_rule_models), OUT/metrics.json with every rule's epoch, OUT/curves.csv."""
    params, config, class_names, provenance = run.params, run.config, run.class_names, run.provenance
    best_epoch, others = kept.best_epoch, kept.others
    info = {"best_epoch": best_epoch, "select": params.select, "val": metrics["val"], "train_params": asdict(params)}
    # the folder is built hidden beside OUT and replaces it whole: a kill or an error never leaves a new
    # model.pt beside an old metrics.json or rules/ (suite-select, bench-report and export read them together)
    with staged_dirs([out_dir]) as (stage,):
        save_checkpoint(stage / MODEL_FILE, config, class_names, provenance, kept.best_state, info)
        if "last" in others:  # the EMA weights after the last epoch run
            others["last"].update(epoch=kept.epochs_run, state=_state(run.ema.model) if params.keep_rule_models else None)
        metrics["rules"] = {kept.select: {"epoch": best_epoch, "score": kept.best_score, "file": MODEL_FILE}}
        for rule, o in others.items():
            file = None
            if o["epoch"] == best_epoch:
                file = MODEL_FILE  # the same epoch: the same weights
            elif params.keep_rule_models:
                file = f"{RULES_DIR}/{rule}.pt"
                rule_info = {**info, "best_epoch": o["epoch"], "select": rule}
                save_checkpoint(stage / file, config, class_names, provenance, o["state"], rule_info)
            metrics["rules"][rule] = {"epoch": o["epoch"], "score": o["score"], "file": file}
        write_json_atomic(stage / "metrics.json", metrics)
        _write_curves(stage / "curves.csv", kept.curves)


def _report_saved(run: _Run, kept: _Kept, metrics: dict, out_dir: Path, seconds: float) -> None:
    """The closing line: where the model went, its epoch and val scores, the time, the backbone."""
    v = metrics["val"]
    run.console.print(
        f"saved {out_dir / MODEL_FILE} (epoch {kept.best_epoch} of {kept.epochs_run}, select {kept.select}"
        + (f", val box score {v['box_score']:.4f}" if v and v.get("box_score") is not None else "")
        + (f", val anomaly mIoU {v['anomaly_miou']:.4f}, binary IoU {v['binary_iou']:.4f} vs pseudo-masks" if v and v.get("anomaly_miou") is not None and v.get("binary_iou") is not None else "")
        + f") in {seconds:.1f} s; backbone {describe_backbone(run.model)}"
    )


MODEL_FOLDER_FILES = (MODEL_FILE, "metrics.json", "curves.csv", RULES_DIR)


def _check_model_folder(out_dir: Path) -> None:
    """train replaces its output folder whole (one training's files, never mixed with an earlier one's):
    refuse, before training, a folder holding anything train does not write there (`--out data` would
    otherwise delete the project)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise B2PError("model output is a file, not a folder", out_dir)
    for e in sorted(out_dir.iterdir()):
        if e.name not in MODEL_FOLDER_FILES and not (e.name.startswith(".") and e.name.endswith(".tmp")):  # atomic_write's leftovers
            raise B2PError(
                f"train replaces this model folder whole, but it holds {e.name!r}, which train does not write: "
                "give an empty folder, or a model folder train wrote", out_dir)


def _state(model: torch.nn.Module) -> dict:
    """A CPU copy of the model's weights (the EMA's, at this epoch)."""
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@torch.no_grad()
def _validate(model, dl, ds, truth, features, loss_fn, device, use_amp, amp_dtype, num_classes, class_names) -> dict:
    """Whole val images: loss at model scale; scores at each image's own size against the teacher's label
    maps (`truth`) and the `box` selection score against its boxes."""
    from b2p.metrics import ConfusionMatrix, scores

    model.eval()
    cm = ConfusionMatrix(num_classes)
    box_fit = BoxFitScore()
    total, n = 0.0, 0
    for batch in dl:
        batch = _to_device(batch, device)
        feats = features(batch, ds)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            out = model(cpu_layout(batch["image"], device), cpu_layout(feats, device), (batch["edge_rows"], batch["edge_cols"]))
        # validation loss without self-correction: the pseudo-labels as they are
        _, parts = loss_fn(out, batch, -1)  # epoch -1: self-correction off
        total += parts["loss"]
        n += 1
        fine = out["fine"].float()
        for j, i in enumerate(batch["index"].tolist()):
            pred = windows.class_map(ds.geometry(i).logits_to_image(fine[j].cpu().numpy()))
            cm.update(pred, truth[i])
            box_fit.update(pred > 0, ds.samples[i].record.boxes_xyxy())
    s = scores(cm.matrix, class_names)
    s["loss"] = total / max(n, 1)
    s.update(box_fit.parts())
    return s


def _jsonable(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    if isinstance(d, (np.floating, np.integer)):
        return d.item()
    return d


def _write_curves(path: Path, rows: list[dict]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k])) for k in cols})
    write_bytes_atomic(path, buf.getvalue().encode())
