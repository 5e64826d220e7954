"""Student training, checkpoints, and the `b2p train` / `b2p predict` commands on a tiny synthetic batch."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from b2p.cli import app
from b2p.dataset import load_batch
from b2p.fileio import read_image
from b2p.labels import label_map_path, read_label_map, write_label_map
from b2p.student.checkpoint import load_student, save_checkpoint
from b2p.student.model import StudentConfig, build_model
from b2p.student.train import TrainParams, train_student
from conftest import make_synthetic_batch

TINY_DINO = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, patch_size=8, image_size=32)


def tiny_params(**kw) -> TrainParams:
    base = dict(
        backbone="dinov2_s", weights="random", dinov2_config=TINY_DINO, taps=[0, 1, 2], decoder_dim=32,
        input_size=32, epochs=3, lr=3e-3, seed=0, adaptation="full",
    )
    base.update(kw)
    return TrainParams(**base)


def write_teacher(root: Path, batch_file: Path, truth: dict[str, np.ndarray]) -> Path:
    """Teacher label maps = the true masks (a perfect teacher), at each image's size."""
    b = load_batch(batch_file)
    for rec in b.images:
        write_label_map(label_map_path(root / "teach", b.name, rec.file_name), truth[rec.file_name])
    return root / "teach"


@pytest.fixture
def taught(tmp_path: Path):
    path, truth = make_synthetic_batch(tmp_path, n_images=10, size=48, manual_every=4)
    return path, write_teacher(tmp_path, path, truth), truth


def _curves(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_tiny_random_backbone_learns(taught, tmp_path: Path):
    path, teach, _ = taught
    m = train_student([path], teach, tmp_path / "m", tiny_params(epochs=4), progress=False)
    rows = _curves(tmp_path / "m" / "curves.csv")
    assert len(rows) == 4 == m["epochs_run"]
    loss = [float(r["train_loss"]) for r in rows]
    iou = [float(r["train_binary_iou"]) for r in rows]
    assert loss[-1] < loss[0]
    assert iou[-1] > iou[0]
    assert m["backbone"]["pretrained"] is False
    assert {"val_anomaly_miou", "lr", "train_dice", "train_ce"} <= set(rows[0])
    saved = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert saved["params"]["total"] >= saved["params"]["trainable"] > 0 and saved["val"]["anomaly_miou"] is not None
    assert saved["images"]["train"] > 0 and saved["images"]["val"] > 0


def test_checkpoint_round_trip_identical_predictions(tmp_path: Path):
    torch.manual_seed(0)
    cfg = StudentConfig(num_classes=3, backbone="dinov2_s", dinov2_config=TINY_DINO, taps=[0, 2], decoder_dim=16, input_size=32)
    model = build_model(cfg, weights="random").eval()
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    save_checkpoint(tmp_path / "model.pt", cfg, ["crack", "spot"], model.provenance, model.state_dict())
    raw = torch.load(tmp_path / "model.pt", weights_only=True)
    json.dumps(raw["config"])  # JSON-able
    assert raw["class_names"] == ["crack", "spot"] and raw["provenance"]["pretrained"] is False
    loaded, ck = load_student(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a["fine"], b["fine"]) and torch.equal(a["binary"], b["binary"])
    # U-Net baseline too
    ucfg = StudentConfig(num_classes=3, arch="unet", unet_base=8, input_size=32)
    u = build_model(ucfg).eval()
    save_checkpoint(tmp_path / "u" / "model.pt", ucfg, ["crack", "spot"], u.provenance, u.state_dict())
    lu, _ = load_student(tmp_path / "u")
    with torch.no_grad():
        assert torch.equal(u(x)["fine"], lu(x)["fine"])


def test_frozen_backbone_uses_feature_cache(taught, tmp_path: Path):
    path, teach, _ = taught
    m = train_student([path], teach, tmp_path / "f", tiny_params(epochs=2, adaptation="frozen", feature_cache="disk", cache_dir=str(tmp_path / "cache"), augment="none"), progress=False)
    n = m["images"]["train"] + m["images"]["val"]
    assert m["feature_cache"]["misses"] == n  # each image's features computed once
    assert m["feature_cache"]["hits"] >= n  # and reused in the second epoch
    assert len(list((tmp_path / "cache").glob("*.pt"))) == n
    # a second run reads the disk cache: no recomputation
    m2 = train_student([path], teach, tmp_path / "f2", tiny_params(epochs=1, adaptation="frozen", feature_cache="disk", cache_dir=str(tmp_path / "cache"), augment="none"), progress=False)
    assert m2["feature_cache"]["misses"] == 0
    # flipped training images have features of their own (never the unflipped image's); val is never flipped
    m3 = train_student([path], teach, tmp_path / "f3", tiny_params(epochs=4, adaptation="frozen", augment="flips"), progress=False)
    n_train, n_val = m3["images"]["train"], m3["images"]["val"]
    assert n_train + n_val < m3["feature_cache"]["misses"] <= 4 * n_train + n_val


def test_flip_augmentation_moves_image_labels_and_boxes_together(taught):
    from b2p.student.data import StudentDataset, gather_samples

    path, teach, _ = taught
    samples, k = gather_samples([path], teach, ("train", "val", "test"))
    plain = StudentDataset(samples, 32, (0.5,) * 3, (0.25,) * 3, k, augment="none")
    flipped = StudentDataset(samples, 32, (0.5,) * 3, (0.25,) * 3, k, augment="flips")
    torch.manual_seed(0)
    codes = set()
    for i in range(len(samples)):
        x0, y0, b0, _, c0 = plain[i]
        for _ in range(3):
            x, y, b, idx, code = flipped[i]
            assert c0 == 0 and idx == i
            codes.add(code)
            dims = [d for bit, d in ((1, -1), (2, -2)) if code & bit]
            ex, ey, eb = (x0.flip(dims), y0.flip(dims), b0.flip(dims)) if dims else (x0, y0, b0)
            assert torch.equal(x, ex) and torch.equal(y, ey) and torch.equal(b, eb)
    assert codes == {0, 1, 2, 3}
    with pytest.raises(Exception, match="augment must be"):
        StudentDataset(samples, 32, (0.5,) * 3, (0.25,) * 3, k, augment="rotate")


def test_within_boxes_keeps_student_pixels_inside_boxes_with_the_box_class():
    from b2p.student.predict import within_boxes

    p = np.zeros((20, 30), dtype=np.float32)
    p[2:8, 2:8] = 0.9  # a confident blob, half of it outside box 1
    p[12:15, 20:23] = 0.3  # a weak blob: box 2 finds nothing above 0.5
    p[13, 21] = 0.4
    p[0, 29] = 0.99  # confident, but in no box
    boxes = np.array([[0, 0, 5, 10], [18, 10, 26, 18], [3, 3, 5, 5]], dtype=np.float32)
    lm, rescued = within_boxes(p, boxes, np.array([1, 2, 2]), threshold=0.5, relative=0.5)
    assert rescued == 1
    expect = np.zeros((20, 30), dtype=np.uint8)
    expect[2:8, 2:5] = 1  # box 1: the blob clipped to the box, class 1
    expect[3:5, 3:5] = 2  # box 3 lies inside box 1: the smaller mask wins
    expect[12:15, 20:23] = 2  # box 2, rescued: pixels >= 0.5 x its max (0.4) -> the whole weak blob
    assert np.array_equal(lm, expect)
    # no boxes: nothing, whatever the student says
    lm0, r0 = within_boxes(p, np.zeros((0, 4)), np.zeros(0, dtype=np.int64))
    assert r0 == 0 and not lm0.any()


def test_cli_train_and_predict(taught, tmp_path: Path):
    path, teach, truth = taught
    params = tmp_path / "params.yaml"
    p = tiny_params(epochs=2, unet_base=8)
    section = {k: v for k, v in p.__dict__.items()}
    params.write_text(yaml.safe_dump({"train": section, "other": {"x": 1}}))
    runner = CliRunner()
    imported = path.parent
    model_dir = tmp_path / "model"
    r = runner.invoke(app, ["train", "--imported", str(imported), "--teacher-root", str(teach), "--out", str(model_dir), "--params", str(params), "--epochs", "1"])
    assert r.exit_code == 0, r.output
    assert "RANDOM" in r.output
    for f in ("model.pt", "metrics.json", "curves.csv"):
        assert (model_dir / f).is_file()
    assert json.loads((model_dir / "metrics.json").read_text())["epochs_run"] == 1  # CLI overrides params.yaml
    # layered params files: the later file's keys win over the earlier file's
    later = tmp_path / "variant.yaml"
    later.write_text("train:\n  epochs: 2\n")
    r = runner.invoke(app, ["train", "--imported", str(imported), "--teacher-root", str(teach), "--out", str(tmp_path / "layered"),
                            "--params", str(params), "--params", str(later)])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "layered" / "metrics.json").read_text())["epochs_run"] == 2
    # predict every split, with probabilities
    pred = tmp_path / "pred"
    r = runner.invoke(app, ["predict", "--model", str(model_dir), "--imported", str(imported), "--split", "all", "--out", str(pred), "--probs"])
    assert r.exit_code == 0, r.output
    b = load_batch(path)
    for rec in b.images:
        lm = read_label_map(label_map_path(pred, b.name, rec.file_name), shape=(rec.height, rec.width), num_classes=2)
        assert lm.dtype == np.uint8 and lm.max() <= 2
        z = np.load(pred / b.name / "probs" / (Path(rec.file_name).stem + ".npz"))
        assert z["probs"].dtype == np.float16 and z["probs"].shape == (3, rec.height, rec.width)
        assert np.allclose(z["probs"].astype(np.float32).sum(0), 1.0, atol=1e-2)
        agree = np.mean(z["probs"].astype(np.float32).argmax(0) == lm)
        assert agree > 0.99  # the label map is the argmax of the probabilities (float16 ties aside)
    # an image folder of another size
    folder = tmp_path / "free"
    folder.mkdir()
    img = read_image(b.images[0].path)
    import cv2

    cv2.imwrite(str(folder / "big.png"), cv2.resize(img, (70, 50)))
    out = tmp_path / "free_pred"
    r = runner.invoke(app, ["predict", "--model", str(model_dir), "--images", str(folder), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert read_label_map(out / "big.png").shape == (50, 70)
    # box-guided masks: nothing outside the boxes, only the box's class inside, every box non-empty
    boxed = tmp_path / "boxed"
    r = runner.invoke(app, ["predict", "--model", str(model_dir), "--imported", str(imported), "--split", "all", "--out", str(tmp_path / "pred2"), "--boxes-out", str(boxed)])
    assert r.exit_code == 0, r.output
    from b2p.teach.base import box_mask

    for rec in b.images:
        lm = read_label_map(label_map_path(boxed, b.name, rec.file_name), shape=(rec.height, rec.width))
        inside = np.zeros(lm.shape, dtype=bool)
        for box in rec.boxes:
            m = box_mask(np.asarray(box.xyxy), lm.shape)
            inside |= m
            assert np.isin(lm[m], [0, *[bb.category_id for bb in rec.boxes]]).all()
        assert not lm[~inside].any()
        if len(rec.boxes) == 1:
            assert lm.any() and set(np.unique(lm)) <= {0, rec.boxes[0].category_id}
    r = runner.invoke(app, ["predict", "--model", str(model_dir), "--images", str(folder), "--out", str(out), "--boxes-out", str(boxed)])
    assert r.exit_code == 1 and "--boxes-out needs box annotations" in r.output


def test_cli_errors(taught, tmp_path: Path):
    path, teach, _ = taught
    runner = CliRunner()
    # missing teacher label maps
    r = runner.invoke(app, ["train", "--imported", str(path.parent), "--teacher-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")])
    assert r.exit_code == 1 and "b2p teach" in r.output
    # DINOv2 without weights: a clear error, not random weights
    r = runner.invoke(app, ["train", "--imported", str(path.parent), "--teacher-root", str(teach), "--out", str(tmp_path / "m"), "--backbone", "dinov2_s", "--input-size", "56"])
    assert r.exit_code == 1 and "no pretrained weights" in r.output
    # unknown parameter in params.yaml
    params = tmp_path / "p.yaml"
    params.write_text("train:\n  epochz: 3\n")
    r = runner.invoke(app, ["train", "--imported", str(path.parent), "--teacher-root", str(teach), "--params", str(params)])
    assert r.exit_code == 1 and "epochz" in r.output
    # an unknown augmentation in the later of two layered params files: refused naming the files
    aug = tmp_path / "aug.yaml"
    aug.write_text("train:\n  augment: rotate\n")
    ok = tmp_path / "ok.yaml"
    ok.write_text("train:\n  epochs: 1\n")
    r = runner.invoke(app, ["train", "--imported", str(path.parent), "--teacher-root", str(teach), "--out", str(tmp_path / "m"),
                            "--params", str(ok), "--params", str(aug)])
    assert r.exit_code == 1 and "train.augment: must be one of" in r.output and "aug.yaml" in r.output
    # no model yet
    r = runner.invoke(app, ["predict", "--model", str(tmp_path / "none"), "--images", str(tmp_path)])
    assert r.exit_code == 1
    assert not (tmp_path / "m" / "model.pt").exists()


def test_empty_splits(tmp_path: Path):
    # all images carry manual masks -> all in test: train split empty
    path, truth = make_synthetic_batch(tmp_path, n_images=2, size=32, manual_every=1)
    teach = write_teacher(tmp_path, path, truth)
    from b2p.errors import B2PError

    with pytest.raises(B2PError, match="train split .* is empty"):
        train_student([path], teach, tmp_path / "m", tiny_params(epochs=1), progress=False)
