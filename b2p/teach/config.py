"""Teach-stage settings: built-in defaults < `params.yaml` section `teach` < command-line options.

`params.yaml` example (every key optional):

    teach:
      teacher: sam            # grabcut | box | sam | auto
      candidates: {}          # auto only: NAME: ROOT of an earlier round's masks (ROOT/<batch>/labelmaps)
      sam_model: vit_b        # vit_b | vit_l | vit_h
      checkpoint: null        # explicit checkpoint file
      weights_dir: weights
      cache_dir: data/cache/embeddings
      device: auto
      mask_select: box        # box | iou | single
      clip_margin: 0
      download: true
      fallback: grabcut       # auto without calib masks: this candidate teaches every class
      grabcut: {iterations: 5, context_frac: 0.5, context_px: 8, min_side: 4, min_background: 32, empty: box}
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from b2p.errors import B2PError
from b2p.params import read_params_section
from b2p.teach.base import Teacher
from b2p.teach.cache import DEFAULT_CACHE_DIR
from b2p.teach.grabcut import GrabCutSettings

TEACHERS = ("grabcut", "box", "sam", "auto")  # auto: chosen per class on the calib split (b2p/teach/auto.py)


@dataclass
class TeachConfig:
    teacher: str = "grabcut"  # grabcut | box | sam | auto (per class the best on calib)
    sam_model: str = "vit_b"  # SAM size: vit_b | vit_l | vit_h
    checkpoint: str | None = None  # an explicit SAM checkpoint file (else the official file name in weights_dir)
    weights_dir: str | None = None  # where official weights lie (null: $B2P_WEIGHTS_DIR, else weights/)
    cache_dir: str | None = DEFAULT_CACHE_DIR  # SAM image embeddings, keyed by content, model and checkpoint (null: no cache)
    device: str = "auto"  # auto (a GPU when there is one), cpu, cuda, cuda:N
    mask_select: str = "box"  # which of SAM's 3 masks: box (best fit to the box) | iou (SAM's own score) | single
    clip_margin: int = 0  # SAM masks are clipped to the box grown by this many px
    download: bool = True  # download official SAM weights when missing (checksum-verified)
    decoder_batch: int = 64  # boxes per SAM prompt-decoder call
    grabcut: dict[str, Any] = field(default_factory=dict)  # the GrabCut settings (teach.grabcut, below)
    candidates: dict[str, str] = field(default_factory=dict)  # auto: further candidates NAME: mask root (an earlier round's masks)
    fallback: str = "grabcut"  # auto without calib masks: the candidate that teaches every class

    def __post_init__(self) -> None:
        if self.teacher not in TEACHERS:
            raise B2PError(f"unknown teacher {self.teacher!r}; choose one of {', '.join(TEACHERS)}")


def load_teach_params(path: str | Path) -> dict[str, Any]:
    """The `teach:` section of a params YAML file ({} when the file has none); unknown keys are an error."""
    return read_params_section(path, "teach", [f.name for f in fields(TeachConfig)])


def build_config(params_file: str | Path | None = None, sets: list[str] | None = None, **cli: Any) -> TeachConfig:
    """Merge defaults, the params file's `teach` section, CLI options (None means "not given") and
    `--set KEY=VALUE` items; typed and range-checked by the teach schema (b2p/schema.py)."""
    from b2p.schema import teach_config

    gc = cli.pop("grabcut", None) or {}
    options = {**cli, **{f"grabcut.{k}": v for k, v in gc.items()}}
    flags = {"grabcut.iterations": "--grabcut-iters", "grabcut.context_frac": "--grabcut-context"}
    return teach_config(params_file, options, sets, flags)


def make_teacher(cfg: TeachConfig, progress: bool = True) -> Teacher:
    """The teacher `cfg` describes (SAM: checkpoint found/downloaded and loaded here, before any output)."""
    if cfg.teacher == "auto":
        raise B2PError("teacher 'auto' is chosen on the batches' calib images: build it with b2p.teach.auto.build_auto_teacher")
    if cfg.teacher == "box":
        from b2p.teach.box import BoxTeacher

        return BoxTeacher()
    if cfg.teacher == "grabcut":
        from b2p.teach.grabcut import GrabCutTeacher

        known = {f.name for f in fields(GrabCutSettings)}
        unknown = sorted(set(cfg.grabcut) - known)
        if unknown:
            raise B2PError(f"unknown grabcut settings {unknown}; known: {sorted(known)}")
        try:
            return GrabCutTeacher(GrabCutSettings(**cfg.grabcut))
        except TypeError as e:
            raise B2PError(f"bad grabcut settings: {e}") from None
    from b2p.teach.sam import SamSettings, SamTeacher

    return SamTeacher(
        SamSettings(model_type=cfg.sam_model, mask_select=cfg.mask_select, clip_margin=int(cfg.clip_margin)),
        checkpoint=cfg.checkpoint,
        weights_dir=cfg.weights_dir,
        cache_dir=cfg.cache_dir,
        device=cfg.device,
        download=cfg.download,
        decoder_batch=int(cfg.decoder_batch),
        progress=progress,
    )
