"""Student losses: asymmetric Dice, weighted CE, one-sided self-correction (warm-up, box region)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from b2p.errors import B2PError
from b2p.student.geometry import IGNORE
from b2p.student.losses import LossParams, StudentLoss, asymmetric_dice, self_correct


def _logits_from_probs(probs: torch.Tensor) -> torch.Tensor:
    """Bx C x H x W probabilities -> logits whose softmax gives them back."""
    return probs.clamp_min(1e-9).log()


def _scene():
    """1x3x1x6 logits and targets covering every case of the correction rule."""
    # pixel: 0 bg-label, confident crack (0.95)  -> flips to 1
    #        1 bg-label, confident spot (0.97)   -> flips to 2
    #        2 bg-label, unsure crack (0.6)      -> stays 0
    #        3 bg-label, confident bg            -> stays 0
    #        4 crack-label, confident bg (0.99)  -> stays 1 (defects never change)
    #        5 spot-label, confident crack       -> stays 2
    p = torch.tensor(
        [
            [0.03, 0.02, 0.35, 0.98, 0.99, 0.01],
            [0.95, 0.01, 0.60, 0.01, 0.005, 0.98],
            [0.02, 0.97, 0.05, 0.01, 0.005, 0.01],
        ]
    ).view(1, 3, 1, 6)
    target = torch.tensor([0, 0, 0, 0, 1, 2]).view(1, 1, 6)
    return _logits_from_probs(p), target


def test_self_correction_flips_only_confident_background():
    logits, target = _scene()
    corrected, flipped = self_correct(logits, target, tau=0.9)
    assert corrected.view(-1).tolist() == [1, 2, 0, 0, 1, 2]
    assert flipped.view(-1).tolist() == [True, True, False, False, False, False]
    # never the reverse: every defect target is kept
    assert torch.equal(corrected[target > 0], target[target > 0])
    # a stricter tau keeps the 0.95 pixel but flips the 0.97 one
    corrected, _ = self_correct(logits, target, tau=0.96)
    assert corrected.view(-1).tolist() == [0, 2, 0, 0, 1, 2]


def test_self_correction_box_region():
    logits, target = _scene()
    region = torch.tensor([False, True, True, True, True, True]).view(1, 1, 6)
    corrected, flipped = self_correct(logits, target, tau=0.9, region=region)
    assert corrected.view(-1).tolist() == [0, 2, 0, 0, 1, 2]  # pixel 0 lies outside every box
    loss = StudentLoss(LossParams(self_correction_region="boxes"), num_classes=3)
    _, parts = loss({"fine": logits, "binary": None}, {"target": target, "box_mask": region}, epoch=0)
    assert parts["flipped_fraction"] == pytest.approx(1 / 6)
    with pytest.raises(B2PError):
        loss({"fine": logits, "binary": None}, {"target": target, "box_mask": None}, epoch=0)


def test_self_correction_off_during_warmup_and_loss_uses_corrected_targets():
    logits, target = _scene()
    p = LossParams(warmup_epochs=2, w_binary=0.0, w_fine=1.0)
    loss = StudentLoss(p, num_classes=3)
    w = torch.tensor([0.4, 4.0, 4.0])
    raw_ce = F.cross_entropy(logits, target, weight=w, reduction="none").mean()
    for epoch in (0, 1):
        total, parts = loss({"fine": logits, "binary": None}, {"target": target}, epoch=epoch)
        assert parts["flipped_fraction"] == 0.0
        assert float(total) == pytest.approx(float(raw_ce), rel=1e-5)
    total, parts = loss({"fine": logits, "binary": None}, {"target": target}, epoch=2)
    corrected = torch.tensor([1, 2, 0, 0, 1, 2]).view(1, 1, 6)
    assert parts["flipped_fraction"] == pytest.approx(2 / 6)
    assert float(total) == pytest.approx(float(F.cross_entropy(logits, corrected, weight=w, reduction="none").mean()), rel=1e-5)
    assert float(total) < float(raw_ce)  # agreeing with the student's confident finds lowers the loss
    # no self-correction at all when switched off
    _, parts = StudentLoss(LossParams(self_correction=False), 3)({"fine": logits, "binary": None}, {"target": target}, epoch=5)
    assert parts["flipped_fraction"] == 0.0


def test_no_gradient_through_the_correction_mask():
    logits, target = _scene()
    logits = logits.clone().requires_grad_(True)
    total, _ = StudentLoss(LossParams(w_binary=0.0, w_fine=1.0), 3)({"fine": logits, "binary": None}, {"target": target})
    total.backward()
    # the gradient equals that of plain CE against fixed corrected targets
    ref = logits.detach().clone().requires_grad_(True)
    corrected = torch.tensor([1, 2, 0, 0, 1, 2]).view(1, 1, 6)
    F.cross_entropy(ref, corrected, weight=torch.tensor([0.4, 4.0, 4.0]), reduction="none").mean().backward()
    assert torch.allclose(logits.grad, ref.grad, atol=1e-7)


def test_dice_beta_weights_false_positives_less_than_misses():
    target = torch.zeros(1, 10, 10, dtype=torch.bool)
    target[0, 2:6, 2:6] = True  # 16 defect pixels
    k = 5
    with_fp = target.float().clone()
    with_fp.view(-1)[torch.nonzero(~target.view(-1))[:k, 0]] = 1.0  # k extra pixels
    with_fn = target.float().clone()
    with_fn.view(-1)[torch.nonzero(target.view(-1))[:k, 0]] = 0.0  # k missed pixels
    l_fp = float(asymmetric_dice(with_fp, target, beta=0.4))
    l_fn = float(asymmetric_dice(with_fn, target, beta=0.4))
    assert l_fp < l_fn
    assert l_fp == pytest.approx(1 - 16 / (16 + 0.4 * k), rel=1e-5)
    assert l_fn == pytest.approx(1 - 11 / (11 + k), rel=1e-5)
    # beta = 1 is symmetric in the counts: plain Tversky/Dice-like ratio
    assert float(asymmetric_dice(with_fp, target, beta=1.0)) == pytest.approx(1 - 16 / 21, rel=1e-5)
    assert float(asymmetric_dice(target.float(), target)) == pytest.approx(0.0, abs=1e-6)


def test_total_is_weighted_sum_and_binary_head_is_used():
    torch.manual_seed(0)
    fine = torch.randn(2, 3, 8, 8)
    binary = torch.randn(2, 2, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    p = LossParams(self_correction=False)
    total, parts = StudentLoss(p, 3)({"fine": fine, "binary": binary}, {"target": target})
    dice = asymmetric_dice(torch.softmax(binary, 1)[:, 1], target > 0, 0.4)
    ce = F.cross_entropy(fine, target, weight=torch.tensor([0.4, 4.0, 4.0]), reduction="none").mean()
    assert float(total) == pytest.approx(0.5 * float(dice) + 0.5 * float(ce), rel=1e-5)
    # without a binary head, Dice uses the fine head's summed defect probabilities
    _, parts2 = StudentLoss(p, 3)({"fine": fine, "binary": None}, {"target": target})
    dice2 = asymmetric_dice(torch.softmax(fine, 1)[:, 1:].sum(1), target > 0, 0.4)
    assert parts2["dice"] == pytest.approx(float(dice2), rel=1e-5)


def test_outside_box_background_weight():
    fine = torch.zeros(1, 3, 1, 4)  # uniform prediction: every pixel has the same CE
    target = torch.tensor([[[0, 0, 1, 0]]])
    box = torch.tensor([[[False, True, True, True]]])
    base = StudentLoss(LossParams(self_correction=False, w_binary=0, w_fine=1), 3)
    heavy = StudentLoss(LossParams(self_correction=False, w_binary=0, w_fine=1, outside_box_bg_weight=3.0), 3)
    ce = torch.log(torch.tensor(3.0))
    assert float(base({"fine": fine, "binary": None}, {"target": target, "box_mask": box})[0]) == pytest.approx(float(ce * (0.4 * 3 + 4.0) / 4), rel=1e-5)
    assert float(heavy({"fine": fine, "binary": None}, {"target": target, "box_mask": box})[0]) == pytest.approx(float(ce * (0.4 * 3 + 0.4 * 2 + 4.0) / 4), rel=1e-5)


def test_padding_is_ignored_by_every_term():
    """Appending IGNORE (or valid=False) pixels with any logits leaves the loss and its gradient unchanged."""
    torch.manual_seed(1)
    fine, binary = torch.randn(1, 3, 4, 6), torch.randn(1, 2, 4, 6)
    target = torch.randint(0, 3, (1, 4, 6))
    loss = StudentLoss(LossParams(tau=0.5), 3)  # self-correction on: padding must never flip either
    ref, ref_parts = loss({"fine": fine, "binary": binary}, {"target": target})
    pad_fine = torch.cat([fine, 30 * torch.randn(1, 3, 4, 3)], -1).requires_grad_(True)
    pad_binary = torch.cat([binary, 30 * torch.randn(1, 2, 4, 3)], -1)
    pad_target = torch.cat([target, torch.full((1, 4, 3), IGNORE)], -1)
    total, parts = loss({"fine": pad_fine, "binary": pad_binary}, {"target": pad_target}, epoch=0)
    assert float(total.detach()) == pytest.approx(float(ref), rel=1e-5)
    assert parts["flipped_fraction"] == pytest.approx(ref_parts["flipped_fraction"])
    total.backward()
    assert float(pad_fine.grad[..., 6:].abs().max()) == 0.0
    # a `valid` mask acts the same way when the target itself is not marked
    valid = torch.cat([torch.ones(1, 4, 6, dtype=torch.bool), torch.zeros(1, 4, 3, dtype=torch.bool)], -1)
    labelled = torch.cat([target, torch.ones(1, 4, 3, dtype=torch.long)], -1)
    total_v, _ = loss({"fine": pad_fine.detach(), "binary": pad_binary}, {"target": labelled, "valid": valid})
    assert float(total_v) == pytest.approx(float(ref), rel=1e-5)


def test_bad_loss_params():
    with pytest.raises(B2PError):
        LossParams(self_correction_region="inside")
    with pytest.raises(B2PError):
        LossParams(tau=1.5)


def test_balanced_class_weights_follow_the_teacher_masks(tmp_path):
    """class_balance: rarer defect classes weigh more, the defect pixels' total weight stays, 0 = uniform."""
    import numpy as np

    from b2p.dataset import ImageRecord
    from b2p.labels import write_label_map
    from b2p.student.data import Sample
    from b2p.student.train import balanced_class_weights

    samples = []
    for i in range(2):  # class 1: 90 px per image, class 2: 10 px, class 3: none
        lm = np.zeros((20, 20), np.uint8)
        lm.flat[:90] = 1
        lm.flat[100:110] = 2
        write_label_map(tmp_path / f"{i}.png", lm)
        rec = ImageRecord(id=i, file_name=f"{i}.png", path=tmp_path / f"{i}.png", width=20, height=20, split="train", batch="b", sha256="", has_manual_mask=False)
        samples.append(Sample(rec, tmp_path / f"{i}.png"))
    w = balanced_class_weights(samples, 4, bg_weight=0.4, defect_weight=4.0, power=0.5).tolist()
    assert w[0] == pytest.approx(0.4) and w[3] == pytest.approx(4.0)  # background as set; an absent class keeps the default
    assert w[2] / w[1] == pytest.approx((0.9 / 0.1) ** 0.5)  # inverse square root of the share
    assert 0.9 * w[1] + 0.1 * w[2] == pytest.approx(4.0)  # the defect pixels' mean weight is kept
    assert balanced_class_weights(samples, 4, 0.4, 4.0, power=0.0).tolist() == pytest.approx([0.4, 4.0, 4.0, 4.0])
