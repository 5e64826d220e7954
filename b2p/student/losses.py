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
- Box terms (b2p/student/box_losses.py, BoxInst): `proj_weight` * projection + `pairwise_weight` * ramp *
  pairwise colour affinity, each applied to both heads with the heads' weights (w_binary on p(defect),
  w_fine on the box class's own probability: a box of class c asks for class c, not just "a defect").
  The ramp goes linearly from 0 at epoch 0 to 1 at epoch `pairwise_warmup` (early predictions are noise,
  and the pairwise term alone would settle them into all-background or all-defect).
- `pseudo_labels: partial` (boxes only, the teacher given is the filled box): the CE becomes the
  partial-label CE (outside every box background, inside a box of class c "background or c"), the binary
  head gets the same with every box as "defect", Dice on the pseudo-masks is off, and projection +
  pairwise decide the shape. Self-correction has no place there (refused).
Padding (target -1, `valid` False) takes no part in any term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from b2p.errors import B2PError
from b2p.student.box_losses import class_log_probs, colour_similarity, pairwise_loss, partial_label_ce, projection_loss

from b2p.student.geometry import IGNORE  # target value of padding
PSEUDO_LABELS = ("teacher", "partial")


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
    pseudo_labels: str = "teacher"  # teacher | partial (boxes only: see the module docstring)
    proj_weight: float = 0.0  # box projection loss
    pairwise_weight: float = 0.0  # pairwise colour-affinity loss
    pairwise_threshold: float = 0.3  # Lab colour similarity above which a pair must agree
    pairwise_dilation: int = 2  # neighbour distance in pixels
    pairwise_warmup: int = 0  # epochs over which the pairwise weight ramps up from 0

    def __post_init__(self) -> None:
        if self.self_correction_region not in ("all", "boxes"):
            raise B2PError(f"self_correction_region must be 'all' or 'boxes', got {self.self_correction_region!r}")
        if not 0 < self.tau <= 1:
            raise B2PError(f"self-correction tau must be in (0, 1], got {self.tau}")
        if self.dice_beta < 0 or self.bg_weight < 0 or self.defect_weight < 0 or self.outside_box_bg_weight < 0:
            raise B2PError("loss weights and dice beta must be non-negative")
        if self.pseudo_labels not in PSEUDO_LABELS:
            raise B2PError(f"pseudo_labels must be one of {list(PSEUDO_LABELS)}, got {self.pseudo_labels!r}")
        if self.pseudo_labels == "partial" and self.self_correction:
            raise B2PError("pseudo_labels 'partial' already reads a box as 'background or its class'; set self_correction: false")
        if self.proj_weight < 0 or self.pairwise_weight < 0 or self.pairwise_warmup < 0:
            raise B2PError("proj_weight, pairwise_weight and pairwise_warmup must be non-negative")
        if not 0 <= self.pairwise_threshold <= 1:
            raise B2PError(f"pairwise_threshold is a colour similarity in [0, 1], got {self.pairwise_threshold}")
        if self.pairwise_dilation < 1:
            raise B2PError(f"pairwise_dilation must be >= 1, got {self.pairwise_dilation}")

    @property
    def uses_boxes(self) -> bool:
        """Whether the loss reads the batch's `boxes`."""
        return self.pseudo_labels == "partial" or self.proj_weight > 0 or self.pairwise_weight > 0

    def pairwise_ramp(self, epoch: int) -> float:
        if self.pairwise_warmup == 0:
            return 1.0 if epoch >= 0 else 0.0
        return min(1.0, max(0.0, epoch / self.pairwise_warmup))


def defect_probability(binary_logits: torch.Tensor | None, fine_logits: torch.Tensor) -> torch.Tensor:
    """BxHxW p(defect): the binary head's class-1 probability, else 1 - p(background) of the fine head."""
    if binary_logits is not None:
        return torch.softmax(binary_logits.float(), dim=1)[:, 1]
    return torch.softmax(fine_logits.float(), dim=1)[:, 1:].sum(dim=1)


def asymmetric_dice(
    p_defect: torch.Tensor,
    target_defect: torch.Tensor,
    beta: float = 0.4,
    eps: float = 1e-6,
    valid: torch.Tensor | None = None,
    reduce=None,
) -> torch.Tensor:
    """1 - (TP + eps) / (TP + beta*FP + FN + eps), soft counts summed over the whole batch.

    p_defect: BxHxW float probabilities; target_defect: BxHxW bool/0-1; valid: BxHxW bool, pixels that count.
    `reduce`: sums a count over the ranks of a distributed training (the global batch's counts).
    """
    r = reduce or (lambda x: x)
    t = target_defect.float()
    if valid is not None:
        p_defect = p_defect * valid
        t = t * valid
    tp = r((p_defect * t).sum())
    fp = r(p_defect.sum()) - tp
    fn = r(t.sum()) - tp
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

    batch: the training batch dict; read here: `target` BxHxW int64 (-1 = ignore), `valid` BxHxW bool
    (optional: else target >= 0), `box_mask` BxHxW bool (self-correction region, outside-box weight),
    `boxes` (list of Nx6, box terms and partial labels), `image` Bx3xHxW normalised (pairwise colours;
    un-normalised with the `mean`/`std` given here).
    """

    def __init__(self, params: LossParams, num_classes: int, mean=None, std=None, reduce=None):
        self.p = params
        # distributed training: sums over the ranks (b2p/scale/distributed.py sum_across), so that every rank
        # computes the loss of the global batch; None: one process
        self.reduce = reduce
        self.num_classes = num_classes
        self.class_weights = torch.tensor([params.bg_weight] + [params.defect_weight] * (num_classes - 1), dtype=torch.float32)
        if params.pairwise_weight > 0 and (mean is None or std is None):
            raise B2PError("the pairwise loss needs the model's normalisation mean/std to recover the image colours")
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, outputs: dict, batch: dict, epoch: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
        fine = outputs["fine"].float()
        binary = outputs.get("binary")
        p = self.p
        target = batch["target"]
        valid = target != IGNORE
        if batch.get("valid") is not None:
            valid = valid & batch["valid"].bool()
        target = torch.where(valid, target, torch.full_like(target, IGNORE))  # no term reads a padded label
        box_mask = batch.get("box_mask")
        w = self.class_weights.to(fine.device)
        r = self.reduce or (lambda t: t)
        if self.reduce is not None and (p.proj_weight > 0 or p.pairwise_weight > 0):
            raise B2PError("the box projection and pairwise losses train on one process only (train.processes 1)")
        n_valid = r(valid.float().sum()).clamp_min(1.0)
        parts: dict[str, float] = {}
        flipped = None
        if p.pseudo_labels == "partial":
            ce = partial_label_ce(fine, batch.get("boxes"), w, valid, p.outside_box_bg_weight, reduce=self.reduce)
            # the binary head: the same partial labels with every box standing for "defect"
            wb = torch.tensor([p.bg_weight, p.defect_weight], device=fine.device)
            dice = partial_label_ce(binary, batch["boxes"], wb, valid, p.outside_box_bg_weight, binary=True, reduce=self.reduce) if binary is not None else fine.sum() * 0.0
        else:
            corrected = target
            if p.self_correction and epoch >= p.warmup_epochs:
                region = None
                if p.self_correction_region == "boxes":
                    if box_mask is None:
                        raise B2PError("self_correction_region 'boxes' needs the box masks of the batch")
                    region = box_mask
                corrected, flipped = self_correct(fine, target, p.tau, region)
            ce = F.cross_entropy(fine, corrected, weight=w, reduction="none", ignore_index=IGNORE)  # w[y] * -log p_y
            if box_mask is not None and p.outside_box_bg_weight != 1.0:
                outside_bg = (~box_mask.bool()) & (corrected == 0)
                ce = ce * torch.where(outside_bg, torch.full_like(ce, p.outside_box_bg_weight), torch.ones_like(ce))
            ce = r(ce.sum()) / n_valid
            # Dice on the pseudo-labels as given (self-correction concerns the fine head only)
            dice = asymmetric_dice(defect_probability(binary, fine), target > 0, p.dice_beta, p.dice_eps, valid, self.reduce)
        total = p.w_binary * dice + p.w_fine * ce
        names = ("binary_pce", "pce") if p.pseudo_labels == "partial" else ("dice", "ce")
        parts[names[0]] = float(dice.detach())
        parts[names[1]] = float(ce.detach())
        if p.proj_weight > 0 or p.pairwise_weight > 0:
            total = total + self._box_terms(fine, binary, batch, valid, epoch, parts)
        parts["loss"] = float(total.detach())
        parts["flipped_fraction"] = float(r(flipped.sum().float())) / float(n_valid) if flipped is not None else 0.0
        return total, parts

    def _box_terms(self, fine, binary, batch, valid, epoch, parts) -> torch.Tensor:
        """proj_weight * projection + pairwise_weight * ramp * pairwise, on p(defect) and on p(box class)."""
        p = self.p
        boxes = batch.get("boxes")
        k1 = fine.shape[1]
        lp_fine, lq_fine = class_log_probs(fine)
        if binary is not None:
            lp_def, lq_def = class_log_probs(binary, channels=k1)
        else:  # p(defect) = 1 - p(background) of the fine head
            ls = torch.log_softmax(fine, dim=1)
            lp_def = torch.logsumexp(ls[:, 1:], dim=1, keepdim=True).expand_as(ls)
            lq_def = ls[:, 0:1].expand_as(ls)
        heads = [(p.w_binary, lp_def, lq_def), (p.w_fine, lp_fine, lq_fine)]
        total = fine.sum() * 0.0
        if p.proj_weight > 0:
            proj = sum(wh * projection_loss(lp.exp(), boxes, valid) for wh, lp, _ in heads)
            parts["proj"] = float(proj.detach())
            total = total + p.proj_weight * proj
        ramp = p.pairwise_ramp(epoch)
        if p.pairwise_weight > 0 and ramp > 0:
            image = batch.get("image")
            if image is None:
                raise B2PError("the pairwise loss needs the batch's image (key 'image')")
            rgb = image.float() * self.std.to(image.device) + self.mean.to(image.device)
            sim = colour_similarity(rgb, p.pairwise_dilation)
            pw = sum(wh * pairwise_loss(lp, lq, boxes, sim, p.pairwise_dilation, p.pairwise_threshold, valid) for wh, lp, lq in heads)
            parts["pairwise"] = float(pw.detach())
            total = total + p.pairwise_weight * ramp * pw
        return total
