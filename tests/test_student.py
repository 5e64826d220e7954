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
        tile_size=32, epochs=3, lr=3e-3, seed=0, adaptation="full",
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


@pytest.mark.parametrize(
    "decoder,extra",
    [("full", {}), ("lite", {}), ("lite", {"context": "strip", "refine": True}), ("lite", {"context": "strip", "edges": True})],
)
def test_checkpoint_round_trip_identical_predictions(tmp_path: Path, decoder: str, extra: dict):
    torch.manual_seed(0)
    cfg = StudentConfig(
        num_classes=3, backbone="dinov2_s", dinov2_config=TINY_DINO, taps=[0, 2], decoder_dim=16, tile_size=32, decoder=decoder, **extra
    )
    model = build_model(cfg, weights="random").eval()
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
        if model.refine is not None:  # its last conv starts at zero: give it weights that change the logits
            model.refine.body[-1].weight.normal_()
    save_checkpoint(tmp_path / "model.pt", cfg, ["crack", "spot"], model.provenance, model.state_dict())
    raw = torch.load(tmp_path / "model.pt", weights_only=True)
    json.dumps(raw["config"])  # JSON-able
    assert raw["class_names"] == ["crack", "spot"] and raw["provenance"]["pretrained"] is False
    loaded, ck = load_student(tmp_path)
    assert loaded.config.decoder == decoder
    assert (loaded.config.context, loaded.config.refine) == (extra.get("context", "none"), extra.get("refine", False))
    assert loaded.config.edges == extra.get("edges", False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a["fine"], b["fine"]) and torch.equal(a["binary"], b["binary"])
    # U-Net baseline too
    ucfg = StudentConfig(num_classes=3, arch="unet", unet_base=8, tile_size=32)
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


def _dataset(samples, k, **kw):
    from b2p.student.data import StudentDataset

    return StudentDataset(samples, (0.5,) * 3, (0.25,) * 3, k, **kw)


def test_dataset_keeps_decoded_images_read_only_within_its_memory_bound(taught, monkeypatch):
    from b2p.student import data
    from b2p.student.data import gather_samples

    path, teach, _ = taught
    samples, k = gather_samples([path], teach, ("train",))
    ds = _dataset(samples, k, min_side=32)
    img, lm = ds.read(0)
    assert ds.read(0)[0] is img and ds.read(0)[1] is lm  # decoded once
    with pytest.raises(ValueError):  # a caller that wrote into the shared copy fails, never corrupts it
        img[0, 0] = 0
    item = ds[0]
    item["target"].zero_()  # items are fresh arrays: the cached label map is untouched
    assert np.array_equal(ds.read(0)[1], data.read_label_map(samples[0].label_path, shape=img.shape[:2], num_classes=k - 1))
    monkeypatch.setattr(data, "READ_CACHE_BYTES", img.nbytes + lm.nbytes)  # room for one image only
    small = _dataset(samples, k, min_side=32)
    a, b = small.read(0), small.read(1)
    assert small.read(0)[0] is a[0] and small.read(1)[0] is not b[0]  # the second is decoded again
    assert np.array_equal(small.read(1)[0], b[0]) and b[0].flags.writeable


def test_flip_augmentation_moves_image_labels_and_boxes_together(taught):
    from b2p.student.data import gather_samples

    path, teach, _ = taught
    samples, k = gather_samples([path], teach, ("train", "val", "test"))
    plain = _dataset(samples, k, min_side=32)
    flipped = _dataset(samples, k, augment="flips", min_side=32)  # whole images: the flip alone
    torch.manual_seed(0)
    codes = set()
    for i in range(len(samples)):
        p0 = plain[i]
        for _ in range(3):
            it = flipped[i]
            assert p0["flip"] == 0 and it["index"] == i
            codes.add(it["flip"])
            dims = [d for bit, d in ((1, -1), (2, -2)) if it["flip"] & bit]
            for key in ("image", "target", "valid", "box_mask"):
                assert torch.equal(it[key], p0[key].flip(dims) if dims else p0[key])
            # the distances to the image's edges travel with the rows and columns they belong to
            assert torch.equal(it["edge_rows"], p0["edge_rows"].flip(0) if it["flip"] & 2 else p0["edge_rows"])
            assert torch.equal(it["edge_cols"], p0["edge_cols"].flip(0) if it["flip"] & 1 else p0["edge_cols"])
            # flipped boxes still frame the flipped box mask
            for x0, y0, x1, y1, *_ in it["boxes"].tolist():
                assert it["box_mask"][int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))].all()
    assert codes == {0, 1, 2, 3}
    with pytest.raises(Exception, match="augment must be"):
        _dataset(samples, k, augment="rotate")


def test_training_tiles_pad_small_images_and_keep_boxes_in_tile_coordinates(tmp_path: Path):
    """48 px images, 64 px tiles: padded (IGNORE, valid False), never stretched; boxes Nx6 in tile pixels."""
    from b2p.student.data import TileSampling, collate, gather_samples
    from b2p.student.geometry import IGNORE

    path, truth = make_synthetic_batch(tmp_path, n_images=4, size=48, manual_every=100)
    teach = write_teacher(tmp_path, path, truth)
    samples, k = gather_samples([path], teach, ("train", "val"))
    ds = _dataset(samples, k, sampling=TileSampling(64, crops_per_image=3), multiple=32)
    assert len(ds) == 3 * len(samples)
    for j in range(len(ds)):
        it = ds[j]
        i = it["index"]
        assert i == j // 3 and it["origin"] == (0, 0) and it["image"].shape == (3, 64, 64)
        lab = truth[samples[i].record.file_name]
        assert np.array_equal(it["target"][:48, :48].numpy(), lab) and (it["target"][48:] == IGNORE).all()
        assert int(it["valid"].sum()) == 48 * 48 and not it["box_mask"][48:].any()
        assert it["edge_rows"][:48].tolist() == [min(r, 47 - r) for r in range(48)] and (it["edge_cols"][48:] == 0).all()
        assert torch.allclose(it["image"][:, 48:], torch.tensor(-2.0))  # black padding, (0 - 0.5) / 0.25
        b = it["boxes"]
        assert b.shape == (len(samples[i].record.boxes), 6) and (b[:, 5] == 0).all()
        np.testing.assert_allclose(b[:, :4].numpy(), samples[i].record.boxes_xyxy(), atol=1e-5)
        assert b[:, 4].tolist() == samples[i].record.box_class_ids().tolist()
    batch = collate([ds[0], ds[4]])
    assert batch["image"].shape == (2, 3, 64, 64) and batch["origin"].shape == (2, 2) and len(batch["boxes"]) == 2


def test_box_centred_tiles_hold_their_box_and_uniform_tiles_cover_the_image(tmp_path: Path):
    from b2p.student.data import TileSampling, gather_samples

    path, truth = make_synthetic_batch(tmp_path, n_images=3, size=96, manual_every=100)
    teach = write_teacher(tmp_path, path, truth)
    samples, k = gather_samples([path], teach, ("train", "val"))
    torch.manual_seed(0)
    boxed = _dataset(samples, k, sampling=TileSampling(32, box_crop_fraction=1.0, origin_step=8), multiple=8)
    for _ in range(20):
        for j in range(len(boxed)):
            it = boxed[j]
            oy, ox = it["origin"]
            assert oy % 8 == 0 and ox % 8 == 0 and 0 <= oy <= 64 and 0 <= ox <= 64
            assert len(it["boxes"]) and it["box_mask"].any()  # a box is always (at least partly) in view
            b = it["boxes"]
            assert (b[:, :4] >= 0).all() and (b[:, :4] <= 32).all()
            # a clipped box touches the tile border; an unclipped one lies inside it and equals the original
            full = samples[j].record.boxes_xyxy() - np.array([ox, oy, ox, oy])
            for row in b.tolist():
                if row[5] == 0:
                    assert np.isclose(full, row[:4], atol=1e-4).all(1).any()
                else:
                    assert min(row[:4]) == 0 or max(row[:4]) == 32
    uniform = _dataset(samples, k, sampling=TileSampling(32, box_crop_fraction=0.0), multiple=8)
    seen = {uniform[0]["origin"] for _ in range(200)}
    assert len(seen) > 100  # any origin, not a coarse grid: translation augmentation without a cache
    assert all(0 <= y <= 64 and 0 <= x <= 64 for y, x in seen)


def test_labels_shrink_with_the_geometry_in_training_and_validation(tmp_path: Path):
    """At scale 0.5 a 96 px image becomes 48 model px; validation scores at the image's own size."""
    from b2p.student.data import gather_samples
    from b2p.student.geometry import Geometry

    path, truth = make_synthetic_batch(tmp_path, n_images=2, size=96, manual_every=100)
    teach = write_teacher(tmp_path, path, truth)
    samples, k = gather_samples([path], teach, ("train", "val"))
    ds = _dataset(samples, k, scale=0.5, multiple=16, min_side=32)
    it = ds[0]
    g = Geometry.for_image(96, 96, 0.5, multiple=16)
    assert it["target"].shape == (48, 48) and g.padded_size(32) == (48, 48)
    assert np.array_equal(it["target"].numpy(), g.labels_to_model(truth[samples[0].record.file_name], 32))
    assert (it["target"] == 1).any()  # the 2-px crack survives the halving


@pytest.mark.slow
def test_cached_tile_features_equal_cropped_whole_image_features(taught, tmp_path: Path):
    """A frozen backbone trains from cached whole-image features cut per tile; they must equal the features
    the backbone computes afresh for the whole (flipped) model image, cut at the tile's origin."""
    from b2p.student import train as train_mod
    from b2p.student.data import crop_features

    path, teach, _ = taught
    seen: list = []
    real = train_mod.crop_features

    def spy(feats, origin, size, padded):
        out = real(feats, origin, size, padded)
        seen.append(([f.clone() for f in feats], origin, size, padded, [o.clone() for o in out]))
        return out

    params = tiny_params(epochs=2, adaptation="frozen", augment="flips", tile_size=16, box_crop_fraction=0.5)
    try:
        train_mod.crop_features = spy
        train_student([path], teach, tmp_path / "c", params, progress=False)
    finally:
        train_mod.crop_features = real
    tiles = [s for s in seen if s[2] == (16, 16)]
    assert len(tiles) > 10 and any(s[1] != (0, 0) for s in tiles)
    loaded, _ = load_student(tmp_path / "c")
    from b2p.student.data import StudentDataset, TileSampling, gather_samples

    samples, k = gather_samples([path], teach, ("train",))
    c = loaded.config
    ds = StudentDataset(samples, c.mean, c.std, k, c.scale, c.max_side, c.multiple, TileSampling(16, origin_step=c.multiple))
    origins = {s[1] for s in tiles}
    assert all(y % c.multiple == 0 and x % c.multiple == 0 for y, x in origins)
    checked = 0
    for i in range(len(samples)):
        for code in range(4):
            with torch.no_grad():
                fresh = loaded.backbone_features(ds.model_image(i, code)[None])
            fresh = [f[0].to(torch.float16).float() for f in fresh]
            for feats, origin, size, padded, out in tiles:
                if all(f.shape == g.shape and torch.equal(f.float(), g) for f, g in zip(feats, fresh)):
                    want = crop_features(fresh, origin, size, padded)
                    assert all(torch.equal(o.float(), w) for o, w in zip(out, want))
                    checked += 1
    assert checked >= len(tiles) // 2  # most tiles matched a recomputed whole-image view


def test_within_boxes_keeps_student_pixels_inside_boxes_with_the_box_class():
    from b2p.boxes import within_boxes

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
    params.write_text(yaml.safe_dump({"train": section, "evaluate": {"worst": 3}}))  # other known sections: not train's
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
        from b2p.student.predict import read_probs

        z = np.load(pred / b.name / "probs" / (Path(rec.file_name).stem + ".npz"))
        assert z["probs"].dtype == np.uint8 and z["probs"].shape == (3, rec.height, rec.width) and float(z["scale"]) == 255
        pr = read_probs(pred / b.name / "probs" / (Path(rec.file_name).stem + ".npz"))
        assert np.allclose(pr.sum(0), 1.0, atol=1e-2)
        # the label map is the argmax of the probabilities, wherever rounding to 1/255 leaves a clear winner
        top2 = np.sort(pr, 0)[-2:]
        clear = top2[1] - top2[0] > 2.0 / 255
        assert clear.any() and np.mean(pr.argmax(0)[clear] == lm[clear]) > 0.99
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
    from b2p.boxes import box_mask

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
    # snapped maps: --snap none writes the student's own maps there; grabcut needs --snap-out, a folder of its own
    snapped = tmp_path / "snapped"
    r = runner.invoke(app, ["predict", "--model", str(model_dir), "--imported", str(imported), "--split", "all", "--out", str(pred), "--snap-out", str(snapped)])
    assert r.exit_code == 0, r.output
    for rec in b.images:
        own = read_label_map(label_map_path(pred, b.name, rec.file_name))
        assert np.array_equal(read_label_map(label_map_path(snapped, b.name, rec.file_name)), own)
    r = runner.invoke(app, ["predict", "--model", str(model_dir), "--imported", str(imported), "--out", str(pred), "--snap", "grabcut"])
    assert r.exit_code == 1 and "--snap-out" in r.output
    # with a snap, the box-guided masks are the snapped mask inside the boxes (a rescued box adds pixels)
    r = runner.invoke(app, ["predict", "--model", str(model_dir), "--imported", str(imported), "--split", "all", "--out", str(pred),
                            "--snap", "grabcut", "--snap-out", str(snapped), "--boxes-out", str(boxed)])
    assert r.exit_code == 0, r.output
    for rec in b.images:
        inside = np.zeros((rec.height, rec.width), dtype=bool)
        for box in rec.boxes:
            inside |= box_mask(np.asarray(box.xyxy), inside.shape)
        sm = read_label_map(label_map_path(snapped, b.name, rec.file_name)) > 0
        bm = read_label_map(label_map_path(boxed, b.name, rec.file_name)) > 0
        assert not bm[~inside].any() and bm[sm & inside].all()
    r = runner.invoke(app, ["predict", "--model", str(model_dir), "--imported", str(imported), "--out", str(pred), "--snap", "grabcut", "--snap-out", str(pred)])
    assert r.exit_code == 1 and "--out is the same folder as --snap-out" in r.output
    # one root inside another: its maps would read as a batch folder of the other; refused before any work
    before = sorted(p for p in tmp_path.rglob("*"))
    r = runner.invoke(app, ["predict", "--model", str(model_dir), "--imported", str(imported), "--out", str(tmp_path / "p2"),
                            "--snap", "grabcut", "--snap-out", str(tmp_path / "p2" / "snap")])
    assert r.exit_code == 1 and "--out holds --snap-out" in r.output and sorted(p for p in tmp_path.rglob("*")) == before
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    before = {p: p.read_bytes() for p in sorted(pred.rglob("*.png")) + sorted(snapped.rglob("*.png"))}
    for bad, says in ((["--snap", "crf"], "--snap: predict.snap: Input should be 'none' or 'grabcut'"), (["--snap-sure", "0.4"], "--snap-sure"),
                      (["--snap", "grabcut", "--snap-out", str(a_file)], "is a file")):
        r = runner.invoke(app, ["predict", "--model", str(model_dir), "--imported", str(imported), "--out", str(pred), "--snap-out", str(snapped), *bad])
        assert r.exit_code == 1 and says in r.output, r.output
    # refused before anything is written: the earlier maps are untouched
    assert {p: p.read_bytes() for p in before} == before and a_file.read_text() == "not a folder"
    r = runner.invoke(app, ["predict", "--model", str(model_dir), "--images", str(folder), "--out", str(out), "--snap", "grabcut", "--snap-out", str(snapped / "free")])
    assert r.exit_code == 0, r.output
    assert read_label_map(snapped / "free" / "big.png").shape == (50, 70)


def test_cli_errors(taught, tmp_path: Path):
    path, teach, _ = taught
    runner = CliRunner()
    # missing teacher label maps
    r = runner.invoke(app, ["train", "--imported", str(path.parent), "--teacher-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")])
    assert r.exit_code == 1 and "b2p teach" in r.output
    # DINOv2 without weights: a clear error, not random weights
    r = runner.invoke(app, ["train", "--imported", str(path.parent), "--teacher-root", str(teach), "--out", str(tmp_path / "m"), "--backbone", "dinov2_s", "--tile-size", "56"])
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
    # image-edge distances without the strip context they join: one error before anything is written
    old = tmp_path / "m2" / "model.pt"
    old.parent.mkdir()
    old.write_bytes(b"an earlier model")
    r = runner.invoke(app, ["train", "--imported", str(path.parent), "--teacher-root", str(teach), "--out", str(old.parent),
                            "--set", "edges=true", "--set", "context=none", "--epochs", "1"])
    assert r.exit_code == 1 and "edges join the strip context: set context to strip or edges to false" in r.output, r.output
    assert old.read_bytes() == b"an earlier model" and sorted(p.name for p in old.parent.iterdir()) == ["model.pt"]
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


def test_box_fit_score_rewards_masks_that_span_their_boxes_and_stay_inside():
    from b2p.student.selection import BoxFitScore

    boxes = np.array([[2, 2, 12, 6], [20, 10, 24, 30]], dtype=np.float32)  # 10x4 and 4x20 px
    perfect = np.zeros((40, 40), bool)
    perfect[4, 2:12] = True  # a 1-px line the box's length: spans x fully, y only 1 of 4 rows
    perfect[10:30, 22] = True
    s = BoxFitScore()
    s.update(perfect, boxes)
    p = s.parts()
    dice_y1 = 2 * 1 / (4 + 1)  # box 1: y projection touches 1 of 4 rows
    dice_x2 = 2 * 1 / (4 + 1)
    assert p["box_dice"] == pytest.approx(((1 + dice_y1) / 2 + (dice_x2 + 1) / 2) / 2)
    assert p["outside_share"] == 0.0 and p["box_score"] == pytest.approx(p["box_dice"])
    # the same plus as many pixels outside every box: the score halves
    noisy = perfect.copy()
    noisy[35:37, :15] = True  # 30 px outside, as many as inside
    s2 = BoxFitScore()
    s2.update(noisy, boxes)
    assert s2.parts()["outside_share"] == pytest.approx(0.5) and s2.value() == pytest.approx(p["box_score"] / 2)
    # filling the boxes scores 1; predicting nothing scores 0; no box at all: undefined
    full = np.zeros((40, 40), bool)
    full[2:6, 2:12] = full[10:30, 20:24] = True
    s3 = BoxFitScore()
    s3.update(full, boxes)
    s3.update(np.zeros((40, 40), bool), np.zeros((0, 4)))  # a defect-free image without prediction changes nothing
    assert s3.value() == pytest.approx(1.0)
    s4 = BoxFitScore()
    s4.update(np.zeros((40, 40), bool), boxes)
    assert s4.value() == 0.0
    assert BoxFitScore().value() is None


@pytest.mark.parametrize("rule", ["box", "pseudo", "last"])
def test_select_rule_is_recorded_and_followed(taught, tmp_path: Path, rule):
    path, teach, _ = taught
    m = train_student([path], teach, tmp_path / rule, tiny_params(epochs=3, select=rule), progress=False)
    rows = _curves(tmp_path / rule / "curves.csv")
    assert {"val_box_score", "val_box_dice", "val_outside_share", "val_anomaly_miou", "select_score"} <= set(rows[0])
    assert m["select"]["rule"] == rule and json.loads((tmp_path / rule / "metrics.json").read_text())["select"]["rule"] == rule
    if rule == "last":
        assert m["best_epoch"] == 3 and m["select"]["score"] is None and all(r["select_score"] == "" for r in rows)
    else:
        col = "val_box_score" if rule == "box" else "val_anomaly_miou"
        scores = [float(r[col] or 0) for r in rows]
        assert [float(r["select_score"]) for r in rows] == pytest.approx(scores, rel=1e-5)
        assert m["best_epoch"] == 1 + int(np.argmax(scores)) and m["select"]["score"] == pytest.approx(max(scores), rel=1e-5)
    assert load_student(tmp_path / rule)[1]["info"]["select"] == rule


def test_train_params_geometry_keys_and_the_old_input_size_name(tmp_path: Path):
    from b2p.errors import B2PError

    p = TrainParams.from_dict({"input_size": 64, "scale": 0.5, "max_side": 1000})
    assert (p.tile_size, p.scale, p.max_side) == (64, 0.5, 1000)
    c = p.student_config(3)
    assert (c.tile_size, c.scale, c.max_side, c.multiple) == (64, 0.5, 1000, 32)
    with pytest.raises(B2PError, match="both set"):
        TrainParams.from_dict({"input_size": 64, "tile_size": 64})
    for bad, msg in (({"select": "best"}, "select must be"), ({"box_crop_fraction": 1.5}, "box_crop_fraction"), ({"crops_per_image": 0}, "crops_per_image")):
        with pytest.raises(B2PError, match=msg) as e:
            TrainParams.from_dict(bad, tmp_path / "params.yaml")
        assert "params.yaml" in str(e.value)


def test_training_at_half_scale_records_its_geometry_and_scores_val_at_image_size(taught, tmp_path: Path):
    path, teach, _ = taught
    m = train_student([path], teach, tmp_path / "h", tiny_params(epochs=1, scale=0.5, tile_size=16, select="pseudo"), progress=False)
    assert m["geometry"] == {"scale": 0.5, "max_side": None, "tile_size": 16, "multiple": 8}
    support = sum(c["support"] for c in m["val"]["per_class"].values())
    assert support == 48 * 48 * m["images"]["val"]  # every pixel of each 48 px val image, none of the padding
    model, _ = load_student(tmp_path / "h")
    assert (model.config.scale, model.config.tile_size) == (0.5, 16)
    capped = train_student([path], teach, tmp_path / "c", tiny_params(epochs=1, max_side=24, tile_size=16, select="last"), progress=False)
    assert capped["geometry"]["max_side"] == 24


def test_every_rules_epoch_is_kept(taught, tmp_path: Path):
    """keep_rule_models: each rule's own epoch is written (rules/<rule>.pt, those weights), and only then."""
    path, teach, _ = taught
    out = tmp_path / "m"
    m = train_student([path], teach, out, tiny_params(epochs=5, lr=2e-2, select="box", keep_rule_models=True), progress=False)
    rows = _curves(out / "curves.csv")
    want = {"box": 1 + int(np.argmax([float(r["val_box_score"] or 0) for r in rows])),
            "pseudo": 1 + int(np.argmax([float(r["val_anomaly_miou"] or 0) for r in rows])), "last": 5}
    rules = json.loads((out / "metrics.json").read_text())["rules"]
    assert {r: v["epoch"] for r, v in rules.items()} == want and rules["box"]["file"] == "model.pt" == m["rules"]["box"]["file"]
    own = [r for r in rules if rules[r]["epoch"] != want["box"]]
    assert own, "this seed's rules must disagree, or the rule models go untested"
    saved = load_student(out)[0].state_dict()
    for r in rules:
        f = rules[r]["file"]
        assert f == (f"rules/{r}.pt" if r in own else "model.pt")
        model, ck = load_student(out / f)
        assert ck["info"]["best_epoch"] == want[r]
        same = all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
        assert same == (r not in own)
    # without keep_rule_models: the epochs are recorded, no rule model is written
    bare = tmp_path / "bare"
    train_student([path], teach, bare, tiny_params(epochs=5, lr=2e-2, select="box"), progress=False)
    assert not (bare / "rules").exists() and set(json.loads((bare / "metrics.json").read_text())["rules"]) == {"box", "pseudo", "last"}


def test_a_model_folder_is_always_one_trainings_output(taught, tmp_path: Path, monkeypatch):
    """train replaces its folder whole: a kill -9 right after model.pt is written (the audit's
    kill_after_model.py) or an error before metrics.json leaves the earlier model, metrics.json and rules/
    byte-identical; a folder holding files train does not write, or the teacher root, is refused before
    any training."""
    import subprocess
    import sys

    import b2p.student.train as train_mod
    from b2p.errors import B2PError

    path, teach, _ = taught
    out = tmp_path / "m"
    kw = dict(epochs=2, select="pseudo", keep_rule_models=True)
    train_student([path], teach, out, tiny_params(**kw), progress=False)
    before = {f: f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()}
    assert out / "metrics.json" in before and out / "curves.csv" in before

    script = (
        f"import os, sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import b2p.student.train as t\nfrom test_student import tiny_params\nreal = t.save_checkpoint\n"
        "def die(p, *a, **k):\n    real(p, *a, **k)\n    str(p).endswith('model.pt') and os._exit(137)\n"
        "t.save_checkpoint = die\n"
        f"t.train_student([{str(path)!r}], {str(teach)!r}, {str(out)!r}, tiny_params(epochs=1, seed=5), progress=False)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 137, r.stderr
    assert {f: f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()} == before

    def disk_full(*a, **k):
        raise OSError("disk full")

    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".b2p-")]  # a kill cannot clean up its hidden build folder
    monkeypatch.setattr(train_mod, "_write_curves", disk_full)
    with pytest.raises(OSError):
        train_student([path], teach, out, tiny_params(epochs=1, seed=5), progress=False)
    monkeypatch.undo()
    assert {f: f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()} == before
    # the next run removed the kill's build folder, and its own is gone with its error
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".b2p-")]

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(B2PError, match="notes.txt"):
        train_student([path], teach, tmp_path / "mine", tiny_params(epochs=1), progress=False)
    with pytest.raises(B2PError, match="--out is the same folder as --teacher-root"):
        train_student([path], teach, teach, tiny_params(epochs=1), progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    # a retrained folder holds that training's files only (no rule model of the earlier run)
    train_student([path], teach, out, tiny_params(epochs=1), progress=False)
    assert not (out / "rules").exists() and json.loads((out / "metrics.json").read_text())["epochs_run"] == 1
