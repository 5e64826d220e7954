"""SAM teacher: each box is SAM's only prompt (no points), one mask per box (the Boxes2Pixels teacher).

Speed: the image encoder (the expensive part) runs once per image, and its embedding is cached on disk
(`b2p.teach.cache`); all of that image's boxes then go through the prompt encoder and mask decoder in ONE
batched `predict_torch` call (split into chunks of `decoder_batch` boxes only for images with more boxes
than that, to bound memory: the masks are upsampled to the full image size).

Mask choice (`mask_select`): SAM returns three candidate masks per box (multimask output).
  - "box" (default): the candidate whose tight bounding box has the highest IoU with the prompt box; ties
    go to SAM's predicted IoU. A box annotator drew the box around the defect, so a mask that spills far
    outside it (shadow, stain, the whole blade) or covers only a corner of it is the wrong candidate;
  - "iou": the candidate with the highest predicted IoU (SAM's own confidence);
  - "single": multimask output off; SAM's single-mask head.
The chosen mask is then clipped to the box grown by `clip_margin` pixels. Score = SAM's predicted IoU of
the chosen mask, clamped to [0, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from b2p.errors import B2PError
from b2p.boxes import box_pixel_bounds
from b2p.teach.base import Teacher, TeacherOutput, check_inputs
from b2p.teach.cache import DEFAULT_CACHE_DIR, EmbeddingCache, image_content_hash
from b2p.teach.weights import CheckpointSpec, ResolvedCheckpoint, load_sam, resolve_checkpoint

MASK_SELECT = ("box", "iou", "single")


@dataclass(frozen=True)
class SamSettings:
    """Settings that change the masks (hashed for resume). The checkpoint hash is added by the teacher."""

    model_type: str = "vit_b"
    mask_select: str = "box"
    clip_margin: int = 0

    def __post_init__(self) -> None:
        if self.mask_select not in MASK_SELECT:
            raise B2PError(f"mask_select must be one of {', '.join(MASK_SELECT)}, got {self.mask_select!r}")
        if self.clip_margin < 0:
            raise B2PError(f"clip_margin must be >= 0 pixels, got {self.clip_margin}")


def pick_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is usable, else 'cpu'; anything else is checked and returned."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise B2PError(f"device {device!r} was asked for but no CUDA GPU is usable here; use --device auto or cpu")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise B2PError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    return device


class SamTeacher(Teacher):
    """Box-prompted SAM (segment_anything's SamPredictor) with an on-disk embedding cache.

    `encoder_calls` counts image-encoder forward passes (cache hits do not run it).
    """

    name = "sam"

    def __init__(
        self,
        settings: SamSettings | None = None,
        checkpoint: str | Path | None = None,
        weights_dir: str | Path | None = None,
        cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
        device: str = "auto",
        download: bool = True,
        specs: dict[str, CheckpointSpec] | None = None,
        decoder_batch: int = 64,
        progress: bool = True,
    ):
        self.cfg = settings or SamSettings()
        if decoder_batch < 1:
            raise B2PError(f"decoder_batch must be >= 1, got {decoder_batch}")
        self.decoder_batch = decoder_batch
        self.ckpt: ResolvedCheckpoint = resolve_checkpoint(
            self.cfg.model_type, checkpoint, weights_dir, download=download, specs=specs, progress=progress
        )
        self.device_request = device
        self.encoder_calls = 0
        self.cache = EmbeddingCache(cache_dir, self.cfg.model_type, self.ckpt.sha256) if cache_dir is not None else None
        self._load()

    def _load(self) -> None:
        from segment_anything import SamPredictor

        self.device = pick_device(self.device_request)
        model = load_sam(self.cfg.model_type, self.ckpt.path).to(self.device)
        model.image_encoder.register_forward_hook(self._count_encoder)
        self.predictor = SamPredictor(model)

    def _count_encoder(self, *_: Any) -> None:
        self.encoder_calls += 1

    # an engine's worker gets the teacher pickled without its model, and loads it (on its own device) once
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "predictor"}

    def setup(self) -> None:
        if getattr(self, "predictor", None) is None:
            self._load()

    def counters(self) -> dict[str, int]:
        c = self.cache
        return {"encoder_calls": self.encoder_calls, "cache_hits": c.hits if c else 0, "cache_misses": c.misses if c else 0}

    def add_counters(self, counts: dict[str, int]) -> None:
        self.encoder_calls += counts.get("encoder_calls", 0)
        if self.cache is not None:
            self.cache.hits += counts.get("cache_hits", 0)
            self.cache.misses += counts.get("cache_misses", 0)

    def settings(self) -> dict[str, Any]:
        return {**asdict(self.cfg), "checkpoint_sha256": self.ckpt.sha256}

    def provenance(self) -> dict[str, Any]:
        return {
            "model_type": self.cfg.model_type,
            "checkpoint": {"path": str(self.ckpt.path), "sha256": self.ckpt.sha256, "source": self.ckpt.source},
            "device": self.device,
            "encoder_calls": self.encoder_calls,
            "embedding_cache": None
            if self.cache is None
            else {"dir": str(self.cache.dir), "hits": self.cache.hits, "misses": self.cache.misses},
        }

    def set_image(self, image: np.ndarray) -> None:
        """Give the predictor this image's embedding: from the cache, else by running the encoder (and caching)."""
        import torch

        key = image_content_hash(image) if self.cache is not None else None
        hit = self.cache.load(key) if self.cache is not None else None
        if hit is not None:
            feats, input_size, original_size = hit
            p = self.predictor
            p.reset_image()
            p.features = torch.from_numpy(feats).to(self.device)
            p.input_size, p.original_size = input_size, original_size
            p.is_image_set = True
            return
        self.predictor.set_image(image, image_format="RGB")
        if self.cache is not None:
            p = self.predictor
            self.cache.save(key, p.features.float().cpu().numpy(), tuple(p.input_size), tuple(p.original_size))

    def predict(self, image: np.ndarray, boxes: np.ndarray) -> TeacherOutput:
        """image: HxWx3 uint8 RGB; boxes: Nx4 float XYXY pixels -> masks NxHxW bool (inside each box +
        clip_margin), scores N float32 (predicted IoU of the chosen candidate)."""
        image, boxes = check_inputs(image, boxes)
        h, w = image.shape[:2]
        if len(boxes) == 0:
            return TeacherOutput(np.zeros((0, h, w), bool), np.zeros(0, np.float32), [])
        self.set_image(image)
        masks, scores = [], []
        for s in range(0, len(boxes), self.decoder_batch):
            m, sc = self._decode(boxes[s : s + self.decoder_batch], (h, w))
            masks.append(m)
            scores.append(sc)
        masks_all = np.concatenate(masks)
        # an empty mask is kept (no silent box fill) but noted, so provenance shows how often it happens
        notes = [None if m.any() else "sam mask empty inside the box; kept empty" for m in masks_all]
        return TeacherOutput(masks_all, np.concatenate(scores), notes)

    def _decode(self, boxes: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        import torch

        p = self.predictor
        with torch.no_grad():
            tb = torch.as_tensor(boxes, dtype=torch.float32, device=self.device)
            prompt = p.transform.apply_boxes_torch(tb, shape)
            multi = self.cfg.mask_select != "single"
            cand, iou_pred, _ = p.predict_torch(None, None, boxes=prompt, multimask_output=multi)  # BxCxHxW bool, BxC
            if multi and self.cfg.mask_select == "box":
                rank = _bbox_iou(cand, tb) + 1e-3 * iou_pred  # predicted IoU only breaks ties
            else:
                rank = iou_pred
            best = rank.argmax(dim=1)
            idx = torch.arange(len(boxes), device=cand.device)
            chosen = cand[idx, best]  # BxHxW
            score = iou_pred[idx, best].clamp(0, 1)
            keep = torch.zeros_like(chosen)
            for i, b in enumerate(boxes):
                x0, y0, x1, y1 = box_pixel_bounds(b, shape, self.cfg.clip_margin)
                keep[i, y0:y1, x0:x1] = True
            chosen = chosen & keep
        return chosen.cpu().numpy().astype(bool), score.float().cpu().numpy().astype(np.float32)


def _bbox_iou(masks, boxes):
    """IoU between each candidate mask's tight bounding box and its prompt box.

    masks: BxCxHxW bool; boxes: Bx4 float XYXY -> BxC float (0 for an empty mask).
    """
    import torch

    rows = masks.any(dim=3)  # BxCxH
    cols = masks.any(dim=2)  # BxCxW
    h, w = rows.shape[-1], cols.shape[-1]
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    big = torch.tensor(10**9, device=masks.device)
    y0 = torch.where(rows, ar_h, big).amin(-1).float()
    y1 = torch.where(rows, ar_h, -big).amax(-1).float() + 1
    x0 = torch.where(cols, ar_w, big).amin(-1).float()
    x1 = torch.where(cols, ar_w, -big).amax(-1).float() + 1
    bx0, by0, bx1, by1 = (boxes[:, i : i + 1] for i in range(4))
    iw = (torch.minimum(x1, bx1) - torch.maximum(x0, bx0)).clamp(min=0)
    ih = (torch.minimum(y1, by1) - torch.maximum(y0, by0)).clamp(min=0)
    inter = iw * ih
    union = (x1 - x0) * (y1 - y0) + (bx1 - bx0) * (by1 - by0) - inter
    nonempty = rows.any(-1)
    return torch.where(nonempty, inter / union.clamp(min=1e-6), torch.zeros_like(inter))
