"""Losses that take the box itself as supervision (BoxInst, Tian et al., CVPR 2021), and partial labels.

All of them read the training batch's `boxes`: per sample an Nx6 float tensor (x0, y0, x1, y1 in tile
pixels, clipped to the tile; class id; clipped flag, non-zero when the tile border cut the box). A box's
pixels follow `b2p.boxes.box_pixel_bounds` (floor of the start, ceil of the end, end-exclusive).

Per box and class: a box of class c constrains the probability of class c (fine head) and p(defect)
(binary head); the caller passes per-class probability maps, so one function serves both heads.

- Projection: a tight box means the defect touches every row and every column of it. Per box, the
  max-projection of the probability onto the x axis (max over the box's rows, one value per column) and
  onto the y axis (max over its columns, one per row) should both be all ones, the box's own projections.
  Dice on each axis: 1 - (2 sum(m) + eps) / (sum(m^2) + n + eps); zero exactly when every row and column
  holds a pixel of probability 1. Only inside the box: outside it, other boxes of the same class may lie
  (semantic segmentation), and the background there is taught by the cross entropy. When the tile border
  cut a box, the part that is left need not reach every row (cut left/right) or column (cut top/bottom):
  the projection along the cut is skipped (which border cut it is read from the coordinates on the tile
  border; a box that also touches another border by chance loses that axis as well, the safe side).
- Pairwise colour affinity: neighbouring pixels of similar colour most likely share a label. For every
  pixel i inside a box of class c and each of its 8 neighbours j at `dilation`, the colour similarity
  s = exp(-||Lab_i - Lab_j|| / theta) (CIELab, theta 2 as in BoxInst); where s >= threshold (0.3) the term
  -log(p_i p_j + (1 - p_i)(1 - p_j)) pulls both to the same label, p = p(class c). Averaged over the pairs
  that pass. Computed in log space (logaddexp) so confident pixels do not give log(0).
- Partial-label cross entropy (boxes only, no teacher): outside every box a pixel is certain background;
  inside boxes of classes S it is "background or one of S": -log(p_bg + sum_{c in S} p_c).
"""

from __future__ import annotations

import torch

from b2p.errors import B2PError

LAB_THETA = 2.0  # BoxInst: similarity exp(-||dLab|| * 0.5)
# the 8 neighbours (dy, dx) of a pixel, scaled by the dilation
NEIGHBOURS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def box_bounds(box: torch.Tensor, height: int, width: int) -> tuple[int, int, int, int]:
    """Integer end-exclusive pixel bounds (x0, y0, x1, y1) of one box row, the rule of box_pixel_bounds."""
    x0 = max(0, int(torch.floor(box[0])))
    y0 = max(0, int(torch.floor(box[1])))
    x1 = min(width, int(torch.ceil(box[2])))
    y1 = min(height, int(torch.ceil(box[3])))
    return x0, y0, max(x0, x1), max(y0, y1)


def _check_boxes(boxes: list[torch.Tensor] | None, batch: int) -> list[torch.Tensor]:
    if boxes is None:
        raise B2PError("the box losses and pseudo_labels 'partial' need the batch's boxes (key 'boxes')")
    if len(boxes) != batch:
        raise B2PError(f"the batch holds {batch} samples but {len(boxes)} box lists")
    for b in boxes:
        if b.ndim != 2 or b.shape[1] != 6:
            raise B2PError(f"boxes must be Nx6 (x0, y0, x1, y1, class, clipped), got shape {tuple(b.shape)}")
    return boxes


def class_box_masks(boxes: list[torch.Tensor], num_classes: int, height: int, width: int, device=None) -> torch.Tensor:
    """Bx(K+1)xHxW bool: channel c marks pixels inside some box of class c (channel 0 stays False)."""
    out = torch.zeros(len(boxes), num_classes, height, width, dtype=torch.bool, device=device)
    for b, rows in enumerate(boxes):
        for box in rows:
            c = int(box[4])
            if not 0 < c < num_classes:
                raise B2PError(f"box class {c} outside 1..{num_classes - 1}")
            x0, y0, x1, y1 = box_bounds(box, height, width)
            out[b, c, y0:y1, x0:x1] = True
    return out


def _soft_dice_to_ones(m: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Dice loss between a vector of probabilities and the all-ones vector of its length."""
    return 1.0 - (2.0 * m.sum() + eps) / ((m * m).sum() + m.numel() + eps)


def projection_loss(prob: torch.Tensor, boxes: list[torch.Tensor], valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over boxes and kept axes of the Dice between the box's max-projections and all ones.

    prob: Bx(K+1)xHxW probabilities, channel c = the probability a box of class c constrains.
    valid: BxHxW bool (False = padding, never counted as defect). Returns a 0-d tensor (0 with a graph
    when there is no box, so callers can always add it).
    """
    bsz, _, h, w = prob.shape
    boxes = _check_boxes(boxes, bsz)
    terms = []
    for b, rows in enumerate(boxes):
        for box in rows:
            x0, y0, x1, y1 = box_bounds(box, h, w)
            if x1 <= x0 or y1 <= y0:
                continue
            crop = prob[b, int(box[4]), y0:y1, x0:x1]
            if valid is not None:
                crop = crop * valid[b, y0:y1, x0:x1]
            cut_x = cut_y = False
            if float(box[5]) != 0:  # which tile border cut it: coordinates on the border
                cut_x = x0 == 0 or x1 == w
                cut_y = y0 == 0 or y1 == h
            if not cut_y:  # x-projection: one max per column, over all the box's rows
                terms.append(_soft_dice_to_ones(crop.amax(dim=0)))
            if not cut_x:  # y-projection: one max per row, over all the box's columns
                terms.append(_soft_dice_to_ones(crop.amax(dim=1)))
    if not terms:
        return prob.sum() * 0.0
    return torch.stack(terms).mean()


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """Bx3xHxW sRGB in [0, 1] -> CIELab (D65; L in [0, 100], a and b about [-128, 127])."""
    rgb = rgb.clamp(0.0, 1.0)
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = torch.tensor(
        [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]],
        dtype=lin.dtype, device=lin.device,
    )
    xyz = torch.einsum("ij,bjhw->bihw", m, lin)
    white = torch.tensor([0.950456, 1.0, 1.088754], dtype=lin.dtype, device=lin.device).view(1, 3, 1, 1)
    t = xyz / white
    delta = 6.0 / 29.0
    f = torch.where(t > delta**3, t.clamp_min(1e-12) ** (1.0 / 3.0), t / (3 * delta**2) + 4.0 / 29.0)
    lab_l = 116.0 * f[:, 1] - 16.0
    lab_a = 500.0 * (f[:, 0] - f[:, 1])
    lab_b = 200.0 * (f[:, 1] - f[:, 2])
    return torch.stack([lab_l, lab_a, lab_b], dim=1)


def _shift(t: torch.Tensor, dy: int, dx: int, fill: float | bool = 0) -> torch.Tensor:
    """out[..., y, x] = t[..., y + dy, x + dx], `fill` where that falls outside."""
    out = torch.full_like(t, fill)
    h, w = t.shape[-2:]
    ys, yd = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
    xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
    out[..., yd, xd] = t[..., ys, xs]
    return out


@torch.no_grad()
def colour_similarity(rgb: torch.Tensor, dilation: int, theta: float = LAB_THETA) -> torch.Tensor:
    """Bx8xHxW similarity exp(-||Lab_i - Lab_j|| / theta) of each pixel i with its 8 neighbours j at
    `dilation` (order of NEIGHBOURS); 0 where the neighbour lies outside the image."""
    if dilation < 1:
        raise B2PError(f"pairwise_dilation must be >= 1, got {dilation}")
    lab = rgb_to_lab(rgb.float())
    sims = []
    for dy, dx in NEIGHBOURS:
        other = _shift(lab, dy * dilation, dx * dilation, float("nan"))
        s = torch.exp(-torch.linalg.vector_norm(lab - other, dim=1) / theta)
        sims.append(torch.nan_to_num(s, nan=0.0))
    return torch.stack(sims, dim=1)


def pairwise_loss(
    log_p: torch.Tensor,
    log_not_p: torch.Tensor,
    boxes: list[torch.Tensor],
    similarity: torch.Tensor,
    dilation: int,
    threshold: float = 0.3,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of -log(p_i p_j + (1 - p_i)(1 - p_j)) over the pairs (i in a box of class c, j a neighbour)
    whose colour similarity is >= threshold, p = p(class c).

    log_p, log_not_p: Bx(K+1)xHxW log p(class c) and log(1 - p(class c)); similarity: Bx8xHxW from
    colour_similarity at the same dilation; valid: BxHxW bool (padding takes no part in any pair).
    """
    bsz, k1, h, w = log_p.shape
    inside = class_box_masks(_check_boxes(boxes, bsz), k1, h, w, log_p.device)
    ok = similarity >= threshold
    if valid is not None:
        v = valid.bool()
        ok = ok & v[:, None]
        ok = ok & torch.stack([_shift(v, dy * dilation, dx * dilation, False) for dy, dx in NEIGHBOURS], dim=1)
    total = log_p.sum() * 0.0
    count = 0
    for c in range(1, k1):
        where_c = inside[:, c]
        if not where_c.any():
            continue
        lp, lq = log_p[:, c], log_not_p[:, c]
        for n, (dy, dx) in enumerate(NEIGHBOURS):
            pair = ok[:, n] & where_c
            if not pair.any():
                continue
            lp_j = _shift(lp, dy * dilation, dx * dilation, 0.0)
            lq_j = _shift(lq, dy * dilation, dx * dilation, 0.0)
            term = -torch.logaddexp(lp + lp_j, lq + lq_j)  # -log(p_i p_j + (1-p_i)(1-p_j))
            total = total + term[pair].sum()
            count += int(pair.sum())
    return total / max(count, 1)


def class_log_probs(logits: torch.Tensor, channels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log(1 - p)) per class from Bx(K+1)xHxW logits, both Bx(K+1)xHxW.

    With `channels` given, the logits are a binary head (background, defect) and p(defect) is broadcast to
    that many channels, so a box of any class constrains p(defect).
    """
    logits = logits.float()
    if channels is not None:
        ls = torch.log_softmax(logits, dim=1)
        bsz, _, h, w = ls.shape
        return ls[:, 1:2].expand(bsz, channels, h, w), ls[:, 0:1].expand(bsz, channels, h, w)
    ls = torch.log_softmax(logits, dim=1)
    # log(1 - p_c) = log sum of every other class's probability
    k1 = ls.shape[1]
    others = []
    for c in range(k1):
        idx = [i for i in range(k1) if i != c]
        others.append(torch.logsumexp(ls[:, idx], dim=1))
    return ls, torch.stack(others, dim=1)


def partial_label_ce(
    logits: torch.Tensor,
    boxes: list[torch.Tensor],
    class_weights: torch.Tensor,
    valid: torch.Tensor,
    outside_weight: float = 1.0,
    binary: bool = False,
    reduce=None,
) -> torch.Tensor:
    """-log(p_bg + sum of p_c over the classes of the boxes covering the pixel), weighted, averaged over
    the valid pixels. Outside every box that is -log p_bg (certain background, weight class_weights[0] *
    outside_weight); inside, weight = the largest class weight among the covering boxes' classes.

    logits: Bx(K+1)xHxW (fine head), or Bx2xHxW with binary=True (every box stands for class 1, so inside a
    box any answer is allowed and only the outside teaches the binary head). valid: BxHxW bool. `reduce` sums
    a tensor over the ranks of a distributed training (b2p/scale/distributed.py `sum_across`), so that the
    average is over the global batch.
    """
    logits = logits.float()
    bsz, k1, h, w = logits.shape
    boxes = _check_boxes(boxes, bsz)
    if binary:
        boxes = [torch.cat([b[:, :4], torch.ones_like(b[:, 4:5]), b[:, 5:6]], dim=1) for b in boxes]
    allowed = class_box_masks(boxes, k1, h, w, logits.device)
    in_box = allowed[:, 1:].any(dim=1)
    allowed[:, 0] = True
    ls = torch.log_softmax(logits, dim=1)
    nll = -torch.logsumexp(ls.masked_fill(~allowed, float("-inf")), dim=1)
    cw = class_weights.to(logits.device, torch.float32)
    inside_w = (allowed[:, 1:].float() * cw[1:].view(1, -1, 1, 1)).amax(dim=1)
    weight = torch.where(in_box, inside_w, torch.full_like(inside_w, float(cw[0]) * outside_weight))
    weight = weight * valid.float()
    r = reduce or (lambda t: t)
    return r((nll * weight).sum()) / r(valid.float().sum()).clamp_min(1.0)
