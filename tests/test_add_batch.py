"""`b2p add-batch`: validation through the importer, atomic copy, params.yaml registration, no damage on bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from b2p.cli import app
from b2p.errors import B2PError
from b2p.ingest.demo import DEMO_CLASSES, make_demo_data
from b2p.ingest.importer import import_batch
from b2p.labels import ClassList, load_class_list, save_class_list
from b2p.pipeline import batches as batches_mod
from b2p.pipeline.batches import add_batch, batch_entry, check_name, register_batch

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    """A project folder with the repository's params.yaml and class list; cwd is set to it."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    save_class_list(tmp_path / "data" / "classes.json", ClassList(DEMO_CLASSES))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A box-annotated COCO batch with manual masks (the demo generator, 6 images of 64 px)."""
    out = tmp_path / "incoming"
    make_demo_data(out, seed=3, images=6, size=64, mask_fraction=0.5)
    return out


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _add(src: Path, name: str, *extra: str):
    return runner.invoke(app, ["add-batch", str(src / "images"), "--name", name, "--coco", str(src / "annotations.json"), *extra])


def test_add_batch_copies_registers_and_keeps_comments(project: Path, source: Path) -> None:
    before = (project / "params.yaml").read_text()
    res = _add(source, "line7", "--masks", str(source / "masks"))
    assert res.exit_code == 0, res.output
    folder = project / "data" / "raw" / "line7"
    # the copy: every image, the COCO file byte for byte, every mask
    assert sorted(p.name for p in (folder / "images").iterdir()) == sorted(p.name for p in (source / "images").iterdir())
    assert (folder / "annotations.json").read_bytes() == (source / "annotations.json").read_bytes()
    assert sorted(p.name for p in (folder / "masks").iterdir()) == sorted(p.name for p in (source / "masks").iterdir())
    assert not list((project / "data" / "raw").glob(".*partial*"))
    # registration: the entry DVC unpacks into `b2p import` options, and nothing else changed
    after = (project / "params.yaml").read_text()
    params = yaml.safe_load(after)
    assert params["batches"]["line7"] == {
        "source": "data/raw/line7",
        "format": "coco",
        "files": {"images": "data/raw/line7/images", "coco": "data/raw/line7/annotations.json", "masks": "data/raw/line7/masks"},
    }
    old = yaml.safe_load(before)
    assert {k: v for k, v in params.items() if k != "batches"} == {k: v for k, v in old.items() if k != "batches"}
    assert list(params["batches"]) == [*old["batches"], "line7"]
    # every original line (comments included) is still there, in order; only the entry's lines are new
    new_lines = after.splitlines()
    it = iter(new_lines)
    assert all(any(line == n for n in it) for line in before.splitlines())
    assert len(new_lines) - len(before.splitlines()) == 7
    # the comment heading the section after `batches:` still sits right above that section
    i = new_lines.index("import:")
    heading = before.splitlines()[before.splitlines().index("import:") - 1]
    assert heading.startswith("#") and new_lines[i - 1] == heading, new_lines[i - 3 : i + 1]
    # and the registered files import to the same batch as the source did (the copy is complete)
    a = import_batch("line7", **_import_args(params["batches"]["line7"]["files"]), classes_path=project / "data" / "classes.json",
                     out=project / "x" / "line7.json")
    b = import_batch("line7", source / "images", coco=source / "annotations.json", masks_dir=source / "masks",
                     classes_path=project / "data" / "classes.json", out=project / "y" / "line7.json")
    assert (a.num_images, a.num_boxes, a.manual_masks, a.splits) == (b.num_images, b.num_boxes, b.manual_masks, b.splits)
    assert a.num_images == 6 and a.manual_masks > 0


def _import_args(files: dict) -> dict:
    """params.yaml `files` (option names) -> import_batch keyword arguments."""
    names = {"images": "images_dir", "coco": "coco", "yolo-labels": "yolo_labels", "yolo-classes": "yolo_classes", "masks": "masks_dir"}
    return {names[k]: Path(v) for k, v in files.items()}


def test_add_batch_yolo(project: Path, source: Path) -> None:
    """A YOLO batch (labels + class list converted from the demo COCO) is copied and registered as yolo."""
    coco = json.loads((source / "annotations.json").read_text())
    labels = project.parent / "yolo_labels"
    names = project.parent / "names.txt"
    names.write_text("\n".join(_yolo_labels(coco, labels)) + "\n")
    res = runner.invoke(app, ["add-batch", str(source / "images"), "--name", "y1", "--yolo-labels", str(labels), "--yolo-classes", str(names)])
    assert res.exit_code == 0, res.output
    entry = yaml.safe_load((project / "params.yaml").read_text())["batches"]["y1"]
    assert entry["format"] == "yolo"
    assert entry["files"] == {"images": "data/raw/y1/images", "yolo-labels": "data/raw/y1/labels", "yolo-classes": "data/raw/y1/classes.txt"}
    r = import_batch("y1", **_import_args(entry["files"]), classes_path=project / "data" / "classes.json", out=project / "x.json")
    assert r.num_boxes == len(coco["annotations"])


def _yolo_labels(coco: dict, labels: Path) -> list[str]:
    """Write the COCO boxes as YOLO label files into `labels`; returns the class names in index order."""
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(cats)}
    labels.mkdir(parents=True, exist_ok=True)
    for im in coco["images"]:
        lines = []
        for a in coco["annotations"]:
            if a["image_id"] == im["id"]:
                x, y, w, h = a["bbox"]
                lines.append(f"{index[a['category_id']]} {(x + w / 2) / im['width']:.6f} {(y + h / 2) / im['height']:.6f} "
                             f"{w / im['width']:.6f} {h / im['height']:.6f}")
        (labels / (Path(im["file_name"]).stem + ".txt")).write_text("\n".join(lines) + "\n")
    return [c["name"] for c in cats]


def test_add_batch_copies_exactly_what_validated_yolo(project: Path, source: Path) -> None:
    """labelImg keeps classes.txt inside the labels folder, and a label named `.TXT` counts: the copy must
    import in `dvc repro` as it did here (the class list copied into labels/ was read as a label file)."""
    coco = json.loads((source / "annotations.json").read_text())
    labels = project.parent / "yolo" / "labels"
    names = _yolo_labels(coco, labels)
    (labels / "classes.txt").write_text("\n".join(names) + "\n")
    first = sorted(p for p in labels.glob("*.txt") if p.name != "classes.txt")[0]
    first.rename(first.with_suffix(".TXT"))
    res = runner.invoke(app, ["add-batch", str(source / "images"), "--name", "y2", "--yolo-labels", str(labels),
                              "--yolo-classes", str(labels / "classes.txt")])
    assert res.exit_code == 0, res.output
    copied = project / "data" / "raw" / "y2"
    assert not (copied / "labels" / "classes.txt").exists() and (copied / "labels" / first.with_suffix(".TXT").name).is_file()
    entry = yaml.safe_load((project / "params.yaml").read_text())["batches"]["y2"]
    r = import_batch("y2", **_import_args(entry["files"]), classes_path=project / "data" / "classes.json", out=project / "x.json")
    assert r.num_boxes == len(coco["annotations"])


def test_add_batch_copies_exactly_what_validated_coco(project: Path, source: Path) -> None:
    """COCO may name any decodable file (a .ppm, a dot-file): what imports here is what gets copied."""
    import cv2

    coco = json.loads((source / "annotations.json").read_text())
    a, b = coco["images"][0], coco["images"][1]
    img = cv2.imread(str(source / "images" / a["file_name"]))
    cv2.imwrite(str(source / "images" / "a.ppm"), img)
    (source / "images" / a["file_name"]).unlink()
    (source / "images" / b["file_name"]).rename(source / "images" / ".hidden.png")
    a["file_name"], b["file_name"] = "a.ppm", ".hidden.png"
    (source / "annotations.json").write_text(json.dumps(coco))
    res = _add(source, "odd")
    assert res.exit_code == 0, res.output
    assert (project / "data" / "raw" / "odd" / "images" / "a.ppm").is_file()
    assert (project / "data" / "raw" / "odd" / "images" / ".hidden.png").is_file()
    entry = yaml.safe_load((project / "params.yaml").read_text())["batches"]["odd"]
    r = import_batch("odd", **_import_args(entry["files"]), classes_path=project / "data" / "classes.json", out=project / "x.json")
    assert (r.num_images, r.num_boxes) == (len(coco["images"]), len(coco["annotations"]))


@pytest.mark.parametrize(
    "case",
    ["broken_json", "duplicate_name", "bad_name_dots", "bad_name_escape", "no_box_source", "unknown_class", "box_outside", "folder_exists", "case_only_name", "source_holds_raw"],
)
def test_add_batch_bad_input_changes_nothing(project: Path, source: Path, case: str) -> None:
    args = [str(source / "images"), "--name", "line7", "--coco", str(source / "annotations.json")]
    if case == "broken_json":
        (source / "annotations.json").write_text('{"images": [')
    elif case == "duplicate_name":
        args[2] = "demo"  # registered in the project's params.yaml
    elif case == "bad_name_dots":
        args[2] = "line.7"
    elif case == "bad_name_escape":
        args[2] = "../evil"
    elif case == "no_box_source":
        args = args[:3]
    elif case == "unknown_class":
        coco = json.loads((source / "annotations.json").read_text())
        coco["categories"][0]["name"] = "crak"
        (source / "annotations.json").write_text(json.dumps(coco))
    elif case == "box_outside":
        coco = json.loads((source / "annotations.json").read_text())
        coco["annotations"][0]["bbox"] = [60, 60, 30, 30]
        (source / "annotations.json").write_text(json.dumps(coco))
    elif case == "folder_exists":
        (project / "data" / "raw" / "line7").mkdir(parents=True)
    elif case == "case_only_name":
        args[2] = "Demo"  # "demo" is registered: one folder on a case-insensitive file system
    elif case == "source_holds_raw":
        (project / "data" / "raw").mkdir(parents=True)
        args[0] = str(project)  # the copy would land inside the folder it copies
    before = _snapshot(project)
    res = runner.invoke(app, ["add-batch", *args])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    assert _snapshot(project) == before  # params.yaml, the class list and data/ byte-identical
    if case == "broken_json":
        assert "annotations.json" in res.output and "not valid JSON" in res.output
    if case == "duplicate_name":
        assert "already registered" in res.output
    if case == "unknown_class":
        assert "crak" in res.output and "--add-classes" in res.output
    if case == "case_only_name":
        assert "differs only in case" in res.output and "'demo'" in res.output
    if case == "source_holds_raw":
        assert "holds the project's batch folder" in res.output


def test_add_classes_appends_to_class_list(project: Path, source: Path) -> None:
    coco = json.loads((source / "annotations.json").read_text())
    coco["categories"].append({"id": 9, "name": "dent"})
    coco["annotations"][0]["category_id"] = 9
    (source / "annotations.json").write_text(json.dumps(coco))
    res = _add(source, "dents", "--add-classes")
    assert res.exit_code == 0, res.output
    assert load_class_list(project / "data" / "classes.json").names == (*DEMO_CLASSES, "dent")
    assert "dent" in res.output


def test_failure_while_registering_rolls_back(project: Path, source: Path, monkeypatch) -> None:
    """If params.yaml cannot be written, the copied folder and a changed class list are undone."""
    coco = json.loads((source / "annotations.json").read_text())
    coco["categories"].append({"id": 9, "name": "dent"})
    (source / "annotations.json").write_text(json.dumps(coco))
    before = _snapshot(project)

    def boom(*a, **k):
        raise B2PError("disk full (simulated)")

    monkeypatch.setattr(batches_mod, "register_batch", boom)
    with pytest.raises(B2PError, match="simulated"):
        add_batch(source / "images", "line7", coco=source / "annotations.json", add_classes=True)
    assert _snapshot(project) == before
    assert not (project / "data" / "raw" / "line7").exists()
    assert list((project / "data" / "raw").iterdir()) == []


def test_register_batch_creates_section_and_refuses_duplicates(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_text("# top comment\ntrain:\n  epochs: 3  # why three\n")
    entry = batch_entry("a1", "data/raw", "coco", has_masks=False)
    register_batch(p, "a1", entry)
    text = p.read_text()
    assert text.startswith("# top comment\ntrain:\n  epochs: 3  # why three\n")
    assert yaml.safe_load(text)["batches"] == {"a1": entry}
    with pytest.raises(B2PError, match="already registered"):
        register_batch(p, "a1", entry)
    assert p.read_text() == text
    p.write_text("batches: [a, b]\n")
    with pytest.raises(B2PError, match="mapping"):
        register_batch(p, "a1", entry)


@pytest.mark.parametrize("name,ok", [("line7", True), ("Line_7-b", True), ("a" * 64, True), ("a" * 65, False),
                                     ("a.b", False), ("a b", False), ("-x", False), ("", False), ("x/y", False),
                                     ("line7\n", False)])
def test_check_name(name: str, ok: bool) -> None:
    if ok:
        assert check_name(name) == name
    else:
        with pytest.raises(B2PError):
            check_name(name)
