"""The deployable student as ONNX: export, the torch-free runtime's parity with `b2p predict`, rule.json, and
every refused model file (one clear error, exit 1, nothing written)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from b2p.cli import app
from b2p.deploy.onnx_model import METADATA_KEY, OnnxStudent, check_header, read_header
from b2p.errors import B2PError
from b2p.fileio import read_image, sha256_file
from b2p.labels import ClassList, read_label_map, save_class_list
from b2p.student.checkpoint import save_checkpoint
from b2p.student.model import StudentConfig, build_model
from b2p.student.rules import DecisionRule, DeploySettings, read_deploy_settings, student_label_map, write_deploy_settings

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
CLASSES = ["crack", "spot", "erosion"]  # the demo's classes
CONFIGS = {
    # the demo pipeline's student (params.yaml train:), tiny tile
    "lite_strip": dict(decoder="lite", context="strip", refine=True, adaptation="frozen", tile_size=64),
    # with the distances to the image edges as extra inputs, and flips + a threshold rule from rule.json
    "edges": dict(decoder="lite", context="strip", edges=True, tile_size=64),
}


def _random_student(folder: Path, **cfg) -> Path:
    torch.manual_seed(0)
    model = build_model(StudentConfig(num_classes=len(CLASSES) + 1, **cfg), weights="random").eval()
    torch.manual_seed(1)
    for m in model.modules():  # fresh BatchNorm statistics are 0/1: give them values so any slip shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    save_checkpoint(folder / "model.pt", model.config, CLASSES, model.provenance, model.state_dict())
    return folder


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory) -> Path:
    from b2p.ingest.demo import make_demo_data

    out = tmp_path_factory.mktemp("demo")
    make_demo_data(out, seed=5, images=5, size=96, mask_fraction=0.0)
    return out / "images"


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, tmp_path_factory) -> tuple[str, Path]:
    folder = _random_student(tmp_path_factory.mktemp(request.param), **CONFIGS[request.param])
    if request.param == "edges":
        write_deploy_settings(folder, DeploySettings(DecisionRule("threshold", t=0.3), "flips", 64, 0.5, tuple(CLASSES), "test"))
    r = runner.invoke(app, ["export-onnx", "--model", str(folder)])
    assert r.exit_code == 0, r.output
    return request.param, folder


def test_export_writes_the_metadata_a_runtime_needs(exported):
    name, folder = exported
    onnx_path = folder / "model.onnx"
    opsets, props = read_header(onnx_path.read_bytes(), onnx_path)
    meta = check_header(opsets, props, onnx_path)
    cfg = torch.load(folder / "model.pt", weights_only=True)["config"]
    assert list(meta.class_names) == CLASSES and opsets[""] == meta.opset == 17
    assert (list(meta.mean), list(meta.std), meta.scale, meta.multiple, meta.tile_size, meta.max_side) == (
        cfg["mean"], cfg["std"], cfg["scale"], cfg["multiple"], cfg["tile_size"], cfg["max_side"])
    assert meta.source["sha256"] == sha256_file(folder / "model.pt")
    if name == "edges":  # rule.json's choice
        assert (meta.rule["kind"], meta.rule["t"], meta.tta, meta.window, meta.overlap, meta.edges) == ("threshold", 0.3, "flips", 64, 0.5, True)
    else:  # no rule.json: the argmax, no TTA, the strip model's default window (its tile)
        assert (meta.rule["kind"], meta.tta, meta.window, meta.overlap) == ("argmax", "none", 64, 0.25)
    sess = OnnxStudent(onnx_path).session
    assert [i.name for i in sess.get_inputs()] == list(meta.inputs)
    assert all(isinstance(d, str) for i in sess.get_inputs() for d in i.shape if i.shape.index(d) != 1)  # dynamic sizes


def test_onnx_runtime_matches_torch_probabilities_and_label_maps(exported, demo_images):
    from b2p.student import windows
    from b2p.student.checkpoint import load_student
    from b2p.student.predict import predict_image

    name, folder = exported
    model, _ = load_student(folder)
    onnx_model = OnnxStudent(folder / "model.onnx")
    m = onnx_model.meta
    same = total = 0
    for f in sorted(demo_images.glob("*.png")):
        img = read_image(f)
        lm_t, p_t = predict_image(model, img, "cpu", m.overlap, 4, m.window, m.tta, onnx_model.rule)
        p_o = windows.image_probs(onnx_model.forward, img, m.window_model(), m.overlap, 4, m.window, m.tta)
        lm_o, _ = onnx_model.rule.label_map(p_o, img)
        assert p_o.shape == p_t.shape == (4, *img.shape[:2])
        assert np.abs(p_o - p_t).max() < 1e-4
        same += int((lm_o == lm_t).sum())
        total += lm_t.size
    assert same / total >= 0.9999


def test_b2p_run_writes_what_b2p_predict_writes_with_the_rule(exported, demo_images, tmp_path):
    from b2p.deploy.run_cli import main

    name, folder = exported
    r = runner.invoke(app, ["predict", "--model", str(folder), "--images", str(demo_images), "--out", str(tmp_path / "torch"), "--probs"])
    assert r.exit_code == 0, r.output
    assert main(["predict", "--model", str(folder / "model.onnx"), "--images", str(demo_images), "--out", str(tmp_path / "onnx"), "--quiet"]) == 0
    maps = sorted(p.name for p in (tmp_path / "torch").glob("*.png"))
    assert maps and maps == sorted(p.name for p in (tmp_path / "onnx").glob("*.png"))
    a = np.concatenate([read_label_map(tmp_path / "torch" / n).ravel() for n in maps])
    b = np.concatenate([read_label_map(tmp_path / "onnx" / n).ravel() for n in maps])
    assert np.mean(a == b) >= 0.9999
    torch_run = json.loads((tmp_path / "torch" / "predict.json").read_text())["runs"][0]
    onnx_run = json.loads((tmp_path / "onnx" / "predict.json").read_text())["runs"][0]
    assert onnx_run["settings"]["rule"] == torch_run["settings"].get("rule", DecisionRule().to_dict())
    assert onnx_run["model"]["exported_from"]["sha256"] == torch_run["model"]["sha256"]
    if name == "edges":  # b2p predict applied rule.json's threshold rule (and its flips) to its label maps
        from b2p.student.outputs import read_probs

        assert torch_run["settings"]["tta"] == "flips" and torch_run["settings"]["rule"]["t"] == 0.3
        for n in maps:
            probs = read_probs(tmp_path / "torch" / "probs" / n.replace(".png", ".npz"))
            assert np.mean(student_label_map(probs, 0.3) == read_label_map(tmp_path / "torch" / n)) > 0.999  # probs hold 1/255 steps


def test_the_runtime_modules_import_and_predict_without_torch(exported, demo_images, tmp_path):
    """runtime/ (the small distribution's package) holds every module b2p-run needs, and none imports torch."""
    folder = exported[1]
    script = (
        "import sys, runpy; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "import b2p; assert b2p.__file__.startswith(sys.argv[1]), b2p.__file__\n"
        "sys.argv = ['b2p-run', 'predict', '--model', sys.argv[2], '--images', sys.argv[3], '--out', sys.argv[4], '--quiet']\n"
        "runpy.run_module('b2p.deploy.run_cli', run_name='__main__')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "runtime")}
    r = subprocess.run([sys.executable, "-c", script, str(REPO / "runtime" / "b2p"), str(folder / "model.onnx"), str(demo_images), str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)  # not the repository: its b2p/ would be found first
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((tmp_path / "out").glob("*.png"))) == len(list(demo_images.glob("*.png")))


def _b2p_run(args: list[str]) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-m", "b2p.deploy.run_cli", *args], capture_output=True, text=True, timeout=300)
    return r.returncode, r.stderr


def _foreign_onnx(path: Path, opset: int = 17, metadata: str | None = None, input_name: str = "x") -> Path:
    """A valid ONNX model another tool could write: Identity on a float tensor, optionally with b2p metadata."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["n", 3, "h", "w"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, "h", "w"])
    graph = helper.make_graph([helper.make_node("Identity", [input_name], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="other-tool")
    model.ir_version = 8
    if metadata is not None:
        helper.set_model_props(model, {METADATA_KEY: metadata})
    onnx.save(model, str(path))
    return path


def test_refused_model_files_give_one_clear_error_and_write_nothing(exported, demo_images, tmp_path):
    folder = exported[1]
    good = (folder / "model.onnx").read_bytes()
    meta = json.loads(read_header(good, "m")[1][METADATA_KEY])
    cases = {}
    (tmp_path / "truncated.onnx").write_bytes(good[: len(good) // 2])
    cases["truncated.onnx"] = "not a complete ONNX model"
    (tmp_path / "empty.onnx").write_bytes(b"")
    cases["empty.onnx"] = "not an ONNX model"
    (tmp_path / "image.onnx").write_bytes((demo_images / "img_000.png").read_bytes())
    cases["image.onnx"] = "ONNX model"
    _foreign_onnx(tmp_path / "foreign.onnx")
    cases["foreign.onnx"] = "without b2p metadata"
    _foreign_onnx(tmp_path / "opset.onnx", opset=13, metadata=json.dumps(meta))  # b2p's metadata, another opset
    cases["opset.onnx"] = "opset is 13 but b2p exported it at 17"
    _foreign_onnx(tmp_path / "old_opset.onnx", opset=13, metadata=json.dumps({**meta, "opset": 13}))
    cases["old_opset.onnx"] = "need opset 17 or newer"
    _foreign_onnx(tmp_path / "inputs.onnx", metadata=json.dumps(meta))
    cases["inputs.onnx"] = "are not the b2p ones"
    _foreign_onnx(tmp_path / "format.onnx", metadata=json.dumps({**meta, "format": 99}))
    cases["format.onnx"] = "b2p ONNX format 99"
    for name, message in cases.items():
        code, err = _b2p_run(["predict", "--model", str(tmp_path / name), "--images", str(demo_images), "--out", str(tmp_path / "out")])
        assert code == 1 and message in err and name in err, (name, err)
        assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
        assert not (tmp_path / "out").exists()
    # a class list under which the model's ids would mean other classes (another order)
    save_class_list(tmp_path / "classes.json", ClassList(("spot", "crack", "erosion")))
    code, err = _b2p_run(["predict", "--model", str(folder / "model.onnx"), "--images", str(demo_images), "--out", str(tmp_path / "out"), "--classes", str(tmp_path / "classes.json")])
    assert code == 1 and "class ids would mean other classes" in err and not (tmp_path / "out").exists()
    # ... while a list with an appended class is fine (the model never predicts it)
    save_class_list(tmp_path / "classes.json", ClassList((*CLASSES, "dent")))
    code, err = _b2p_run(["predict", "--model", str(folder / "model.onnx"), "--images", str(demo_images), "--out", str(tmp_path / "out"), "--classes", str(tmp_path / "classes.json")])
    assert code == 0, err
    code, err = _b2p_run(["predict", "--model", str(folder / "model.onnx"), "--images", str(demo_images), "--out", str(tmp_path / "out2"), "--batch-size", "zero"])
    assert code == 1 and not (tmp_path / "out2").exists()


def test_export_refuses_bad_inputs_and_leaves_no_file(tmp_path, monkeypatch):
    folder = _random_student(tmp_path / "m", arch="unet", unet_base=4, tile_size=32)
    # rule.json for another class list
    write_deploy_settings(folder, DeploySettings(class_names=("a", "b", "c")))
    r = runner.invoke(app, ["export-onnx", "--model", str(folder)])
    assert r.exit_code == 1 and "chosen for classes ['a', 'b', 'c']" in r.output and not (folder / "model.onnx").exists()
    (folder / "rule.json").write_text('{"format": 1, "rule": {"kind": "threshold"}}')
    r = runner.invoke(app, ["export-onnx", "--model", str(folder)])
    assert r.exit_code == 1 and "rule.json" in r.output and not (folder / "model.onnx").exists()
    (folder / "rule.json").unlink()
    r = runner.invoke(app, ["export-onnx", "--model", str(folder), "--opset", "11"])
    assert r.exit_code == 1 and "--opset 11" in r.output and not (folder / "model.onnx").exists()
    # a network ONNX Runtime computes otherwise than torch is never written
    import b2p.deploy.export as export

    monkeypatch.setattr(export, "PARITY_ATOL", 0.0)
    r = runner.invoke(app, ["export-onnx", "--model", str(folder)])
    assert r.exit_code == 1 and "disagrees with torch" in r.output and not (folder / "model.onnx").exists()
    monkeypatch.undo()
    (folder / "model.onnx").write_bytes(b"old")
    r = runner.invoke(app, ["export-onnx", "--model", str(folder)])
    assert r.exit_code == 0, r.output
    assert OnnxStudent(folder / "model.onnx").meta.tile_size == 32  # replaced whole


def test_rule_file_round_trips_and_refuses_malformed_rules(tmp_path):
    s = DeploySettings(DecisionRule("offsets", offsets=(0.0, 0.5, -0.25, 1.0)), "flips", None, 0.25, tuple(CLASSES), "b2p.distill seed 3")
    write_deploy_settings(tmp_path, s)
    assert read_deploy_settings(tmp_path, CLASSES) == s
    assert json.loads((tmp_path / "rule.json").read_text())["rule"] == {"kind": "offsets", "t": None, "offsets": [0.0, 0.5, -0.25, 1.0], "snap_sure": None}
    (tmp_path / "plain").mkdir()
    assert read_deploy_settings(tmp_path / "plain") is None  # a model folder without rule.json
    assert DecisionRule.of_choice(t=None) == DecisionRule() and DecisionRule.of_choice(t=0.4).t == 0.4
    assert DecisionRule.of_choice(snap_sure=0.9).kind == "snap" and DecisionRule.of_choice(offsets=[0, 1]).offsets == (0.0, 1.0)
    for bad, msg in [
        (dict(kind="threshold"), "needs t"), (dict(kind="argmax", t=0.5), "takes no t"), (dict(kind="threshold", t=1.5), "in (0, 1)"),
        (dict(kind="snap", snap_sure=0.3), "(0.5, 1)"), (dict(kind="median"), "must be one of"), (dict(kind="offsets", offsets=[0.0, float("nan")]), "finite"),
    ]:
        with pytest.raises(B2PError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            DecisionRule(**bad)
    with pytest.raises(B2PError, match="3 class offsets but the model 4"):
        DeploySettings(DecisionRule("offsets", offsets=(0.0, 1.0, 2.0)), class_names=tuple(CLASSES))
    d = s.to_dict()
    for change, msg in [({"format": 2}, "format 1"), ({"tta": "rot90"}, "test-time"), ({"window": 0}, "window"), ({"extra": 1}, "unknown")]:
        (tmp_path / "rule.json").write_text(json.dumps({**d, **change}))
        with pytest.raises(B2PError, match=msg) as e:
            read_deploy_settings(tmp_path)
        assert e.value.path == tmp_path / "rule.json"
