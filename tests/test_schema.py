"""The typed parameter schema (b2p/schema.py): coercion, ranges, every error at once naming file and key,
defaults < params files < options < --set, and every params file the project ships is valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from b2p.cli import app
from b2p.errors import B2PError
from b2p.schema import STAGES, check_params_file, resolve, teach_config, train_params
from conftest import make_synthetic_batch

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_yaml_string_numbers_are_coerced(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  lr: 5e-4\n  epochs: '3'\n  taps: 1,2,4\n  self_correction: 'false'\n")
    tp = train_params([p])
    assert tp.lr == 5e-4 and isinstance(tp.lr, float)  # YAML 1.2 (as DVC reads it): a float; quoted ones are coerced
    assert tp.epochs == 3 and tp.taps == [1, 2, 4] and tp.self_correction is False


def test_every_bad_value_is_reported_at_once_naming_file_and_key(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  lr: fast\n  tau: .nan\n  epochs: 0\n  augment: rotate\n  epoch: 3\n")
    with pytest.raises(B2PError) as e:
        train_params([p])
    msg = str(e.value)
    assert msg.startswith("5 invalid parameters")
    for key, problem in (("lr", "'fast'"), ("tau", "finite"), ("epochs", "greater than or equal to 1"),
                         ("augment", "must be one of"), ("epoch", "unknown key (did you mean 'epochs'?)")):
        line = next(ln for ln in msg.splitlines() if f"train.{key}:" in ln)
        assert line.strip().startswith(str(p)) and problem in line, line


def test_layers_defaults_files_options_set(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("train:\n  epochs: 5\n  lr: 0.01\n  tau: 0.8\n")
    b.write_text("train:\n  epochs: 7\n")
    tp = train_params([a, b], {"lr": 0.02, "tau": None}, ["tau=0.7", "lr=3e-3"])
    assert (tp.epochs, tp.lr, tp.tau, tp.batch_size) == (7, 3e-3, 0.7, 1)  # batch_size: the default
    cfg = teach_config(None, {"grabcut.iterations": 4}, ["grabcut.min_fill=0.1", "teacher=box"])
    assert cfg.teacher == "box" and cfg.grabcut["iterations"] == 4 and cfg.grabcut["min_fill"] == 0.1


def test_command_line_errors_name_the_option(tmp_path):
    with pytest.raises(B2PError, match=r"command line --lr: train.lr: Input should be a finite number"):
        train_params([], {"lr": float("nan")})
    with pytest.raises(B2PError, match=r"command line --set grabcut.iterations=0: teach.grabcut.iterations"):
        teach_config(None, {}, ["grabcut.iterations=0"])
    with pytest.raises(B2PError, match="--set needs KEY=VALUE"):
        train_params([], {}, ["lr"])


def test_cli_refuses_nan_and_bad_types_writing_nothing(tmp_path):
    batch_file, _ = make_synthetic_batch(tmp_path, n_images=2, size=32)
    r = _cli("teach", batch_file, "--out", tmp_path / "t", "--grabcut-context", "nan", "--quiet")
    assert r.exit_code == 1 and "--grabcut-context: teach.grabcut.context_frac" in r.output and "finite" in r.output, r.output
    assert not (tmp_path / "t").exists()
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  lr: fast\n")
    r = _cli("train", "--imported", batch_file.parent, "--teacher-root", tmp_path / "t", "--out", tmp_path / "m", "--params", params)
    assert r.exit_code == 1 and f"{params}: train.lr" in r.output and "'fast'" in r.output, r.output
    r = _cli("train", "--imported", batch_file.parent, "--teacher-root", tmp_path / "t", "--out", tmp_path / "m", "--lr", "nan")
    assert r.exit_code == 1 and "--lr: train.lr" in r.output, r.output
    r = _cli("train", "--imported", batch_file.parent, "--teacher-root", tmp_path / "t", "--out", tmp_path / "m", "--set", "tau=2")
    assert r.exit_code == 1 and "--set tau=2: train.tau" in r.output, r.output
    assert not (tmp_path / "m").exists()


def test_import_set_overrides_the_split(tmp_path):
    batch_file, _ = make_synthetic_batch(tmp_path, n_images=4, size=32, manual_every=0)
    d = json.loads(batch_file.read_text())
    coco = {"images": [{"id": im["id"], "file_name": im["file_name"]} for im in d["images"]],
            "annotations": [{"id": a["id"], "image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"]} for a in d["annotations"]],
            "categories": [{"id": c["id"], "name": c["name"]} for c in d["categories"]]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    params = tmp_path / "params.yaml"
    params.write_text("import:\n  val: 0.0\n  test: 0.0\n")
    out = tmp_path / "imp" / "x.json"
    r = _cli("import", "--batch", "x", "--images", tmp_path / "raw" / "b1" / "images", "--coco", tmp_path / "c.json",
             "--classes", tmp_path / "classes.json", "--out", out, "--params", params, "--set", "val=1")
    assert r.exit_code == 0, r.output
    assert {im["split"] for im in json.loads(out.read_text())["images"]} == {"val"}


def test_decoder_and_prediction_window_are_checked_naming_file_and_key(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  decoder: huge\n  context: ring\n  refine: maybe\npredict:\n  window: 0\n  tta: rot90\n")
    with pytest.raises(B2PError) as e:
        check_params_file(p)
    msg = str(e.value)
    assert "train.decoder" in msg and "must be one of ['full', 'lite']" in msg
    assert "train.context" in msg and "must be one of ['none', 'strip']" in msg
    assert "train.refine" in msg and "boolean" in msg
    assert "predict.window" in msg and "greater than or equal to 1" in msg and str(p) in msg
    assert "predict.tta" in msg and "flips" in msg


def test_predict_params_offer_exactly_the_test_time_augmentations_predict_knows():
    import typing

    from b2p.schema import PredictParams
    from b2p.student.predict import PRECISIONS, TTA_MODES

    assert set(typing.get_args(PredictParams.model_fields["tta"].annotation)) == set(TTA_MODES)
    assert set(typing.get_args(PredictParams.model_fields["precision"].annotation)) == set(PRECISIONS)
    from b2p.student.snap import SNAP_MODES, SnapSettings

    assert set(typing.get_args(PredictParams.model_fields["snap"].annotation)) == set(SNAP_MODES)
    assert PredictParams().snap_sure == SnapSettings().sure


@pytest.mark.parametrize("path", ["params.yaml", *sorted(str(p.relative_to(REPO)) for p in (REPO / "pipelines").rglob("*.yaml") if p.name != "dvc.yaml")])
def test_every_shipped_params_file_is_valid(path):
    check_params_file(REPO / path)


def test_every_stage_has_a_schema():
    from b2p.schema import schema

    for stage in STAGES:
        assert schema(stage).model_fields


def test_add_batch_prints_the_split_of_params_yaml(tmp_path):
    """Item 12: the counts add-batch prints come from params.yaml's `import:` rule, not the default rule."""
    batch_file, _ = make_synthetic_batch(tmp_path, n_images=4, size=32, manual_every=0)
    d = json.loads(batch_file.read_text())
    coco = {"images": [{"id": im["id"], "file_name": im["file_name"]} for im in d["images"]],
            "annotations": [], "categories": [{"id": 1, "name": "crack"}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    params = tmp_path / "params.yaml"
    params.write_text("import:\n  val: 0.0\n  test: 1.0\nbatches: {}\n")
    r = _cli("add-batch", tmp_path / "raw" / "b1" / "images", "--name", "n1", "--coco", tmp_path / "c.json", "--params", params,
             "--raw-root", tmp_path / "data" / "raw", "--classes", tmp_path / "classes.json")
    assert r.exit_code == 0, r.output
    assert "'test': 4" in r.output and "'train': 0" in r.output, r.output
    params.write_text("import:\n  val: half\nbatches: {}\n")
    r = _cli("add-batch", tmp_path / "raw" / "b1" / "images", "--name", "n2", "--coco", tmp_path / "c.json", "--params", params,
             "--raw-root", tmp_path / "data" / "raw", "--classes", tmp_path / "classes.json")
    assert r.exit_code == 1 and f"{params}: import.val" in r.output and not (tmp_path / "data" / "raw" / "n2").exists(), r.output


def test_a_rule_over_two_keys_names_where_both_were_set(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("import:\n  val: 0.7\n")
    with pytest.raises(B2PError) as e:
        resolve("import", p, {"test": 0.6})
    assert f"{p}, command line --test: import: val + test must be at most 1" in str(e.value)


def test_a_params_file_rewritten_on_disk_is_read_anew_and_callers_cannot_change_the_cache(tmp_path):
    from b2p.params import read_yaml

    p = tmp_path / "params.yaml"
    p.write_text("train:\n  epochs: 4\n")
    first = read_yaml(p)
    first["train"]["epochs"] = 99  # a caller changing what it got must not change the next read
    assert read_yaml(p) == {"train": {"epochs": 4}}
    p.write_text("train:\n  epochs: 8\n")  # same size, same second: only the content tells
    assert read_yaml(p) == {"train": {"epochs": 8}}
    p.write_text("train:\n  epochs: 8\n  epochs: 9\n")  # an error is raised on every read, never cached away
    for _ in range(2):
        with pytest.raises(B2PError, match="given twice"):
            read_yaml(p)
