"""Image and label-map decoding every stage shares: EXIF orientation, bit depth, palette label maps.

Real files written with OpenCV and Pillow; the import CLI shows what a user sees (exit code, one message
naming the file)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps, PngImagePlugin
from typer.testing import CliRunner

from b2p.cli import app
from b2p.dataset import load_batch
from b2p.errors import B2PError
from b2p.fileio import describe_size_mismatch, exif_orientation, image_size, read_image
from b2p.labels import read_label_map

runner = CliRunner()
W, H = 40, 24  # stored pixels: wider than high, so a 90-degree orientation shows as a transposed size


def _raw(seed: int = 0) -> np.ndarray:
    """HxWx3 uint8 pixels with a white top-left corner, so every turn and mirror is visible."""
    img = np.random.default_rng(seed).integers(0, 200, (H, W, 3), dtype=np.uint8)
    img[:4, :6] = 255
    return img


def _save_oriented(path: Path, pixels: np.ndarray, orientation: int, **kw) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif, **kw)
    return path


def _import(tmp_path: Path, images: Path, names: list[str], sizes: list[tuple[int, int]], masks: Path | None = None,
            boxes: list[tuple[int, list[int]]] = ((1, [1, 1, 5, 5]),)):
    """Each image gets `boxes` ((category id, [x, y, w, h]), ...)."""
    coco = {
        "images": [{"id": i + 1, "file_name": n, "width": w, "height": h} for i, (n, (w, h)) in enumerate(zip(names, sizes))],
        "annotations": [{"id": len(names) * k + i + 1, "image_id": i + 1, "category_id": c, "bbox": b}
                        for i in range(len(names)) for k, (c, b) in enumerate(boxes)],
        "categories": [{"id": 1, "name": "crack"}, {"id": 2, "name": "spot"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    out = tmp_path / "imported" / "b1.json"
    args = ["import", "--batch", "b1", "--images", images, "--coco", tmp_path / "ann.json",
            "--classes", tmp_path / "classes.json", "--out", out, *(["--masks", masks] if masks else [])]
    return runner.invoke(app, [str(a) for a in args]), out


# --- EXIF orientation: applied as displayed, reported by exif_orientation, the same for every format --------


@pytest.mark.parametrize("fmt", ["png", "tiff", "webp"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_applied_as_pillow_displays_it_and_reported(tmp_path, fmt, orientation):
    path = _save_oriented(tmp_path / f"a.{fmt}", _raw(), orientation, **({"lossless": True} if fmt == "webp" else {}))
    shown = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    np.testing.assert_array_equal(read_image(path), shown)
    assert exif_orientation(path) == orientation
    assert image_size(path) == (shown.shape[1], shown.shape[0])


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_jpeg_orientation_applied_and_reported(tmp_path, orientation):
    path = _save_oriented(tmp_path / "a.jpg", _raw(), orientation, quality=95)
    shown = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB")).astype(int)
    img = read_image(path)
    assert img.shape == shown.shape and np.abs(img.astype(int) - shown).mean() < 2  # two JPEG decoders
    assert exif_orientation(path) == orientation


def test_png_exif_after_the_pixels_counts_and_imagemagick_text_profile_does_not(tmp_path):
    """The report follows the decoder: OpenCV honours an eXIf chunk anywhere, ignores the text profile."""
    data = _save_oriented(tmp_path / "early.png", _raw(), 6).read_bytes()
    at = data.index(b"eXIf") - 4
    chunk = data[at : at + 12 + struct.unpack(">I", data[at : at + 4])[0]]
    rest = data[:at] + data[at + len(chunk) :]
    end = rest.index(b"IEND") - 4
    (tmp_path / "late.png").write_bytes(rest[:end] + chunk + rest[end:])
    assert exif_orientation(tmp_path / "late.png") == 6 and read_image(tmp_path / "late.png").shape == (W, H, 3)

    exif = Image.Exif()
    exif[0x0112] = 6
    blob = exif.tobytes().hex()
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", f"\nexif\n{len(blob) // 2:8d}\n{blob}\n")
    Image.fromarray(_raw()).save(tmp_path / "text.png", pnginfo=info)
    assert exif_orientation(tmp_path / "text.png") == 1
    np.testing.assert_array_equal(read_image(tmp_path / "text.png"), _raw())


def test_no_or_unreadable_orientation_is_1(tmp_path):
    cv2.imwrite(str(tmp_path / "plain.png"), _raw())
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    assert exif_orientation(tmp_path / "plain.png") == 1 and exif_orientation(tmp_path / "junk.jpg") == 1


def test_size_mismatch_of_a_turned_image_names_its_exif_orientation(tmp_path):
    path = _save_oriented(tmp_path / "a.jpg", _raw(), 6)
    w, h = image_size(path)
    assert (w, h) == (H, W)
    text = describe_size_mismatch(path, (W, H), (w, h))  # declared as the raw pixels are stored
    assert f"'a.jpg' is declared {W}x{H} but the file is {H}x{W}" in text
    assert "EXIF orientation 6 (rotated 90 degrees clockwise)" in text and f"declare {H}x{W}" in text
    assert "-Orientation=1" in text
    # a size off by something else, or a transposed size without such a tag, says nothing of EXIF
    assert "EXIF" not in describe_size_mismatch(path, (W + 1, H), (w, h))
    cv2.imwrite(str(tmp_path / "b.png"), _raw()[:, : H])  # 24x24: no tag
    assert "EXIF" not in describe_size_mismatch(tmp_path / "b.png", (H, W), (W, H), name="sub/b.png")
    assert "'sub/b.png'" in describe_size_mismatch(tmp_path / "b.png", (H, W), (W, H), name="sub/b.png")


# --- bit depth: more than 8 bits per channel is refused, 8-bit decoding unchanged ----------------------------


def _twelve_bit(path: Path, channels: int = 1) -> Path:
    grey = (np.arange(H * W, dtype=np.uint16).reshape(H, W) * 17 % 4081).astype(np.uint16)  # 0..4080
    cv2.imwrite(str(path), grey if channels == 1 else np.repeat(grey[..., None], channels, axis=2))
    return path


@pytest.mark.parametrize("name,channels", [("g.png", 1), ("rgb.png", 3), ("rgba.png", 4), ("g.tiff", 1)])
def test_16_bit_image_is_refused_not_squashed(tmp_path, name, channels):
    path = _twelve_bit(tmp_path / name, channels)
    with pytest.raises(B2PError) as e:
        read_image(path)
    assert e.value.path == path and "16-bit integer samples (largest value 4080)" in e.value.problem
    assert "8-bit" in e.value.problem and "4095" in e.value.problem


def test_float_tiff_is_refused_as_deep_not_as_corrupt(tmp_path):
    cv2.imwrite(str(tmp_path / "f.tiff"), np.full((H, W), 0.5, np.float32))
    with pytest.raises(B2PError, match="32-bit floating-point samples"):
        read_image(tmp_path / "f.tiff")


def test_import_of_a_16_bit_image_exits_1_naming_the_file(tmp_path):
    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "ok.png"), _raw())
    _twelve_bit(tmp_path / "images" / "deep.png")
    r, out = _import(tmp_path, tmp_path / "images", ["ok.png", "deep.png"], [(W, H), (W, H)])
    assert r.exit_code == 1, r.output
    assert "deep.png" in r.output and "16-bit" in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_8_bit_grey_rgba_palette_and_cmyk_decode_as_before(tmp_path):
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (H, W), dtype=np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(rng.integers(0, 255, (H, W, 4), dtype=np.uint8), "RGBA").save(tmp_path / "rgba.png")
    pal = Image.fromarray(rng.integers(0, 3, (H, W), dtype=np.uint8), "P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
    pal.save(tmp_path / "p.png")
    Image.fromarray(rng.integers(0, 255, (H, W, 4), dtype=np.uint8), "CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(tmp_path / "rgb.jpg")
    for name in ["g.png", "rgba.png", "p.png", "cmyk.jpg", "rgb.jpg"]:
        path = tmp_path / name
        expected = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        img = read_image(path)
        assert img.dtype == np.uint8 and img.shape == (H, W, 3), name
        np.testing.assert_array_equal(img, expected, err_msg=name)
    np.testing.assert_array_equal(read_image(tmp_path / "p.png")[..., 0], np.asarray(pal.convert("RGB"))[..., 0])


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
    r, out = _import(tmp_path, tmp_path / "images", ["a.png"], [(W, H)], masks=tmp_path / "masks", boxes=[(1, [1, 1, 5, 5]), (2, [20, 12, 8, 4])])
    assert r.exit_code == 0, r.output
    (im,) = load_batch(out).images
    np.testing.assert_array_equal(im.manual_label_map(), lm)
