"""`b2p predict` against hostile input: it never writes into its own input, never predicts an image that
changed since import, and a prediction root says which model wrote it (predict.json) and is never left
half-replaced. Tiny 32-px images and a random 4-channel U-Net: seconds on a CPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from b2p.cli import app
from b2p.errors import B2PError
from b2p.fileio import sha256_file, write_png_atomic
from b2p.labels import label_map_path
from conftest import make_synthetic_batch

runner = CliRunner()


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _tree(*roots: Path) -> dict[Path, bytes]:
    """Every file under the given folders with its bytes (what a refused run must not change)."""
    return {p: p.read_bytes() for r in roots if r.is_dir() for p in sorted(r.rglob("*")) if p.is_file()}


def _model(path: Path, seed: int = 0) -> Path:
    import torch

    from b2p.student.checkpoint import save_checkpoint
    from b2p.student.model import StudentConfig, build_model

    torch.manual_seed(seed)
    cfg = StudentConfig(num_classes=3, arch="unet", unet_base=4, tile_size=32)
    model = build_model(cfg)
    save_checkpoint(path / "model.pt", cfg, ["crack", "spot"], model.provenance, model.state_dict())
    return path


@pytest.fixture
def project(tmp_path: Path) -> dict:
    batch_file, _ = make_synthetic_batch(tmp_path, n_images=3, size=32)
    p = {"root": tmp_path, "imported": batch_file.parent, "images": tmp_path / "raw" / "b1" / "images",
         "model": _model(tmp_path / "m1"), "pred": tmp_path / "pred"}
    r = _predict(p, p["model"], "--boxes-out", tmp_path / "boxes", "--probs")
    assert r.exit_code == 0, r.output
    return p


def _predict(p: dict, model: Path, *extra):
    return _cli("predict", "--model", model, "--imported", p["imported"], "--split", "all", "--out", p["pred"], "--device", "cpu", *extra)


def _maps(p: dict, root: Path) -> list[Path]:
    return [label_map_path(root, "b1", f"img_{i:03d}.png") for i in range(3)]


# --- 1. outputs never inside the input ----------------------------------------------------------------------


@pytest.mark.parametrize("where", ["--out = the folder", "--out inside", "--snap-out inside", "--out holds it"])
def test_output_root_in_or_around_the_image_folder_is_refused(project, where):
    free = project["root"] / "free"
    shutil.copytree(project["images"], free)
    out = {"--out = the folder": free, "--out inside": free / "pred", "--out holds it": project["root"]}.get(where, project["root"] / "o")
    extra = ["--snap-out", free / "snap"] if where == "--snap-out inside" else []
    before = _tree(project["root"])
    r = _cli("predict", "--model", project["model"], "--images", free, "--out", out, "--device", "cpu", *extra)
    assert r.exit_code == 1, r.output
    how = {"--out = the folder": "is the same folder as", "--out holds it": "holds"}.get(where, "lies inside")
    assert f"{'--snap-out' if extra else '--out'} {how} --images" in r.output, r.output
    assert _tree(project["root"]) == before  # the images untouched, nothing written


def test_batch_output_root_holding_the_input_images_is_refused(project):
    before = _tree(project["root"])
    r = _cli("predict", "--model", project["model"], "--imported", project["imported"], "--split", "all",
             "--out", project["images"].parent, "--device", "cpu")
    assert r.exit_code == 1 and "--out holds the image folder of batch 'b1'" in r.output, r.output
    assert _tree(project["root"]) == before


# --- 2. an image changed since import is refused before anything is written ----------------------------------


@pytest.mark.parametrize("change", ["replaced, same size", "resized", "deleted"])
def test_image_changed_since_import_is_refused_before_writing(project, change):
    img = project["images"] / "img_002.png"  # the last one: a file-by-file writer would have written the others
    if change == "deleted":
        img.unlink()
    else:
        side = 32 if change.startswith("replaced") else 48
        write_png_atomic(img, np.random.default_rng(5).integers(0, 255, (side, side, 3), dtype=np.uint8))
    before = _tree(project["pred"], project["root"] / "boxes")
    r = _predict(project, _model(project["root"] / "m2", seed=1), "--boxes-out", project["root"] / "boxes", "--probs")
    assert r.exit_code == 1, r.output
    assert "img_002.png" in r.output, r.output
    assert ("not found" if change == "deleted" else "changed since `b2p import`") in r.output, r.output
    assert _tree(project["pred"], project["root"] / "boxes") == before


# --- 3. the manifest: which model wrote a root; a failed run changes nothing ---------------------------------


def test_manifest_names_the_model_and_a_second_model_on_one_split_is_refused_downstream(project):
    from b2p.student.predict import read_prediction_manifest

    m = read_prediction_manifest(project["pred"], _maps(project, project["pred"]), probs=True)
    assert m["model"]["sha256"] == sha256_file(project["model"] / "model.pt") and m["maps"] == "student"
    assert m["runs"][0]["inputs"]["split"] == "all" and len(m["runs"][0]["maps"]) == 3
    assert read_prediction_manifest(project["root"] / "boxes")["settings"]["box_threshold"] == 0.5
    # a second model on the test split only: the root now mixes two models
    m2 = _model(project["root"] / "m2", seed=1)
    r = _predict(project, m2, "--split", "test")
    assert r.exit_code == 0 and "different models" in r.output, r.output
    with pytest.raises(B2PError, match="2 predict runs with different models"):
        read_prediction_manifest(project["pred"])
    # ... and the stages that read it say so: finalize and evaluate exit 1 naming the manifest, writing nothing
    root = project["root"]
    r = _cli("finalize", "--imported", project["imported"], "--probs", project["pred"], "--out", root / "final", "--quiet")
    assert r.exit_code == 1 and "predict.json" in r.output and "different models" in r.output and not (root / "final").exists(), r.output
    r = _cli("evaluate", "--imported", project["imported"], "--pred-root", project["pred"], "--no-teacher", "--out", root / "ev", "--no-plots")
    assert r.exit_code == 1 and "predict.json" in r.output and "different models" in r.output and not (root / "ev").exists(), r.output
    # every split again with the second model: one model again; without --probs, probabilities are refused
    assert _predict(project, m2).exit_code == 0
    m = read_prediction_manifest(project["pred"], _maps(project, project["pred"]))
    assert m["model"]["sha256"] == sha256_file(m2 / "model.pt") and len(m["runs"]) == 1
    r = _cli("evaluate", "--imported", project["imported"], "--pred-root", project["pred"], "--no-teacher", "--out", root / "ev", "--no-plots")
    assert r.exit_code == 0, r.output
    with pytest.raises(B2PError, match="without --probs"):
        read_prediction_manifest(project["pred"], _maps(project, project["pred"]), probs=True)
    stray = project["pred"] / "b1" / "labelmaps" / "other.png"
    with pytest.raises(B2PError, match="not written by the predict run"):
        read_prediction_manifest(project["pred"], [stray])


def test_a_run_that_fails_midway_leaves_the_root_as_it_was(project, monkeypatch):
    import b2p.student.predict as predict

    calls = {"n": 0}
    real = predict.write_bytes_atomic  # every output file of a predict run is written through it

    def dies_on_the_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # what Ctrl-C does; kill -9 is the stale-stage case below
        real(*a, **k)

    monkeypatch.setattr(predict, "write_bytes_atomic", dies_on_the_third)
    before = _tree(project["pred"], project["root"] / "boxes")
    with pytest.raises(KeyboardInterrupt):
        predict.run_prediction(
            _model(project["root"] / "m2", seed=1), predict.items_from_batches([project["imported"] / "b1.json"], "all", project["pred"], True,
                                                                                project["root"] / "boxes"),
            device="cpu", progress=False, roots={"student": project["pred"], "boxes": project["root"] / "boxes"},
        )
    assert _tree(project["pred"], project["root"] / "boxes") == before  # old maps, old manifest, no stage left


def test_stale_stage_of_a_killed_run_is_removed_and_an_unfinished_root_refused(project):
    from b2p.student.predict import MANIFEST, read_prediction_manifest

    stale = project["pred"] / ".predict.abc123.building" / "b1" / "labelmaps"
    stale.mkdir(parents=True)
    (stale / "img_000.png").write_bytes(b"half")
    mine = project["pred"] / ".mine"
    mine.mkdir()
    assert _predict(project, project["model"]).exit_code == 0
    assert not stale.parent.parent.exists() and mine.is_dir()
    # killed while moving files in: the manifest is gone until the end, so the root reads as unfinished
    (project["pred"] / MANIFEST).unlink()
    with pytest.raises(B2PError, match="did not finish"):
        read_prediction_manifest(project["pred"])


# --- 5. the log says the window actually used ------------------------------------------------------------------


def test_window_larger_than_the_image_is_logged_as_used(project):
    r = _predict(project, project["model"], "--window", "1000")
    assert r.exit_code == 0, r.output
    assert "windows used: 32 px" in r.output and "asked 1000 px" in r.output, r.output


# --- 6. inference precision: float32 by default, bfloat16 only where the CPU has it, and said -----------------


def test_bfloat16_on_a_cpu_without_it_is_refused_before_writing(project, monkeypatch):
    import b2p.student.train as train_mod

    monkeypatch.setattr(train_mod, "cpu_native_bf16", lambda: False)
    before = _tree(project["pred"])
    r = _predict(project, project["model"], "--precision", "bfloat16")
    assert r.exit_code == 1 and "no native bfloat16" in r.output, r.output
    assert _tree(project["pred"]) == before
    r = _predict(project, project["model"], "--precision", "float16")
    assert r.exit_code == 1 and "--precision" in r.output and "'float32', 'bfloat16' or 'auto'" in r.output, r.output
    assert _tree(project["pred"]) == before


@pytest.mark.parametrize("native", [False, True])
def test_precision_auto_is_bfloat16_only_on_a_native_cpu_and_the_manifest_says_which(project, monkeypatch, native):
    import b2p.student.train as train_mod
    from b2p.labels import read_label_map
    from b2p.student.predict import read_prediction_manifest

    f32 = [read_label_map(p) for p in _maps(project, project["pred"])]  # the fixture's float32 run
    monkeypatch.setattr(train_mod, "cpu_native_bf16", lambda: native)
    out = project["root"] / "auto"
    r = _cli("predict", "--model", project["model"], "--imported", project["imported"], "--split", "all", "--out", out,
             "--device", "cpu", "--precision", "auto")
    assert r.exit_code == 0, r.output
    settings = read_prediction_manifest(out)["settings"]
    assert settings.get("precision") == ("bfloat16" if native else None), settings  # float32 runs stay unnamed
    assert ("bfloat16 (precision auto)" in r.output) == native, r.output
    agree = np.mean([(read_label_map(p) == q).mean() for p, q in zip(_maps(project, out), f32)])
    assert agree == 1.0 if not native else agree > 0.95, agree
