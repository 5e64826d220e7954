"""The box-supervision losses inside the student's trainer: boxes-only (partial labels) and on top of a teacher."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import make_synthetic_batch

from b2p.errors import B2PError
from b2p.teach.base import teach_batch
from b2p.teach.box import BoxTeacher


def _curves(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_boxes_only_and_teacher_plus_box_terms_train(tmp_path: Path):
    from test_student import tiny_params

    from b2p.student.train import train_student

    path, _ = make_synthetic_batch(tmp_path, n_images=8, size=48, manual_every=4)
    teach_batch(path, tmp_path / "box", BoxTeacher(), progress=False)
    partial = tiny_params(epochs=2, pseudo_labels="partial", self_correction=False, proj_weight=1.0, pairwise_weight=1.0, pairwise_warmup=1)
    m = train_student([path], tmp_path / "box", tmp_path / "p", partial, progress=False)
    rows = _curves(tmp_path / "p" / "curves.csv")
    assert m["epochs_run"] == 2
    assert {"train_pce", "train_binary_pce", "train_proj", "train_pairwise"} <= set(rows[-1])
    assert rows[0]["train_pairwise"] in ("", None)  # warm-up: no pairwise term in epoch 1
    assert float(rows[-1]["train_pairwise"]) > 0 and float(rows[-1]["train_proj"]) > 0
    teacher = tiny_params(epochs=1, proj_weight=0.5)
    train_student([path], tmp_path / "box", tmp_path / "t", teacher, progress=False)
    assert "train_proj" in _curves(tmp_path / "t" / "curves.csv")[0]
    with pytest.raises(B2PError, match="self_correction"):
        tiny_params(pseudo_labels="partial").loss_params()
