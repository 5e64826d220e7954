"""Image and label-map decoding every stage shares: palette label maps.

Real files written with OpenCV and Pillow; the import CLI shows what a user sees (exit code, one message
naming the file)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from b2p.cli import app
from b2p.dataset import load_batch
from b2p.errors import B2PError
from b2p.labels import read_label_map

runner = CliRunner()
W, H = 40, 24


def _raw(seed: int = 0) -> np.ndarray:
    """HxWx3 uint8 pixels with a white top-left corner, so every turn and mirror is visible."""
    img = np.random.default_rng(seed).integers(0, 200, (H, W, 3), dtype=np.uint8)
    img[:4, :6] = 255
    return img


def _import(tmp_path: Path, images: Path, names: list[str], sizes: list[tuple[int, int]], masks: Path | None = None):
    coco = {
        "images": [{"id": i + 1, "file_name": n, "width": w, "height": h} for i, (n, (w, h)) in enumerate(zip(names, sizes))],
        "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [1, 1, 5, 5]} for i in range(len(names))],
        "categories": [{"id": 1, "name": "crack"}, {"id": 2, "name": "spot"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    out = tmp_path / "imported" / "b1.json"
    args = ["import", "--batch", "b1", "--images", images, "--coco", tmp_path / "ann.json",
            "--classes", tmp_path / "classes.json", "--out", out, *(["--masks", masks] if masks else [])]
    return runner.invoke(app, [str(a) for a in args]), out


# --- label maps: a palette PNG is read by its indices, an RGB one is still refused ---------------------------


def _palette_png(path: Path, indices: np.ndarray, bits: int | None = None) -> Path:
    im = Image.fromarray(indices, "P")
    im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [255, 255, 255] * 253)  # VOC-style colours
    im.save(path, **({"bits": bits} if bits else {}))
    return path


@pytest.mark.parametrize("bits", [None, 2])
def test_palette_label_map_is_read_by_its_indices(tmp_path, bits):
    lm = np.zeros((H, W), np.uint8)
    lm[2:8, 3:9], lm[10:14, 20:30] = 1, 2
    path = _palette_png(tmp_path / "m.png", lm, bits)
    assert Image.open(path).mode == "P"
    out = read_label_map(path, shape=(H, W), num_classes=2)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, lm)
    with pytest.raises(B2PError, match="class id 2 but only 1 classes"):
        read_label_map(path, num_classes=1)


def test_rgb_and_corrupt_palette_label_maps_are_still_refused(tmp_path):
    cv2.imwrite(str(tmp_path / "rgb.png"), np.zeros((H, W, 3), np.uint8))
    with pytest.raises(B2PError, match="single-channel"):
        read_label_map(tmp_path / "rgb.png")
    data = _palette_png(tmp_path / "p.png", np.ones((H, W), np.uint8)).read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(B2PError, match="could not be decoded") as e:
        read_label_map(tmp_path / "cut.png")
    assert e.value.path == tmp_path / "cut.png"


def test_import_with_voc_style_palette_masks(tmp_path):
    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), _raw())
    lm = np.zeros((H, W), np.uint8)
    lm[1:6, 1:6], lm[12:16, 20:28] = 1, 2
    (tmp_path / "masks").mkdir()
    _palette_png(tmp_path / "masks" / "a.png", lm)
    r, out = _import(tmp_path, tmp_path / "images", ["a.png"], [(W, H)], masks=tmp_path / "masks")
    assert r.exit_code == 0, r.output
    (im,) = load_batch(out).images
    np.testing.assert_array_equal(im.manual_label_map(), lm)
