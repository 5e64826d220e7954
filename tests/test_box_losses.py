"""Box-supervision losses: projection, pairwise colour affinity, partial-label CE, and StudentLoss with them."""

from __future__ import annotations

import pytest
import torch

from b2p.errors import B2PError
from b2p.student.box_losses import (
    class_log_probs,
    colour_similarity,
    pairwise_loss,
    partial_label_ce,
    projection_loss,
    rgb_to_lab,
)
from b2p.student.losses import LossParams, StudentLoss

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def _boxes(*rows) -> list[torch.Tensor]:
    """One sample's Nx6 box tensor per argument (x0, y0, x1, y1, class, clipped)."""
    return [torch.tensor(r, dtype=torch.float32).view(-1, 6) for r in rows]


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


def test_projection_zero_when_every_row_and_column_is_touched_positive_when_a_row_is_empty():
    prob = torch.zeros(1, 2, 12, 12)
    # a diagonal line: a thin defect that touches each row and each column of its box once
    for i in range(6):
        prob[0, 1, 3 + i, 2 + i] = 1.0
    prob[0, 1, 0, 0] = 1.0  # outside the box: no influence
    boxes = _boxes([[2, 3, 8, 9, 1, 0]])
    assert float(projection_loss(prob, boxes)) == pytest.approx(0.0, abs=1e-7)
    emptied = prob.clone()
    emptied[0, 1, 5, 4] = 0.0  # row 5 (and column 4) now hold no defect
    assert float(projection_loss(emptied, boxes)) > 0.05
    # a box of class 2 reads channel 2 only
    prob3 = torch.zeros(1, 3, 12, 12)
    prob3[0, 1] = prob[0, 1]
    assert float(projection_loss(prob3, _boxes([[2, 3, 8, 9, 2, 0]]))) > 0.5
    # fractional coordinates follow box_pixel_bounds (floor / ceil): same pixels as the integer box
    assert float(projection_loss(prob, _boxes([[2.4, 3.2, 7.6, 8.1, 1, 0]]))) == pytest.approx(0.0, abs=1e-7)


def test_projection_skips_the_axis_cut_by_the_tile_border():
    prob = torch.zeros(1, 2, 10, 10)
    prob[0, 1, 4, 0:5] = 1.0  # a horizontal stroke in row 4 touching every column 0..4, rows 2..6 partly empty
    cut_left = _boxes([[0, 2, 5, 7, 1, 1]])  # cut by the left tile border
    uncut = _boxes([[0, 2, 5, 7, 1, 0]])
    # the y-projection (rows) is unreliable for a box cut left/right: only the column projection counts
    assert float(projection_loss(prob, cut_left)) == pytest.approx(0.0, abs=1e-7)
    assert float(projection_loss(prob, uncut)) > 0.1
    # cut at the top: the x-projection is skipped, the rows still must be touched
    prob2 = torch.zeros(1, 2, 10, 10)
    prob2[0, 1, 0:5, 6] = 1.0  # a vertical stroke touching every row 0..4 of the box, not every column
    assert float(projection_loss(prob2, _boxes([[3, 0, 8, 5, 1, 1]]))) == pytest.approx(0.0, abs=1e-7)
    assert float(projection_loss(prob2, _boxes([[3, 0, 8, 5, 1, 0]]))) > 0.1


def test_projection_ignores_padding_and_handles_no_boxes():
    prob = torch.ones(1, 2, 8, 8)
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    valid[:, :, 4:] = False  # right half is padding: probability there does not count as defect
    boxes = _boxes([[0, 0, 8, 8, 1, 0]])
    assert float(projection_loss(prob, boxes)) == pytest.approx(0.0, abs=1e-7)
    assert float(projection_loss(prob, boxes, valid)) > 0.1
    empty = projection_loss(prob.requires_grad_(True), _boxes(torch.zeros(0, 6).tolist()))
    empty.backward()  # a graph even without boxes
    assert float(empty.detach()) == 0.0
    with pytest.raises(B2PError):
        projection_loss(prob, None)


def test_lab_conversion():
    rgb = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
    lab = rgb_to_lab(rgb)[0, :, 0]
    assert lab[:, 0].tolist() == pytest.approx([100.0, 0.0, 0.0], abs=0.05)  # white
    assert lab[:, 1].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=0.05)  # black
    assert lab[:, 2].tolist() == pytest.approx([53.24, 80.09, 67.20], abs=0.1)  # sRGB red


def _two_tone(right_grey: float) -> torch.Tensor:
    """1x3x8x8 image: left half grey 0.5, right half `right_grey`."""
    img = torch.full((1, 3, 8, 8), 0.5)
    img[..., 4:] = right_grey
    return img


@pytest.mark.parametrize("dilation", [1, 2])
def test_pairwise_pulls_across_a_weak_edge_and_ignores_a_strong_one(dilation):
    boxes = _boxes([[0, 0, 8, 8, 1, 0]])
    # the student says defect on the left half, background on the right, both confidently
    p = torch.full((1, 2, 8, 8), 0.5)
    p[0, 1, :, :4], p[0, 1, :, 4:] = 1 - 1e-6, 1e-6
    p[0, 0] = 1 - p[0, 1]
    logits = torch.log(p)
    lp, lq = class_log_probs(logits)
    weak = colour_similarity(_two_tone(0.52), dilation)  # nearly the same grey: one surface
    strong = colour_similarity(_two_tone(0.05), dilation)  # dark against grey: an edge
    assert float(weak.min()) >= 0.0 and float(weak[:, :, 2:-2, 2:-2].min()) > 0.3
    loss_weak = float(pairwise_loss(lp, lq, boxes, weak, dilation))
    loss_strong = float(pairwise_loss(lp, lq, boxes, strong, dilation))
    assert loss_weak > 1.0  # pairs across the weak edge disagree and are penalised
    assert loss_strong == pytest.approx(0.0, abs=1e-4)  # pairs across the strong edge take no part
    # one pair, two pixels at `dilation` apart in one box: pulled together across a weak edge only
    pair_img = torch.full((1, 3, 1, dilation + 1), 0.5)
    boxes2 = _boxes([[0, 0, dilation + 1, 1, 1, 0]])
    for right, pulled in ((0.52, True), (0.05, False)):
        pair_img[..., -1] = right
        sim = colour_similarity(pair_img, dilation)
        lg = torch.zeros(1, 2, 1, dilation + 1)
        lg[0, 1, 0, 0], lg[0, 1, 0, -1] = 1.0, -1.0  # p = 0.73 and 0.27
        lg.requires_grad_(True)
        lp, lq = class_log_probs(lg)
        pairwise_loss(lp, lq, boxes2, sim, dilation).backward()
        g = lg.grad[0, 1, 0]
        if pulled:  # descent lowers the high one and raises the low one
            assert float(g[0]) > 1e-3 and float(g[-1]) < -1e-3
        else:
            assert float(g.abs().max()) == 0.0


def test_pairwise_only_inside_boxes_of_the_class_and_not_with_padding():
    logits = torch.randn(1, 3, 8, 8)
    lp, lq = class_log_probs(logits)
    sim = colour_similarity(_two_tone(0.5), 1)
    # no box of a class -> no pairs
    assert float(pairwise_loss(lp, lq, _boxes(torch.zeros(0, 6).tolist()), sim, 1)) == 0.0
    # padding: changing logits in the padded columns does not change the loss
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    valid[..., 6:] = False
    boxes = _boxes([[0, 0, 8, 8, 2, 0]])
    a = pairwise_loss(lp, lq, boxes, sim, 1, valid=valid)
    other = logits.clone()
    other[..., 6:] = torch.randn(1, 3, 8, 2) * 5
    lp2, lq2 = class_log_probs(other)
    assert float(pairwise_loss(lp2, lq2, boxes, sim, 1, valid=valid)) == pytest.approx(float(a), rel=1e-6)
    assert float(pairwise_loss(lp2, lq2, boxes, sim, 1)) != pytest.approx(float(a), rel=1e-6)


def test_partial_label_ce():
    # 1x3x1x3 (rows: class 0, 1, 2; columns: pixels): pixel 0 outside boxes, pixel 1 inside a class-1 box,
    # pixel 2 inside boxes of class 1 and 2
    p = torch.tensor([[0.2, 0.3, 0.1], [0.5, 0.3, 0.1], [0.3, 0.4, 0.8]]).view(1, 3, 1, 3)
    logits = p.log()
    boxes = _boxes([[1, 0, 3, 1, 1, 0], [2, 0, 3, 1, 2, 0]])
    w = torch.tensor([0.4, 4.0, 4.0])
    valid = torch.ones(1, 1, 3, dtype=torch.bool)
    got = float(partial_label_ce(logits, boxes, w, valid))
    want = (0.4 * -torch.log(torch.tensor(0.2)) + 4.0 * -torch.log(torch.tensor(0.3 + 0.3)) + 4.0 * 0.0) / 3
    assert got == pytest.approx(float(want), rel=1e-5)
    # outside_weight scales only the certain background; padding drops out of sum and count
    got2 = float(partial_label_ce(logits, boxes, w, valid, outside_weight=2.0))
    assert got2 == pytest.approx(float(want) + 0.4 * float(-torch.log(torch.tensor(0.2))) / 3, rel=1e-5)
    valid[0, 0, 1] = False
    got3 = float(partial_label_ce(logits, boxes, w, valid))
    assert got3 == pytest.approx(0.4 * float(-torch.log(torch.tensor(0.2))) / 2, rel=1e-5)
    # binary head: inside any box anything goes, outside it must be background
    b = torch.tensor([[0.9, 0.1, 0.2], [0.1, 0.9, 0.8]]).view(1, 2, 1, 3).log()
    valid[:] = True
    gotb = float(partial_label_ce(b, boxes, torch.tensor([0.4, 4.0]), valid, binary=True))
    assert gotb == pytest.approx(0.4 * float(-torch.log(torch.tensor(0.9))) / 3, rel=1e-5)


def _scene(size: int = 20):
    """A grey image with one dark diagonal blob (the defect) inside a box of class 1."""
    img = torch.full((1, 3, size, size), 0.6)
    truth = torch.zeros(size, size, dtype=torch.bool)
    for i in range(4, 14):
        truth[i, i - 1 : i + 2] = True
    img[0, :, truth] = 0.1
    ys, xs = torch.nonzero(truth, as_tuple=True)
    box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1), 1.0, 0.0]
    target = torch.zeros(1, size, size, dtype=torch.long)  # the filled box, as `--teacher box` gives it
    target[0, int(box[1]) : int(box[3]), int(box[0]) : int(box[2])] = 1
    return img, truth, _boxes([box]), target


def _confident(mask: torch.Tensor) -> torch.Tensor:
    """1x2xHxW logits saying `mask` (HxW bool) is defect, confidently."""
    lg = torch.where(mask, 8.0, -8.0)
    return torch.stack([-lg, lg])[None]


def test_boxes_only_loss_prefers_the_true_shape_to_the_box_and_to_nothing():
    img, truth, boxes, target = _scene()
    image = (img - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    params = LossParams(pseudo_labels="partial", self_correction=False, proj_weight=1.0, pairwise_weight=1.0, pairwise_dilation=1)
    loss = StudentLoss(params, 2, MEAN, STD)
    batch = {"target": target, "boxes": boxes, "image": image, "box_mask": target > 0}

    def total(mask):
        out = _confident(mask)
        return loss({"fine": out, "binary": out}, batch, epoch=1)

    l_truth, parts = total(truth)
    l_box, parts_box = total(target[0] > 0)
    l_empty, parts_empty = total(torch.zeros_like(truth))
    l_outside, _ = total(truth | (torch.arange(20) < 2).view(1, 20).expand(20, 20))  # defect outside the box too
    assert float(l_truth) < 0.01
    assert parts_box["pairwise"] > 1.0  # the box cuts through one grey surface
    assert parts_empty["proj"] > 0.9  # no row or column of the box is touched
    assert float(l_box) > float(l_truth) + 0.5 and float(l_empty) > float(l_truth) + 0.5
    assert float(l_outside) > float(l_truth) + 0.5  # outside every box is certain background
    assert set(parts) >= {"pce", "binary_pce", "proj", "pairwise", "loss"} and "dice" not in parts

    # gradients reach both heads through every term
    torch.manual_seed(0)
    fine = torch.randn(1, 2, 20, 20, requires_grad=True)
    binary = torch.randn(1, 2, 20, 20, requires_grad=True)
    l, _ = loss({"fine": fine, "binary": binary}, batch, epoch=1)
    l.backward()
    for g in (fine.grad, binary.grad):
        assert torch.isfinite(g).all() and g.abs().sum() > 0

    # padding: where target is -1 / valid False, the logits change nothing
    pad_target = target.clone()
    pad_target[0, :, 16:] = -1
    padded = dict(batch, target=pad_target, valid=pad_target >= 0)
    f2 = fine.detach().clone()
    f2[..., 16:] = torch.randn(1, 2, 20, 4) * 3
    l1, _ = loss({"fine": fine.detach(), "binary": binary.detach()}, padded, epoch=1)
    l2, _ = loss({"fine": f2, "binary": binary.detach()}, padded, epoch=1)
    assert float(l1) == pytest.approx(float(l2), rel=1e-6)
    l3, _ = loss({"fine": f2, "binary": binary.detach()}, batch, epoch=1)
    assert float(l3) != pytest.approx(float(l1), rel=1e-6)
    # `valid` alone (labels left in place under the padding) acts the same
    by_valid = dict(batch, valid=pad_target >= 0)
    l4, _ = loss({"fine": f2, "binary": binary.detach()}, by_valid, epoch=1)
    assert float(l4) == pytest.approx(float(l1), rel=1e-6)
    teacher_mode = StudentLoss(LossParams(tau=0.5, proj_weight=1.0), 2)
    l5, p5 = teacher_mode({"fine": fine.detach(), "binary": binary.detach()}, by_valid, epoch=1)
    l6, p6 = teacher_mode({"fine": f2, "binary": binary.detach()}, by_valid, epoch=1)
    assert float(l5) == pytest.approx(float(l6), rel=1e-6) and p5["flipped_fraction"] == p6["flipped_fraction"]


def test_teacher_mode_adds_box_terms_and_warmup_ramps_the_pairwise_weight():
    img, _, boxes, target = _scene()
    image = (img - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.manual_seed(1)
    out = {"fine": torch.randn(1, 2, 20, 20), "binary": torch.randn(1, 2, 20, 20)}
    batch = {"target": target, "boxes": boxes, "image": image}
    base = LossParams(self_correction=False)
    plain, parts0 = StudentLoss(base, 2)(out, batch)
    with_proj, parts1 = StudentLoss(LossParams(self_correction=False, proj_weight=2.0), 2)(out, batch)
    assert float(with_proj) == pytest.approx(float(plain) + 2.0 * parts1["proj"], rel=1e-5)
    assert parts1["dice"] == pytest.approx(parts0["dice"]) and parts1["ce"] == pytest.approx(parts0["ce"])
    ramped = StudentLoss(LossParams(self_correction=False, pairwise_weight=1.0, pairwise_warmup=4), 2, MEAN, STD)
    at = {e: ramped(out, batch, epoch=e) for e in (0, 2, 4, 9)}
    assert float(at[0][0]) == pytest.approx(float(plain), rel=1e-6) and "pairwise" not in at[0][1]
    pw = at[4][1]["pairwise"]
    assert float(at[2][0]) == pytest.approx(float(plain) + 0.5 * pw, rel=1e-5)
    assert float(at[9][0]) == pytest.approx(float(plain) + pw, rel=1e-5)


def test_box_loss_params_are_checked():
    with pytest.raises(B2PError, match="pseudo_labels"):
        LossParams(pseudo_labels="boxes")
    with pytest.raises(B2PError, match="self_correction"):
        LossParams(pseudo_labels="partial")  # self-correction on by default: refused, not ignored
    with pytest.raises(B2PError):
        LossParams(pairwise_threshold=1.5)
    with pytest.raises(B2PError):
        LossParams(pairwise_dilation=0)
    with pytest.raises(B2PError, match="mean"):
        StudentLoss(LossParams(pairwise_weight=1.0), 2)
    loss = StudentLoss(LossParams(proj_weight=1.0, self_correction=False), 2)
    with pytest.raises(B2PError, match="boxes"):
        loss({"fine": torch.zeros(1, 2, 4, 4), "binary": None}, {"target": torch.zeros(1, 4, 4, dtype=torch.long)})
