"""The Boxes2Pixels student: a (mostly frozen) backbone, a hierarchical decoder, a detail branch, two heads.

Architecture (METHOD.md "Student"): the tapped backbone maps are projected to `decoder_dim` channels
(1x1 conv + BN + ReLU), resized to the finest tap, and fused top-down from the deepest (add, then
conv3x3-BN-ReLU-conv3x3-BN, add the sum back, ReLU); three up-steps (conv3x3 to 4*C', PixelShuffle x2, BN,
ReLU) take 256 -> 128 -> 64 -> 32 channels; the result is resized to the detail branch (two stride-2
conv3x3, H/4, 32 ch), concatenated and mixed (conv3x3 64 -> 64); two heads of the same shape (x2,
conv3x3 64 -> 32 BN ReLU, x2, conv1x1) give binary (2) and fine (K + 1) logits at the input size.
Our optional additions (off by default, so the paper's student is unchanged): `context: strip` (StripContext
after the fusion; with `edges: true` each row's and column's distance to the image's nearest edge joins it)
and `refine: true` (PixelRefine on the logits at the input size).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from b2p.errors import B2PError
from b2p.student.geometry import Geometry
from b2p.student.backbones import (
    BACKBONES,
    DINOV2_SIZES,
    EFFNET_NAME,
    TF_MEAN,
    TF_STD,
    backbone_multiple,
    backbone_normalisation,
    build_backbone,
    default_taps,
)

ADAPTATIONS = ("bitfit", "frozen", "full")
DECODERS = ("full", "lite")
CONTEXTS = ("none", "strip")
ARCHS = ("b2p", "unet")
UNET_MULTIPLE = 8  # three 2x2 max-pools
# the U-Net learns from scratch on whatever it is fed: the symmetric [-1, 1] scaling, recorded like any other
UNET_MEAN, UNET_STD = TF_MEAN, TF_STD
DEFAULT_TILE = 256  # px at model scale; rounded up to the backbone's multiple when not given


@dataclass
class StudentConfig:
    """Everything needed to rebuild a student and feed it (JSON-serialisable; stored in model.pt).

    Geometry (see geometry.py): images are resized by `scale` (model px per image px; 1.0 = native
    resolution), the longer side capped at `max_side`, padded to a multiple of `multiple`, and seen in
    square tiles of `tile_size` px (training crops, sliding-window prediction). `mean`/`std` are the input
    statistics of the backbone's weights. None fields are filled from the backbone on construction, so a
    stored config always holds the values the model was trained with.
    """

    num_classes: int  # K + 1, background included
    arch: str = "b2p"  # b2p | unet (the from-scratch baseline)
    backbone: str = EFFNET_NAME  # dinov2_s | dinov2_b | dinov2_l | dinov2_g | efficientnet_lite0
    adaptation: str = "bitfit"  # bitfit (bias + norm params train) | frozen | full
    taps: list[int] | None = None  # None: paper's (1, 2, 4, 7) for DINOv2, (4, 10, 15) for EfficientNet
    detail_branch: bool = True
    binary_head: bool = True
    tile_size: int | None = None  # None: DEFAULT_TILE rounded up to `multiple`; else must be a multiple of it
    scale: float = 1.0
    max_side: int | None = None
    multiple: int | None = None  # None: the backbone's (DINOv2 patch 14, EfficientNet 32, U-Net 8)
    decoder_dim: int | None = None  # None: 256 for DINOv2 (paper), 128 for EfficientNet-Lite0 (measured)
    # full: the paper's decoder; lite: the same stages at about a quarter of the cost (one conv per fusion,
    # 32-channel up-steps, mixer and heads): with a frozen backbone's cached features, 24 epochs in the time
    # BitFit + the full decoder takes for 8 (benchmarks/bench_student.py --decoder lite)
    decoder: str = "full"
    # strip: row, column and whole-input means of the fused decoder map join it (StripContext); none: the paper's
    context: str = "none"
    # a full-resolution refinement of both heads' logits from the image itself (PixelRefine): thin defects
    # are 1-3 px wide, finer than the heads' stride-2 features
    refine: bool = False
    # with a strip context: each row's and column's distance to the image's nearest edge joins the means
    # (StripContext): defects that hug the edges of a part look like the plain surface in a tile cut from
    # the middle of the image
    edges: bool = False
    upsample_steps: int | None = None  # x2 steps of the three up-steps; None: 3 for ViT, to ~H/4 for CNNs
    unet_base: int = 32
    # tiny DINOv2 config for tests (hidden_size, num_hidden_layers, ...): always random weights
    dinov2_config: dict | None = None
    mean: list[float] | None = None  # None: the backbone's (EfficientNet-Lite0 0.5, DINOv2 ImageNet)
    std: list[float] | None = None
    # LEGACY (model.pt version 1 only): the square side every image was resized to, aspect ratio lost.
    # Set by the checkpoint loader for old models so they predict as they were trained; never for new ones.
    legacy_input_size: int | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise B2PError(f"arch must be one of {list(ARCHS)}, got {self.arch!r}")
        if self.backbone not in BACKBONES:
            raise B2PError(f"backbone must be one of {list(BACKBONES)}, got {self.backbone!r}")
        if self.decoder not in DECODERS:
            raise B2PError(f"decoder must be one of {list(DECODERS)}, got {self.decoder!r}")
        if self.context not in CONTEXTS:
            raise B2PError(f"context must be one of {list(CONTEXTS)}, got {self.context!r}")
        if self.adaptation not in ADAPTATIONS:
            raise B2PError(f"adaptation must be one of {list(ADAPTATIONS)}, got {self.adaptation!r}")
        if self.arch == "unet" and (self.context != "none" or self.refine):
            # never ignored silently: the U-Net baseline has neither part
            raise B2PError("context and refine are parts of the Boxes2Pixels student; arch unet has neither: "
                "set train.context: none and train.refine: false (or --set context=none --set refine=false)")
        if self.edges and self.context != "strip":
            raise B2PError("edges join the strip context: set context to strip or edges to false")
        if self.num_classes < 2:
            raise B2PError("the student needs at least one defect class")
        if self.taps is None:
            self.taps = list(default_taps(self.backbone))
        self.taps = [int(t) for t in self.taps]
        if self.decoder_dim is None:
            self.decoder_dim = 128 if self.backbone == EFFNET_NAME else 256
        if self.mean is None or self.std is None:
            mean, std = (UNET_MEAN, UNET_STD) if self.arch == "unet" else backbone_normalisation(self.backbone)
            self.mean = list(mean) if self.mean is None else self.mean
            self.std = list(std) if self.std is None else self.std
        self.mean, self.std = [float(v) for v in self.mean], [float(v) for v in self.std]
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise B2PError(f"mean and std need 3 values (RGB), std > 0; got mean {self.mean}, std {self.std}")
        self._check_geometry()

    def _check_geometry(self) -> None:
        need = self.required_multiple()
        if self.multiple is None:
            self.multiple = need
        if self.multiple < 1 or self.multiple % need:
            raise B2PError(f"multiple must be a positive multiple of {need} for this model, got {self.multiple}")
        if self.tile_size is None:
            self.tile_size = -(-DEFAULT_TILE // self.multiple) * self.multiple
        if self.legacy_input_size is not None:
            return  # LEGACY: a version-1 model's square input; its tile_size is unused
        m = self.multiple
        if self.tile_size < max(16, m) or self.tile_size % m:
            lo, hi = max(m, self.tile_size // m * m), -(-self.tile_size // m) * m
            what = f"the DINOv2 patch size {m}" if self.arch == "b2p" and self.backbone in DINOV2_SIZES else str(m)
            raise B2PError(f"tile_size must be a multiple of {what} (e.g. {lo} or {hi}), got {self.tile_size}")
        if not self.scale > 0:
            raise B2PError(f"scale must be positive (1.0 = native resolution), got {self.scale}")
        if self.max_side is not None and self.max_side < 16:
            raise B2PError(f"max_side must be at least 16 px (or null), got {self.max_side}")

    def required_multiple(self) -> int:
        """The side multiple the network itself needs (model-space image and tile sides)."""
        if self.arch == "unet":
            return UNET_MULTIPLE
        return backbone_multiple(self.backbone, self.dinov2_config)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StudentConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def count_params(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": int(total), "trainable": int(trainable)}


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResidualFusion(nn.Module):
    """s = deep + skip; out = ReLU(s + BN(conv(ReLU(BN(conv(s))))))."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        )

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        s = deep + skip
        return F.relu(s + self.body(s))


class LiteFusion(nn.Module):
    """s = deep + skip; out = ReLU(BN(conv3x3(s))): one conv instead of ResidualFusion's two."""

    def __init__(self, c: int):
        super().__init__()
        self.body = _cbr(c, c)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.body(deep + skip)


class StripContext(nn.Module):
    """x + BN(conv1x1([row mean - mean, column mean - mean, mean])), the means over the whole input (strip
    pooling, Hou et al. 2020). Why: a 3x3 decoder sees a few hundred pixels; a defect such as Magnetic-Tile's
    "uneven" band is a whole row range slightly darker than the rest of the image, visible only against it.

    `edges`: each row's and column's distance to the image's nearest edge joins the means, as exp(-d / s) at
    a few scales: a tile cut from the middle of an image cannot tell otherwise that a band hugs its edge."""

    EDGE_SCALES = (8.0, 32.0, 128.0)  # model px: exp(-distance / scale), from a few pixels to a tile

    def __init__(self, c: int, edges: bool = False):
        super().__init__()
        self.mix = nn.Sequential(nn.Conv2d(3 * c + (2 * len(self.EDGE_SCALES) if edges else 0), c, 1), nn.BatchNorm2d(c))
        self.edges = edges

    def forward(self, x: torch.Tensor, edges: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`edges` (BxH, BxW: each input row's / column's distance to the image's nearest edge, model px, at
        the input's resolution) is needed when the context was built with `edges`."""
        g = x.mean((-2, -1), keepdim=True)
        rows, cols = x.mean(-1, keepdim=True) - g, x.mean(-2, keepdim=True) - g
        z = [rows.expand_as(x), cols.expand_as(x), g.expand_as(x)]
        if self.edges:
            if edges is None:
                raise B2PError("this strip context reads the distances to the image edges: pass edges=(rows, cols)")
            h, w = x.shape[-2:]
            if torch.onnx.is_in_onnx_export():
                # ONNX has no area resize to a size known only at run time; the input's sides are whole
                # multiples of the map's (both multiples of the backbone's stride), so the area average is
                # the mean over blocks of rows (columns)
                b = x.shape[0]
                er = edges[0].to(x.dtype).reshape(b, h, -1).mean(-1)[:, None, :, None]
                ec = edges[1].to(x.dtype).reshape(b, w, -1).mean(-1)[:, None, None, :]
            else:
                er = F.interpolate(edges[0][:, None, :, None].to(x.dtype), size=(h, 1), mode="area")
                ec = F.interpolate(edges[1][:, None, None, :].to(x.dtype), size=(1, w), mode="area")
            for s in self.EDGE_SCALES:
                z += [torch.exp(-er / s).expand(-1, -1, h, w), torch.exp(-ec / s).expand(-1, -1, h, w)]
        return F.relu(x + self.mix(torch.cat(z, 1)))


class UpStep(nn.Module):
    """conv3x3 to scale^2 * cout, PixelShuffle(scale), BN, ReLU (scale 1: a plain conv-BN-ReLU)."""

    def __init__(self, cin: int, cout: int, scale: int = 2):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout * scale * scale, 3, padding=1), nn.PixelShuffle(scale), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class HierarchicalDecoder(nn.Module):
    """Feature maps (shallow first, possibly different strides) -> Bx32x(h)x(w) at about stride 4."""

    def __init__(
        self,
        in_channels: list[int],
        strides: list[float],
        dim: int = 256,
        upsample_steps: int | None = None,
        vit: bool = False,
        lite: bool = False,
        context: str = "none",
        edges: bool = False,
    ):
        super().__init__()
        # built first (the order of initialisation the recorded runs used; it is applied after the fusion)
        self.context = StripContext(dim, edges) if context == "strip" else None
        self.proj = nn.ModuleList([_cbr(c, dim, k=1) for c in in_channels])
        self.fuse = nn.ModuleList([(LiteFusion if lite else ResidualFusion)(dim) for _ in range(len(in_channels) - 1)])
        finest = min(strides)
        if upsample_steps is None:
            # the paper's ViT decoder always doubles three times (37 -> 296 at 518 px); for a CNN double
            # only as far as stride ~4, the detail branch's resolution
            upsample_steps = 3 if vit else max(0, min(3, round(math.log2(max(finest, 1) / 4))))
        self.upsample_steps = int(upsample_steps)
        if lite:  # only the x2 steps, straight to 32 channels (one plain step when none is needed)
            n = max(1, self.upsample_steps)
            self.up = nn.ModuleList([UpStep(dim if i == 0 else 32, 32, 2 if i < self.upsample_steps else 1) for i in range(n)])
        else:
            chans = [dim, 128, 64, 32]
            self.up = nn.ModuleList(
                [UpStep(chans[i], chans[i + 1], 2 if i < self.upsample_steps else 1) for i in range(3)]
            )

    def forward(self, feats: list[torch.Tensor], edges: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`edges`: see StripContext (read only by a context built with edges)."""
        size = max((f.shape[-2:] for f in feats), key=lambda s: s[0] * s[1])
        p = [proj(f) for proj, f in zip(self.proj, feats)]
        p = [x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in p]
        x = p[-1]
        for i in range(len(p) - 2, -1, -1):  # deepest first
            x = self.fuse[len(p) - 2 - i](x, p[i])
        if self.context is not None:
            x = self.context(x, edges)
        for up in self.up:
            x = up(x)
        return x


class Head(nn.Sequential):
    """x2, conv3x3 64 -> 32 BN ReLU, x2, conv1x1 -> logits (layers kept in this order, so model.pt keys stay).

    Computed in a cheaper, identical order: the 1x1 conv is a per-pixel affine map and bilinear weights sum
    to 1, so conv1x1(up(z)) == up(conv1x1(z)); applying it before the last x2 moves that upsampling from 32
    channels to the few logit channels. `forward_from_up` takes the first x2 already done (the heads share it).
    """

    def __init__(self, cout: int, cin: int = 64, mid: int = 32):
        super().__init__(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            _cbr(cin, mid),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(mid, cout, 1),
        )

    def forward_from_up(self, up: torch.Tensor) -> torch.Tensor:
        return self[2](self[3](self[1](up)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from_up(self[0](x))


class PixelRefine(nn.Module):
    """logits + conv1x1(ReLU(BN(conv3x3(ReLU(BN(conv3x3([logits, image]))))))) at the input resolution. The last
    conv starts at zero, so training starts from the heads' own logits and learns only a correction."""

    def __init__(self, n_logits: int, mid: int = 16):
        super().__init__()
        self.body = nn.Sequential(_cbr(n_logits + 3, mid), _cbr(mid, mid), nn.Conv2d(mid, n_logits, 1))
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return logits + self.body(torch.cat([logits, image], 1))


def class_map(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """The per-pixel class of logits or probabilities (their argmax over `dim`, ties to the first class).
    torch's argmax over a channel dim is several times slower on CPU than max(dim).indices, which is the same."""
    return scores.max(dim).indices


def _resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class Boxes2PixelsStudent(nn.Module):
    """forward(x: Bx3xHxW float, normalised) -> {"fine": Bx(K+1)xHxW, "binary": Bx2xHxW or None} logits."""

    def __init__(self, config: StudentConfig, load_weights: bool = True, weights: str | None = None, allow_download: bool = False):
        super().__init__()
        self.config = config
        # load_weights=False: the structure only (a checkpoint's state dict fills it in)
        src = weights if load_weights else "random"
        self.backbone, self.provenance = build_backbone(
            config.backbone, config.taps, src, allow_download, dinov2_config_override=config.dinov2_config
        )
        info = self.backbone.info
        lite = config.decoder == "lite"
        self.decoder = HierarchicalDecoder(
            info.channels, info.strides, config.decoder_dim, config.upsample_steps, vit=config.backbone in DINOV2_SIZES, lite=lite,
            context=config.context, edges=config.edges,
        )
        self.detail = nn.Sequential(_cbr(3, 24, stride=2), _cbr(24, 32, stride=2)) if config.detail_branch else None
        mixed, mid = (32, 16) if lite else (64, 32)
        self.mixer = _cbr(64 if config.detail_branch else 32, mixed)
        self.fine_head = Head(config.num_classes, mixed, mid)
        self.binary_head = Head(2, mixed, mid) if config.binary_head else None
        n_logits = config.num_classes + (2 if config.binary_head else 0)
        self.refine = PixelRefine(n_logits) if config.refine else None
        self.apply_adaptation()

    # --- adaptation: which backbone parameters train ---
    def apply_adaptation(self) -> None:
        mode = self.config.adaptation
        norm_types = (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)
        norm_params = {id(p) for m in self.backbone.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
        for name, p in self.backbone.named_parameters():
            if mode == "full":
                p.requires_grad = True
            elif mode == "frozen":
                p.requires_grad = False
            else:  # BitFit as in the paper: names holding "bias" or "norm" (plus BN affine params of CNNs)
                p.requires_grad = "bias" in name or "norm" in name or id(p) in norm_params

    def train(self, mode: bool = True) -> Boxes2PixelsStudent:
        super().train(mode)
        # a frozen or BitFit backbone keeps its running statistics (BN) fixed: batch size 1 would ruin them
        if self.config.adaptation != "full":
            self.backbone.eval()
        return self

    @property
    def backbone_frozen(self) -> bool:
        return self.config.adaptation == "frozen"

    def backbone_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone(x)

    def forward(
        self, x: torch.Tensor, feats: list[torch.Tensor] | None = None, edges: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor | None]:
        """`edges` (BxH, BxW: each row's / column's distance to the image's edges, Geometry.edge_distance) for a
        model with `edges`; None: the input is the whole image."""
        h, w = x.shape[-2:]
        if feats is None:
            feats = self.backbone(x)
        if self.config.edges and edges is None:  # the input taken as the whole image, unpadded
            edges = tuple(torch.from_numpy(d).to(x).expand(x.shape[0], -1) for d in Geometry(h, w, 1.0, multiple=1).edge_distance())
        y = self.decoder([f.to(x.dtype) for f in feats], edges)
        if self.detail is not None:
            d = self.detail(x)
            y = torch.cat([_resize_to(y, d.shape[-2:]), d], dim=1)
        else:
            y = _resize_to(y, (math.ceil(h / 4), math.ceil(w / 4)))
        y = self.mixer(y)
        up = self.fine_head[0](y)  # the first x2 of both heads (no parameters): done once
        out = {"fine": _resize_to(self.fine_head.forward_from_up(up), (h, w)), "binary": None}
        if self.binary_head is not None:
            out["binary"] = _resize_to(self.binary_head.forward_from_up(up), (h, w))
        if self.refine is not None:
            k = self.config.num_classes
            both = self.refine(torch.cat([t for t in (out["fine"], out["binary"]) if t is not None], 1), x)
            out["fine"], out["binary"] = both[:, :k], (both[:, k:] if out["binary"] is not None else None)
        return out


def build_model(config: StudentConfig, load_weights: bool = True, weights: str | None = None, allow_download: bool = False) -> nn.Module:
    """The student described by `config`; `weights` is the backbone weight source (see backbones.py)."""
    if config.arch == "unet":
        from b2p.student.unet import SmallUNet

        return SmallUNet(config)
    return Boxes2PixelsStudent(config, load_weights=load_weights, weights=weights, allow_download=allow_download)


def describe_backbone(model: nn.Module) -> str:
    prov: dict[str, Any] = getattr(model, "provenance", {})
    if not prov:
        return "no backbone"
    kind = "PRETRAINED" if prov.get("pretrained") else "RANDOM WEIGHTS (not pretrained)"
    return f"{prov.get('backbone')} [{kind}] from {prov.get('source')}"
