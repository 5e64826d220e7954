"""b2p browse: the FiftyOne dataset (samples, masks, scores, tags, views) and its in-place update.

A private mongod (FiftyOne's bundled binary) on a free port, with its data under tmp, serves these tests
and is shut down at the end; FiftyOne reaches it by URI so no other FiftyOne database is touched.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import make_synthetic_batch
from typer.testing import CliRunner

from b2p.browse.build import TagRule, build_dataset, sample_content
from b2p.cli import app
from b2p.dataset import load_batch
from b2p.errors import B2PError
from b2p.labels import ClassList, label_map_path, write_label_map


@pytest.fixture(scope="module")
def fo_db(tmp_path_factory):
    """FiftyOne connected to a throwaway mongod; yields the `fiftyone` module."""
    from b2p.browse.fo_env import PrivateMongod, configure_env

    configure_env()
    old_uri = os.environ.get("FIFTYONE_DATABASE_URI")
    with PrivateMongod(tmp_path_factory.mktemp("fo_db")) as uri:
        os.environ["FIFTYONE_DATABASE_URI"] = uri
        import fiftyone as fo
        from fiftyone.core.odm import database as fodb

        fo.config.database_uri = uri  # in case FiftyOne was imported before this fixture ran
        yield fo
        # drop the connection to the server we are about to stop (private API, tests only)
        fodb._disconnect()
        fodb._connection_kwargs.pop("host", None)
        fo.config.database_uri = old_uri
        if old_uri is None:
            os.environ.pop("FIFTYONE_DATABASE_URI", None)
        else:
            os.environ["FIFTYONE_DATABASE_URI"] = old_uri


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """Binary IoU computed here, independently of b2p.metrics (1.0 when both are empty)."""
    a, b = a > 0, b > 0
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _write_masks(root: Path, batch: str, truth: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """Teacher and student label maps with known errors, by image index:
    0 (manual): teacher empty -> teacher_miss vs manual; 3 (manual): teacher adds a 20x20 block ->
    teacher_hallucination; 1: teacher empty, student right -> teacher_miss vs student; 2: student empty ->
    teacher_hallucination vs student; others: teacher = student = truth."""
    teacher, student = {}, {}
    for i, (fname, lm) in enumerate(sorted(truth.items())):
        t, s = lm.copy(), lm.copy()
        if i in (0, 1):
            t[:] = 0
        if i == 3:
            t[:20, :20] = 1
        if i == 2:
            s[:] = 0
        write_label_map(label_map_path(root / "teach", batch, fname), t)
        write_label_map(label_map_path(root / "predict", batch, fname), s)
        teacher[fname], student[fname] = t, s
    return teacher, student


EXPECTED_TAGS = {0: ["teacher_miss"], 1: ["teacher_miss"], 2: ["teacher_hallucination"], 3: ["teacher_hallucination"]}


def test_sample_content_scores_and_tags(tmp_path):
    path, truth = make_synthetic_batch(tmp_path)
    teacher, student = _write_masks(tmp_path, "b1", truth)
    batch = load_batch(path)
    classes = ClassList(("crack", "spot"))
    for i, im in enumerate(sorted(batch.images, key=lambda r: r.file_name)):
        c = sample_content(im, classes, tmp_path / "teach", tmp_path / "predict")
        t, s, lm = teacher[im.file_name], student[im.file_name], truth[im.file_name]
        assert c.key == f"b1/{im.file_name}" and c.split == im.split
        assert c.tags == EXPECTED_TAGS.get(i, [])
        assert c.tag_reference == ("manual" if im.has_manual_mask else "student")
        assert c.scores["disagreement"] == pytest.approx(1 - _iou(t, s))
        if im.has_manual_mask:
            np.testing.assert_array_equal(c.manual, lm)
            assert c.scores["teacher_iou"] == pytest.approx(_iou(t, lm))
            assert c.scores["student_iou"] == pytest.approx(_iou(s, lm))
            assert c.scores["student_gain"] == pytest.approx(_iou(s, lm) - _iou(t, lm))
        else:
            assert c.manual is None and c.scores["teacher_iou"] is None and c.scores["student_gain"] is None
        # relative boxes: the crack box of the truth, in [0, 1]
        ys, xs = np.nonzero(lm == 1)
        label, box, _ = c.boxes[0]
        assert label == "crack"
        assert box == pytest.approx([xs.min() / 64, ys.min() / 64, (xs.max() - xs.min() + 1) / 64, (ys.max() - ys.min() + 1) / 64])
    # a stricter rule tags more: any missed pixel counts
    im0 = sorted(batch.images, key=lambda r: r.file_name)[4]
    assert sample_content(im0, classes, tmp_path / "teach", tmp_path / "predict", TagRule(min_recall=1.01, min_pixels=0)).tags == ["teacher_miss"]


def test_build_update_and_views(tmp_path, fo_db):
    fo = fo_db
    name = f"t-{uuid.uuid4().hex[:8]}"
    path1, truth1 = make_synthetic_batch(tmp_path, "b1", seed=0)
    teacher1, student1 = _write_masks(tmp_path, "b1", truth1)
    s = build_dataset([path1], tmp_path / "teach", tmp_path / "predict", name=name, progress=False)
    assert (s.num_samples, s.added, s.updated, s.removed) == (6, 6, 0, 0)
    ds = fo.load_dataset(name)
    assert ds.persistent
    schema = ds.get_field_schema()
    for f in ("boxes", "manual", "teacher", "student", "batch", "split", "teacher_iou", "student_iou", "disagreement"):
        assert f in schema
    assert ds.default_mask_targets == {1: "crack", 2: "spot"}
    assert ds.app_config.active_fields.paths == ["boxes", "manual", "teacher", "student", "final"]
    scheme = ds.app_config.color_scheme
    assert scheme.color_by == "field"  # teacher and student masks of one image in two colours
    colors = {f["path"]: f["fieldColor"] for f in scheme.fields}
    assert len({colors[m] for m in ("manual", "teacher", "student", "final")}) == 4

    for i, fname in enumerate(sorted(truth1)):
        smp = ds.one(fo.ViewField("b2p_key") == f"b1/{fname}")
        np.testing.assert_array_equal(smp.teacher.get_mask(), teacher1[fname])
        np.testing.assert_array_equal(smp.student.get_mask(), student1[fname])
        assert smp.batch == "b1" and len(smp.boxes.detections) == 2
        assert sorted(smp.tags) == EXPECTED_TAGS.get(i, [])
        if smp.has_manual_mask:
            np.testing.assert_array_equal(smp.manual.get_mask(), truth1[fname])
            assert smp.teacher_iou == pytest.approx(_iou(teacher1[fname], truth1[fname]))
        else:
            assert smp.manual is None and smp.teacher_iou is None
        assert smp.disagreement == pytest.approx(1 - _iou(teacher1[fname], student1[fname]))

    worst = ds.load_saved_view("worst-teacher")
    assert worst.values("teacher_iou") == sorted(worst.values("teacher_iou"))
    assert worst.first().b2p_key == f"b1/{sorted(truth1)[0]}"  # empty teacher: IoU 0
    fixed = ds.load_saved_view("student-fixed-teacher")
    assert set(fixed.values("b2p_key")) == {f"b1/{sorted(truth1)[0]}", f"b1/{sorted(truth1)[3]}"}
    assert len(ds.load_saved_view("teacher-errors")) == 4

    # a second batch: added in place, nothing duplicated, it becomes the newest
    path2, truth2 = make_synthetic_batch(tmp_path, "b2", seed=1, n_images=4)
    _write_masks(tmp_path, "b2", truth2)
    ids_before = dict(zip(*ds.values(["b2p_key", "id"])))
    s = build_dataset([path1, path2], tmp_path / "teach", tmp_path / "predict", name=name, progress=False)
    assert (s.num_samples, s.added, s.updated, s.unchanged) == (10, 4, 0, 6)
    ds.reload()
    keys = ds.values("b2p_key")
    assert len(keys) == len(set(keys)) == 10
    assert {k: v for k, v in zip(*ds.values(["b2p_key", "id"])) if k in ids_before} == ids_before
    newest = ds.load_saved_view("newest-batch")
    assert set(newest.values("batch")) == {"b2"} and len(newest) == 4
    d = newest.values("disagreement")
    assert d == sorted(d, reverse=True)

    # running again changes nothing
    snapshot = ds.values(["b2p_key", "b2p_fingerprint", "teacher_iou", "disagreement", "tags"])
    s = build_dataset([path1, path2], tmp_path / "teach", tmp_path / "predict", name=name, progress=False)
    assert (s.num_samples, s.added, s.updated, s.unchanged, s.removed) == (10, 0, 0, 10, 0)
    assert ds.values(["b2p_key", "b2p_fingerprint", "teacher_iou", "disagreement", "tags"]) == snapshot

    # a re-taught mask is picked up: scores and tags refreshed in place
    f0 = sorted(truth1)[0]
    write_label_map(label_map_path(tmp_path / "teach", "b1", f0), truth1[f0])
    s = build_dataset([path1, path2], tmp_path / "teach", tmp_path / "predict", name=name, progress=False)
    assert (s.added, s.updated, s.unchanged) == (0, 1, 9)
    smp = ds.one(fo.ViewField("b2p_key") == f"b1/{f0}")
    assert smp.id == ids_before[f"b1/{f0}"]
    assert smp.teacher_iou == pytest.approx(1.0) and smp.tags == []
    fo.delete_dataset(name)


def test_missing_roots_and_cli(tmp_path, fo_db):
    fo = fo_db
    path, truth = make_synthetic_batch(tmp_path)
    name = f"t-{uuid.uuid4().hex[:8]}"
    runner = CliRunner()
    args = ["browse", "--imported", str(tmp_path / "imported"), "--teacher-root", str(tmp_path / "teach"),
            "--pred-root", str(tmp_path / "predict"), "--name", name, "--build-only"]
    # neither root exists: allowed, fields empty, said in the summary
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "does not exist" in res.output and "6 samples" in res.output
    ds = fo.load_dataset(name)
    assert ds.count("teacher") == 0 and ds.count("student") == 0 and ds.count("manual") == 2

    # a teacher root that exists but misses a label map: exit 1 naming the file
    teacher, _ = _write_masks(tmp_path, "b1", truth)
    missing = label_map_path(tmp_path / "teach", "b1", sorted(truth)[2])
    missing.unlink()
    res = runner.invoke(app, args)
    assert res.exit_code == 1 and "teacher label map missing" in res.output and missing.name in res.output
    with pytest.raises(B2PError, match="teacher label map missing"):
        build_dataset([path], tmp_path / "teach", None, name=name, progress=False)
    write_label_map(missing, teacher[sorted(truth)[2]])

    # predictions for the test split only: other images get no student mask when --pred-split says so
    for im in load_batch(path).images:
        if im.split != "test":
            label_map_path(tmp_path / "predict", "b1", im.file_name).unlink()
    res = runner.invoke(app, args)
    assert res.exit_code == 1 and "pred label map missing" in res.output
    res = runner.invoke(app, [*args, "--pred-split", "test"])
    assert res.exit_code == 0, res.output
    ds.reload()
    assert ds.count("teacher") == 6 and ds.count("student") == 2 == ds.match(fo.ViewField("split") == "test").count("student")

    # a root with no folder for the batch is an error too
    (tmp_path / "other" / "x").mkdir(parents=True)
    res = runner.invoke(app, [*args[:-1], "--teacher-root", str(tmp_path / "other"), "--build-only"])
    assert res.exit_code == 1 and "no label maps for batch 'b1'" in res.output
    fo.delete_dataset(name)


def test_final_masks_field_with_its_own_scores(tmp_path, fo_db):
    fo = fo_db
    path, truth = make_synthetic_batch(tmp_path)
    teacher, _ = _write_masks(tmp_path, "b1", truth)
    final = {}
    for i, (fname, lm) in enumerate(sorted(truth.items())):
        f = lm.copy()
        if i == 3:
            f[lm == 2] = 0  # the final masks lose the spot of image 3
        write_label_map(label_map_path(tmp_path / "final", "b1", fname), f)
        final[fname] = f
    name = f"t-{uuid.uuid4().hex[:8]}"
    s = build_dataset([path], tmp_path / "teach", tmp_path / "predict", name=name, progress=False, final_root=tmp_path / "final")
    assert s.batches["b1"]["final"] == 6
    ds = fo.load_dataset(name)
    assert "final" in ds.get_field_schema() and "final_iou" in ds.get_field_schema()
    for fname in sorted(truth):
        smp = ds.one(fo.ViewField("b2p_key") == f"b1/{fname}")
        np.testing.assert_array_equal(smp.final.get_mask(), final[fname])
        if smp.has_manual_mask:
            assert smp.final_iou == pytest.approx(_iou(final[fname], truth[fname]))
            assert smp.final_gain == pytest.approx(smp.final_iou - _iou(teacher[fname], truth[fname]))
        else:
            assert smp.final_iou is None
    worst = ds.load_saved_view("worst-final")
    assert worst.values("final_iou") == sorted(worst.values("final_iou")) and len(worst) == 2
    assert worst.first().b2p_key == f"b1/{sorted(truth)[3]}"
    # a final root missing a label map is an error naming it
    label_map_path(tmp_path / "final", "b1", sorted(truth)[1]).unlink()
    with pytest.raises(B2PError, match="final label map missing"):
        build_dataset([path], tmp_path / "teach", tmp_path / "predict", name=name, progress=False, final_root=tmp_path / "final")
    fo.delete_dataset(name)


def test_refuses_foreign_dataset(tmp_path, fo_db):
    fo = fo_db
    path, _ = make_synthetic_batch(tmp_path)
    name = f"t-{uuid.uuid4().hex[:8]}"
    fo.Dataset(name, persistent=True)
    with pytest.raises(B2PError, match="not made by b2p"):
        build_dataset([path], None, None, name=name, progress=False)
    fo.delete_dataset(name)


def test_every_further_source_is_its_own_field_with_its_iou(tmp_path, fo_db):
    """`b2p browse --source` / `--recipe`: a mask source beyond teacher / student / final is a field of its own,
    with its IoU against the manual mask and a colour of its own (masks are coloured by field)."""
    fo = fo_db
    name = f"t-{uuid.uuid4().hex[:8]}"
    path, truth = make_synthetic_batch(tmp_path, "b1", seed=0)
    _write_masks(tmp_path, "b1", truth)
    for fname, lm in truth.items():  # a source that misses every spot
        write_label_map(label_map_path(tmp_path / "combined", "b1", fname), np.where(lm == 2, 0, lm).astype(np.uint8))
    build_dataset([path], tmp_path / "teach", tmp_path / "predict", name=name, progress=False,
                  extra_roots={"combined": tmp_path / "combined", "students.bitfit.final": tmp_path / "predict"})
    ds = fo.load_dataset(name)
    schema = ds.get_field_schema()
    assert {"combined", "combined_iou", "students_bitfit_final", "students_bitfit_final_iou"} <= set(schema)
    for smp in ds:
        fname = smp.b2p_key.split("/", 1)[1]
        want = np.where(truth[fname] == 2, 0, truth[fname])
        np.testing.assert_array_equal(smp.combined.get_mask(), want)
        if smp.has_manual_mask:
            assert smp.combined_iou == pytest.approx(_iou(want, truth[fname]))
        else:
            assert smp.combined_iou is None
    colors = {f["path"]: f["fieldColor"] for f in ds.app_config.color_scheme.fields}
    assert len({colors[m] for m in ("teacher", "student", "final", "combined", "students_bitfit_final")}) == 5
