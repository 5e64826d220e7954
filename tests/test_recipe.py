"""The recipe's pieces that are not one stage: every command defined once, the combine and deploy choices,
the calib share by default. (End to end through `dvc repro`: tests/test_pipeline.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from b2p.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_every_b2p_command_is_spelled_in_one_stage_definition() -> None:
    """A variant (round 2, the distilled students, the oracle, the final choice) is parameters of a stage
    definition (YAML anchors + `vars`), never a copied command: each `b2p <command>` appears in the `cmd` of
    one stage definition of all the project's dvc.yaml files."""
    files = [p for p in REPO.rglob("dvc.yaml") if ".venv" not in p.parts and not p.is_symlink() and "suite" not in p.parent.parts[-2:]]
    assert files == [REPO / "dvc.yaml"], files  # the suite runs this file; it has none of its own
    seen: dict[str, list[str]] = {}
    for f in files:
        raw = yaml.compose(f.read_text())  # the text as written: anchors not expanded
        stages = next(v for k, v in raw.value if k.value == "stages")
        for key, node in stages.value:
            body = dict((k.value, v) for k, v in node.value)
            if "do" in body:
                body = dict((k.value, v) for k, v in body["do"].value)
            if "cmd" in body:
                for cmd in re.findall(r"\bb2p ([a-z][a-z-]*)", body["cmd"].value):
                    seen.setdefault(cmd, []).append(key.value)
    twice = {c: s for c, s in seen.items() if len(s) > 1}
    assert not twice, f"b2p commands spelled in several stage definitions: {twice}"
    assert {"train", "predict", "finalize", "combine", "deploy", "evaluate", "teach", "choose-teacher", "export"} <= set(seen)


def test_every_group_shares_its_command() -> None:
    """The resolved stages: the distilled and oracle groups run the very command of the candidates'."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        stages = {s.name: s.cmd for s in repo.stage.collect(str(REPO / "dvc.yaml"))}
    cand = json.dumps(stages["train@bitfit"])
    assert stages["train_distilled@lite"] == stages["train@bitfit"].replace("data/teach ", "data/combined ").replace(
        "data/students/bitfit/", "data/distilled/lite/").replace("--student bitfit", "--student lite"), cand


# --- combine: per class the best source on calib ------------------------------------------------------------


def _two_sources(root: Path, calib: float = 0.5) -> tuple[Path, dict[str, Path]]:
    """A batch (every image masked, a share in calib) and two mask roots: `a` exact on crack but without its
    spots, `b` exact on spot but without its cracks."""
    from b2p.labels import label_map_path, write_label_map
    from conftest import make_synthetic_batch

    batch_file, truth = make_synthetic_batch(root, n_images=8, manual_every=1, calib=calib)
    roots = {"a": root / "a", "b": root / "b"}
    for fname, lm in truth.items():
        write_label_map(label_map_path(roots["a"], "b1", fname), np.where(lm == 2, 0, lm).astype(np.uint8))
        write_label_map(label_map_path(roots["b"], "b1", fname), np.where(lm == 1, 0, lm).astype(np.uint8))
    return batch_file, roots


def test_combine_takes_each_class_from_its_best_source_and_the_first_member_without_calib(tmp_path: Path) -> None:
    from b2p.dataset import load_batch
    from b2p.finalize.combine import combine
    from b2p.labels import label_map_path, read_label_map

    batch_file, roots = _two_sources(tmp_path / "c")
    assert load_batch(batch_file).split("calib")
    rec = combine([batch_file], roots, tmp_path / "out", fallback="a", progress=False)
    assert rec["choice"] == {"crack": "a", "spot": "b"}  # a is exact on crack, b on spot
    for im in load_batch(batch_file).images:
        got = read_label_map(label_map_path(tmp_path / "out", im.batch, im.file_name), (im.height, im.width))
        np.testing.assert_array_equal(got, im.manual_label_map())  # every box from its class's winner
    # no calib: every class from the fallback, said so
    nocalib, roots2 = _two_sources(tmp_path / "n", calib=0.0)
    rec = combine([nocalib], roots2, tmp_path / "out2", fallback="b", progress=False)
    assert rec["choice"] == {"crack": "b", "spot": "b"} and rec["iou_on_calib"] is None
    assert all("no calib" in why for why in rec["reason"].values())


# --- deploy: never worse on calib than a model it could have been ---------------------------------------------


def _model_folder(root: Path, name: str, calib: dict | None, rule: dict) -> Path:
    f = root / name
    (f / "model").mkdir(parents=True)
    (f / "model" / "model.pt").write_bytes(name.encode())
    (f / "predict").mkdir()
    (f / "predict" / "predict.json").write_text(json.dumps({"runs": [{"settings": {"window": 256, "overlap": 0.25, "tta": "flips"}}]}))
    (f / "alone" / "b" / "labelmaps").mkdir(parents=True)
    (f / "alone" / "b" / "labelmaps" / "x.png").write_bytes(name.encode())
    th = {"t": None, "snap_sure": None, "offsets": None, **rule, "rule": "r", "calib": calib}
    (f / "alone" / "threshold.json").write_text(json.dumps(th))
    return f


@pytest.mark.parametrize("scores", [(0.5, 0.7, 0.6), (0.9, 0.2, 0.9), (0.1, 0.1, 0.3)])
def test_deploy_ships_the_best_student_alone_on_calib(tmp_path: Path, scores) -> None:
    from b2p.finalize.deploy import deploy

    folders = {}
    for i, s in enumerate(scores):
        folders[f"m{i}"] = _model_folder(tmp_path / "pool", f"m{i}", {"binary_iou": s, "anomaly_miou": s / 2}, {"t": 0.3} if i else {})
    rec = deploy(folders, tmp_path / "model", ["crack"])
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # ties: the earlier
    assert rec["chosen"] == f"m{best}"
    shipped = rec["candidates"][rec["chosen"]]["score"]
    assert all(shipped >= c["score"] for c in rec["candidates"].values())  # never worse on calib than any candidate
    assert (tmp_path / "model" / "model.pt").read_bytes() == f"m{best}".encode()
    assert (tmp_path / "model" / "masks" / "b" / "labelmaps" / "x.png").read_bytes() == f"m{best}".encode()
    rule = json.loads((tmp_path / "model" / "rule.json").read_text())
    assert rule["rule"]["kind"] == ("argmax" if best == 0 else "threshold") and rule["tta"] == "flips" and rule["class_names"] == ["crack"]


def test_deploy_without_calib_ships_the_first_with_the_argmax(tmp_path: Path) -> None:
    from b2p.finalize.deploy import deploy

    folders = {n: _model_folder(tmp_path / "pool", n, None, {"t": 0.4}) for n in ("first", "second")}
    rec = deploy(folders, tmp_path / "model", ["crack"])
    assert rec["chosen"] == "first" and "no calib" in rec["reason"]
    assert json.loads((tmp_path / "model" / "rule.json").read_text())["rule"]["kind"] == "argmax"


def test_deploy_refuses_a_model_folder_without_its_calibrated_rule(tmp_path: Path) -> None:
    from b2p.errors import B2PError
    from b2p.finalize.deploy import deploy

    f = _model_folder(tmp_path / "pool", "m", None, {})
    (f / "alone" / "threshold.json").unlink()
    with pytest.raises(B2PError, match="threshold.json"):
        deploy({"m": f}, tmp_path / "model", ["crack"])
    assert not (tmp_path / "model").exists()


# --- the calib split by default ---------------------------------------------------------------------------------


def test_the_recipe_sends_a_share_of_the_masked_images_to_calib_by_default(tmp_path: Path) -> None:
    from b2p.dataset import load_batch
    from b2p.ingest.demo import make_demo_data

    make_demo_data(tmp_path / "raw", seed=0, images=24, size=64, mask_fraction=0.5)
    res = runner.invoke(app, ["import", "--batch", "demo", "--images", str(tmp_path / "raw/images"), "--coco", str(tmp_path / "raw/annotations.json"),
                              "--masks", str(tmp_path / "raw/masks"), "--classes", str(tmp_path / "classes.json"),
                              "--params", str(REPO / "params.yaml"), "--out", str(tmp_path / "demo.json")])
    assert res.exit_code == 0, res.output
    b = load_batch(tmp_path / "demo.json")
    calib, test = b.split("calib"), b.split("test")
    assert calib and test and all(im.has_manual_mask for im in calib + test)
    assert not any(im.has_manual_mask for im in b.split("train", "val"))


def test_too_few_masks_for_calib_and_test_say_so(tmp_path: Path) -> None:
    from b2p.ingest.demo import make_demo_data

    make_demo_data(tmp_path / "raw", seed=0, images=6, size=64, mask_fraction=0.2)  # one masked image
    res = runner.invoke(app, ["import", "--batch", "demo", "--images", str(tmp_path / "raw/images"), "--coco", str(tmp_path / "raw/annotations.json"),
                              "--masks", str(tmp_path / "raw/masks"), "--classes", str(tmp_path / "classes.json"), "--calib", "0.5", "--test", "0",
                              "--out", str(tmp_path / "demo.json")])
    assert res.exit_code == 0, res.output
    assert "too few for both calib" in " ".join(res.output.split())


def test_a_recipe_naming_an_unknown_student_is_refused_before_any_work(tmp_path: Path) -> None:
    from b2p.ingest.demo import make_demo_data

    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text().replace("distill: [lite]", "distill: [lite, lightning]"))
    make_demo_data(tmp_path / "raw", seed=0, images=4, size=64, mask_fraction=0.5)
    res = runner.invoke(app, ["import", "--batch", "demo", "--images", str(tmp_path / "raw/images"), "--coco", str(tmp_path / "raw/annotations.json"),
                              "--classes", str(tmp_path / "classes.json"), "--params", str(params), "--out", str(tmp_path / "demo.json")])
    assert res.exit_code == 1 and "lightning" in res.output and str(params) in " ".join(res.output.split())
    assert not (tmp_path / "demo.json").exists()
