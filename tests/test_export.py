"""`b2p export`: COCO, YOLO-seg and semantic exports read back by the tools that consume them.

The fixture is a tiny batch (non-square images, so width and height cannot be swapped unnoticed) whose
label maps hold the hard cases: a ring (a hole), a crack in two separate parts inside one box, two
overlapping boxes of the same class, defect pixels outside every box, a box with an empty mask and an image
without boxes.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from b2p.cli import app
from b2p.dataset import save_batch_dict, to_coco_dict
from b2p.fileio import sha256_file, write_json_atomic, write_png_atomic
from b2p.labels import ClassList, label_map_path, write_label_map

runner = CliRunner()
CLASSES = ClassList(("crack", "spot"))
H, W = 40, 56


def _label_maps() -> dict[str, tuple[np.ndarray, list[tuple[int, list[int]]], str]]:
    """file name -> (label map, boxes [(class id, xywh)], split)."""
    out = {}
    # a ring-shaped spot (hole in the middle) and a crack in two parts inside one box
    lm = np.zeros((H, W), np.uint8)
    cv2.circle(lm, (14, 14), 9, 2, -1)
    cv2.circle(lm, (14, 14), 3, 0, -1)
    lm[5:30, 36] = 1
    lm[32:38, 44:46] = 1
    out["a.png"] = (lm, [(2, [5, 5, 19, 19]), (1, [34, 4, 14, 35])], "train")
    # two overlapping crack boxes: the smaller mask keeps the shared pixels; a spot pixel outside any box
    lm = np.zeros((H, W), np.uint8)
    lm[10:12, 5:40] = 1
    lm[8:20, 20:24] = 1
    lm[35, 50] = 2
    out["b.png"] = (lm, [(1, [4, 9, 40, 4]), (1, [19, 7, 6, 14])], "train")
    # a box whose mask is empty, and a separate filled spot
    lm = np.zeros((H, W), np.uint8)
    lm[20:30, 20:32] = 2
    out["c.png"] = (lm, [(1, [2, 2, 8, 8]), (2, [20, 20, 12, 10])], "val")
    # no boxes, no defects
    out["d.png"] = (np.zeros((H, W), np.uint8), [], "test")
    return out


@pytest.fixture()
def project(tmp_path: Path, monkeypatch) -> Path:
    """tmp_path laid out like a b2p project: data/imported/demo.json and masks under data/final."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    images, anns = [], []
    ann_id = 100  # box ids the export must keep (not 1..N)
    for i, (name, (lm, boxes, split)) in enumerate(_label_maps().items()):
        img = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
        write_png_atomic(tmp_path / "raw/images" / name, img)
        images.append({"id": i + 1, "file_name": name, "width": W, "height": H, "sha256": sha256_file(tmp_path / "raw/images" / name),
                       "batch": "demo", "split": split, "has_manual_mask": False})
        for cid, xywh in boxes:
            anns.append({"id": ann_id, "image_id": i + 1, "category_id": cid, "bbox": xywh, "area": xywh[2] * xywh[3], "iscrowd": 0})
            ann_id += 1
        write_label_map(label_map_path(tmp_path / "data/final", "demo", name), lm)
    coco = to_coco_dict("demo", CLASSES, images, anns, [], "../../raw/images")
    save_batch_dict(tmp_path / "data/imported/demo.json", coco)
    return tmp_path


def _expected_instances() -> dict[str, list[tuple[int, int, np.ndarray]]]:
    """file name -> [(box id, class id, mask)] by the documented rule, written out case by case."""
    lms = _label_maps()
    a, b, c = lms["a.png"][0], lms["b.png"][0], lms["c.png"][0]
    spot_a = np.zeros((H, W), bool)
    spot_a[5:24, 5:24] = a[5:24, 5:24] == 2
    crack_a = np.zeros((H, W), bool)
    crack_a[4:39, 34:48] = a[4:39, 34:48] == 1
    small = np.zeros((H, W), bool)
    small[7:21, 19:25] = b[7:21, 19:25] == 1  # the smaller box's mask wins the shared pixels
    big = np.zeros((H, W), bool)
    big[9:13, 4:44] = b[9:13, 4:44] == 1
    big &= ~small
    spot_c = c == 2
    return {"a.png": [(100, 2, spot_a), (101, 1, crack_a)], "b.png": [(102, 1, big), (103, 1, small)],
            "c.png": [(105, 2, spot_c)], "d.png": []}


def _export(*args: str) -> None:
    res = runner.invoke(app, ["export", "--quiet", *args])
    assert res.exit_code == 0, res.output


def _tree(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file() or f.is_symlink()}


def test_coco_rle_read_back_by_pycocotools(project: Path) -> None:
    from pycocotools.coco import COCO

    # a teacher-style instances.json beside the label maps gives each box its score
    write_json_atomic(project / "data/final/demo/instances.json",
                      {"annotations": [{"box_id": 100, "score": 0.75}, {"box_id": 103, "score": 0.5}]})
    _export("--format", "coco")
    expected = _expected_instances()
    seen_boxes = []
    for split, files in (("train", ["a.png", "b.png"]), ("val", ["c.png"]), ("test", ["d.png"])):
        coco = COCO(str(project / f"data/export/coco/annotations/instances_{split}.json"))
        assert [coco.imgs[i]["b2p_file_name"] for i in sorted(coco.imgs)] == files
        for img_id, img in coco.imgs.items():
            assert (img["width"], img["height"]) == (W, H)
            assert (project / "data/export/coco/images" / img["file_name"]).read_bytes() == \
                (project / "raw/images" / img["b2p_file_name"]).read_bytes()
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))
            want = expected[img["b2p_file_name"]]
            assert [(a["box_id"], a["category_id"]) for a in anns] == [(bid, cid) for bid, cid, _ in want]
            for a, (_, _, mask) in zip(anns, want):
                got = coco.annToMask(a).astype(bool)
                assert np.array_equal(got, mask)  # holes and both crack parts exact
                assert a["area"] == int(mask.sum()) and a["iscrowd"] == 0
                ys, xs = np.nonzero(mask)
                assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                seen_boxes.append(a["box_id"])
            scores = {a["box_id"]: a.get("score") for a in anns}
            if img["b2p_file_name"] == "a.png":
                assert scores == {100: 0.75, 101: None}
        info = coco.dataset["info"]
        assert info["source"] == "final" and info["source_root"] == "data/final" and info["b2p_version"]
    assert seen_boxes == [100, 101, 102, 103, 105]  # box 104 has an empty mask: left out, and counted
    manifest = json.loads((project / "data/export/coco/export.json").read_text())
    assert manifest["boxes"] == {"boxes": 6, "empty_boxes": 1, "unboxed_pixels": 1}
    # the hole of the ring is background in the instance
    assert not expected["a.png"][0][2][14, 14] and expected["a.png"][0][2][14, 14 + 6]


def test_coco_polygons_rasterise_exactly(project: Path) -> None:
    from pycocotools.coco import COCO

    _export("--format", "coco", "--coco-masks", "polygons", "--split", "train")
    coco = COCO(str(project / "data/export/coco/annotations/instances_train.json"))
    expected = {bid: m for v in _expected_instances().values() for bid, _, m in v}
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) == 4
    for a in anns:
        assert isinstance(a["segmentation"], list) and len(a["segmentation"]) == 1  # one polygon per instance
        assert np.array_equal(coco.annToMask(a).astype(bool), expected[a["box_id"]])
    m = json.loads((project / "data/export/coco/export.json").read_text())
    assert m["polygon_iou"]["pooled_iou"] == 1.0 and m["info"]["splits"] == ["train"]
    assert not (project / "data/export/coco/annotations/instances_val.json").exists()


def _ultralytics_raster(values: list[float]) -> np.ndarray:
    """Ultralytics' polygon2mask: normalised points x (W, H), truncated to int32, cv2.fillPoly."""
    pts = (np.array(values).reshape(-1, 2) * (W, H)).astype(np.int32)
    out = np.zeros((H, W), np.uint8)
    cv2.fillPoly(out, [pts], 1)
    return out.astype(bool)


def test_yolo_seg_polygons_rasterise_back(project: Path) -> None:
    import yaml

    _export("--format", "yolo")
    root = project / "data/export/yolo"
    data = yaml.safe_load((root / "data.yaml").read_text())
    assert data["names"] == {0: "crack", 1: "spot"} and data["train"] == "images/train" and "path" not in data
    expected = _expected_instances()
    inter = union = 0
    for name, split in (("a", "train"), ("b", "train"), ("c", "val"), ("d", "test")):
        assert (root / f"images/{split}/demo__{name}.png").is_file()
        lines = (root / f"labels/{split}/demo__{name}.txt").read_text().splitlines()
        want = expected[f"{name}.png"]
        assert len(lines) == len(want)  # an image without defects has an empty label file
        for line, (_, cid, mask) in zip(lines, want):
            cls, *vals = line.split()
            assert int(cls) == cid - 1 and len(vals) >= 6 and len(vals) % 2 == 0
            assert all(0.0 <= float(v) <= 1.0 for v in vals)
            back = _ultralytics_raster([float(v) for v in vals])
            assert not (mask & ~back).any()  # nothing of the mask is lost
            inter += int((mask & back).sum())
            union += int((mask | back).sum())
    # only the zero-width cuts add pixels: the hole (1 cut) and the two crack parts (1 cut) cost a few
    assert inter / union >= 0.97
    ring = _ultralytics_raster([float(v) for v in (root / "labels/train/demo__a.txt").read_text().splitlines()[0].split()[1:]])
    assert not ring[14, 14]  # the hole stays open
    m = json.loads((root / "export.json").read_text())
    assert m["polygon_iou"]["pooled_iou"] == pytest.approx(inter / union, abs=1e-6)


def test_semantic_export_mmsegmentation_layout(project: Path) -> None:
    _export("--format", "semantic", "--images", "symlink")
    root = project / "data/export/semantic"
    lms = _label_maps()
    assert (root / "classes.txt").read_text() == "background\ncrack\nspot\n"
    assert (root / "splits/train.txt").read_text() == "demo__a\ndemo__b\n"
    assert (root / "splits/test.txt").read_text() == "demo__d\n"
    for name, (lm, _, split) in lms.items():
        stem = "demo__" + name[:-4]
        got = cv2.imread(str(root / f"ann_dir/{split}/{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(got, lm)  # every defect pixel, boxed or not
        img = root / f"img_dir/{split}/{stem}.png"
        assert img.is_symlink() and img.resolve() == (project / "raw/images" / name).resolve()


def test_second_export_is_byte_identical_and_replaces_the_first(project: Path) -> None:
    _export("--format", "coco,yolo,semantic", "--coco-masks", "polygons")
    first = _tree(project / "data/export")
    (project / "data/export/yolo/labels/train/stale.txt").write_text("0 0 0 1 1 0 1\n")
    _export("--format", "coco", "--format", "yolo,semantic", "--coco-masks", "polygons")
    assert _tree(project / "data/export") == first  # same bytes, the stale file gone, nothing appended
    assert not list((project / "data").glob(".*")) and not list((project / "data/export").glob(".*"))


def test_params_section_sets_the_options(project: Path) -> None:
    (project / "params.yaml").write_text("export:\n  formats: [yolo]\n  source: final\n  splits: [val]\n  images: hardlink\n  coco_masks: rle\n")
    _export("--params", "params.yaml")
    assert sorted(p.name for p in (project / "data/export").iterdir()) == ["yolo"]
    img = project / "data/export/yolo/images/val/demo__c.png"
    assert img.stat().st_ino == (project / "raw/images/c.png").stat().st_ino
    (project / "params.yaml").write_text("export:\n  format: [yolo]\n")
    res = runner.invoke(app, ["export", "--params", "params.yaml"])
    assert res.exit_code == 1 and "export.format: unknown key (did you mean 'formats'?)" in res.output, res.output


@pytest.mark.parametrize(
    "case",
    ["unknown source", "missing masks", "wrong-size mask", "out is a file", "foreign folder", "unknown split", "unknown format",
     "image replaced", "image resized"],
)
def test_bad_input_is_one_clear_error_and_writes_nothing(project: Path, case: str) -> None:
    args = ["export", "--out", "data/export"]
    if case == "unknown source":
        args += ["--source", "sam"]
        expect = "unknown mask source 'sam'"
    elif case == "missing masks":
        (project / "data/final/demo/labelmaps/c.png").unlink()
        expect = "no label map for 1 exported image"
    elif case == "wrong-size mask":  # found only while exporting: the half-built folders are removed
        write_label_map(project / "data/final/demo/labelmaps/d.png", np.zeros((10, 10), np.uint8))
        expect = f"label map is 10x10 but its image is {W}x{H}"
    elif case == "out is a file":
        (project / "data/export").write_text("not a folder")
        expect = "export output is a file"
    elif case == "foreign folder":
        (project / "data/export/coco").mkdir(parents=True)
        (project / "data/export/coco/mine.txt").write_text("keep me")
        expect = "is not a b2p export"
    elif case.startswith("image"):  # same size: the other picture would be exported with c.png's masks
        h, w = (H, W) if case == "image replaced" else (H + 8, W)
        write_png_atomic(project / "raw/images/c.png", np.random.default_rng(9).integers(0, 255, (h, w, 3), dtype=np.uint8))
        expect = "changed since `b2p import`"
    elif case == "unknown split":
        args += ["--split", "tset"]
        expect = "no images in split(s) ['tset']"
    else:
        args += ["--format", "voc"]
        expect = "export.formats: Input should be 'coco', 'yolo' or 'semantic', got 'voc'"
    before = _tree(project)
    res = runner.invoke(app, args)
    assert res.exit_code == 1
    assert expect in res.output and "Traceback" not in res.output
    assert not case.startswith("image") or "c.png" in res.output
    assert len(res.output.strip().splitlines()) <= 2  # one message (a long path may wrap once)
    assert _tree(project) == before  # nothing written, nothing removed
    assert (project / "data/export").exists() == (case in ("out is a file", "foreign folder"))


def test_stale_stages_of_a_killed_export_are_removed(project: Path) -> None:
    out = project / "data/export"
    for stale in (".coco.k1.building/images", ".semantic.k2.building/img_dir/train", ".yolo.k3.building"):
        (out / stale).mkdir(parents=True)
        (out / stale / "half.png").write_bytes(b"half")
    # killed mid-swap: the old yolo export sits in its .old folder and yolo/ is gone; it goes back
    (out / ".yolo.k4.old/yolo").mkdir(parents=True)
    (out / ".yolo.k4.old/yolo/export.json").write_text("{}")
    (out / ".mine").mkdir()  # not b2p's: kept
    _export("--format", "coco,semantic")
    assert sorted(p.name for p in out.iterdir()) == [".mine", "coco", "semantic", "yolo"]
    assert (out / "yolo/export.json").read_text() == "{}"


def _manifest_root(root: Path, *model_shas: str) -> None:
    """A prediction manifest naming the model(s) that wrote the maps of `root` (one run each, split between them)."""
    from b2p.student.predict import MANIFEST, PREDICT_FORMAT

    maps = [f"demo/labelmaps/{n}.png" for n in "abcd"]
    runs = [{"model": {"path": "elsewhere/model.pt", "sha256": sha}, "settings": {"window": 512}, "inputs": {},
             "maps": maps[i :: len(model_shas)]} for i, sha in enumerate(model_shas)]
    write_json_atomic(root / MANIFEST, {"b2p_predict": PREDICT_FORMAT, "maps": "boxes", "runs": runs})


def test_model_is_recorded_only_for_the_students_own_masks(project: Path) -> None:
    import shutil

    model = project / "data/model"
    model.mkdir(parents=True)
    (model / "model.pt").write_bytes(b"weights")
    shutil.copytree(project / "data/final", project / "data/predict_boxes")  # the student's box-guided masks

    def recorded(*args: str):
        _export("--format", "semantic", "--source", "boxes", *args)
        return json.loads((project / "data/export/semantic/export.json").read_text())["info"]["model"]

    assert recorded()["sha256"] == sha256_file(model / "model.pt")  # default root, no manifest: --model
    copy = project / "elsewhere"
    shutil.copytree(project / "data/final", copy)
    assert recorded("--source-root", str(copy)) is None  # --model says nothing about masks from elsewhere
    _manifest_root(copy, "f" * 64)
    rec = recorded("--source-root", str(copy))
    assert rec["sha256"] == "f" * 64 and rec["path"] == "elsewhere/model.pt"  # the model that wrote them
    res = runner.invoke(app, ["export", "--quiet", "--format", "semantic", "--source", "boxes", "--source-root", str(copy)])
    assert "elsewhere/model.pt" in res.output
    # maps of two models in one root: refused before anything is written
    _manifest_root(copy, "f" * 64, "e" * 64)
    before = _tree(project / "data/export")
    res = runner.invoke(app, ["export", "--quiet", "--format", "semantic", "--source", "boxes", "--source-root", str(copy)])
    assert res.exit_code == 1 and "different models" in res.output and "predict.json" in res.output, res.output
    assert _tree(project / "data/export") == before


def test_teacher_source_records_its_provenance(project: Path) -> None:
    from b2p.teach.base import teach_batch
    from b2p.teach.box import BoxTeacher

    teach_batch(project / "data/imported/demo.json", project / "data/teach", BoxTeacher(), progress=False)
    _export("--source", "teacher", "--format", "coco")
    coco = json.loads((project / "data/export/coco/annotations/instances_train.json").read_text())
    assert coco["info"]["teacher"]["demo"]["teacher"] == "box" and coco["info"]["model"] is None
    assert all(a["score"] == 1.0 for a in coco["annotations"])  # the teacher's per-box scores


@pytest.fixture()
def fiftyone_private(tmp_path_factory):
    """FiftyOne on a throwaway mongod of its own (as tests/test_browse.py does), so tests never share or
    reuse a closed database connection; yields the `fiftyone` module."""
    import os

    from b2p.browse.fo_env import PrivateMongod, configure_env

    configure_env()
    old_uri = os.environ.get("FIFTYONE_DATABASE_URI")
    with PrivateMongod(tmp_path_factory.mktemp("fo_db_export")) as uri:
        os.environ["FIFTYONE_DATABASE_URI"] = uri
        import fiftyone as fo
        from fiftyone.core.odm import database as fodb

        fo.config.database_uri = uri
        fodb._disconnect()  # a connection left by an earlier test would point at a stopped server
        fodb._connection_kwargs.pop("host", None)
        yield fo
        fodb._disconnect()
        fodb._connection_kwargs.pop("host", None)
        fo.config.database_uri = old_uri
        if old_uri is None:
            os.environ.pop("FIFTYONE_DATABASE_URI", None)
        else:
            os.environ["FIFTYONE_DATABASE_URI"] = old_uri


@pytest.mark.slow
def test_fiftyone_importers_read_coco_and_yolo_exports(project: Path, fiftyone_private) -> None:
    fo = fiftyone_private
    _export("--format", "coco,yolo")
    expected = {"train": (2, 4), "val": (1, 1), "test": (1, 0)}
    for split, (n_samples, n_instances) in expected.items():
        coco = fo.Dataset.from_dir(
            dataset_type=fo.types.COCODetectionDataset, data_path=str(project / "data/export/coco/images"),
            labels_path=str(project / f"data/export/coco/annotations/instances_{split}.json"),
            label_types="segmentations", label_field="gt",
        )
        yolo = fo.Dataset.from_dir(
            dataset_type=fo.types.YOLOv5Dataset, dataset_dir=str(project / "data/export/yolo"), yaml_path="data.yaml",
            split=split, label_type="instances", label_field="gt",
        )
        # no delete(): the private database goes away with its fixture
        for ds in (coco, yolo):
            assert len(ds) == n_samples
            assert ds.count("gt.detections") == n_instances
            if n_instances:
                assert all(d.mask is not None and d.mask.any() for d in ds.values("gt.detections", unwind=True))
        assert sorted(coco.distinct("gt.detections.box_id")) == sorted(
            {"train": [100, 101, 102, 103], "val": [105], "test": []}[split])


@pytest.mark.parametrize("seed", range(4))
def test_polygons_of_noisy_masks(seed: int) -> None:
    """Speckled masks (many parts, holes, pixels touching only at a corner): the edge polygon rasterises
    back exactly with pycocotools; the centre polygon loses no pixel under Ultralytics' rasteriser."""
    from b2p.export.polygons import mask_to_polygon, pixel_edge_rings
    from b2p.masks import polygons_to_mask

    rng = np.random.default_rng(seed)
    mask = np.zeros((H, W), bool)
    mask[5:35, 8:50] = rng.random((30, 42)) < 0.55
    assert len(pixel_edge_rings(mask)) > 20
    edge = mask_to_polygon(mask, "edge")
    assert np.array_equal(polygons_to_mask([edge.ravel().tolist()], H, W), mask)
    centre = mask_to_polygon(mask, "centre")
    back = _ultralytics_raster(((centre + 0.5) / (W, H)).ravel().tolist())
    assert not (mask & ~back).any()
