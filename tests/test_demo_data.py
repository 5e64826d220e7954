"""`b2p demo-data`: deterministic, sparse, tight boxes, exact masks, importable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from b2p.cli import app
from b2p.dataset import load_batch
from b2p.fileio import read_image
from b2p.ingest.demo import DEMO_CLASSES, make_demo_data
from b2p.labels import read_label_map

runner = CliRunner()


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _demo(out: Path, *extra: str) -> None:
    r = runner.invoke(app, ["demo-data", "--out", str(out), "--images", "8", "--size", "96", *extra])
    assert r.exit_code == 0, r.output


def test_same_seed_gives_byte_identical_output(tmp_path: Path) -> None:
    _demo(tmp_path / "a", "--seed", "3")
    _demo(tmp_path / "b", "--seed", "3")
    _demo(tmp_path / "c", "--seed", "4")
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert {"annotations.json", "classes.txt", "preview.png", "images/img_000.png"} <= set(a)
    assert a["images/img_000.png"] != c["images/img_000.png"]


def test_boxes_tight_masks_exact_and_defects_sparse(tmp_path: Path) -> None:
    r = make_demo_data(tmp_path, seed=1, images=12, size=96, all_masks=True)
    coco = json.loads((tmp_path / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == list(DEMO_CLASSES) == (tmp_path / "classes.txt").read_text().split()
    assert r.masks == 12 and len(list((tmp_path / "masks").glob("*.png"))) == 12
    assert all(n >= 1 for n in r.instances_per_class.values())
    total = 0
    for im in coco["images"]:
        lm = read_label_map(tmp_path / "masks" / im["file_name"], shape=(96, 96), num_classes=3)
        assert read_image(tmp_path / "images" / im["file_name"]).shape == (96, 96, 3)
        anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
        covered = np.zeros_like(lm, bool)
        for a in anns:
            x, y, w, h = a["bbox"]
            inside = lm[y : y + h, x : x + w] == a["category_id"]
            # tight: the instance's pixels touch all four sides of its box
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            covered[y : y + h, x : x + w] |= lm[y : y + h, x : x + w] == a["category_id"]
        assert np.array_equal(covered, lm > 0)  # every defect pixel lies in a box of its class
        total += int((lm > 0).sum())
    frac = total / (12 * 96 * 96)
    assert 0.002 < frac < 0.08 and abs(frac - r.defect_pixel_fraction) < 1e-12


def test_box_filling_is_a_noisy_teacher(tmp_path: Path) -> None:
    """Defects are thin and irregular: a filled box is a poor mask (what the student must overcome)."""
    make_demo_data(tmp_path, seed=0, images=10, size=96, all_masks=True)
    coco = json.loads((tmp_path / "annotations.json").read_text())
    names = {im["id"]: im["file_name"] for im in coco["images"]}
    ious = []
    for a in coco["annotations"]:
        lm = read_label_map(tmp_path / "masks" / names[a["image_id"]])
        x, y, w, h = a["bbox"]
        inst = lm[y : y + h, x : x + w] == a["category_id"]
        ious.append(inst.sum() / (w * h))  # IoU of the filled box with the instance
    assert np.mean(ious) < 0.6


def test_mask_fraction_prefix_stale_files_and_import(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    _demo(out, "--images", "10", "--mask-fraction", "0.3")
    assert len(list((out / "masks").glob("*.png"))) == 3
    big = _files(out)
    _demo(out, "--images", "5", "--mask-fraction", "0.0")
    small = _files(out)
    assert sorted(p for p in small if p.startswith("images/")) == [f"images/img_{i:03d}.png" for i in range(5)]
    assert not any(p.startswith("masks/") for p in small)  # stale masks would be imported as truth
    assert all(small[f"images/img_{i:03d}.png"] == big[f"images/img_{i:03d}.png"] for i in range(5))
    _demo(out, "--images", "10", "--mask-fraction", "0.3")
    assert _files(out) == big
    r = runner.invoke(
        app,
        ["import", "--batch", "demo", "--images", str(out / "images"), "--coco", str(out / "annotations.json"),
         "--masks", str(out / "masks"), "--classes", str(tmp_path / "classes.json"), "--out", str(tmp_path / "demo.json")],
    )
    assert r.exit_code == 0, r.output
    batch = load_batch(tmp_path / "demo.json")
    masked = {p.name for p in (out / "masks").glob("*.png")}
    for im in batch.images:
        assert im.has_manual_mask == (im.file_name in masked)
        if im.has_manual_mask:
            assert im.split == "test"
            np.testing.assert_array_equal(im.manual_label_map(), read_label_map(out / "masks" / im.file_name))


def test_preview_and_bad_options(tmp_path: Path) -> None:
    _demo(tmp_path)
    prev = read_image(tmp_path / "preview.png")
    assert prev.shape[0] == 2 * 96 + 22 and prev.shape[1] % 96 == 0 and prev.shape[1] >= 96
    r = runner.invoke(app, ["demo-data", "--out", str(tmp_path / "x"), "--size", "10"])
    assert r.exit_code == 1 and "--size" in r.output and not (tmp_path / "x").exists()


@pytest.mark.parametrize("seed", [0, 1])
def test_default_size_is_fast(tmp_path: Path, seed: int) -> None:
    import time

    t = time.perf_counter()
    r = make_demo_data(tmp_path, seed=seed, images=16, size=192)
    assert time.perf_counter() - t < 15
    assert r.defect_free_images < 16 and 0.002 < r.defect_pixel_fraction < 0.08
