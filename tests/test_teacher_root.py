"""A teacher root made for other images of a batch (same batch and file names, other pixels) is refused by
every stage that reads one (`b2p.teach.base.check_teacher_root`); every root b2p makes for the batch is
accepted: `b2p teach` (and so `--teacher auto`, `suite-combine`), `b2p finalize` (round 2), and a root
without provenance (`masks-to-boxes --oracle-out`, masks written by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_synthetic_batch
from typer.testing import CliRunner

from b2p.cli import app
from b2p.dataset import load_batch
from b2p.errors import B2PError
from b2p.teach.base import check_teacher_root, teach_batch
from b2p.teach.box import BoxTeacher

runner = CliRunner()


def _files(*roots: Path) -> dict[Path, bytes]:
    return {f: f.read_bytes() for r in roots for f in sorted(r.rglob("*")) if f.is_file()}


@pytest.fixture
def two_datasets(tmp_path):
    """Batch b1 taught into TEACH, then a second dataset whose batch is also b1 with the same file names."""
    mine, truth = make_synthetic_batch(tmp_path / "mine", n_images=6, size=48, seed=1, manual_every=2, calib=0.5)
    other, _ = make_synthetic_batch(tmp_path / "other", n_images=6, size=48, seed=2, manual_every=2, calib=0.5)
    teach_batch(other, tmp_path / "teach_other", BoxTeacher(), progress=False)
    teach_batch(mine, tmp_path / "teach", BoxTeacher(), progress=False)
    return mine, truth, tmp_path / "teach_other"


def test_the_check_accepts_every_producer_and_refuses_only_a_real_mismatch(two_datasets, tmp_path):
    mine, truth, wrong = two_datasets
    batch = load_batch(mine)
    check_teacher_root(tmp_path / "teach", batch)  # b2p teach, this batch
    with pytest.raises(B2PError, match="made for other images") as e:
        check_teacher_root(wrong, batch)
    assert "provenance.json" in str(e.value) and "img_000.png" in str(e.value)
    # an older teacher root (no image_sha256 in provenance.json): its resume parts decide
    prov = wrong / "b1" / "provenance.json"
    p = json.loads(prov.read_text())
    del p["image_sha256"]
    prov.write_text(json.dumps(p))
    with pytest.raises(B2PError, match="made for other images") as e:
        check_teacher_root(wrong, batch)
    assert ".parts" in str(e.value)
    # nothing recorded at all (no parts either), or no provenance: cannot be checked, accepted
    import shutil

    shutil.rmtree(wrong / "b1" / ".parts")
    check_teacher_root(wrong, batch)
    prov.unlink()
    check_teacher_root(wrong, batch)
    check_teacher_root(tmp_path / "nowhere", batch)
    # a malformed record: one clear error
    (tmp_path / "teach" / "b1" / "provenance.json").write_text('{"image_sha256": [1]}')
    with pytest.raises(B2PError, match="image_sha256"):
        check_teacher_root(tmp_path / "teach", batch)


def test_finalize_train_and_evaluate_refuse_another_batchs_teacher_root(two_datasets, tmp_path):
    from b2p.finalize.final import finalize, probs_path
    from b2p.student.data import gather_samples
    from b2p.student.predict import write_probs

    mine, truth, wrong = two_datasets
    batch = load_batch(mine)
    for im in batch.images:
        p = np.where(truth[im.file_name] > 0, 0.9, 0.05).astype(np.float32)
        write_probs(probs_path(tmp_path / "pred", "b1", im.file_name), np.stack([1 - p, p / 2, p / 2]), ["background", "crack", "spot"])
    imported = str(mine.parent)
    final = tmp_path / "final"
    finalize([mine], tmp_path / "pred", final, tmp_path / "teach", progress=False)
    before = _files(final)
    said = "made for other images"

    r = runner.invoke(app, ["finalize", "--imported", imported, "--probs", str(tmp_path / "pred"), "--teacher-root", str(wrong), "--out", str(final), "--quiet"])
    assert r.exit_code == 1 and said in r.output and str(wrong / "b1" / "provenance.json") in r.output, r.output
    assert _files(final) == before

    r = runner.invoke(app, ["train", "--imported", imported, "--teacher-root", str(wrong), "--out", str(tmp_path / "m"), "--set", "arch=unet",
                            "--set", "tile_size=32", "--set", "epochs=1", "--device", "cpu"])
    assert r.exit_code == 1 and said in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "m").exists()

    r = runner.invoke(app, ["evaluate", "--imported", imported, "--teacher-root", str(wrong), "--pred-root", str(tmp_path / "teach"),
                            "--out", str(tmp_path / "e"), "--split", "all", "--no-plots"])
    assert r.exit_code == 1 and said in r.output, r.output
    assert not (tmp_path / "e").exists()

    # round 2: finalize's output is a teacher root of this batch (train reads it, finalize blends it)
    samples, _ = gather_samples([mine], final, ("train",))
    assert samples
    finalize([mine], tmp_path / "pred", tmp_path / "final2", final, progress=False)
    # and finalize's output for the other dataset is refused like its teacher's
    other = Path(str(wrong).replace("teach_other", "other")) / "imported" / "b1.json"
    ob = load_batch(other)
    for im in ob.images:
        write_probs(probs_path(tmp_path / "pred_other", "b1", im.file_name), np.full((3, im.height, im.width), 1 / 3, np.float32), ["background", "crack", "spot"])
    finalize([other], tmp_path / "pred_other", tmp_path / "final_other", progress=False)
    with pytest.raises(B2PError, match=said):
        gather_samples([mine], tmp_path / "final_other", ("train",))
