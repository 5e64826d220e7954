"""Training losses of the student (METHOD.md "Losses"); every weight comes from `LossParams`.

- Binary head: asymmetric Dice on p(defect), L = 1 - (TP + eps) / (TP + beta*FP + FN + eps), beta < 1
  makes false positives cheaper than misses (recall bias). p(defect) is the binary head's defect
  probability, or the sum of the fine head's defect-class probabilities when there is no binary head.
- Fine head: class-weighted cross entropy (background 0.4, each defect 4.0), averaged over pixels.
- One-sided online self-correction: where the pseudo-label is background and the student's most likely
  class is a defect with probability > tau, the fine target becomes that class; defect labels never
  change; no gradient flows through the mask; off for the first `warmup_epochs`. Our option: restrict it
  to pixels inside some box (`region="boxes"`): outside every box the pseudo-label is almost surely right,
  and there `outside_box_bg_weight` can weigh background further.
- Total: w_binary * Dice + w_fine * CE.
- Padding (target IGNORE = -1, `valid` False) counts nowhere: CE averages over the other pixels and the
  Dice counts only them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from b2p.errors import B2PError
from b2p.student.geometry import IGNORE


@dataclass
class LossParams:
    dice_beta: float = 0.4
    dice_eps: float = 1e-6
    bg_weight: float = 0.4
    defect_weight: float = 4.0
    tau: float = 0.9
    self_correction: bool = True
    warmup_epochs: int = 0
    self_correction_region: str = "all"  # all (paper) | boxes (only inside annotated boxes)
    outside_box_bg_weight: float = 1.0  # extra factor on background pixels outside every box
    w_binary: float = 0.5
    w_fine: float = 0.5

    def __post_init__(self) -> None:
        if self.self_correction_region not in ("all", "boxes"):
            raise B2PError(f"self_correction_region must be 'all' or 'boxes', got {self.self_correction_region!r}")
        if not 0 < self.tau <= 1:
            raise B2PError(f"self-correction tau must be in (0, 1], got {self.tau}")
        if self.dice_beta < 0 or self.bg_weight < 0 or self.defect_weight < 0 or self.outside_box_bg_weight < 0:
            raise B2PError("loss weights and dice beta must be non-negative")


def defect_probability(binary_logits: torch.Tensor | None, fine_logits: torch.Tensor) -> torch.Tensor:
    """BxHxW p(defect): the binary head's class-1 probability, else 1 - p(background) of the fine head."""
    if binary_logits is not None:
        return torch.softmax(binary_logits.float(), dim=1)[:, 1]
    return torch.softmax(fine_logits.float(), dim=1)[:, 1:].sum(dim=1)


def asymmetric_dice(p_defect: torch.Tensor, target_defect: torch.Tensor, beta: float = 0.4, eps: float = 1e-6) -> torch.Tensor:
    """1 - (TP + eps) / (TP + beta*FP + FN + eps), soft counts summed over the whole batch.

    p_defect: BxHxW float probabilities; target_defect: BxHxW bool/0-1.
    """
    t = target_defect.float()
    tp = (p_defect * t).sum()
    fp = p_defect.sum() - tp
    fn = t.sum() - tp
    return 1.0 - (tp + eps) / (tp + beta * fp + fn + eps)


@torch.no_grad()
def self_correct(
    fine_logits: torch.Tensor, target: torch.Tensor, tau: float, region: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-sided correction of BxHxW int64 targets from Bx(K+1)xHxW logits.

    Returns (corrected targets, BxHxW bool mask of flipped pixels). Only background pixels whose most
    likely class is a defect with probability > tau flip (to that class); `region` (BxHxW bool) limits
    where flips may happen. Defect targets are never touched.
    """
    prob, pred = torch.softmax(fine_logits.detach().float(), dim=1).max(dim=1)
    flip = (target == 0) & (pred > 0) & (prob > tau)
    if region is not None:
        flip &= region.bool()
    corrected = torch.where(flip, pred, target)
    return corrected, flip


class StudentLoss:
    """loss(outputs, batch, epoch) -> (total, parts) where parts holds floats for logging.

    `batch` is the training batch dict (data.py): `target` BxHxW int64 (IGNORE = -1 marks padding, which
    no term sees), optional `box_mask` BxHxW bool, and whatever else losses may read (`boxes`, `image`,
    `valid`). CE is averaged over the non-ignored pixels, the Dice counts only them.
    """

    def __init__(self, params: LossParams, num_classes: int):
        self.p = params
        self.class_weights = torch.tensor([params.bg_weight] + [params.defect_weight] * (num_classes - 1), dtype=torch.float32)

    def __call__(self, outputs: dict, batch: dict, epoch: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
        fine = outputs["fine"].float()
        target = batch["target"]
        box_mask = batch.get("box_mask")
        keep = target != IGNORE
        if batch.get("valid") is not None:
            keep = keep & batch["valid"].bool()
        target = torch.where(keep, target, torch.full_like(target, IGNORE))
        p = self.p
        corrected, flipped = target, None
        if p.self_correction and epoch >= p.warmup_epochs:
            region = None
            if p.self_correction_region == "boxes":
                if box_mask is None:
                    raise B2PError("self_correction_region 'boxes' needs the box masks of the batch")
                region = box_mask
            corrected, flipped = self_correct(fine, target, p.tau, region)  # IGNORE is never background: never flips
        w = self.class_weights.to(fine.device)
        ce = F.cross_entropy(fine, corrected, weight=w, reduction="none", ignore_index=IGNORE)  # w[y] * -log p_y, 0 where ignored
        if box_mask is not None and p.outside_box_bg_weight != 1.0:
            outside_bg = (~box_mask.bool()) & (corrected == 0)
            ce = ce * torch.where(outside_bg, torch.full_like(ce, p.outside_box_bg_weight), torch.ones_like(ce))
        n_keep = keep.sum().clamp(min=1)
        ce = ce.sum() / n_keep
        # Dice on the pseudo-labels as given (self-correction concerns the fine head only)
        p_defect = defect_probability(outputs.get("binary"), fine) * keep
        dice = asymmetric_dice(p_defect, target > 0, p.dice_beta, p.dice_eps)
        total = p.w_binary * dice + p.w_fine * ce
        parts = {
            "loss": float(total.detach()),
            "dice": float(dice.detach()),
            "ce": float(ce.detach()),
            "flipped_fraction": float(flipped.sum()) / float(n_keep) if flipped is not None else 0.0,
        }
        return total, parts
