"""Sliding-window prediction at the training geometry, model.pt versions, and memory on a huge image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from b2p.errors import B2PError
from b2p.student.backbones import IMAGENET_MEAN, IMAGENET_STD
from b2p.student.checkpoint import VERSION, load_student, read_checkpoint, save_checkpoint
from b2p.student.data import normalise
from b2p.student.geometry import Geometry
from b2p.student.model import StudentConfig, build_model
from b2p.student.predict import PROBS_SCALE, PredictItem, blend_window, image_logits, predict_image, read_probs, run_prediction

TINY_DINO = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, patch_size=8, image_size=32)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _randomise_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Fresh BatchNorm statistics are 0/1: give them values so a wrong input or stitching shows."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _tiny_b2p(tile: int = 64, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = StudentConfig(num_classes=3, backbone="dinov2_s", dinov2_config=TINY_DINO, taps=[0, 2], decoder_dim=16, tile_size=tile, **kw)
    return _randomise_bn(build_model(cfg, weights="random"))


class PointwiseNet(torch.nn.Module):
    """A 1x1-conv 'student': every pixel's logits depend only on that pixel, so a correct sliding window
    (placement, blending, normalisation by the summed weights) equals one pass over the whole canvas."""

    def __init__(self, config: StudentConfig):
        super().__init__()
        self.config = config
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, config.num_classes, 1)

    def forward(self, x, feats=None, edges=None):
        return {"fine": self.conv(x), "binary": None}


def _single_pass_probs(model, img: np.ndarray) -> torch.Tensor:
    c = model.config
    geo = Geometry.for_image(*img.shape[:2], scale=c.scale, max_side=c.max_side, multiple=c.multiple)
    canvas, _ = geo.image_to_model(img, min_side=c.tile_size)
    edges = tuple(torch.from_numpy(d)[None] for d in geo.edge_distance(c.tile_size))
    with torch.no_grad():
        lg = model(normalise(canvas, c.mean, c.std)[None], edges=edges)["fine"][0]
    return torch.softmax(torch.from_numpy(geo.logits_to_image(lg.numpy())), 0)


@pytest.mark.parametrize("shape", [(50, 60), (64, 64), (20, 33)])
@pytest.mark.parametrize("extra", [{}, {"context": "strip", "edges": True}])
def test_one_tile_image_equals_a_single_forward_pass(shape, extra):
    model = _tiny_b2p(tile=64, **extra)
    img = _image(*shape)
    labels, probs = predict_image(model, img)
    ref = _single_pass_probs(model, img)
    assert labels.shape == shape and probs.shape == (3, *shape)
    assert torch.allclose(torch.from_numpy(probs), ref, atol=1e-5)
    assert np.array_equal(labels, ref.argmax(0).numpy())


@pytest.mark.parametrize("scale, overlap", [(1.0, 0.25), (1.0, 0.5), (0.6, 0.25), (1.7, 0.0)])
def test_stitched_tiles_equal_a_whole_canvas_pass(scale, overlap):
    cfg = StudentConfig(num_classes=3, arch="unet", tile_size=32, scale=scale)
    model = PointwiseNet(cfg).eval()
    img = _image(75, 130, seed=2)
    got = image_logits(model, img, overlap=overlap, tile_batch=3, window=32)
    geo = Geometry.for_image(75, 130, scale=scale, multiple=cfg.multiple)
    canvas, _ = geo.image_to_model(img, min_side=32)
    with torch.no_grad():
        want = geo.logits_to_image(model(normalise(canvas, cfg.mean, cfg.std)[None])["fine"][0].numpy())
    assert len(geo.tile_origins(32, round(overlap * 32), min_side=32)) > 4  # really tiled
    assert got.shape == (3, 75, 130)
    assert np.allclose(got, want, atol=1e-5)


def test_prediction_window_is_bounded_by_the_tile_and_the_padded_image():
    from b2p.student.predict import DEFAULT_WINDOW, window_of

    model = PointwiseNet(StudentConfig(num_classes=3, arch="unet", tile_size=32))
    assert window_of(model) == DEFAULT_WINDOW and window_of(model, 20) == 32 and window_of(model, 50) == 56
    with pytest.raises(B2PError, match="window"):
        window_of(model, 0)
    # a strip-context model's means span its window: by default it predicts in windows of its own tile
    strip = PointwiseNet(StudentConfig(num_classes=3, arch="b2p", backbone="efficientnet_lite0", context="strip", tile_size=64))
    assert window_of(strip) == 64 and window_of(strip, 512) == 512
    img = _image(75, 130, seed=3)
    seen = []
    real_forward = model.forward

    def spy(x, feats=None, edges=None):
        seen.append(tuple(x.shape[-2:]))
        return real_forward(x)

    model.forward = spy
    default = image_logits(model, img)  # padded canvas 80x136: one row of 80-px windows, never a larger canvas
    assert seen and set(seen) == {(80, 80)}
    seen.clear()
    small = image_logits(model, img, window=32, overlap=0.25)
    assert set(seen) == {(32, 32)} and len(seen) > 4
    assert np.allclose(default, small, atol=1e-5)  # pointwise: the window never changes a pixel's logits


def test_flip_tta_is_the_mean_of_the_flipped_back_views():
    model = _tiny_b2p(tile=64)
    img = _image(50, 90, seed=4)
    views = [img, img[:, ::-1], img[::-1], img[::-1, ::-1]]
    back = [(), (2,), (1,), (1, 2)]  # logit axes (classes first)
    want = sum(
        (np.flip(lg, d) if d else lg) for lg, d in zip((image_logits(model, np.ascontiguousarray(v)) for v in views), back)
    ) / 4
    got = image_logits(model, img, tta="flips")
    plain = image_logits(model, img)
    assert got.shape == (3, 50, 90)
    assert np.allclose(got, want, atol=1e-5)
    assert not np.allclose(got, plain, atol=1e-3)  # a random model is not flip-symmetric: TTA really ran
    # a flip-equivariant (pointwise) model gives the same logits with and without TTA
    pw = PointwiseNet(StudentConfig(num_classes=3, arch="unet", tile_size=32)).eval()
    assert np.allclose(image_logits(pw, img, tta="flips"), image_logits(pw, img), atol=1e-5)
    with pytest.raises(B2PError, match="test-time augmentation"):
        image_logits(model, img, tta="rot90")


def test_non_square_and_larger_than_tile_images_keep_their_size():
    model = _tiny_b2p(tile=64)
    for shape in [(40, 150), (150, 40), (130, 97), (17, 9)]:
        labels, probs = predict_image(model, _image(*shape), overlap=0.25)
        assert labels.shape == shape and labels.dtype == np.uint8
        assert probs.shape == (3, *shape) and np.allclose(probs.sum(0), 1.0, atol=1e-5)
    # the CNN backbone and the U-Net take the same path
    for cfg in (StudentConfig(num_classes=3, tile_size=64), StudentConfig(num_classes=3, arch="unet", unet_base=4, tile_size=64)):
        labels, _ = predict_image(build_model(cfg, weights="random").eval(), _image(70, 133))
        assert labels.shape == (70, 133)


def test_blend_window_is_smooth_separable_and_never_zero():
    w = blend_window(64, 16)
    assert w.shape == (64, 64) and float(w.min()) > 0
    assert float(w[32, 32]) == 1.0 and float(w[0, 0]) < float(w[0, 8]) < float(w[0, 32])
    assert w.dtype == np.float32 and np.array_equal(w, w.T) and np.allclose(w, w[:, 32:33] * w[32:33, :])  # outer product of one ramp
    assert np.array_equal(blend_window(32, 0), np.ones((32, 32), np.float32))
    with pytest.raises(B2PError, match="overlap"):
        image_logits(_tiny_b2p(), _image(20, 20), overlap=1.0)


def _as_version_1(path: Path, model: torch.nn.Module, input_size: int) -> None:
    """A model.pt as b2p wrote it before issue 12: version 1, square `input_size`, ImageNet statistics."""
    cfg = asdict(model.config)
    for k in ("tile_size", "scale", "max_side", "multiple", "legacy_input_size"):
        cfg.pop(k)
    cfg.update(input_size=input_size, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    obj = {"format": "b2p-student", "version": 1, "config": cfg, "class_names": ["a", "b"],
           "provenance": dict(model.provenance), "state_dict": model.state_dict(), "info": {}}
    torch.save(obj, path)


def test_version_1_model_predicts_with_its_own_statistics_and_square_resize(tmp_path: Path):
    import cv2

    model = _randomise_bn(build_model(StudentConfig(num_classes=3, tile_size=64), weights="random"))  # EfficientNet
    assert model.config.mean == [0.5] * 3  # what a new model of this backbone would use
    _as_version_1(tmp_path / "model.pt", model, input_size=48)
    old, ck = load_student(tmp_path)
    assert ck["version"] == 1
    assert old.config.legacy_input_size == 48
    assert old.config.mean == list(IMAGENET_MEAN) and old.config.std == list(IMAGENET_STD)
    img = _image(40, 90, seed=3)
    _, probs = predict_image(old, img)
    # the old recipe by hand: squash to 48x48, ImageNet statistics, logits back to the image bilinearly
    x = (torch.from_numpy(cv2.resize(img, (48, 48), interpolation=cv2.INTER_LINEAR)).permute(2, 0, 1).float() / 255
         - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        lg = model(x[None])["fine"]
    ref = torch.softmax(torch.nn.functional.interpolate(lg, size=(40, 90), mode="bilinear", align_corners=False)[0], 0)
    assert torch.allclose(torch.from_numpy(probs), ref, atol=1e-5)
    # ... and the statistics matter: the backbone's own (0.5) give another answer
    with torch.no_grad():
        lg05 = model(((x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1) - 0.5) / 0.5)[None])["fine"]
    assert not torch.allclose(lg, lg05, atol=1e-3)


def test_version_2_model_records_geometry_and_statistics(tmp_path: Path):
    model = _tiny_b2p(tile=48, scale=0.5, max_side=400)
    save_checkpoint(tmp_path / "model.pt", model.config, ["a", "b"], model.provenance, model.state_dict())
    ck = read_checkpoint(tmp_path / "model.pt")
    assert ck["version"] == VERSION == 2
    c = ck["config"]
    assert (c["tile_size"], c["scale"], c["max_side"], c["multiple"]) == (48, 0.5, 400, 8)
    assert c["mean"] == list(IMAGENET_MEAN) and c["legacy_input_size"] is None
    again, _ = load_student(tmp_path)
    img = _image(90, 70)
    assert np.array_equal(predict_image(again, img)[1], predict_image(model, img)[1])
    # a version nobody wrote is refused with the file named
    obj = torch.load(tmp_path / "model.pt", weights_only=True)
    obj["version"] = 7
    torch.save(obj, tmp_path / "v7.pt")
    with pytest.raises(B2PError, match="version 7"):
        read_checkpoint(tmp_path / "v7.pt")


def test_run_prediction_writes_label_maps_probs_and_box_guided_maps(tmp_path: Path):
    from b2p.fileio import write_png_atomic
    from b2p.labels import read_label_map

    model = _tiny_b2p(tile=32)
    save_checkpoint(tmp_path / "m" / "model.pt", model.config, ["a", "b"], model.provenance, model.state_dict())
    items = []
    for i, shape in enumerate([(70, 45), (20, 100)]):
        write_png_atomic(tmp_path / f"im{i}.png", _image(*shape, seed=i))
        items.append(PredictItem(tmp_path / f"im{i}.png", tmp_path / "out" / f"{i}.png", tmp_path / "out" / f"{i}.npz",
                                 np.array([[5.0, 4.0, 30.0, 15.0]]), np.array([2]), tmp_path / "boxed" / f"{i}.png"))
    res = run_prediction(tmp_path / "m", items, tile_batch=2, device="cpu", progress=False, overlap=0.5)
    assert res["images"] == 2 and res["boxes"] == 2
    for i, shape in enumerate([(70, 45), (20, 100)]):
        lm = read_label_map(tmp_path / "out" / f"{i}.png")
        pr = read_probs(tmp_path / "out" / f"{i}.npz")
        assert lm.shape == shape and pr.shape == (3, *shape) and pr.dtype == np.float32
        assert np.abs(pr.sum(0) - 1).max() < 3 * 0.5 / PROBS_SCALE  # each class rounded to 1/255
        assert np.mean(pr.argmax(0) == lm) > 0.99  # rounding ties aside
        boxed = read_label_map(tmp_path / "boxed" / f"{i}.png")
        assert boxed.shape == shape
        inside = np.zeros(shape, bool)
        inside[4:15, 5:30] = True
        assert not boxed[~inside].any() and set(np.unique(boxed[inside])) <= {0, 2} and (boxed[inside] == 2).any()


# Peak memory on a 4000x3000 image (12 Mpx). The bound: peak RSS of the whole process (python + torch, about
# 0.6 GB before any work) stays under 1.5 GB, and grows by less than 700 MB while predicting: the model-scale
# canvas (uint8 image, 3 float32 logit planes, float32 weights: about 230 MB) plus a few 512-px windows
# (measured 2026-11-29: 1109 MB peak, +549 MB). Forwarding the whole image at once would need several GB.
PEAK_RSS_MB = 1500
PREDICT_GROWTH_MB = 700
_MEMORY_SCRIPT = """
import json, sys
import numpy as np, torch
from b2p.student.model import StudentConfig, build_model
from b2p.student.predict import predict_image
torch.set_num_threads(1)
from b2p.memory import peak_rss_mb as peak_mb
torch.manual_seed(0)
model = build_model(StudentConfig(num_classes=3, arch="unet", unet_base=4, tile_size=256)).eval()
img = np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
before = peak_mb()
labels, probs = predict_image(model, img, overlap=0.25, tile_batch=4)
print(json.dumps({"before": before, "peak": peak_mb(), "labels": list(labels.shape), "probs": list(probs.shape)}))
"""


def test_4000x3000_image_predicts_in_bounded_memory():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["labels"] == [3000, 4000] and m["probs"] == [3, 3000, 4000]
    assert m["peak"] < PEAK_RSS_MB, m
    assert m["peak"] - m["before"] < PREDICT_GROWTH_MB, m


@pytest.mark.parametrize("kw", [{}, {"backbone": "efficientnet_lite0", "decoder": "lite", "context": "strip", "decoder_dim": 16}])
def test_cpu_inference_goes_nhwc_with_the_same_float32_logits(kw):
    from b2p.student.predict import inference_setup

    if kw:  # the CPU student of the benchmark suite (random weights; no download)
        torch.manual_seed(0)
        model = _randomise_bn(build_model(StudentConfig(num_classes=3, tile_size=64, **kw), weights="random"))
    else:
        model = _tiny_b2p(64)
    img = _image(72, 150, seed=3)
    with torch.no_grad():
        ref = image_logits(model, img)
        ctx, used = inference_setup(model, torch.device("cpu"), "float32")
        with ctx:
            out = image_logits(model, img)
    assert used == "float32"
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
