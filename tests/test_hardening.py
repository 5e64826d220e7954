"""Hostile input, one test per hardening item of issue 16: the bad input exits with code 1, the message
names the file and the problem, and every earlier output stays byte-identical."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from b2p.cli import app
from b2p.fileio import write_png_atomic
from conftest import make_synthetic_batch

runner = CliRunner()
W, H = 32, 24


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _snapshot(*roots: Path) -> dict[Path, bytes]:
    """Every file under the given files/folders with its bytes (what must not change)."""
    out = {}
    for r in roots:
        files = [r] if r.is_file() else sorted(p for p in r.rglob("*") if p.is_file()) if r.is_dir() else []
        out.update({p: p.read_bytes() for p in files})
    return out


def _images(folder: Path, names: list[str]) -> None:
    rng = np.random.default_rng(1)
    for n in names:
        img = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
        (folder / n).parent.mkdir(parents=True, exist_ok=True)
        if n.endswith(".png"):
            write_png_atomic(folder / n, img)
        else:
            cv2.imwrite(str(folder / n), img)


def _coco_file(path: Path, names: list[str], boxes: list[list[float]] | None = None) -> Path:
    boxes = boxes or [[2, 2, 8, 6]] * len(names)
    coco = {
        "images": [{"id": i + 1, "file_name": n, "width": W, "height": H} for i, n in enumerate(names)],
        "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": b} for i, b in enumerate(boxes)],
        "categories": [{"id": 1, "name": "crack"}, {"id": 2, "name": "spot"}],
    }
    path.write_text(json.dumps(coco))
    return path


@pytest.fixture
def project(tmp_path: Path) -> dict:
    """A good batch already imported (out + class list): the earlier outputs a bad input must not touch."""
    img = tmp_path / "images"
    _images(img, ["ok.png"])
    classes, out = tmp_path / "classes.json", tmp_path / "imported" / "b1.json"
    r = _cli("import", "--batch", "b1", "--images", img, "--coco", _coco_file(tmp_path / "ok.json", ["ok.png"]),
             "--classes", classes, "--out", out)
    assert r.exit_code == 0, r.output
    return {"root": tmp_path, "classes": classes, "out": out}


def _import_refused(project: dict, names: list[str], *, masks: Path | None = None, expect: tuple[str, ...]) -> str:
    root = project["root"]
    img = root / "bad_images"
    _images(img, names)
    ann = _coco_file(root / "bad.json", names)
    before = _snapshot(project["out"], project["classes"])
    args = ["import", "--batch", "b1", "--images", img, "--coco", ann, "--classes", project["classes"], "--out", project["out"]]
    r = _cli(*args, *(["--masks", masks] if masks else []))
    assert r.exit_code == 1, r.output
    for text in expect:
        assert text in r.output, r.output
    assert _snapshot(project["out"], project["classes"]) == before
    return r.output


# --- 1. two images must never share one label map ----------------------------------------------------------


@pytest.mark.parametrize("names", [["img_000.png", "img_000.jpg"], ["a/b.png", "a__b.png"], ["Img.png", "img.png"]])
def test_colliding_label_map_names_are_refused(project, names):
    _import_refused(project, names, expect=("bad.json", "share one label-map file", repr(names[0])))


# --- 3. 16-bit masks must not wrap modulo 256 --------------------------------------------------------------


@pytest.mark.parametrize("value", [257, 300])
def test_16bit_mask_value_is_refused_not_wrapped(project, value):
    masks = project["root"] / "masks"
    masks.mkdir()
    lm = np.zeros((H, W), np.uint16)
    lm[2:8, 2:10] = value
    cv2.imwrite(str(masks / "m.png"), lm)
    _import_refused(project, ["m.png"], masks=masks, expect=("m.png", f"value {value}", "uint16"))


def test_16bit_mask_with_small_values_is_read_exactly(tmp_path):
    from b2p.labels import read_label_map

    lm = np.zeros((H, W), np.uint16)
    lm[2:8, 2:10] = 2
    cv2.imwrite(str(tmp_path / "m.png"), lm)
    out = read_label_map(tmp_path / "m.png")
    assert out.dtype == np.uint8 and np.array_equal(out, lm.astype(np.uint8))


# --- 4. one file, two spellings ----------------------------------------------------------------------------


@pytest.mark.parametrize("dup", ["./ok2.png", "sub/../ok2.png", ".//ok2.png"])
def test_two_spellings_of_one_image_are_duplicates(project, dup):
    root = project["root"]
    img = root / "bad_images"
    _images(img, ["ok2.png"])
    ann = _coco_file(root / "bad.json", ["ok2.png", dup])
    before = _snapshot(project["out"], project["classes"])
    r = _cli("import", "--batch", "b1", "--images", img, "--coco", ann, "--classes", project["classes"], "--out", project["out"])
    assert r.exit_code == 1 and "bad.json" in r.output and "duplicate image file name" in r.output, r.output
    assert _snapshot(project["out"], project["classes"]) == before


def test_nul_byte_in_file_name_is_one_clear_error(project):
    root = project["root"]
    ann = _coco_file(root / "bad.json", ["a\x00.png"])
    before = _snapshot(project["out"], project["classes"])
    r = _cli("import", "--batch", "b1", "--images", root / "images", "--coco", ann, "--classes", project["classes"], "--out", project["out"])
    assert r.exit_code == 1 and "bad.json" in r.output and "NUL byte" in r.output, r.output
    assert _snapshot(project["out"], project["classes"]) == before


# --- 8. outputs follow the umask ---------------------------------------------------------------------------


def test_outputs_are_created_with_the_process_umask(tmp_path):
    from b2p.fileio import write_text_atomic

    old = os.umask(0o022)
    try:
        img = tmp_path / "images"
        _images(img, ["ok.png"])
        out, classes = tmp_path / "imported" / "b1.json", tmp_path / "classes.json"
        r = _cli("import", "--batch", "b1", "--images", img, "--coco", _coco_file(tmp_path / "ok.json", ["ok.png"]),
                 "--classes", classes, "--out", out)
        assert r.exit_code == 0, r.output
        assert (out.stat().st_mode & 0o777, classes.stat().st_mode & 0o777) == (0o644, 0o644)
        os.umask(0o077)
        write_text_atomic(tmp_path / "private.txt", "x")
        assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600
        # a replaced file keeps its own mode (params.yaml must not turn 0600, nor 0644 turn 0600)
        write_text_atomic(out, "{}")
        assert out.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


def test_add_batch_folder_and_params_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        src = tmp_path / "src"
        _images(src, ["a.png"])
        params = tmp_path / "params.yaml"
        params.write_text("batches: {}\n")
        params.chmod(0o664)
        r = _cli("add-batch", src, "--name", "line7", "--coco", _coco_file(tmp_path / "a.json", ["a.png"]), "--params", params,
                 "--raw-root", tmp_path / "raw", "--classes", tmp_path / "classes.json")
        assert r.exit_code == 0, r.output
        assert (tmp_path / "raw" / "line7").stat().st_mode & 0o777 == 0o755
        assert params.stat().st_mode & 0o777 == 0o664
    finally:
        os.umask(old)


# --- 6. the canonical file is validated on load ------------------------------------------------------------


def _edit_batch(batch_file: Path, edit) -> None:
    d = json.loads(batch_file.read_text())
    edit(d)
    batch_file.write_text(json.dumps(d))


def _taught(tmp_path: Path) -> tuple[Path, Path, dict]:
    batch_file, _ = make_synthetic_batch(tmp_path, n_images=3, size=32)
    out = tmp_path / "teach"
    r = _cli("teach", batch_file, "--out", out, "--teacher", "box", "--quiet")
    assert r.exit_code == 0, r.output
    return batch_file, out, _snapshot(tmp_path / "teach")


HAND_EDITS = {
    "escaping_batch_name": (lambda d: (d["info"].__setitem__("batch", "../escaped"), [im.__setitem__("batch", "../escaped") for im in d["images"]]), "info.batch"),
    "unknown_category": (lambda d: d["annotations"][0].__setitem__("category_id", 99), "category id 99"),
    "missing_split": (lambda d: d["images"][1].pop("split"), "split"),
    "string_width": (lambda d: d["images"][0].__setitem__("width", "wide"), "width"),
    "bbox_not_numbers": (lambda d: d["annotations"][2].__setitem__("bbox", ["x", 1, 2, 3]), "'bbox'"),
    "dangling_image_id": (lambda d: d["annotations"][1].__setitem__("image_id", 77), "image id 77"),
    "escaping_file_name": (lambda d: d["images"][0].__setitem__("file_name", "../../etc/passwd"), "escapes"),
}


@pytest.mark.parametrize("case", sorted(HAND_EDITS))
def test_hand_edited_batch_file_is_refused_on_load(tmp_path, case):
    batch_file, out, before = _taught(tmp_path)
    edit, text = HAND_EDITS[case]
    _edit_batch(batch_file, edit)
    r = _cli("teach", batch_file, "--out", out, "--teacher", "box", "--quiet")
    assert r.exit_code == 1, r.output
    assert batch_file.name in r.output and text in r.output, r.output
    assert _snapshot(tmp_path / "teach") == before
    assert not (tmp_path / "escaped").exists()


def test_every_problem_of_a_hand_edited_file_is_listed(tmp_path):
    batch_file, out, _ = _taught(tmp_path)
    _edit_batch(batch_file, lambda d: [a.__setitem__("category_id", 50 + i) for i, a in enumerate(d["annotations"])])
    r = _cli("teach", batch_file, "--out", out, "--teacher", "box", "--quiet")
    assert r.exit_code == 1 and "6 problems" in r.output and "category id 50" in r.output and "category id 55" in r.output, r.output


def test_image_changed_after_import_is_not_resumed_from_stale_masks(tmp_path):
    batch_file, out, before = _taught(tmp_path)
    img = tmp_path / "raw" / "b1" / "images" / "img_001.png"
    write_png_atomic(img, np.zeros((32, 32, 3), np.uint8))
    r = _cli("teach", batch_file, "--out", out, "--teacher", "box", "--quiet")
    assert r.exit_code == 1 and "img_001.png" in r.output and "changed since" in r.output, r.output
    assert _snapshot(tmp_path / "teach") == before


# --- 2. a model predicts only batches whose class ids mean the same classes --------------------------------


def _tiny_model(path: Path, class_names: list[str], num_classes: int | None = None) -> Path:
    from b2p.student.checkpoint import save_checkpoint
    from b2p.student.model import StudentConfig, build_model

    cfg = StudentConfig(num_classes=len(class_names) + 1, arch="unet", unet_base=4, tile_size=32)
    model = build_model(cfg)
    save_checkpoint(path / "model.pt", cfg, class_names, model.provenance, model.state_dict())
    if num_classes is not None:  # a hand-made file whose class names contradict its class count
        import torch

        ck = torch.load(path / "model.pt", weights_only=True)
        ck["config"]["num_classes"] = num_classes
        torch.save(ck, path / "model.pt")
    return path


@pytest.fixture
def predicted(tmp_path: Path) -> dict:
    batch_file, _ = make_synthetic_batch(tmp_path, n_images=3, size=32)  # classes crack, spot
    model = _tiny_model(tmp_path / "good", ["crack", "spot"])
    pred = tmp_path / "pred"
    r = _cli("predict", "--model", model, "--imported", batch_file.parent, "--split", "all", "--out", pred, "--device", "cpu")
    assert r.exit_code == 0, r.output
    return {"root": tmp_path, "imported": batch_file.parent, "pred": pred, "before": _snapshot(pred)}


def _predict_refused(p: dict, model: Path, *expect: str) -> None:
    r = _cli("predict", "--model", model, "--imported", p["imported"], "--split", "all", "--out", p["pred"], "--device", "cpu")
    assert r.exit_code == 1, r.output
    for text in expect:
        assert text in r.output, r.output
    assert _snapshot(p["pred"]) == p["before"]


def test_predict_refuses_a_model_trained_on_another_class_order(predicted):
    model = _tiny_model(predicted["root"] / "swapped", ["spot", "crack"])
    _predict_refused(predicted, model, "model.pt", "trained on classes ['spot', 'crack']", "['crack', 'spot']")


def test_predict_accepts_classes_appended_after_training(predicted):
    imported = predicted["imported"]
    _edit_batch(imported / "b1.json", lambda d: d["categories"].append({"id": 3, "name": "erosion", "supercategory": "defect"}))
    model = _tiny_model(predicted["root"] / "older", ["crack", "spot"])
    r = _cli("predict", "--model", model, "--imported", imported, "--split", "all", "--out", predicted["root"] / "p2", "--device", "cpu")
    assert r.exit_code == 0, r.output


def test_unknown_test_time_augmentation_is_refused_and_earlier_predictions_kept(predicted):
    p = predicted
    r = _cli("predict", "--model", p["root"] / "good", "--imported", p["imported"], "--split", "all", "--out", p["pred"],
             "--device", "cpu", "--tta", "rot90")
    assert r.exit_code == 1 and "--tta" in r.output and "'none' or 'flips'" in r.output and "rot90" in r.output, r.output
    assert _snapshot(p["pred"]) == p["before"]


def test_model_whose_class_names_contradict_its_class_count_is_refused(predicted):
    model = _tiny_model(predicted["root"] / "liar", ["crack", "spot"], num_classes=5)
    _predict_refused(predicted, model, "model.pt", "2 class names", "5 classes")


@pytest.mark.parametrize("damage", ["empty", "missing_keys", "garbage"])
def test_damaged_model_file_is_one_clear_error(predicted, damage):
    import torch

    model = predicted["root"] / "bad"
    model.mkdir()
    if damage == "empty":
        (model / "model.pt").write_bytes(b"")
    elif damage == "garbage":
        (model / "model.pt").write_bytes(b"not a torch file at all")
    else:
        torch.save({"format": "b2p-student", "version": 1, "config": {"num_classes": 3}}, model / "model.pt")
    _predict_refused(predicted, model, "model.pt")


# --- 5. teach's final files change together ----------------------------------------------------------------


def test_teach_assembly_killed_midway_leaves_old_outputs_whole(tmp_path, monkeypatch):
    import b2p.teach.base as base

    batch_file, out, before = _taught(tmp_path)
    real = base.write_json_atomic
    calls = []

    def dies_on_provenance(path, obj, indent=1):  # the moment a kill -9 hurt most: label maps written, provenance not
        if Path(path).name == "provenance.json":
            calls.append(path)
            raise KeyboardInterrupt
        return real(path, obj, indent)

    monkeypatch.setattr(base, "write_json_atomic", dies_on_provenance)
    from b2p.teach.grabcut import GrabCutTeacher

    with pytest.raises(KeyboardInterrupt):
        base.teach_batch(batch_file, out, GrabCutTeacher(), progress=False)
    assert calls
    def final(snap):
        return {p: b for p, b in snap.items() if ".parts" not in p.parts and ".staging" not in p.parts}

    assert final(_snapshot(out)) == final(before)  # the old label maps, instances and provenance, all of them
    # a (crash-left) temporary file and the staging folder are gone after the next successful run
    (out / "b1" / ".parts" / ".x.json.123.tmp").write_bytes(b"half")
    monkeypatch.setattr(base, "write_json_atomic", real)
    base.teach_batch(batch_file, out, GrabCutTeacher(), progress=False)
    left = [p.name for p in (out / "b1").rglob("*") if p.name.endswith(".tmp") or p.name == ".staging"]
    assert left == []
    prov = json.loads((out / "b1" / "provenance.json").read_text())
    assert prov["teacher"] == "grabcut" and prov["counts"]["reused_from_earlier_run"] == 3


def test_teach_finishes_an_assembly_completed_before_a_kill(tmp_path):
    """A kill between 'staging complete' and the renames: the next run moves the new files in first."""
    from b2p.teach.base import COMPLETE_MARKER, STAGING_DIR, commit_staged_outputs

    batch_file, out, before = _taught(tmp_path)
    staging = out / "b1" / STAGING_DIR
    (staging / "labelmaps").mkdir(parents=True)
    for p in (out / "b1" / "labelmaps").iterdir():
        (staging / "labelmaps" / p.name).write_bytes(b"new " + p.name.encode())
    (staging / "instances.json").write_text('{"new": 1}')
    (staging / COMPLETE_MARKER).write_bytes(b"")
    commit_staged_outputs(out / "b1")
    assert not staging.exists()
    assert (out / "b1" / "instances.json").read_text() == '{"new": 1}'
    assert all(p.read_bytes() == b"new " + p.name.encode() for p in (out / "b1" / "labelmaps").iterdir())
    # incomplete staging (no marker): dropped, the outputs stay as they are
    (staging / "labelmaps").mkdir(parents=True)
    (staging / "instances.json").write_text('{"newer": 1}')
    commit_staged_outputs(out / "b1")
    assert not staging.exists() and (out / "b1" / "instances.json").read_text() == '{"new": 1}'


# --- 14. every problem of a batch in one pass --------------------------------------------------------------


def test_every_bad_box_of_a_batch_is_reported_in_one_run(project):
    root = project["root"]
    names = [f"im_{i:02d}.png" for i in range(30)]
    _images(root / "many", names)
    boxes = [[2, 2, 8, 6] if i % 6 == 0 else [20, 10, 40, 5] for i in range(30)]  # 25 reach outside the 32x24 image
    ann = _coco_file(root / "many.json", names, boxes)
    before = _snapshot(project["out"], project["classes"])
    r = _cli("import", "--batch", "b1", "--images", root / "many", "--coco", ann, "--classes", project["classes"], "--out", project["out"])
    assert r.exit_code == 1 and "many.json" in r.output and "25 problems in this batch" in r.output, r.output
    assert r.output.count("lies outside the 32x24 image") == 20 and "... and 5 more" in r.output
    assert _snapshot(project["out"], project["classes"]) == before


# --- 10. tracebacks that became one clear error ------------------------------------------------------------


@pytest.mark.parametrize("where", ["import_mask", "teacher_label_map", "prediction_label_map"])
def test_empty_png_is_one_clear_error(tmp_path, where):
    from b2p.labels import label_map_path

    if where == "import_mask":
        project = {"root": tmp_path, "classes": tmp_path / "classes.json", "out": tmp_path / "imported" / "b1.json"}
        (tmp_path / "masks").mkdir()
        (tmp_path / "masks" / "m.png").write_bytes(b"")
        _import_refused(project, ["m.png"], masks=tmp_path / "masks", expect=("m.png", "empty (0-byte)"))
        return
    batch_file, out, _ = _taught(tmp_path)
    from b2p.dataset import load_batch

    b = load_batch(batch_file)
    im = b.split("train")[0] if where == "teacher_label_map" else b.split("test")[0]  # an image the command reads
    if where == "teacher_label_map":
        label_map_path(out, "b1", im.file_name).write_bytes(b"")
        args = ["train", "--imported", batch_file.parent, "--teacher-root", out, "--out", tmp_path / "m", "--set", "arch=unet",
                "--set", "tile_size=32", "--set", "epochs=1", "--device", "cpu"]
    else:
        pred = tmp_path / "pred"
        for rec in load_batch(batch_file).images:
            write_png_atomic(label_map_path(pred, "b1", rec.file_name), np.zeros((rec.height, rec.width), np.uint8))
        label_map_path(pred, "b1", im.file_name).write_bytes(b"")
        args = ["evaluate", "--imported", batch_file.parent, "--teacher-root", out, "--pred-root", pred, "--out", tmp_path / "e",
                "--split", "all", "--no-plots"]
    r = _cli(*args)
    assert r.exit_code == 1 and f"{label_map_key_of(im.file_name)}.png" in r.output and "empty (0-byte)" in r.output, r.output
    assert not (tmp_path / "m").exists() and not (tmp_path / "e").exists()


def label_map_key_of(name: str) -> str:
    from b2p.labels import label_map_key

    return label_map_key(name)


def test_out_that_is_a_folder_or_a_file(project, predicted):
    root = project["root"]
    before = _snapshot(project["classes"])
    r = _cli("import", "--batch", "b2", "--images", root / "images", "--coco", root / "ok.json", "--classes", project["classes"],
             "--out", root / "images")
    assert r.exit_code == 1 and "--out is a folder" in r.output and str(root / "images") in r.output, r.output
    assert _snapshot(project["classes"]) == before
    blocker = predicted["root"] / "a_file"
    blocker.write_text("keep me")
    r = _cli("predict", "--model", predicted["root"] / "good", "--imported", predicted["imported"], "--out", blocker, "--device", "cpu")
    assert r.exit_code == 1 and "a_file" in r.output and "is a file" in r.output, r.output
    assert blocker.read_text() == "keep me"


def test_usage_errors_exit_1():
    for args in (["import", "--bogus"], ["train", "--epochs", "many"], ["no-such-command"]):
        r = _cli(*args)
        assert r.exit_code == 1, (args, r.output)


def test_cached_embedding_of_the_wrong_shape_is_a_miss(tmp_path):
    from b2p.teach.cache import EmbeddingCache

    cache = EmbeddingCache(tmp_path, "vit_b", "0" * 64)
    good = np.zeros((1, 256, 64, 64), np.float32)
    cache.save("ab" * 32, good, (1024, 768), (480, 360))
    assert cache.load("ab" * 32)[0].shape == good.shape and cache.hits == 1
    cache.save("cd" * 32, np.zeros((1, 256, 32, 32), np.float32), (1024, 768), (480, 360))
    assert cache.load("cd" * 32) is None and cache.misses == 1
