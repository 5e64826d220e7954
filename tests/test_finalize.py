"""`b2p finalize`: final masks per box from student (+ teacher), (alpha, t) chosen per class on calib."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import make_synthetic_batch
from typer.testing import CliRunner

from b2p.cli import app
from b2p.dataset import load_batch
from b2p.fileio import atomic_write
from b2p.finalize.final import finalize, probs_path
from b2p.labels import label_map_path, read_label_map, write_label_map

runner = CliRunner()


def _write_probs(root: Path, batch_file: Path, truth: dict[str, np.ndarray], inside: dict[int, tuple[float, float]]) -> None:
    """A fake student: per class c, p(defect) = inside[c][0] on the defect, inside[c][1] elsewhere in its
    box, 0.02 outside every box."""
    batch = load_batch(batch_file)
    for im in batch.images:
        lm = truth[im.file_name]
        p = np.full(lm.shape, 0.02, np.float32)
        for b in im.boxes:
            x, y, w, h = (int(v) for v in b.xywh)
            on, off = inside[b.category_id]
            region = p[y : y + h, x : x + w]
            region[:] = np.where(lm[y : y + h, x : x + w] == b.category_id, on, off)
        probs = np.stack([1 - p, p / 2, p / 2]).astype(np.float16)
        with atomic_write(probs_path(root, im.batch, im.file_name)) as f:
            np.savez_compressed(f, probs=probs)


def test_thresholds_chosen_per_class_on_calib_and_masks_written(tmp_path):
    batch_file, truth = make_synthetic_batch(tmp_path, n_images=6, size=64, seed=3, manual_every=2, calib=1.0)
    # crack: the student is unsure (0.35 on the crack, 0.2 around it); spot: over-confident around it (0.6)
    _write_probs(tmp_path / "pred", batch_file, truth, {1: (0.35, 0.2), 2: (0.9, 0.6)})
    out = tmp_path / "final"
    r = runner.invoke(app, ["finalize", "--imported", str(batch_file.parent), "--probs", str(tmp_path / "pred"), "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    th = json.loads((out / "thresholds.json").read_text())
    crack, spot = th["per_class"]["crack"], th["per_class"]["spot"]
    assert crack["alpha"] == 1.0 and 0.2 <= crack["t"] < 0.35 and crack["calib_iou"] == 1.0
    assert spot["alpha"] == 1.0 and 0.6 <= spot["t"] < 0.9 and spot["calib_iou"] == 1.0
    # the default (t 0.5) rescues every crack box to its best pixels... and keeps the whole spot box
    assert spot["default_iou"] < 0.8
    assert th["calib_images"] == 3 and th["calib_chosen"]["binary_iou"] == 1.0
    assert th["calib_chosen"]["binary_iou"] > th["calib_default"]["binary_iou"]
    assert len(th["calib_grid"]) == 8  # no teacher: alpha 1 only, 8 thresholds
    # every image gets its final mask, here exactly the truth (the same student behaviour everywhere)
    batch = load_batch(batch_file)
    for im in batch.images:
        np.testing.assert_array_equal(read_label_map(label_map_path(out, "b1", im.file_name)), truth[im.file_name])
    prov = json.loads((out / "b1" / "provenance.json").read_text())
    assert prov["teacher"] == "final" and prov["counts"]["images"] == 6
    assert "calib" in r.output and "spot" in r.output

    # round 2: the final masks are a teacher root the student's data loader reads
    from b2p.student.data import gather_samples

    samples, k1 = gather_samples([batch_file], out, ("train",))
    assert k1 == 3 and samples


def test_teacher_blend_and_defaults_without_calib(tmp_path):
    batch_file, truth = make_synthetic_batch(tmp_path, n_images=6, size=64, seed=4, manual_every=2, calib=1.0)
    # the student cannot tell the spot from its surroundings; the teacher has it exactly
    _write_probs(tmp_path / "pred", batch_file, truth, {1: (0.9, 0.1), 2: (0.5, 0.5)})
    batch = load_batch(batch_file)
    for im in batch.images:
        write_label_map(label_map_path(tmp_path / "teach", "b1", im.file_name), np.where(truth[im.file_name] == 2, 2, 0))
    r = finalize([batch_file], tmp_path / "pred", tmp_path / "final", tmp_path / "teach", progress=False)
    assert r.choice["spot"]["alpha"] < 1.0 and r.choice["spot"]["calib_iou"] == 1.0
    assert r.choice["crack"]["calib_iou"] == 1.0  # the teacher has no crack: the student's share decides
    # a run without a teacher cannot blend: the spot stays at the student's (whole box) answer
    r2 = finalize([batch_file], tmp_path / "pred", tmp_path / "final2", progress=False)
    assert r2.choice["spot"]["calib_iou"] < 0.8

    # no calib images: the documented defaults, said so
    plain, truth2 = make_synthetic_batch(tmp_path / "p", n_images=3, size=48, manual_every=3)
    _write_probs(tmp_path / "p" / "pred", plain, truth2, {1: (0.9, 0.1), 2: (0.9, 0.1)})
    r3 = finalize([plain], tmp_path / "p" / "pred", tmp_path / "p" / "final", progress=False)
    assert r3.calib_images == 0 and r3.calib_scores is None
    assert all(c["alpha"] == 1.0 and c["t"] == 0.5 and "no calib" in c["reason"] for c in r3.choice.values())


def test_missing_probabilities_is_one_clear_error(tmp_path):
    batch_file, _ = make_synthetic_batch(tmp_path, n_images=3, size=48)
    r = runner.invoke(app, ["finalize", "--imported", str(batch_file.parent), "--probs", str(tmp_path / "nope"), "--out", str(tmp_path / "f"), "--quiet"])
    assert r.exit_code == 1
    assert "predict --probs" in r.output and "Traceback" not in r.output


def test_student_alone_rule_chosen_on_calib_and_splits_limit_the_output(tmp_path):
    """A student whose defect classes together outweigh the background but never singly: its argmax says
    background everywhere; calib picks a p(defect) threshold that recovers every defect pixel."""
    from b2p.student.predict import write_probs

    batch_file, truth = make_synthetic_batch(tmp_path, n_images=10, size=64, seed=5, manual_every=2, calib=0.7)
    batch = load_batch(batch_file)
    for im in batch.images:  # the new uint8 probs format
        lm = truth[im.file_name]
        p = np.where(lm > 0, 0.45, 0.05).astype(np.float32)
        write_probs(probs_path(tmp_path / "pred", im.batch, im.file_name), np.stack([1 - p, p / 2, p / 2]), ["background", "crack", "spot"])
    splits = {im.split for im in batch.images}
    assert {"calib", "test", "train"} <= splits
    r = runner.invoke(app, ["finalize", "--imported", str(batch_file.parent), "--probs", str(tmp_path / "pred"), "--out", str(tmp_path / "final"),
                            "--student-out", str(tmp_path / "alone"), "--split", "calib,test", "--quiet"])
    assert r.exit_code == 0, r.output
    st = json.loads((tmp_path / "alone" / "threshold.json").read_text())
    assert st["t"] in (0.1, 0.2, 0.3, 0.4) and st["rule"] == f"p(defect) >= {st['t']:g}" and st["calib"]["binary_iou"] == 1.0
    assert st["default_calib"]["binary_iou"] == 0.0 and st["grid"][0]["rule"] == "argmax"
    assert json.loads((tmp_path / "final" / "thresholds.json").read_text())["student_alone"]["t"] == st["t"]
    for im in batch.images:
        alone = label_map_path(tmp_path / "alone", "b1", im.file_name)
        final = label_map_path(tmp_path / "final", "b1", im.file_name)
        if im.split in ("calib", "test"):
            lm = read_label_map(alone)  # no box used: every defect pixel, the most likely defect class (a tie: crack)
            np.testing.assert_array_equal(lm > 0, truth[im.file_name] > 0)
            assert set(np.unique(lm)) <= {0, 1} and final.is_file()
        else:
            assert not alone.exists() and not final.exists()
    prov = json.loads((tmp_path / "final" / "b1" / "provenance.json").read_text())
    assert prov["splits"] == ["test", "calib"] and prov["counts"]["images"] == sum(im.split in ("calib", "test") for im in batch.images)
    assert "p(defect) >=" in r.output

    # a split that is not one: one clear error, exit 1
    r = runner.invoke(app, ["finalize", "--imported", str(batch_file.parent), "--probs", str(tmp_path / "pred"), "--out", str(tmp_path / "f2"), "--split", "calib,tset"])
    assert r.exit_code == 1 and "tset" in r.output and not (tmp_path / "f2").exists()


def test_student_alone_class_offsets_fitted_on_calib_fix_an_under_called_class(tmp_path):
    """A student that finds every defect pixel but calls its cracks "spot" (p crack 0.3 < p spot 0.4): the
    argmax and every p(defect) threshold get the mask right and the crack wrong; a positive crack offset on
    log p, fitted on calib, gets both, and binary IoU + anomaly mIoU choose it. The test images get it."""
    from b2p.finalize.final import fit_class_offsets, offset_label_map
    from b2p.student.predict import write_probs

    batch_file, truth = make_synthetic_batch(tmp_path, n_images=10, size=64, seed=5, manual_every=2, calib=0.7)
    batch = load_batch(batch_file)
    for im in batch.images:
        lm = truth[im.file_name]
        p = np.where(lm == 1, [[[0.3]], [[0.3]], [[0.4]]], np.where(lm == 2, [[[0.3]], [[0.1]], [[0.6]]], [[[0.9]], [[0.05]], [[0.05]]]))
        write_probs(probs_path(tmp_path / "pred", im.batch, im.file_name), p.astype(np.float32), ["background", "crack", "spot"])
    r = runner.invoke(app, ["finalize", "--imported", str(batch_file.parent), "--probs", str(tmp_path / "pred"), "--out", str(tmp_path / "final"),
                            "--student-out", str(tmp_path / "alone"), "--split", "calib,test", "--no-student-snap", "--quiet"])
    assert r.exit_code == 0, r.output
    st = json.loads((tmp_path / "alone" / "threshold.json").read_text())
    assert st["rule"].startswith("argmax with class offsets") and st["reason"] == "best binary IoU + anomaly mIoU on calib"
    assert st["offsets"][0] == 0.0 and st["offsets"][1] > 0 and st["calib"]["anomaly_miou"] == 1.0 and st["calib"]["binary_iou"] == 1.0
    assert st["default_calib"]["binary_iou"] == 1.0 and st["default_calib"]["per_class_iou"]["crack"] == 0.0  # the argmax: mask right, class wrong
    for im in batch.split("test"):
        np.testing.assert_array_equal(read_label_map(label_map_path(tmp_path / "alone", "b1", im.file_name)), truth[im.file_name])
    # the fit itself: from zeros, only what raises the score; a student already right keeps all zeros
    lp = np.log(np.array([[0.9, 0.3, 0.3], [0.05, 0.3, 0.1], [0.05, 0.4, 0.6]], np.float32))
    off, s = fit_class_offsets([(lp, np.array([0, 1, 2]))], ["crack", "spot"], 3)
    assert off[0] == 0 and off[1] > 0 and s["anomaly_miou"] == 1.0
    assert (offset_label_map(np.exp(lp)[:, None, :], off)[0] == [0, 1, 2]).all()
    assert fit_class_offsets([(lp, np.array([0, 2, 2]))], ["crack", "spot"], 3)[0] == (0.0, 0.0, 0.0)


def test_student_alone_snaps_to_the_image_where_calib_says_it_pays(tmp_path):
    """A student sure of each dark defect (p 0.99) but painting a 2 px rim of plain surface around it almost
    as surely (0.93): no threshold of the grid (<= 0.9) drops the rim, while the snap at sure 0.95 lets the
    image's colours settle it. Calib picks that snap; the test images get it; without snap candidates
    (`--no-student-snap`) a threshold is chosen. An image that changed size since import: one error, exit 1,
    no mask written."""
    from scipy.ndimage import binary_dilation

    from b2p.finalize.final import SNAP_SURES
    from b2p.student.predict import write_probs

    batch_file, truth = make_synthetic_batch(tmp_path, n_images=10, size=64, seed=5, manual_every=2, calib=0.7)
    batch = load_batch(batch_file)
    for im in batch.images:
        lm = truth[im.file_name]
        rim = binary_dilation(lm > 0, iterations=2) & (lm == 0)
        p = np.where(lm > 0, 0.99, np.where(rim, 0.93, 0.01)).astype(np.float32)
        cls = np.where(lm == 2, 2, 1)  # the rim takes the crack's class: the fine head's own guess
        write_probs(probs_path(tmp_path / "pred", im.batch, im.file_name), np.stack([1 - p, np.where(cls == 1, p, 0), np.where(cls == 2, p, 0)]),
                    ["background", "crack", "spot"])
    args = ["finalize", "--imported", str(batch_file.parent), "--probs", str(tmp_path / "pred"), "--split", "calib,test", "--quiet"]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "final"), "--student-out", str(tmp_path / "alone")])
    assert r.exit_code == 0, r.output
    st = json.loads((tmp_path / "alone" / "threshold.json").read_text())
    assert st["snap_sure"] == 0.95 and st["rule"] == "snapped to the image (GrabCut, sure 0.95)" and st["unsnapped"] == 0
    assert [g["snap_sure"] for g in st["grid"] if g["snap_sure"] is not None] == list(SNAP_SURES)
    best_plain = max(g["binary_iou"] for g in st["grid"] if g["snap_sure"] is None)
    assert best_plain < 0.75 and st["calib"]["binary_iou"] > 0.95, (best_plain, st["calib"])
    assert "snapped to the image" in r.output
    for im in batch.split("test"):
        lm, t = read_label_map(label_map_path(tmp_path / "alone", "b1", im.file_name)), truth[im.file_name]
        iou = ((lm > 0) & (t > 0)).sum() / ((lm > 0) | (t > 0)).sum()
        assert iou > 0.9, (im.file_name, iou)
        assert set(np.unique(lm[t > 0])) <= {1, 2} and (lm[t == 2] == 2).all()  # the student's classes kept

    r = runner.invoke(app, [*args, "--out", str(tmp_path / "final2"), "--student-out", str(tmp_path / "alone2"), "--no-student-snap"])
    assert r.exit_code == 0, r.output
    st2 = json.loads((tmp_path / "alone2" / "threshold.json").read_text())
    # every plain rule keeps the rim alike: the tie goes to the argmax
    assert st2["snap_sure"] is None and st2["rule"] == "argmax" and len(st2["grid"]) == 11 and st2["calib"]["binary_iou"] == best_plain
    assert st2["grid"][-1]["rule"].startswith("argmax with class offsets")  # fitted, no better: the argmax keeps it

    # a test image replaced by a larger one after import: refused before any mask is written
    im = batch.split("test")[0]
    from b2p.fileio import write_png_atomic

    write_png_atomic(im.path, np.full((im.height + 8, im.width, 3), 150, np.uint8))
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "final3"), "--student-out", str(tmp_path / "alone3")])
    assert r.exit_code == 1 and im.file_name in r.output and "re-import" in r.output and "Traceback" not in r.output
    assert not list((tmp_path / "alone3").rglob("*.png")) and not list((tmp_path / "final3").rglob("*.png"))


def test_probabilities_files_old_and_new_read_alike(tmp_path):
    from b2p.errors import B2PError
    from b2p.student.predict import PROBS_SCALE, read_probs, write_probs

    rng = np.random.default_rng(0)
    p = rng.dirichlet([1, 1, 1], size=(20, 30)).transpose(2, 0, 1).astype(np.float32)
    write_probs(tmp_path / "new.npz", p, ["background", "a", "b"])
    with atomic_write(tmp_path / "old.npz") as f:
        np.savez_compressed(f, probs=p.astype(np.float16))
    assert np.abs(read_probs(tmp_path / "new.npz") - p).max() <= 0.5 / PROBS_SCALE + 1e-6
    assert np.abs(read_probs(tmp_path / "old.npz") - p).max() < 1e-3
    with atomic_write(tmp_path / "bad.npz") as f:
        np.savez_compressed(f, probs=(p * 255).astype(np.uint8))  # uint8 without its scale
    try:
        read_probs(tmp_path / "bad.npz")
        raise AssertionError("a uint8 file without its scale was read")
    except B2PError as e:
        assert "scale" in str(e) and "bad.npz" in str(e)


def test_a_missing_probabilities_file_stops_before_any_mask_is_written(tmp_path):
    """One test image lacks its probabilities: exit 1 naming it, and the final masks of an earlier run stay as they were."""
    batch_file, truth = make_synthetic_batch(tmp_path, n_images=10, size=64, seed=5, manual_every=2, calib=0.7)
    _write_probs(tmp_path / "pred", batch_file, truth, {1: (0.9, 0.1), 2: (0.9, 0.1)})
    args = ["finalize", "--imported", str(batch_file.parent), "--probs", str(tmp_path / "pred"), "--out", str(tmp_path / "final"),
            "--student-out", str(tmp_path / "alone"), "--quiet"]
    assert runner.invoke(app, args).exit_code == 0
    before = {f: f.read_bytes() for f in sorted((tmp_path / "final").rglob("*")) + sorted((tmp_path / "alone").rglob("*")) if f.is_file()}
    batch = load_batch(batch_file)
    # the earlier run's masks are replaced by a changed student, then one test image's probabilities go missing
    _write_probs(tmp_path / "pred", batch_file, truth, {1: (0.3, 0.2), 2: (0.3, 0.2)})
    last_test = batch.split("test")[-1]
    probs_path(tmp_path / "pred", "b1", last_test.file_name).unlink()
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and last_test.file_name.rsplit(".", 1)[0] in r.output and "b2p predict --probs" in r.output
    after = {f: f.read_bytes() for f in sorted((tmp_path / "final").rglob("*")) + sorted((tmp_path / "alone").rglob("*")) if f.is_file()}
    assert after == before


def _new_probs(root: Path, batch_file: Path, truth: dict[str, np.ndarray], names=("background", "crack", "spot")) -> None:
    """A sure student in the current probs format (class names stored)."""
    from b2p.student.predict import write_probs

    for im in load_batch(batch_file).images:
        p = np.where(truth[im.file_name] > 0, 0.9, 0.05).astype(np.float32)
        extra = [np.zeros_like(p)] * (len(names) - 3)
        write_probs(probs_path(root, im.batch, im.file_name), np.stack([1 - p, p / 2, p / 2, *extra]), list(names))


def _files(*roots: Path) -> dict[Path, bytes]:
    return {f: f.read_bytes() for r in roots for f in sorted(r.rglob("*")) if f.is_file()}


def test_an_output_overlapping_an_input_or_the_other_output_is_refused_before_anything_is_written(tmp_path):
    """`--out P` over `--probs P`, the README's old round-2 recipe (`--teacher-root data/final` with the
    default `--out data/final`), nested folders, and `--out` over a folder finalize did not write."""
    batch_file, truth = make_synthetic_batch(tmp_path, n_images=6, size=48, seed=1, manual_every=2, calib=0.5)
    pred, final = tmp_path / "pred", tmp_path / "final"
    _new_probs(pred, batch_file, truth)
    base = ["finalize", "--imported", str(batch_file.parent), "--quiet"]
    assert runner.invoke(app, [*base, "--probs", str(pred), "--out", str(final)]).exit_code == 0
    before = _files(pred, final)
    for extra, says in [
        (["--probs", str(pred), "--out", str(pred)], "--out is the same folder as --probs"),
        (["--probs", str(pred), "--out", str(pred / "b1" / "final")], "--out lies inside --probs"),
        (["--probs", str(pred / "b1"), "--out", str(pred)], "--out holds --probs"),
        (["--probs", str(pred), "--teacher-root", str(final), "--out", str(final)], "--out is the same folder as --teacher-root"),
        (["--probs", str(pred), "--out", str(tmp_path / "f2"), "--student-out", str(tmp_path / "f2")], "--out is the same folder as --student-out"),
        (["--probs", str(pred), "--out", str(tmp_path / "f2"), "--student-out", str(final)], "holds b1/provenance.json, which finalize does not write"),
        (["--probs", str(pred), "--out", str(tmp_path / "f2"), "--student-out", str(tmp_path / "f2" / "alone")], "--out holds --student-out"),
        (["--probs", str(pred), "--out", str(batch_file.parent)], "--out is the same folder as the folder"),
    ]:
        r = runner.invoke(app, [*base, *extra])
        assert r.exit_code == 1 and says in r.output and "Traceback" not in r.output, (extra, r.output)
    assert _files(pred, final) == before and not (tmp_path / "f2").exists()
    assert load_batch(batch_file).name == "b1"  # the batch file is untouched too
    # round 2 done right: blended with round 1, written beside it
    r = runner.invoke(app, [*base, "--probs", str(pred), "--teacher-root", str(final), "--out", str(tmp_path / "final2")])
    assert r.exit_code == 0, r.output


def test_probabilities_of_another_class_list_are_refused_naming_the_file(tmp_path):
    """A model with another class order or more classes: ids would mean other classes (exit 0 and wrong
    --student-out masks before); one error naming the probs file, nothing written. A model whose list is
    a prefix of the batches' (classes appended since) is fine."""
    batch_file, truth = make_synthetic_batch(tmp_path, n_images=6, size=48, seed=2, manual_every=2, calib=0.5)
    args = ["finalize", "--imported", str(batch_file.parent), "--probs", str(tmp_path / "pred"), "--out", str(tmp_path / "final"),
            "--student-out", str(tmp_path / "alone"), "--quiet"]
    im = load_batch(batch_file).split("test", "train")[-1]
    for names in (("background", "spot", "crack"), ("background", "crack", "spot", "dent")):
        _new_probs(tmp_path / "pred", batch_file, truth)
        _new_probs(tmp_path / "wrong", batch_file, truth, names)
        bad = probs_path(tmp_path / "wrong", "b1", im.file_name)
        bad.replace(probs_path(tmp_path / "pred", "b1", im.file_name))
        r = runner.invoke(app, args)
        assert r.exit_code == 1 and str(probs_path(tmp_path / "pred", "b1", im.file_name)) in r.output and "crack" in r.output, r.output
        assert not (tmp_path / "final").exists() and not (tmp_path / "alone").exists()
    # wrong size, met late before: refused up front too
    _new_probs(tmp_path / "pred", batch_file, truth)
    from b2p.student.predict import write_probs

    write_probs(probs_path(tmp_path / "pred", "b1", im.file_name), np.full((3, 8, 8), 1 / 3, np.float32), ["background", "crack", "spot"])
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "expected (K+1)x48x48" in r.output and im.file_name.rsplit(".", 1)[0] in r.output
    # a prefix of the batches' list: accepted
    for f in (tmp_path / "pred").rglob("*.npz"):
        f.unlink()
    for i in load_batch(batch_file).images:
        p = np.where(truth[i.file_name] == 1, 0.9, 0.05).astype(np.float32)
        write_probs(probs_path(tmp_path / "pred", "b1", i.file_name), np.stack([1 - p, p]), ["background", "crack"])
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output


def test_finalize_is_all_or_nothing_and_an_output_root_is_one_runs_output(tmp_path, monkeypatch):
    """A failure (or a kill -9) half-way through the writing leaves the previous outputs byte-identical;
    a run with --split replaces the output roots whole: they then hold that split's images only."""
    import subprocess
    import sys

    import b2p.finalize.final as final_mod

    batch_file, truth = make_synthetic_batch(tmp_path, n_images=8, size=48, seed=3, manual_every=2, calib=0.5)
    _new_probs(tmp_path / "pred", batch_file, truth)
    final, alone = tmp_path / "final", tmp_path / "alone"
    kw = dict(progress=False, student_out=alone, student_snap=False)
    finalize([batch_file], tmp_path / "pred", final, **kw)
    before = _files(final, alone)
    _new_probs(tmp_path / "pred", batch_file, {k: np.zeros_like(v) for k, v in truth.items()})  # another student

    calls = []
    real = final_mod.write_bytes_atomic  # the masks are written through it

    def fail_late(path, data):
        calls.append(path)
        if len(calls) == 7:
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(final_mod, "write_bytes_atomic", fail_late)
    try:
        finalize([batch_file], tmp_path / "pred", final, **kw)
        raise AssertionError("the failure was not raised")
    except OSError:
        pass
    monkeypatch.undo()
    assert _files(final, alone) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no build folder left

    # a kill -9 in the middle of the writing: the old outputs are still whole
    script = (
        "import os, sys; import b2p.finalize.final as f; n = [0]; real = f.write_bytes_atomic\n"
        "def die(p, data):\n    n[0] += 1\n    real(p, data)\n    n[0] == 5 and os._exit(137)\n"
        "f.write_bytes_atomic = die\n"
        f"f.finalize([{str(batch_file)!r}], {str(tmp_path / 'pred')!r}, {str(final)!r}, progress=False, student_out={str(alone)!r}, student_snap=False)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 137, r.stderr
    assert _files(final, alone) == before

    # --split test: the roots hold the test images only (the other images' old masks are gone, not left stale)
    finalize([batch_file], tmp_path / "pred", final, splits="test", **kw)
    batch = load_batch(batch_file)
    for root in (final, alone):
        assert {p.name for p in (root / "b1" / "labelmaps").iterdir()} == {f"{im.file_name.rsplit('.', 1)[0]}.png" for im in batch.split("test")}
    prov = json.loads((final / "b1" / "provenance.json").read_text())
    assert prov["splits"] == ["test"] and set(prov["image_sha256"]) == {im.file_name for im in batch.split("test")}
