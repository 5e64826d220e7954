"""The from-scratch baseline of the paper's comparison: a small four-level U-Net (`--arch unet`)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class SmallUNet(nn.Module):
    """forward(x: Bx3xHxW) -> {"fine": Bx(K+1)xHxW logits, "binary": None}; all parameters train.

    Encoder base, 2, 4, 8 x `unet_base` channels with three 2x2 max-pools; transposed-conv decoder with
    skip concatenation. No binary head: the Dice loss then uses p(defect) from the fine head.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.provenance = {"backbone": "none (U-Net from scratch)", "pretrained": False, "source": "random init (from-scratch baseline)"}
        b = config.unet_base
        self.enc = nn.ModuleList([_double_conv(3, b), _double_conv(b, 2 * b), _double_conv(2 * b, 4 * b), _double_conv(4 * b, 8 * b)])
        self.ups = nn.ModuleList([nn.ConvTranspose2d(8 * b, 4 * b, 2, stride=2), nn.ConvTranspose2d(4 * b, 2 * b, 2, stride=2), nn.ConvTranspose2d(2 * b, b, 2, stride=2)])
        self.dec = nn.ModuleList([_double_conv(8 * b, 4 * b), _double_conv(4 * b, 2 * b), _double_conv(2 * b, b)])
        self.head = nn.Conv2d(b, config.num_classes, 1)

    backbone_frozen = False

    def forward(self, x: torch.Tensor, feats=None, edges=None) -> dict:  # feats, edges: the B2P student's (unused)
        h, w = x.shape[-2:]
        skips = []
        y = x
        for i, enc in enumerate(self.enc):
            y = enc(y if i == 0 else F.max_pool2d(y, 2))
            skips.append(y)
        for up, dec, skip in zip(self.ups, self.dec, reversed(skips[:-1])):
            y = up(y)
            if y.shape[-2:] != skip.shape[-2:]:  # odd sizes
                y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = dec(torch.cat([y, skip], dim=1))
        y = self.head(y)
        if y.shape[-2:] != (h, w):
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        return {"fine": y, "binary": None}
