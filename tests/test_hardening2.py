"""Hostile input, round 2 (issue 40), one section per numbered item (1 and 2, manual masks against their
boxes: tests/test_mask_agreement.py; 10, the core install: tests/test_core_install.py). Each bad input exits
with code 1 (or prints the documented warning), the message names the file and the problem, and every earlier
output stays byte-identical."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from b2p.cli import app
from b2p.fileio import write_png_atomic
from conftest import make_synthetic_batch

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
S = 32


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _tree(*roots: Path) -> dict[Path, bytes]:
    """Every file under the given files / folders (hidden ones included) with its bytes."""
    out = {}
    for r in roots:
        files = [r] if r.is_file() else sorted(p for p in r.rglob("*") if p.is_file()) if r.is_dir() else []
        out.update({p: p.read_bytes() for p in files})
    return out


def _images(folder: Path, names: list[str], seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    for n in names:
        write_png_atomic(folder / n, rng.integers(0, 255, (S, S, 3), dtype=np.uint8))


def _coco(path: Path, names: list[str], cats=("crack", "spot"), box=(2, 2, 8, 6)) -> Path:
    path.write_text(json.dumps({
        "images": [{"id": i + 1, "file_name": n, "width": S, "height": S} for i, n in enumerate(names)],
        "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": list(box)} for i in range(len(names))],
        "categories": [{"id": i + 1, "name": c} for i, c in enumerate(cats)],
    }))
    return path


def _import(root: Path, batch: str, images: Path, coco: Path, *extra, out: Path | None = None):
    return _cli("import", "--batch", batch, "--images", images, "--coco", coco, "--classes", root / "classes.json",
                "--out", out or root / "imported" / f"{batch}.json", *extra)


@pytest.fixture
def imported(tmp_path: Path) -> dict:
    """One good batch imported: the earlier outputs (batch file, class list) a bad input must leave alone."""
    _images(tmp_path / "images", ["ok.png"])
    r = _import(tmp_path, "b1", tmp_path / "images", _coco(tmp_path / "ok.json", ["ok.png"]))
    assert r.exit_code == 0, r.output
    return {"root": tmp_path, "before": _tree(tmp_path / "imported", tmp_path / "classes.json")}


def _unchanged(p: dict) -> bool:
    return _tree(p["root"] / "imported", p["root"] / "classes.json") == p["before"]


# --- 3. class names in one Unicode form ----------------------------------------------------------------------

NFC, NFD = unicodedata.normalize("NFC", "érosion"), unicodedata.normalize("NFD", "érosion")


def test_class_names_are_nfc_wherever_they_are_read(imported):
    root = imported["root"]
    assert NFC != NFD
    _images(root / "e1", ["e.png"], seed=2)
    r = _import(root, "e1", root / "e1", _coco(root / "e1.json", ["e.png"], cats=(NFC,)), "--add-classes")
    assert r.exit_code == 0, r.output
    listed = root / "classes.json"
    before = listed.read_bytes()
    # NFD in COCO, in a YOLO names file and in a data.yaml: the same class, with or without --add-classes
    _images(root / "e2", ["f.png"], seed=3)
    for extra in ([], ["--add-classes"]):
        r = _import(root, "e2", root / "e2", _coco(root / "e2.json", ["f.png"], cats=(NFD,)), *extra)
        assert r.exit_code == 0 and "(new)" not in r.output, r.output
        assert listed.read_bytes() == before
    (root / "labels").mkdir()
    (root / "labels" / "f.txt").write_text("0 0.5 0.5 0.25 0.25\n")
    for names_file, text in (("names.txt", NFD + "\n"), ("data.yaml", f"names: [{NFD}]\n")):
        (root / names_file).write_text(text)
        r = _cli("import", "--batch", "y2", "--images", root / "e2", "--yolo-labels", root / "labels", "--yolo-classes",
                 root / names_file, "--classes", listed, "--out", root / "imported" / "y2.json")
        assert r.exit_code == 0 and "(new)" not in r.output, r.output
    assert listed.read_bytes() == before
    # a class list written by hand in NFD reads as NFC
    from b2p.labels import load_class_list

    (root / "nfd.json").write_text(json.dumps({"classes": [{"id": 1, "name": NFD}]}))
    assert load_class_list(root / "nfd.json").names == (NFC,) and load_class_list(root / "nfd.json").id_of(NFD) == 1


# --- 4. params files: unknown sections, duplicate keys, strict booleans and integers ------------------------


@pytest.mark.parametrize("text, says", [
    ("improt:\n  val: 0.3\n", "unknown top-level section `improt:` (did you mean `import:`?)"),
    ("import:\n  val: 0.1\n  test: 0.2\n  val: 0.3\n", "key 'val' is given twice in one mapping at line 4"),
    ("import:\n  val: true\n", "import.val: must be a number, not a boolean: got True"),
    ("import:\n  val: [0.1\n", "params file is not valid YAML"),
])
def test_bad_params_file_is_refused_naming_it(imported, text, says):
    root = imported["root"]
    (root / "params.yaml").write_text(text)
    r = _import(root, "b1", root / "images", root / "ok.json", "--params", root / "params.yaml")
    assert r.exit_code == 1 and says in r.output and str(root / "params.yaml") in r.output, r.output
    assert _unchanged(imported)


@pytest.mark.parametrize("item, says", [
    ("epochs=true", "train.epochs: must be an integer, not a boolean: got True"),
    ("refine=yes", "train.refine: must be a boolean (true or false), got 'yes'"),
    ("refine=1", "train.refine: must be a boolean (true or false), got 1"),
    ("lr=false", "train.lr: must be a number, not a boolean: got False"),
])
def test_set_refuses_booleans_for_numbers_and_numbers_for_booleans(tmp_path, item, says):
    batch_file, _ = make_synthetic_batch(tmp_path, n_images=3, size=32)
    r = _cli("train", "--imported", batch_file.parent, "--teacher-root", tmp_path / "teach", "--out", tmp_path / "m", "--set", item)
    assert r.exit_code == 1 and says in r.output and f"--set {item}" in r.output, r.output
    assert not (tmp_path / "m").exists()


def test_params_booleans_and_section_names_pass_where_right(tmp_path):
    from b2p.params import SECTIONS
    from b2p.schema import check_params_file, train_params

    p = tmp_path / "p.yaml"
    p.write_text("train:\n  refine: false\n  epochs: 3\n  lr: 5e-4\nbatches: {}\nseeds: [1, 2]\n")
    tp = train_params([p])
    assert (tp.refine, tp.epochs, tp.lr) == (False, 3, 5e-4)  # YAML 1.2, as DVC reads it: 5e-4 is a number
    assert set(check_params_file(p)) == {"train"} and {"batches", "seeds", "export", "finalize"} <= set(SECTIONS)


def test_add_batch_refuses_a_params_file_with_a_duplicate_key(tmp_path):
    _images(tmp_path / "src", ["a.png"])
    params = tmp_path / "params.yaml"
    params.write_text("batches:\n  a: {source: x, format: coco, files: {}}\n  a: {source: y, format: coco, files: {}}\n")
    before = params.read_bytes()
    r = _cli("add-batch", tmp_path / "src", "--name", "line7", "--coco", _coco(tmp_path / "a.json", ["a.png"]), "--params", params,
             "--raw-root", tmp_path / "raw", "--classes", tmp_path / "classes.json")
    assert r.exit_code == 1 and "key 'a' is given twice" in r.output and str(params) in r.output, r.output
    assert params.read_bytes() == before and not (tmp_path / "raw").exists()


def test_yolo_data_yaml_with_a_duplicate_key_is_refused(tmp_path):
    _images(tmp_path / "images", ["a.png"])
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "data.yaml").write_text("names:\n  0: crack\n  0: spot\n")
    r = _cli("import", "--batch", "y", "--images", tmp_path / "images", "--yolo-labels", tmp_path / "labels", "--yolo-classes",
             tmp_path / "data.yaml", "--classes", tmp_path / "c.json", "--out", tmp_path / "y.json")
    assert r.exit_code == 1 and "data.yaml" in r.output and "key 0 is given twice" in r.output.replace("'0'", "0"), r.output


# --- 5. a full disk, a read-only folder, a name too long, no permission: one clear error ---------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny project after every main stage: imported, taught (box), trained (1 epoch), predicted (with
    probabilities), finalized, evaluated, exported."""
    root = tmp_path_factory.mktemp("proj")
    batch_file, truth = make_synthetic_batch(root, n_images=6, size=32, manual_every=2, calib=0.5)
    for lm_name, lm in truth.items():  # a second mask source for exports that differ from the teacher's
        write_png_atomic(root / "truth" / "b1" / "labelmaps" / lm_name, lm)
    steps = [
        ("teach", batch_file, "--out", root / "teach", "--teacher", "box", "--quiet"),
        ("train", "--imported", root / "imported", "--teacher-root", root / "teach", "--out", root / "model", "--device", "cpu",
         "--set", "arch=unet", "--set", "unet_base=4", "--set", "tile_size=32", "--set", "epochs=1"),
        ("predict", "--model", root / "model", "--imported", root / "imported", "--split", "all", "--out", root / "pred",
         "--probs", "--device", "cpu"),
        ("finalize", "--imported", root / "imported", "--probs", root / "pred", "--out", root / "final", "--quiet"),
        ("evaluate", "--imported", root / "imported", "--teacher-root", root / "teach", "--pred-root", root / "pred", "--out",
         root / "eval", "--split", "all", "--no-plots"),
        *_export_args(root, "teacher"),
        ("demo-data", "--out", root / "demo", "--images", "2", "--size", "64"),
    ]
    for args in steps:
        r = _cli(*args)
        assert r.exit_code == 0, (args[0], r.output)
    return root


def _export_args(root: Path, source: str, out: Path | None = None) -> list[tuple]:
    src = ["--source", "teacher", "--source-root", root / "teach"] if source == "teacher" else ["--source", "final", "--source-root", root / "truth"]
    return [("export", "--imported", root / "imported", "--teacher-root", root / "teach", "--model", root / "model", *src,
             "--out", out or root / "export", "--quiet")]


# each writing command, run again over its earlier output; the output it must leave as it was
COMMANDS = {
    "import": (lambda r: ("import", "--batch", "b1", "--images", r / "raw" / "b1" / "images", "--coco", r / "boxes.json",
                          "--classes", r / "classes.json", "--out", r / "imported" / "b1.json"), "imported"),
    "teach": (lambda r: ("teach", r / "imported" / "b1.json", "--out", r / "teach", "--teacher", "grabcut", "--quiet"), "teach"),
    "train": (lambda r: ("train", "--imported", r / "imported", "--teacher-root", r / "teach", "--out", r / "model", "--device", "cpu",
                         "--set", "arch=unet", "--set", "unet_base=4", "--set", "tile_size=32", "--set", "epochs=1"), "model"),
    "predict": (lambda r: ("predict", "--model", r / "model", "--imported", r / "imported", "--split", "all", "--out", r / "pred",
                           "--probs", "--device", "cpu"), "pred"),
    "finalize": (lambda r: ("finalize", "--imported", r / "imported", "--probs", r / "pred", "--out", r / "final", "--quiet"), "final"),
    "evaluate": (lambda r: ("evaluate", "--imported", r / "imported", "--teacher-root", r / "teach", "--pred-root", r / "pred",
                            "--out", r / "eval", "--split", "all", "--no-plots"), "eval"),
    "export": (lambda r: _export_args(r, "final")[0], "export"),
    "demo-data": (lambda r: ("demo-data", "--out", r / "demo", "--images", "2", "--size", "64"), "demo"),
}


def _copy(project: Path, tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    shutil.copytree(project, root, symlinks=True)
    from b2p.dataset import load_batch

    b = load_batch(root / "imported" / "b1.json")  # the batch's boxes as a COCO file (import's input)
    (root / "boxes.json").write_text(json.dumps({
        "images": [{"id": im.id, "file_name": im.file_name, "width": im.width, "height": im.height} for im in b.images],
        "annotations": [{"id": x.id, "image_id": im.id, "category_id": x.category_id, "bbox": list(x.xywh)} for im in b.images for x in im.boxes],
        "categories": b.classes.to_coco_categories(),
    }))
    return root


def _fail(monkeypatch, where: str, code: int) -> None:
    """Make the OS refuse every write at `where`: the file's bytes (fsync) or the creation of any temporary
    file or folder (mkstemp, mkdtemp), the first thing an atomic write or a staged folder does."""
    import tempfile

    def refuse(*a, **k):
        raise OSError(code, os.strerror(code), k.get("dir"))

    if where == "fsync":
        monkeypatch.setattr(os, "fsync", refuse)
    else:
        monkeypatch.setattr(tempfile, "mkstemp", refuse)
        monkeypatch.setattr(tempfile, "mkdtemp", refuse)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_full_disk_is_one_clear_error_and_the_earlier_output_is_kept(project, tmp_path, monkeypatch, command):
    root = _copy(project, tmp_path)
    make, kept = COMMANDS[command]
    before = _tree(root)
    _fail(monkeypatch, "fsync", errno.ENOSPC)
    r = _cli(*make(root))
    monkeypatch.undo()
    assert r.exit_code == 1, r.output
    assert "no space left on the device (ENOSPC)" in r.output and "the earlier output is kept" in r.output, r.output
    assert str(root / kept) in r.output and "Traceback" not in r.output, r.output
    assert _tree(root) == before  # the earlier output, and everything else, byte for byte; nothing left behind


@pytest.mark.parametrize("command, code, says", [
    ("import", errno.EROFS, "the file system is read-only (EROFS)"),
    ("export", errno.EROFS, "the file system is read-only (EROFS)"),
    ("teach", errno.EACCES, "permission denied (EACCES)"),
    ("predict", errno.ENAMETOOLONG, "the file name is too long for this file system (ENAMETOOLONG)"),
    ("train", errno.EDQUOT, "the disk quota is used up (EDQUOT)"),
])
def test_read_only_no_permission_name_too_long_are_one_clear_error(project, tmp_path, monkeypatch, command, code, says):
    root = _copy(project, tmp_path)
    make, kept = COMMANDS[command]
    before = _tree(root)
    _fail(monkeypatch, "create", code)
    r = _cli(*make(root))
    monkeypatch.undo()
    assert r.exit_code == 1 and says in r.output and "the earlier output is kept" in r.output, r.output
    assert str(root) in r.output and "Traceback" not in r.output, r.output
    assert _tree(root) == before


def _mount(*args: str) -> None:
    p = subprocess.run(["mount", *args], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount here ({p.stderr.strip() or p.returncode}): needs root / CAP_SYS_ADMIN; the simulated-OSError tests cover it")


@pytest.fixture
def mounted(tmp_path):
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small file system needs Linux and root (CAP_SYS_ADMIN); the simulated-OSError tests cover it")
    points: list[Path] = []
    yield points
    for m in reversed(points):
        subprocess.run(["umount", str(m)], capture_output=True)


def test_export_onto_a_full_file_system(project, tmp_path, mounted):
    root = _copy(project, tmp_path)
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk))
    mounted.append(disk)
    assert _cli(*_export_args(root, "teacher", disk / "export")[0]).exit_code == 0
    before = _tree(disk)
    st = os.statvfs(disk)
    with open(disk / "filler", "wb") as f:  # the disk is full now
        f.write(b"\0" * (st.f_bavail * st.f_frsize))
    r = _cli(*_export_args(root, "final", disk / "export")[0])
    assert r.exit_code == 1 and "no space left on the device (ENOSPC)" in r.output and str(disk / "export") in r.output, r.output
    (disk / "filler").unlink()
    assert _tree(disk) == before  # the old export whole, no hidden build folder left


def test_import_and_teach_into_a_read_only_folder(project, tmp_path, mounted):
    root = _copy(project, tmp_path)
    for folder in (root / "imported", root / "teach"):
        _mount("--bind", str(folder), str(folder))
        mounted.append(folder)
        _mount("-o", "remount,bind,ro", str(folder))
    before = _tree(root)
    r = _cli(*COMMANDS["import"][0](root))
    assert r.exit_code == 1 and "the file system is read-only (EROFS)" in r.output and str(root / "imported" / "b1.json") in r.output, r.output
    r = _cli(*COMMANDS["teach"][0](root))
    assert r.exit_code == 1 and "the file system is read-only (EROFS)" in r.output and str(root / "teach") in r.output, r.output
    assert _tree(root) == before


# --- 6. long names: refused at import when a derived name cannot fit, handled everywhere when it can --------


def test_names_too_long_for_their_derived_files_are_refused_at_import(imported):
    root = imported["root"]
    fits, too_long = "f" * 243 + ".png", "g" * 244 + ".png"  # `999_b1__<stem>.png`, the longest derived name: 255, 256 bytes
    _images(root / "long", [fits, too_long], seed=4)
    r = _import(root, "b1", root / "long", _coco(root / "long.json", [fits, too_long]))
    assert r.exit_code == 1 and "long.json" in r.output and f"image {too_long!r}" in r.output and "256 bytes" in r.output, r.output
    assert "evaluation overlay" in r.output and "longer than the 255 bytes" in r.output and f"image {fits!r}" not in r.output
    assert _unchanged(imported)


def test_a_name_that_just_fits_goes_through_teach_and_export(tmp_path):
    name = "f" * 243 + ".png"
    _images(tmp_path / "images", [name])
    assert _import(tmp_path, "b1", tmp_path / "images", _coco(tmp_path / "a.json", [name])).exit_code == 0
    r = _cli("teach", tmp_path / "imported" / "b1.json", "--out", tmp_path / "teach", "--teacher", "box", "--quiet")
    assert r.exit_code == 0, r.output
    r = _cli("export", "--imported", tmp_path / "imported", "--source", "teacher", "--source-root", tmp_path / "teach",
             "--teacher-root", tmp_path / "teach", "--model", tmp_path / "none", "--out", tmp_path / "export", "--quiet")
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "export" / "yolo" / "labels").rglob(f"b1__{'f' * 243}.txt"))) == 1


def test_temporary_names_stay_short_beside_a_long_target(tmp_path):
    from b2p.fileio import name_max, temp_prefix, write_text_atomic

    target = tmp_path / ("t" * 250)
    write_text_atomic(target, "x")  # `.<250>.XXXXXXXX.tmp` would be 264 bytes
    assert target.read_text() == "x" and len(temp_prefix(target.name).encode()) + 12 <= name_max(tmp_path)


# --- 7. one export run replaces all its formats, or none ----------------------------------------------------


def _formats(out: Path) -> dict[str, dict[str, bytes]]:
    return {f: {str(p.relative_to(out / f)): p.read_bytes() for p in sorted((out / f).rglob("*")) if p.is_file()}
            for f in ("coco", "yolo", "semantic") if (out / f).is_dir()}


def _all_old_or_all_new(out: Path, old: dict, new: dict) -> str:
    from b2p.fileio import recover_staged

    now = _formats(out)
    mixed = now not in (old, new)
    if mixed:  # only ever with the swap's journal beside it, which the next run finishes
        assert list(out.glob(".b2p-*.swap")), sorted(p.name for p in out.iterdir())
    recover_staged([out / f for f in ("coco", "yolo", "semantic")])
    now = _formats(out)
    assert now in (old, new), "formats mixed after recovery"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    return "old" if now == old else "new"


def test_an_export_killed_at_every_step_of_its_swap_is_all_old_or_all_new(project, tmp_path, monkeypatch):
    from b2p.export.export import ExportOptions, export_dataset
    from b2p.project import resolve_batch_files

    root = _copy(project, tmp_path)
    out, files = root / "export", resolve_batch_files(root / "imported")
    opts = ExportOptions(source="final", source_root=root / "truth")
    old = _formats(out)
    export_dataset(files, tmp_path / "reference", opts, progress=False)
    new = _formats(tmp_path / "reference")
    assert old != new and set(old) == set(new) == {"coco", "yolo", "semantic"}
    saved = tmp_path / "saved"
    shutil.copytree(out, saved)
    real_replace, real_rename = os.replace, os.rename
    seen = []
    for kill_at in range(8):  # the commit rename, then two moves per format
        shutil.rmtree(out)
        shutil.copytree(saved, out)
        steps = []

        def step(real, src, dst, *a, **k):
            rel = Path(dst).resolve().relative_to(out.resolve()) if out.resolve() in Path(dst).resolve().parents else None
            if rel is not None and (len(rel.parts) == 1 or (len(rel.parts) == 2 and rel.parts[0].endswith(".old"))):
                if len(steps) == kill_at:
                    raise KeyboardInterrupt  # a kill -9 at this point
                steps.append(dst)
            return real(src, dst, *a, **k)

        monkeypatch.setattr(os, "replace", lambda s, d, *a, **k: step(real_replace, s, d, *a, **k))
        monkeypatch.setattr(os, "rename", lambda s, d, *a, **k: step(real_rename, s, d, *a, **k))
        try:
            export_dataset(files, out, opts, progress=False)
        except KeyboardInterrupt:
            pass
        monkeypatch.undo()
        seen.append(_all_old_or_all_new(out, old, new))
    assert seen == ["old"] + ["new"] * 7  # killed before the commit point: old; after it: finished as new


@pytest.mark.slow
def test_b2p_export_killed_at_random_moments_leaves_all_formats_old_or_all_new(project, tmp_path):
    root = _copy(project, tmp_path)
    out = root / "export"
    old = _formats(out)
    saved = tmp_path / "saved"
    shutil.copytree(out, saved)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "b2p", *[str(a) for a in _export_args(root, "final")[0]]]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=root, check=True, capture_output=True)
    full = time.perf_counter() - t0
    new = _formats(out)
    assert new != old
    rng = np.random.default_rng(40)
    outcomes = []
    for delay in sorted(rng.uniform(0.3, 1.0, 6) * full):
        shutil.rmtree(out)
        shutil.copytree(saved, out)
        p = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        outcomes.append(_all_old_or_all_new(out, old, new))
    assert set(outcomes) <= {"old", "new"}


# --- 8. teach refusing a changed image writes nothing, not even its hidden resume files ----------------------


def test_teach_refusing_a_changed_image_leaves_its_resume_files_alone(project, tmp_path):
    root = _copy(project, tmp_path)
    (root / "teach" / "b1" / ".parts").mkdir(exist_ok=True)  # resume files from a run with other settings
    assert _cli("teach", root / "imported" / "b1.json", "--out", root / "parts_run", "--teacher", "box", "--quiet").exit_code == 0
    img = root / "raw" / "b1" / "images" / "img_005.png"  # the last image: a file-by-file loop would have redone the others
    write_png_atomic(img, np.zeros((32, 32, 3), np.uint8))
    before = _tree(root / "teach", root / "parts_run")
    for out in (root / "teach", root / "parts_run"):
        r = _cli("teach", root / "imported" / "b1.json", "--out", out, "--teacher", "grabcut", "--no-resume", "--quiet")
        assert r.exit_code == 1 and "img_005.png" in r.output and "changed since `b2p import`" in r.output, r.output
    assert _tree(root / "teach", root / "parts_run") == before


# --- 9. silent, risky accepts ----------------------------------------------------------------------------------


def test_one_image_under_two_names_of_a_batch_is_refused(imported):
    root = imported["root"]
    _images(root / "dup", ["a.png"], seed=7)
    shutil.copy(root / "dup" / "a.png", root / "dup" / "copy_of_a.png")
    r = _import(root, "b2", root / "dup", _coco(root / "dup.json", ["a.png", "copy_of_a.png"]))
    assert r.exit_code == 1 and "dup.json" in r.output and "'a.png' and 'copy_of_a.png' have the same content" in r.output, r.output
    assert _unchanged(imported) and not (root / "imported" / "b2.json").exists()


def test_an_image_another_batch_holds_too_is_a_warning(imported):
    root = imported["root"]
    shutil.copytree(root / "images", root / "again")
    first = json.loads((root / "imported" / "b1.json").read_text())["images"][0]["split"]
    other = "test" if first != "test" else "val"
    r = _import(root, "b2", root / "again", _coco(root / "again.json", ["ok.png"]), "--val", str(int(other == "val")), "--test", str(int(other == "test")))
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "warning: 1 image(s) of this batch are also in batch 'b1'" in text and f"'ok.png' ({other}) = b1/'ok.png' ({first})" in text, text
    assert "sit in different splits" in text


def test_batch_names_differing_only_in_case_are_refused(imported, tmp_path):
    root = imported["root"]
    _images(root / "other", ["o.png"], seed=8)
    r = _import(root, "B1", root / "other", _coco(root / "o.json", ["o.png"]))
    assert r.exit_code == 1 and "batch name 'B1' differs only in case from the imported batch 'b1'" in r.output, r.output
    assert str(root / "imported" / "b1.json") in r.output and _unchanged(imported)
    from b2p.dataset import load_batches
    from b2p.errors import B2PError

    r = _import(root, "B1", root / "other", _coco(root / "o.json", ["o.png"]), out=tmp_path / "elsewhere" / "B1.json")
    assert r.exit_code == 0, r.output
    with pytest.raises(B2PError, match="'b1' and 'B1' differ only in case"):
        load_batches([root / "imported" / "b1.json", tmp_path / "elsewhere" / "B1.json"])


@pytest.mark.parametrize("case", ["export --out in an image folder", "export --out in the teacher root", "teach --out in the batch files' folder",
                                  "train --out in an image folder", "evaluate --out in the predictions", "import --out in --images",
                                  "masks-to-boxes --oracle-out in the dataset"])
def test_outputs_inside_inputs_are_refused_for_every_command(project, tmp_path, case):
    root = _copy(project, tmp_path)
    images = root / "raw" / "b1" / "images"
    args, says = {
        "export --out in an image folder": (_export_args(root, "final", images / "export")[0], "--out lies inside the image folder of batch 'b1'"),
        "export --out in the teacher root": (_export_args(root, "final", root / "teach" / "export")[0], "--out lies inside --teacher-root"),
        "teach --out in the batch files' folder": (("teach", root / "imported" / "b1.json", "--out", root / "imported", "--teacher", "box"),
                                                   "--out lies inside the folder of batch file b1.json"),
        "train --out in an image folder": (COMMANDS["train"][0](root)[:5] + ("--out", images / "m") + COMMANDS["train"][0](root)[7:],
                                           "--out lies inside the image folder of batch 'b1'"),
        "evaluate --out in the predictions": (COMMANDS["evaluate"][0](root)[:7] + ("--out", root / "pred" / "eval") + COMMANDS["evaluate"][0](root)[9:],
                                              "--out lies inside --pred-root"),
        "import --out in --images": (("import", "--batch", "b1", "--images", images, "--coco", root / "boxes.json", "--classes",
                                      root / "classes.json", "--out", images / "b1.json"), "--out lies inside --images"),
        "masks-to-boxes --oracle-out in the dataset": (("masks-to-boxes", root / "raw", "--out", root / "mtb.json", "--batch", "m",
                                                        "--oracle-out", root / "raw" / "oracle"), "--oracle-out lies inside the dataset root"),
    }[case]
    before = _tree(root)
    r = _cli(*args)
    assert r.exit_code == 1 and says in r.output, r.output
    assert _tree(root) == before


@pytest.mark.parametrize("what", ["export", "teacher instances", "canonical batch file"])
def test_b2p_own_coco_files_are_not_imported_as_manual_masks(project, tmp_path, what):
    root = _copy(project, tmp_path)
    file, says = {
        "export": (root / "export" / "coco" / "annotations" / "instances_test.json", "this file is a b2p export"),
        "teacher instances": (root / "teach" / "b1" / "instances.json", "this file is b2p teacher pseudo-masks"),
        "canonical batch file": (root / "imported" / "b1.json", "this file is a b2p canonical batch file"),
    }[what]
    images = root / "export" / "coco" / "images" if what == "export" else root / "raw" / "b1" / "images"
    r = _cli("import", "--batch", "again", "--images", images, "--coco", file, "--classes", root / "classes.json",
             "--out", root / "imported2" / "again.json")
    text = " ".join(r.output.split())
    assert r.exit_code == 1 and says in text and str(file) in text and "import the" in text and "original box file" in text, text
    assert not (root / "imported2").exists()
