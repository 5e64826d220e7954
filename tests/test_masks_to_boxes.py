"""`b2p masks-to-boxes`: one box per connected component, manual masks only in the test split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from b2p.cli import app
from b2p.dataset import load_batch
from b2p.errors import B2PError
from b2p.fileio import write_bytes_atomic, write_png_atomic
from b2p.ingest.from_masks import masks_to_boxes
from b2p.splits import SplitRule

runner = CliRunner()
H, W = 40, 56
# the dataset lies in shared/ beside the repository (as in CI); never copied into it
REAL = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic-tile"


def _jpg(path: Path, seed: int) -> None:
    import cv2

    img = np.random.default_rng(seed).integers(60, 200, (H, W), dtype=np.uint8)
    write_bytes_atomic(path, cv2.imencode(".jpg", img)[1].tobytes())


def _mask_two_blobs(seed: int) -> tuple[np.ndarray, list[list[int]]]:
    """Anti-aliased mask: two solid blobs (value 255) with a faint rim (100, below threshold), a 2-px speck,
    and two squares touching only at a corner (one component under 8-connectivity)."""
    rng = np.random.default_rng(seed)
    m = np.zeros((H, W), np.uint8)
    x, y = int(rng.integers(2, 10)), int(rng.integers(2, 10))
    m[y - 1 : y + 7, x - 1 : x + 9] = 100  # rim below the threshold
    m[y : y + 6, x : x + 8] = 255
    m[30:33, 40:43] = 200
    m[33:35, 43:45] = 255  # touches the square above only diagonally
    m[2, 50:52] = 255  # speck: 2 px, dropped with min_area 4
    return m, [[x, y, 8, 6], [40, 30, 5, 5]]


@pytest.fixture
def tree(tmp_path: Path) -> dict:
    root = tmp_path / "MT"
    boxes = {}
    k = 0
    for folder, n in (("MT_Crack", 6), ("MT_Blowhole", 4)):
        for i in range(n):
            name = f"{folder}/Imgs/{folder.lower()}_{i}.jpg"
            _jpg(root / name, k)
            m, b = _mask_two_blobs(k)
            write_png_atomic(root / name.replace(".jpg", ".png"), m)
            boxes[name] = b
            k += 1
    for i in range(8):
        name = f"MT_Free/Imgs/free_{i}.jpg"
        _jpg(root / name, 100 + i)
        write_png_atomic(root / name.replace(".jpg", ".png"), np.zeros((H, W), np.uint8))
    return {"root": root, "boxes": boxes}


def test_boxes_per_component_and_test_only_masks(tree: dict, tmp_path: Path) -> None:
    out = tmp_path / "mt.json"
    r = runner.invoke(
        app,
        ["masks-to-boxes", str(tree["root"]), "--out", str(out), "--batch", "mt", "--strip-prefix", "MT_",
         "--min-area", "4", "--val", "0.2", "--test", "0.4"],
    )
    assert r.exit_code == 0, r.output
    assert "dropped" in r.output and "defect-free" in r.output
    coco = json.loads(out.read_text())
    assert [c["name"] for c in coco["categories"]] == ["blowhole", "crack"]  # no class for MT_Free
    cat = {c["id"]: c["name"] for c in coco["categories"]}
    rule = SplitRule(val=0.2, test=0.4)
    images = {im["file_name"]: im for im in coco["images"]}
    assert len(images) == 18
    for name, im in images.items():
        anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
        assert im["has_manual_mask"] == (rule.hash_split("mt", name) == "test")
        assert all(("segmentation" in a) == im["has_manual_mask"] for a in anns)
        if name.startswith("MT_Free"):
            assert anns == []
            continue
        assert [a["bbox"] for a in anns] == tree["boxes"][name]
        assert {cat[a["category_id"]] for a in anns} == {name.split("/")[0][3:].lower()}
    assert coco["info"]["dropped_components"] == {"blowhole": 4, "crack": 6}
    assert any(im["has_manual_mask"] for im in images.values())
    assert not all(im["has_manual_mask"] for im in images.values())

    # importing with the same fractions gives the same split; manual masks only in test
    r = runner.invoke(
        app,
        ["import", "--batch", "mt", "--images", str(tree["root"]), "--coco", str(out), "--val", "0.2", "--test", "0.4",
         "--classes", str(tmp_path / "classes.json"), "--out", str(tmp_path / "imported" / "mt.json")],
    )
    assert r.exit_code == 0, r.output
    batch = load_batch(tmp_path / "imported" / "mt.json")
    for im in batch.images:
        assert im.split == rule.hash_split("mt", im.file_name)
        assert im.has_manual_mask == (im.split == "test")
        if im.has_manual_mask:
            import cv2

            truth = cv2.imread(str(im.path.with_suffix(".png")), cv2.IMREAD_GRAYSCALE) >= 128
            truth[2, 50:52] = False  # the dropped speck is not part of the manual mask
            if im.file_name.startswith("MT_Free"):
                expected = np.zeros((H, W), np.uint8)
            else:
                expected = truth.astype(np.uint8) * batch.classes.id_of(im.file_name.split("/")[0][3:].lower())
            np.testing.assert_array_equal(im.manual_label_map(), expected)


def test_free_images_limit_is_deterministic(tree: dict, tmp_path: Path) -> None:
    a = masks_to_boxes(tree["root"], tmp_path / "a.json", "mt", strip_prefix="MT_", free_images=3)
    b = masks_to_boxes(tree["root"], tmp_path / "b.json", "mt", strip_prefix="MT_", free_images=3)
    assert (a.free_total, a.free_kept) == (8, 3)
    fa = [im["file_name"] for im in json.loads((tmp_path / "a.json").read_text())["images"] if "Free" in im["file_name"]]
    fb = [im["file_name"] for im in json.loads((tmp_path / "b.json").read_text())["images"] if "Free" in im["file_name"]]
    assert fa == fb and len(fa) == 3
    assert (tmp_path / "a.json").read_bytes().replace(b"a.json", b"") == (tmp_path / "b.json").read_bytes().replace(b"b.json", b"")
    c = masks_to_boxes(tree["root"], tmp_path / "c.json", "mt", free_images=0)
    assert c.free_kept == 0 and c.images == 10
    assert c.categories == ["mt_blowhole", "mt_crack"]  # without --strip-prefix only lower-cased


def test_threshold_and_min_area(tree: dict, tmp_path: Path) -> None:
    # threshold 90 lets the rim in: the first blob's box grows by one pixel on every side
    masks_to_boxes(tree["root"], tmp_path / "t.json", "mt", threshold=90, min_area=4, folders=["MT_Crack"])
    coco = json.loads((tmp_path / "t.json").read_text())
    first = next(a for a in coco["annotations"] if a["image_id"] == 1)
    x, y, w, h = tree["boxes"][coco["images"][0]["file_name"]][0]
    assert first["bbox"] == [x - 1, y - 1, w + 2, h + 2]
    r = masks_to_boxes(tree["root"], tmp_path / "m.json", "mt", min_area=1, folders=["MT_Crack"])
    assert r.boxes_per_class == {"mt_crack": 18} and r.dropped_per_class == {"mt_crack": 0}


def _cli_error(root: Path, tmp_path: Path) -> str:
    out = tmp_path / "o.json"
    r = runner.invoke(app, ["masks-to-boxes", str(root), "--out", str(out), "--batch", "mt"])
    assert r.exit_code == 1 and not out.exists() and "Traceback" not in r.output
    return r.output


def test_bad_layouts_are_refused(tree: dict, tmp_path: Path) -> None:
    root = tree["root"]
    (root / "MT_Crack/Imgs/mt_crack_0.png").unlink()
    assert "mt_crack_0.jpg" in _cli_error(root, tmp_path) and "no manual mask" in _cli_error(root, tmp_path)
    write_png_atomic(root / "MT_Crack/Imgs/mt_crack_0.png", np.zeros((H + 2, W), np.uint8))
    msg = _cli_error(root, tmp_path)
    assert "mt_crack_0.png" in msg and f"{W}x{H + 2}" in msg
    write_png_atomic(root / "MT_Crack/Imgs/mt_crack_0.png", np.zeros((H, W), np.uint8))
    write_png_atomic(root / "MT_Crack/Imgs/orphan.png", np.zeros((H, W), np.uint8))
    assert "orphan.png" in _cli_error(root, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(B2PError, match="no class folders"):
        masks_to_boxes(tmp_path / "empty", tmp_path / "x.json", "mt")
    with pytest.raises(B2PError, match="has no Imgs"):
        masks_to_boxes(root, tmp_path / "x.json", "mt", folders=["MT_Nope"])


@pytest.mark.skipif(not (REAL / "MT_Crack" / "Imgs").is_dir(), reason=f"real magnetic-tile dataset not present at {REAL}")
def test_real_magnetic_tile_crack_boxes_match_components(tmp_path: Path) -> None:
    import cv2
    from scipy import ndimage

    out = tmp_path / "crack.json"
    r = masks_to_boxes(REAL, out, "mt", strip_prefix="MT_", folders=["MT_Crack"], min_area=10)
    coco = json.loads(out.read_text())
    assert r.categories == ["crack"] and r.images == 57
    for im in coco["images"]:
        mask = cv2.imread(str(REAL / im["file_name"].replace(".jpg", ".png")), cv2.IMREAD_GRAYSCALE) >= 128
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))  # 8-connectivity, independent implementation
        sizes = ndimage.sum(mask, labels, range(1, n + 1))
        kept = [k + 1 for k in range(n) if sizes[k] >= 10]
        boxes = sorted(a["bbox"] for a in coco["annotations"] if a["image_id"] == im["id"])
        expected = []
        for k in kept:
            ys, xs = np.nonzero(labels == k)
            expected.append([int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)])
        assert boxes == sorted(expected), im["file_name"]
        assert (im["width"], im["height"]) == (mask.shape[1], mask.shape[0])
    assert sum(r.boxes_per_class.values()) == len(coco["annotations"]) == 70  # the README: 1.23 components per image


def test_calib_share_keeps_manual_masks_and_import_puts_them_in_calib(tree: dict, tmp_path: Path) -> None:
    out = tmp_path / "mt.json"
    args = ["--val", "0.2", "--test", "0.3", "--calib", "0.5"]
    r = runner.invoke(app, ["masks-to-boxes", str(tree["root"]), "--out", str(out), "--batch", "mt", "--strip-prefix", "MT_", *args])
    assert r.exit_code == 0, r.output
    assert "calib images too" in r.output
    rule = SplitRule(val=0.2, test=0.3, calib=0.5)
    coco = json.loads(out.read_text())
    calib_names = {im["file_name"] for im in coco["images"] if rule.is_calib("mt", im["file_name"])}
    test_names = {im["file_name"] for im in coco["images"] if rule.hash_split("mt", im["file_name"]) == "test"}
    assert calib_names and test_names and not calib_names & test_names
    for im in coco["images"]:
        assert im["has_manual_mask"] == (im["file_name"] in calib_names | test_names)
    assert coco["info"]["manual_masks"] == "test and calib splits only"
    # the test images are those of the run without calib: asking for calib never shrinks test
    plain = tmp_path / "plain.json"
    runner.invoke(app, ["masks-to-boxes", str(tree["root"]), "--out", str(plain), "--batch", "mt", "--val", "0.2", "--test", "0.3"])
    assert {im["file_name"] for im in json.loads(plain.read_text())["images"] if im["has_manual_mask"]} == test_names

    r = runner.invoke(
        app,
        ["import", "--batch", "mt", "--images", str(tree["root"]), "--coco", str(out), *args,
         "--classes", str(tmp_path / "classes.json"), "--out", str(tmp_path / "imported" / "mt.json")],
    )
    assert r.exit_code == 0, r.output
    batch = load_batch(tmp_path / "imported" / "mt.json")
    splits = {im.file_name: im.split for im in batch.images}
    assert {n for n, s in splits.items() if s == "calib"} == calib_names
    assert {n for n, s in splits.items() if s == "test"} == test_names
    assert all(im.has_manual_mask for im in batch.images if im.split in ("calib", "test"))
    assert json.loads((tmp_path / "imported" / "mt.json").read_text())["info"]["split_rule"]["calib"] == 0.5

    # evaluation: test and "all" never score calib; calib only on request
    from b2p.evaluate.evaluate import select_images

    assert {im.file_name for im in select_images([batch], "test")} == test_names
    assert not {im.file_name for im in select_images([batch], "all")} & calib_names
    assert {im.file_name for im in select_images([batch], "calib")} == calib_names
    # training reads train and val only
    from b2p.student.data import load_batch_files_for_inference

    assert {r.file_name for r in load_batch_files_for_inference([tmp_path / "imported" / "mt.json"], "all")} == set(splits)


def _boxes(out: Path) -> list:
    coco = json.loads(out.read_text())
    names = {im["id"]: im["file_name"] for im in coco["images"]}
    return sorted((names[a["image_id"]], a["bbox"]) for a in coco["annotations"])


@pytest.mark.parametrize("encoding", ["uint16", "uint16_scaled", "grey_bgr", "grey_bgra"])
def test_mask_encodings_that_hold_the_same_mask_give_the_same_boxes(tree: dict, tmp_path: Path, encoding: str) -> None:
    """A mask is read unchanged: decoding as 8-bit grey turned 16-bit 255 into 0 (defects dropped silently)."""
    import cv2

    root = tree["root"]
    masks_to_boxes(root, tmp_path / "ref.json", "mt")
    for p in sorted(root.glob("MT_*/Imgs/*.png")):
        m = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        m = {
            "uint16": lambda: m.astype(np.uint16),
            "uint16_scaled": lambda: m.astype(np.uint16) * 257,
            "grey_bgr": lambda: np.repeat(m[..., None], 3, axis=2),
            "grey_bgra": lambda: np.dstack([m, m, m, np.full_like(m, 255)]),
        }[encoding]()
        write_bytes_atomic(p, cv2.imencode(".png", m)[1].tobytes())
    masks_to_boxes(root, tmp_path / "new.json", "mt")
    assert _boxes(tmp_path / "new.json") == _boxes(tmp_path / "ref.json") and _boxes(tmp_path / "ref.json")


@pytest.mark.parametrize(
    "mask,message",
    [
        ("colour", "colour image"),
        ("uint16_wide", "does not fit 8 bits"),
        ("zero_one", "none reach --threshold 128"),
    ],
)
def test_masks_that_would_lose_defects_are_refused(tree: dict, tmp_path: Path, mask: str, message: str) -> None:
    import cv2

    root = tree["root"]
    p = root / "MT_Crack/Imgs/mt_crack_0.png"
    m = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    m = {
        "colour": lambda: np.dstack([np.zeros_like(m), np.zeros_like(m), m]),  # red defects (BGR)
        "uint16_wide": lambda: m.astype(np.uint16) * 300,
        "zero_one": lambda: (m >= 128).astype(np.uint8),
    }[mask]()
    write_bytes_atomic(p, cv2.imencode(".png", m)[1].tobytes())
    msg = _cli_error(root, tmp_path)
    assert "mt_crack_0.png" in msg and message in msg, msg
    if mask == "zero_one":  # the hint works: --threshold 1 reads it
        r = masks_to_boxes(root, tmp_path / "one.json", "mt", threshold=1, folders=["MT_Crack"])
        assert r.boxes_per_class["mt_crack"] > 0
