"""SAM teacher end to end on RANDOM weights saved as official-format checkpoints (no pretrained weights).

For speed most tests use `test_tiny`, a tiny-encoder SAM built by segment_anything's own builder (not an
official size); the real-size ViT-B loading path is tested in test_weights.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_synthetic_batch
from typer.testing import CliRunner

from b2p.cli import app
from b2p.fileio import read_image, sha256_file
from b2p.masks import rle_decode
from b2p.boxes import box_pixel_bounds
from b2p.teach.base import settings_hash, teach_batch
from b2p.teach.sam import SamSettings, SamTeacher, _bbox_iou
from b2p.teach.weights import save_random_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return save_random_checkpoint("test_tiny", tmp_path_factory.mktemp("ckpt") / "tiny.pth")


def _teacher(ckpt: Path, cache: Path | None, **kw) -> SamTeacher:
    return SamTeacher(SamSettings(model_type="test_tiny", **kw), checkpoint=ckpt, cache_dir=cache, device="cpu", progress=False)


def _image(size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 255, (size, size, 3)).astype(np.uint8)


def _boxes(n: int, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(n)
    xy = rng.integers(0, size // 2, (n, 2))
    wh = rng.integers(4, size // 2, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def _count_predict_torch(t: SamTeacher) -> list[int]:
    calls: list[int] = []
    orig = t.predictor.predict_torch

    def wrapped(*a, **kw):
        calls.append(int(kw["boxes"].shape[0]))
        return orig(*a, **kw)

    t.predictor.predict_torch = wrapped
    return calls


def test_one_encoder_call_and_one_decoder_call_per_image(tiny_ckpt, tmp_path):
    t = _teacher(tiny_ckpt, None)
    calls = _count_predict_torch(t)
    img = _image()
    for n, expected_encoder in ((1, 1), (6, 2)):
        boxes = _boxes(n)
        out = t.predict(img, boxes)
        assert out.masks.shape == (n, 96, 96) and out.masks.dtype == bool
        assert out.scores.shape == (n,) and out.scores.dtype == np.float32 and ((0 <= out.scores) & (out.scores <= 1)).all()
        assert t.encoder_calls == expected_encoder  # one encoder pass per image, however many boxes
        assert calls[-1] == n  # all boxes in one batched decoder call
        for m, b in zip(out.masks, boxes, strict=True):
            x0, y0, x1, y1 = box_pixel_bounds(b, (96, 96))
            assert m.sum() == m[y0:y1, x0:x1].sum()  # clipped to its box
    assert len(calls) == 2
    # decoder_batch only splits images with more boxes than it
    t.decoder_batch = 2
    t.predict(img, _boxes(5))
    assert calls[-3:] == [2, 2, 1] and t.encoder_calls == 3


def test_clipping_to_box_with_margin(tiny_ckpt, monkeypatch):
    """With SAM forced to claim every pixel, the result is exactly the box (grown by the margin)."""
    img, boxes = _image(), np.array([[10, 20, 30, 25.5], [0, 0, 5, 5]], np.float32)
    for margin in (0, 3):
        t = _teacher(tiny_ckpt, None, clip_margin=margin)

        def everything(*a, boxes=None, multimask_output=True, **kw):
            c = 3 if multimask_output else 1
            return torch.ones(len(boxes), c, 96, 96, dtype=torch.bool), torch.full((len(boxes), c), 0.7), None

        monkeypatch.setattr(t.predictor, "predict_torch", everything)
        out = t.predict(img, boxes)
        expect0 = np.zeros((96, 96), bool)
        expect0[max(0, 20 - margin) : 26 + margin, max(0, 10 - margin) : 30 + margin] = True
        assert np.array_equal(out.masks[0], expect0)
        assert out.masks[1].sum() == (5 + margin) ** 2
        assert np.allclose(out.scores, 0.7)


def test_mask_selection_rule(tiny_ckpt, monkeypatch):
    h = w = 40
    box = torch.tensor([[10.0, 10.0, 20.0, 30.0]])
    cand = torch.zeros(1, 3, h, w, dtype=torch.bool)
    cand[0, 0] = True  # whole image: spills far outside the box
    cand[0, 1, 11:29, 10:20] = True  # fits the box
    cand[0, 2, 10:13, 10:13] = True  # a corner of it
    iou = _bbox_iou(cand, box)
    assert iou[0, 1] > 0.85 and iou[0, 0] < 0.2 and iou[0, 2] < 0.1
    assert _bbox_iou(torch.zeros(1, 1, h, w, dtype=torch.bool), box)[0, 0] == 0

    img = np.zeros((h, w, 3), np.uint8)
    for rule, expected in (("box", 1), ("iou", 0)):
        t = _teacher(tiny_ckpt, None, mask_select=rule, clip_margin=100)
        monkeypatch.setattr(
            t.predictor, "predict_torch", lambda *a, **kw: (cand.clone(), torch.tensor([[0.9, 0.5, 0.1]]), None)
        )
        out = t.predict(img, box.numpy())
        assert np.array_equal(out.masks[0], cand[0, expected].numpy()), rule
        assert out.scores[0] == pytest.approx([0.9, 0.5, 0.1][expected])
    t = _teacher(tiny_ckpt, None, mask_select="single")
    seen = {}
    orig = t.predictor.predict_torch
    monkeypatch.setattr(t.predictor, "predict_torch", lambda *a, **kw: (seen.update(kw), orig(*a, **kw))[1])
    assert t.predict(img, box.numpy()).masks.shape == (1, h, w) and seen["multimask_output"] is False


def test_teach_batch_end_to_end_with_cache(tiny_ckpt, tmp_path):
    batch_file, _ = make_synthetic_batch(tmp_path, n_images=2, size=64)
    cache = tmp_path / "cache"
    t = _teacher(tiny_ckpt, cache)
    r = teach_batch(batch_file, tmp_path / "teach", t, progress=False)
    assert (r.images, r.boxes, r.taught) == (2, 4, 2)
    assert t.encoder_calls == 2 and (t.cache.misses, t.cache.hits) == (2, 0)
    inst = json.loads((tmp_path / "teach" / "b1" / "instances.json").read_text())
    data = json.loads(batch_file.read_text())
    boxes = {a["id"]: a["bbox"] for a in data["annotations"]}
    for a in inst["annotations"]:
        m = rle_decode(a["segmentation"])
        x, y, bw, bh = boxes[a["box_id"]]
        assert m.shape == (64, 64) and m.sum() == m[y : y + bh, x : x + bw].sum() == a["area"]
    prov = json.loads((tmp_path / "teach" / "b1" / "provenance.json").read_text())
    assert prov["teacher"] == "sam" and prov["model_type"] == "test_tiny"
    assert prov["checkpoint"]["sha256"] == sha256_file(tiny_ckpt) and prov["checkpoint"]["path"] == str(tiny_ckpt)
    assert prov["settings"]["checkpoint_sha256"] == sha256_file(tiny_ckpt)
    assert prov["encoder_calls"] == 2 and prov["embedding_cache"]["misses"] == 2
    assert len(list(cache.rglob("*.npz"))) == 2

    # other decoder settings: images are redone (settings hash differs) but the encoder is skipped
    t2 = _teacher(tiny_ckpt, cache, mask_select="iou")
    r2 = teach_batch(batch_file, tmp_path / "teach", t2, progress=False)
    assert r2.taught == 2 and t2.encoder_calls == 0 and t2.cache.hits == 2
    # a cache hit gives the same masks as running the encoder
    t3 = _teacher(tiny_ckpt, None, mask_select="iou")
    img = read_image(tmp_path / "raw" / "b1" / "images" / "img_000.png")
    bx = np.array([[5, 5, 40, 40]], np.float32)
    assert np.array_equal(t2.predict(img, bx).masks, t3.predict(img, bx).masks)
    assert t3.encoder_calls == 1 and t2.encoder_calls == 0


def test_settings_hash_follows_checkpoint(tiny_ckpt, tmp_path):
    other = save_random_checkpoint("test_tiny", tmp_path / "other.pth", seed=1)
    assert settings_hash(_teacher(tiny_ckpt, None)) != settings_hash(_teacher(other, None))
    assert settings_hash(_teacher(tiny_ckpt, None)) == settings_hash(_teacher(tiny_ckpt, tmp_path / "c"))


def test_cli_sam_run_and_cached_rerun(tiny_ckpt, tmp_path):
    batch_file, _ = make_synthetic_batch(tmp_path, n_images=2, size=48)
    base = ["teach", str(batch_file), "--out", str(tmp_path / "t"), "--teacher", "sam", "--sam-model", "test_tiny",
            "--checkpoint", str(tiny_ckpt), "--cache-dir", str(tmp_path / "c"), "--device", "cpu", "--quiet"]
    r = runner.invoke(app, base)
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "t" / "b1" / "labelmaps").glob("*.png"))) == 2
    r = runner.invoke(app, base + ["--mask-select", "iou", "--clip-margin", "2"])
    assert r.exit_code == 0, r.output
    prov = json.loads((tmp_path / "t" / "b1" / "provenance.json").read_text())
    assert prov["settings"]["mask_select"] == "iou" and prov["settings"]["clip_margin"] == 2
    assert prov["encoder_calls"] == 0 and prov["embedding_cache"]["hits"] == 2


def test_cli_sam_bad_checkpoints(tiny_ckpt, tmp_path):
    batch_file, _ = make_synthetic_batch(tmp_path, n_images=2, size=48)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 100)
    for args, msg in (
        (["--checkpoint", str(tmp_path / "missing.pth")], "checkpoint file not found"),
        (["--checkpoint", str(bad)], "could not be read"),
        (["--checkpoint", str(tiny_ckpt), "--sam-model", "vit_b"], "is a test_tiny checkpoint, not vit_b"),
        (["--checkpoint", str(tiny_ckpt), "--sam-model", "test_tiny", "--mask-select", "best"], "mask_select"),
    ):
        r = runner.invoke(app, ["teach", str(batch_file), "--out", str(tmp_path / "t"), "--teacher", "sam", "--quiet", *args])
        assert r.exit_code == 1 and msg in r.output, r.output
        assert not (tmp_path / "t").exists()
