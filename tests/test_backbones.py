"""Backbones: parameter counts, every DINOv2 weight-loading path, missing weights, EfficientNet-Lite0."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from b2p.errors import B2PError
from b2p.student import backbones
from b2p.student.backbones import hf_to_official, load_dinov2, official_to_hf
from b2p.student.model import StudentConfig, build_model, count_params

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, patch_size=8, image_size=32)


@pytest.fixture
def no_weight_places(tmp_path: Path, monkeypatch):
    """Empty local weights folder and torch.hub cache: nothing can be found unless a test places it."""
    wdir, hub = tmp_path / "weights", tmp_path / "hub" / "checkpoints"
    wdir.mkdir()
    hub.mkdir(parents=True)
    monkeypatch.setenv("B2P_WEIGHTS_DIR", str(wdir))
    monkeypatch.setattr(backbones, "_torch_hub_checkpoint_dir", lambda: hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return wdir, hub


def _tiny_reference(**extra):
    from transformers import Dinov2Model

    torch.manual_seed(0)
    m = Dinov2Model(backbones.dinov2_config("dinov2_s", **TINY, **extra)).eval()
    with torch.no_grad():  # layer scale starts at 1.0 and biases at 0: make every tensor distinct
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _same_outputs(a, b) -> bool:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ya = a.eval()(pixel_values=x, output_hidden_states=True).hidden_states
        yb = b.eval()(pixel_values=x, output_hidden_states=True).hidden_states
    return all(torch.equal(u, v) for u, v in zip(ya, yb))


def test_dinov2_s_parameter_counts_match_the_paper():
    # ViT-S/14 sizes, random weights, no download. The paper reports 27.6 M total / 5.6 M trainable,
    # rounded to 0.1 M, so a correct build lies within 0.05 M; we allow 0.1 M for framework-level extras
    # (transformers keeps a 384-value mask token the decoder never uses).
    model = build_model(StudentConfig(num_classes=3, backbone="dinov2_s", tile_size=224), weights="random")
    pc = count_params(model)
    assert abs(pc["total"] - 27.6e6) < 0.1e6, pc
    assert abs(pc["trainable"] - 5.6e6) < 0.1e6, pc
    assert model.provenance["pretrained"] is False
    # frozen: only the decoder and heads train; full: everything
    frozen = build_model(StudentConfig(num_classes=3, backbone="dinov2_s", adaptation="frozen", tile_size=224), weights="random")
    bb = sum(p.numel() for p in frozen.backbone.parameters())
    assert count_params(frozen)["trainable"] == pc["total"] - bb
    names = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert names and all("bias" in n or "norm" in n for n in names)


def test_official_key_conversion_round_trip():
    m = _tiny_reference()
    official = hf_to_official(m.state_dict())
    assert "blocks.0.attn.qkv.weight" in official and official["blocks.0.attn.qkv.weight"].shape == (96, 32)
    assert "blocks.2.ls1.gamma" in official and "pos_embed" in official and "norm.weight" in official
    back = official_to_hf(official, set(m.state_dict()))
    assert set(back) == set(m.state_dict())
    assert all(torch.equal(back[k], v) for k, v in m.state_dict().items())
    # SwiGLU (ViT-g) blocks: w12 is split into gate and up halves
    g = _tiny_reference(use_swiglu_ffn=True)
    og = hf_to_official(g.state_dict())
    assert any(k.endswith("mlp.w12.weight") for k in og)
    back = official_to_hf(og, set(g.state_dict()))
    assert all(torch.equal(back[k], v) for k, v in g.state_dict().items())


def test_load_official_pth_file_and_torch_hub_cache(tmp_path: Path, no_weight_places):
    _, hub = no_weight_places
    ref = _tiny_reference()
    f = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(hf_to_official(ref.state_dict()), f)
    model, prov = load_dinov2("dinov2_s", str(f), config_overrides=TINY)
    assert prov["pretrained"] is True and "file" in prov["source"]
    assert _same_outputs(ref, model)
    # the same file found in the torch.hub cache without naming it
    (hub / f.name).write_bytes(f.read_bytes())
    model, prov = load_dinov2("dinov2_s", None, config_overrides=TINY)
    assert str(hub) in prov["source"]
    assert _same_outputs(ref, model)


def test_load_hf_folder_and_weights_dir(tmp_path: Path, no_weight_places):
    wdir, _ = no_weight_places
    ref = _tiny_reference()
    folder = tmp_path / "some-folder"
    ref.save_pretrained(folder)
    model, prov = load_dinov2("dinov2_s", str(folder), config_overrides=TINY)
    assert _same_outputs(ref, model) and "hf folder" in prov["source"]
    # found by name in the local weights folder (the air-gapped layout)
    ref.save_pretrained(wdir / "dinov2-small")
    model, prov = load_dinov2("dinov2_s", None, config_overrides=TINY)
    assert _same_outputs(ref, model) and "dinov2-small" in prov["source"]
    # a transformers-key safetensors file works too
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "w.safetensors")
    model, _ = load_dinov2("dinov2_s", str(tmp_path / "w.safetensors"), config_overrides=TINY)
    assert _same_outputs(ref, model)
    # the wrong size is refused with a clear message
    with pytest.raises(B2PError, match="hidden size"):
        load_dinov2("dinov2_s", str(folder))


def test_missing_weights_is_a_clear_error_never_random(no_weight_places):
    wdir, hub = no_weight_places
    with pytest.raises(B2PError) as e:
        load_dinov2("dinov2_s", None)
    msg = str(e.value)
    assert "dinov2_vits14_pretrain.pth" in msg and str(wdir) in msg and str(hub) in msg and "dinov2-small" in msg
    with pytest.raises(B2PError, match="no pretrained weights"):
        build_model(StudentConfig(num_classes=3, backbone="dinov2_s", tile_size=224))
    with pytest.raises(B2PError, match="no such file"):
        load_dinov2("dinov2_s", "/nonexistent/dino.pth")
    with pytest.raises(B2PError):  # hub id not in the local cache, and download not allowed
        load_dinov2("dinov2_s", "facebook/dinov2-small-not-cached")


def test_corrupt_or_mismatched_checkpoint(tmp_path: Path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(B2PError, match="could not read"):
        load_dinov2("dinov2_s", str(bad), config_overrides=TINY)
    other = _tiny_reference()
    sd = hf_to_official(other.state_dict())
    del sd["blocks.2.attn.proj.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(B2PError, match="missing"):
        load_dinov2("dinov2_s", str(tmp_path / "partial.pth"), config_overrides=TINY)


def test_efficientnet_lite0_embedded_weights(tmp_path: Path):
    m = build_model(StudentConfig(num_classes=3, tile_size=64))
    assert m.provenance["pretrained"] is True
    # the embedded ImageNet weights really are loaded: compare with the packaged file
    state = torch.load(backbones.efficientnet_lite0_weights_file(), map_location="cpu", weights_only=True)
    assert torch.equal(m.backbone.net._conv_stem.weight, state["_conv_stem.weight"])
    assert m.backbone.info.strides == [8.0, 16.0, 32.0] and m.config.decoder_dim == 128
    with torch.no_grad():
        out = m.eval()(torch.randn(1, 3, 64, 64))
    assert out["fine"].shape == (1, 3, 64, 64) and out["binary"].shape == (1, 2, 64, 64)
    # BitFit on a CNN: only BN affine parameters (and biases) of the backbone train
    trainable = [n for n, p in m.backbone.named_parameters() if p.requires_grad]
    assert trainable and all("_bn" in n or "bias" in n for n in trainable)
    r = build_model(StudentConfig(num_classes=3, tile_size=64), weights="random")
    assert r.provenance["pretrained"] is False
    assert not torch.equal(r.backbone.net._conv_stem.weight, state["_conv_stem.weight"])
    torch.save({"x": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(B2PError, match="do not fit"):
        build_model(StudentConfig(num_classes=3, tile_size=64), weights=str(tmp_path / "wrong.pth"))


def test_lite_decoder_keeps_the_outputs_at_a_fraction_of_the_cost():
    full = build_model(StudentConfig(num_classes=4, tile_size=64, decoder_dim=64), weights="random")
    lite = build_model(StudentConfig(num_classes=4, tile_size=64, decoder_dim=64, decoder="lite"), weights="random")
    x = torch.randn(2, 3, 64, 96)  # non-square: heads come back at the input size
    with torch.no_grad():
        a, b = full.eval()(x), lite.eval()(x)
    for out in (a, b):
        assert out["fine"].shape == (2, 4, 64, 96) and out["binary"].shape == (2, 2, 64, 96)

    def decoder_params(m):
        return sum(p.numel() for n, p in m.named_parameters() if not n.startswith("backbone."))

    assert decoder_params(lite) * 2 < decoder_params(full)
    # the same stages: projections, fusions, detail branch, both heads
    assert len(lite.decoder.proj) == len(full.decoder.proj) and len(lite.decoder.fuse) == len(full.decoder.fuse)
    assert lite.detail is not None and lite.binary_head is not None
    with pytest.raises(B2PError, match="decoder must be one of"):
        StudentConfig(num_classes=3, decoder="huge")


def test_pixel_refine_starts_as_the_heads_and_learns_a_full_resolution_correction():
    torch.manual_seed(0)
    cfg = dict(num_classes=4, tile_size=64, decoder_dim=32, decoder="lite")
    plain = build_model(StudentConfig(**cfg), weights="random").eval()
    refined = build_model(StudentConfig(**cfg, refine=True), weights="random").eval()
    refined.load_state_dict(plain.state_dict(), strict=False)  # same backbone, decoder and heads
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = plain(x), refined(x)
    # the last conv starts at zero: an untrained refinement returns the heads' logits unchanged
    assert torch.equal(a["fine"], b["fine"]) and torch.equal(a["binary"], b["binary"])
    # it sees single pixels: once its last conv is non-zero, one changed image pixel moves the refined logits
    # there by more than it moves the heads' own
    with torch.no_grad():
        refined.refine.body[-1].weight.normal_()
        x2 = x.clone()
        x2[..., 30, 40] += 5.0
        d = (refined(x2)["fine"] - refined(x)["fine"]).abs().sum(1)[0]
        d0 = (plain(x2)["fine"] - plain(x)["fine"]).abs().sum(1)[0]
    assert (d - d0).abs()[30, 40] > 0


def test_strip_context_sees_the_whole_input():
    torch.manual_seed(0)
    m = build_model(StudentConfig(num_classes=3, tile_size=64, decoder_dim=32, decoder="lite", context="strip"), weights="random").eval()
    assert m.decoder.context is not None
    ctx = m.decoder.context
    x = torch.randn(1, 32, 8, 12)
    x2 = x.clone()
    x2[..., 0, 0] += 3.0  # one far corner of the map
    with torch.no_grad():
        ctx.mix[0].weight.normal_()
        d = (ctx(x2) - ctx(x)).abs().sum(1)[0]
    # a 3x3 conv would change only the corner's neighbours; the strip means reach every row and column
    assert (d[7, 1:] > 0).all() and (d[1:, 11] > 0).all()
    with torch.no_grad():
        out = m(torch.randn(1, 3, 64, 96))
    assert out["fine"].shape == (1, 3, 64, 96)
    with pytest.raises(B2PError, match="context must be one of"):
        StudentConfig(num_classes=3, context="global")
    for extra in ({"context": "strip"}, {"refine": True}):  # the U-Net has neither part: refused, not ignored
        with pytest.raises(B2PError, match="arch unet has neither"):
            StudentConfig(num_classes=3, arch="unet", **extra)


def test_edges_join_the_strip_context_and_need_it():
    with pytest.raises(B2PError, match="edges join the strip context"):
        StudentConfig(num_classes=3, edges=True)
    torch.manual_seed(0)
    m = build_model(StudentConfig(num_classes=3, tile_size=64, decoder_dim=32, decoder="lite", context="strip", edges=True), weights="random").eval()
    ctx = m.decoder.context
    with torch.no_grad():
        ctx.mix[0].weight.normal_()
        x = torch.randn(1, 32, 8, 8)
        near = (torch.zeros(1, 64), torch.zeros(1, 64))  # every row and column on an image edge
        far = (torch.full((1, 64), 500.0), torch.full((1, 64), 500.0))  # the middle of a huge image
        assert not torch.allclose(ctx(x, edges=near), ctx(x, edges=far), atol=1e-3)
        with pytest.raises(B2PError, match="distances to the image edges"):
            ctx(x)
        # the whole model without edges treats its input as the whole image
        img = torch.randn(1, 3, 64, 64)
        own = torch.tensor([min(i, 63 - i) for i in range(64)], dtype=torch.float32)[None]
        assert torch.equal(m(img)["fine"], m(img, edges=(own, own))["fine"])


@pytest.mark.parametrize("key,built", [("decoder", "full"), ("context", "none"), ("refine", False), ("edges", False)])
def test_configs_from_before_an_option_rebuild_what_they_were_trained_with(key, built):
    # model.pt files written before the option existed have no such key in their config
    d = StudentConfig(num_classes=3, tile_size=64, decoder="lite", context="strip", refine=True).to_dict()
    del d[key]
    assert getattr(StudentConfig.from_dict(d), key) == built


def test_config_validation():
    with pytest.raises(B2PError, match="patch size 14 .e.g. 490 or 504"):
        StudentConfig(num_classes=3, backbone="dinov2_s", tile_size=500)
    with pytest.raises(B2PError, match="multiple of 32"):
        StudentConfig(num_classes=3, tile_size=100)
    with pytest.raises(B2PError, match="multiple of 32"):
        StudentConfig(num_classes=3, multiple=48)
    with pytest.raises(B2PError, match="scale"):
        StudentConfig(num_classes=3, scale=0)
    with pytest.raises(B2PError):
        StudentConfig(num_classes=3, adaptation="lora")
    c = StudentConfig(num_classes=4, backbone="dinov2_b", tile_size=224)
    assert c.taps == [1, 2, 4, 7]
    assert StudentConfig.from_dict(c.to_dict()) == c
    # geometry defaults come from the backbone: its side multiple, a tile that is a multiple of it
    assert (StudentConfig(num_classes=3).multiple, StudentConfig(num_classes=3).tile_size) == (32, 256)
    d = StudentConfig(num_classes=3, backbone="dinov2_s")
    assert (d.multiple, d.tile_size % 14, d.scale, d.max_side) == (14, 0, 1.0, None)
    assert StudentConfig(num_classes=3, arch="unet").multiple == 8


def test_normalisation_is_a_property_of_the_backbone():
    # the embedded EfficientNet-Lite0 is a TensorFlow conversion: inputs in [-1, 1]
    assert StudentConfig(num_classes=3).mean == [0.5] * 3 and StudentConfig(num_classes=3).std == [0.5] * 3
    assert backbones.backbone_normalisation("efficientnet_lite0") == ((0.5,) * 3, (0.5,) * 3)
    d = StudentConfig(num_classes=3, backbone="dinov2_s", tile_size=224)
    assert d.mean == list(backbones.IMAGENET_MEAN) and d.std == list(backbones.IMAGENET_STD)
    u = StudentConfig(num_classes=3, arch="unet")
    assert u.mean == [0.5] * 3 and u.std == [0.5] * 3
    # explicit statistics win (and are what model.pt then records); nonsense is refused
    assert StudentConfig(num_classes=3, mean=[0.1, 0.2, 0.3], std=[1, 1, 1]).mean == [0.1, 0.2, 0.3]
    with pytest.raises(B2PError, match="std"):
        StudentConfig(num_classes=3, mean=[0.5] * 3, std=[0.5, 0.0, 0.5])
    with pytest.raises(B2PError, match="unknown backbone"):
        backbones.backbone_normalisation("resnet")


def test_embedded_student_config_carries_tf_statistics_into_model_pt(tmp_path: Path):
    from b2p.student.checkpoint import load_student, save_checkpoint
    from b2p.student.data import normalise

    m = build_model(StudentConfig(num_classes=3, tile_size=64))  # the real embedded weights
    assert m.provenance["pretrained"] is True and m.config.mean == [0.5] * 3 and m.config.std == [0.5] * 3
    save_checkpoint(tmp_path / "model.pt", m.config, ["a", "b"], m.provenance, m.state_dict())
    again, ck = load_student(tmp_path)
    assert ck["config"]["mean"] == [0.5] * 3 and again.config.std == [0.5] * 3
    # what the network sees: black -> -1, white -> +1
    x = normalise(np.array([[[0, 0, 0], [255, 255, 255]]], dtype=np.uint8), again.config.mean, again.config.std)
    assert x.shape == (3, 1, 2) and torch.equal(x[:, 0, 0], -torch.ones(3)) and torch.equal(x[:, 0, 1], torch.ones(3))


def test_dinov2_taps_equal_normed_hidden_states():
    from b2p.student.backbones import DinoV2Backbone

    ref = _tiny_reference()
    bb = DinoV2Backbone(ref, [0, 2]).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        feats = bb(x)
        hs = ref(pixel_values=x, output_hidden_states=True).hidden_states
    for f, t in zip(feats, [0, 2]):
        expect = ref.layernorm(hs[t + 1])[:, 1:, :].transpose(1, 2).reshape(1, 32, 4, 4)
        assert torch.allclose(f, expect, atol=1e-6)
    with pytest.raises(B2PError):
        DinoV2Backbone(ref, [0, 3])


def test_dinov2_non_square_tiles_interpolate_position_embeddings():
    from b2p.student.backbones import DinoV2Backbone

    ref = _tiny_reference()  # patch 8, position grid 4x4 (image_size 32)
    bb = DinoV2Backbone(ref, [0, 2]).eval()
    x = torch.randn(2, 3, 24, 56)  # 3x7 patches: neither square nor the grid it was built for
    with torch.no_grad():
        feats = bb(x)
        hs = ref(pixel_values=x, output_hidden_states=True).hidden_states
        pos = ref.embeddings.interpolate_pos_encoding(torch.zeros(1, 1 + 3 * 7, 32), 24, 56)
    assert pos.shape == (1, 22, 32) and not torch.equal(pos[:, 1:4], ref.embeddings.position_embeddings[:, 1:4])
    for f, t in zip(feats, [0, 2]):
        assert f.shape == (2, 32, 3, 7)
        expect = ref.layernorm(hs[t + 1])[:, 1:, :].transpose(1, 2).reshape(2, 32, 3, 7)
        assert torch.allclose(f, expect, atol=1e-5)
    # the whole student on a non-square tile: logits at the tile's size
    cfg = StudentConfig(num_classes=3, backbone="dinov2_s", dinov2_config=TINY, taps=[0, 2], decoder_dim=16, tile_size=32)
    student = build_model(cfg, weights="random").eval()
    with torch.no_grad():
        out = student(torch.randn(1, 3, 40, 64))
    assert out["fine"].shape == (1, 3, 40, 64) and out["binary"].shape == (1, 2, 40, 64)
    with pytest.raises(B2PError, match="multiple of 8"):
        student(torch.randn(1, 3, 40, 60))


def test_heads_cheaper_order_is_the_same_function():
    from b2p.student.model import Head

    torch.manual_seed(0)
    head = Head(3).eval()
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
        z = torch.randn(2, 64, 9, 14)
        layered = torch.nn.Sequential.forward(head, z)  # the layers in their registered order
        assert layered.shape == (2, 3, 36, 56)
        assert torch.allclose(head(z), layered, atol=1e-5)
    assert [k for k in head.state_dict() if k.endswith("weight")] == ["1.0.weight", "1.1.weight", "3.weight"]  # model.pt keys
