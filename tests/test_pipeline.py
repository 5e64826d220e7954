"""The recipe (dvc.yaml) end to end through DVC (its pieces: tests/test_recipe.py; the suite: tests/test_suite.py).

The slow test copies the project's dvc.yaml / params.yaml / code into tmp_path, `git init` + `dvc init`
there, shrinks the demo (12 images of 64 px, 1 epoch per student) and runs the real `dvc repro`, asserting
which stages ran from DVC's own "Running stage" lines.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from b2p.cli import app

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: `dvc` and `b2p`
runner = CliRunner()

TINY = {"demos.demo.images": 12, "demos.demo.size": 64, "demos.demo.mask_fraction": 0.5, "train.epochs": 1, "train.tile_size": 64,
        "students.lite.train.epochs": 1, "students.lite.train.tile_size": 64, "candidates": ["bitfit", "boxes"], "evaluate.worst": 2}


def recipe_stages(params: dict) -> set[str]:
    """The stage names dvc.yaml resolves to for these params (what a fresh `dvc repro` runs)."""
    batches, cands, dist, oracle = params["batches"], params["candidates"], params["distill"], params["oracle"]["students"]
    return ({f"demo_data@{d}" for d in params["demos"]} | {f"{s}@{b}" for s in ("import", "teach") for b in batches}
            | {"teachers", "combine", "final", "deploy", "export_model", "export", "evaluate", "summary"}
            | {f"{s}@{m}" for s in ("train", "predict", "finalize") for m in cands}
            | {f"{s}_distilled@{m}" for s in ("train", "predict", "finalize") for m in dist}
            | {f"{s}_oracle@{m}" for s in ("train", "predict", "finalize", "evaluate") for m in oracle})


# --- helpers -------------------------------------------------------------------------------------------------


def _edit_params(path: Path, changes: dict[str, object]) -> None:
    """Set dotted keys in a params file, keeping its comments (ruamel round trip, as add-batch does)."""
    from b2p.pipeline.batches import dump_params, load_params

    data = load_params(path)
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    path.write_text(dump_params(data))


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(root.parent / "dvc-site-cache"),
        FIFTYONE_DO_NOT_TRACK="true",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com",
    )
    return env


def _run(root: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=root, env=_env(root), capture_output=True, text=True, timeout=900)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(root, str(BIN / "dvc"), *args, check=check)


def stages_run(p: subprocess.CompletedProcess) -> list[str]:
    """Stage names from DVC's "Running stage 'NAME':" lines (stages in other dvc.yaml files: 'file:NAME')."""
    return re.findall(r"Running stage '([^']+)'", p.stdout + p.stderr)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


# params.yaml keys that shrink the main job to a test's size (also used by tests/test_core_install.py)
SMALL_MAIN_JOB = TINY


def make_project(tmp_path: Path) -> Path:
    """A fresh copy of the project (dvc.yaml, params.yaml, class list, code) as its own git + DVC repo."""
    root = tmp_path / "proj"
    root.mkdir()
    for f in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / f, root / f)
    (root / "data").mkdir()
    shutil.copy(REPO / "data" / "classes.json", root / "data" / "classes.json")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "b2p", root / "b2p", ignore=ignore)  # stages depend on their code
    _edit_params(root / "params.yaml", TINY)
    _run(root, "git", "init", "-q")
    dvc(root, "init", "-q")
    dvc(root, "config", "core.analytics", "false")
    return root


# --- fast checks of the pipeline files ---------------------------------------------------------------------


def test_every_student_variant_and_stage_section_is_valid() -> None:
    """The recipe's lists name variants of `students:`; every variant is a valid set of train / predict keys."""
    from b2p.schema import check_recipe, train_params

    recipe = check_recipe(REPO / "params.yaml")
    for name in recipe.students:
        train_params([REPO / "params.yaml"], student=name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for b, entry in params["batches"].items():  # every batch entry is what `b2p import` takes
        assert entry["format"] in ("coco", "yolo")
        assert set(entry["files"]) <= {"images", "coco", "yolo-labels", "yolo-classes", "masks"}


def test_dvc_resolves_the_recipe_into_its_stages(tmp_path: Path) -> None:
    """DVC itself resolves dvc.yaml (interpolation, foreach / matrix / vars) into the stages the params ask for."""
    env = {**_env(tmp_path / "x"), "DVC_SITE_CACHE_DIR": str(tmp_path / "site")}
    p = subprocess.run([str(BIN / "dvc"), "stage", "list"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    names = {line.split()[0] for line in p.stdout.splitlines() if line.strip()}
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert names == recipe_stages(params)


@pytest.mark.slow
def test_the_recipe_end_to_end_through_dvc(tmp_path: Path, monkeypatch) -> None:
    root = make_project(tmp_path)
    params = yaml.safe_load((root / "params.yaml").read_text())

    # 1. a fresh repro runs every stage of the recipe
    p = dvc(root, "repro")
    assert set(stages_run(p)) == recipe_stages(params), stages_run(p)
    assert "teacher per class" in p.stdout and "shipped student" in p.stdout and "efficientnet_lite0 (pretrained" in p.stdout
    # `dvc metrics show`: one row per source, the headline columns
    shown = json.loads(dvc(root, "metrics", "show", "--json").stdout)
    files = next(iter(shown.values()))["data"]
    sources = {Path(f).stem for f in files}
    assert {"box", "teacher", "combined", "final", "student", "students.bitfit", "students.bitfit.final",
            "distilled.lite", "distilled.lite.final"} <= sources, sources
    assert any(s.startswith("teachers.grabcut") for s in sources)
    from b2p.evaluate.evaluate import MAIN_METRICS

    for f, d in files.items():
        assert set(d["data"]) == {*MAIN_METRICS, "images"}, f
    # the shipped model: one of the candidates or distilled students, its rule, its masks of every image
    dep = json.loads((root / "data/model/choice.json").read_text())
    assert dep["chosen"] in {f"students.{m}" for m in params["candidates"]} | {f"distilled.{m}" for m in params["distill"]}
    best = max(c["score"] for c in dep["candidates"].values() if c["score"] is not None)
    assert dep["candidates"][dep["chosen"]]["score"] == best  # never worse on calib than a model it could have been
    assert (root / "data/model/model.pt").is_file() and json.loads((root / "data/model/rule.json").read_text())["format"] == 1
    # the export holds the final masks of the boxed images and the shipped student's of the others
    _check_export_sources(root)

    # 2. nothing changed: nothing runs
    p = dvc(root, "repro")
    assert stages_run(p) == [] and "up to date" in p.stdout

    # 3. a train param: the students and what follows re-run, import / teachers / teach do not
    imported_before = (root / "data/imported/demo.json").read_bytes()
    _edit_params(root / "params.yaml", {"train.lr": 0.003})
    ran = set(stages_run(dvc(root, "repro")))
    assert {f"train@{m}" for m in params["candidates"]} <= ran and not ran & {"import@demo", "teachers", "teach@demo"}, ran
    assert (root / "data/imported/demo.json").read_bytes() == imported_before

    # 4. a new batch without masks: its own import / teach; the old batch is not taught again
    from b2p.ingest.demo import make_demo_data

    src = tmp_path / "incoming"
    make_demo_data(src, seed=7, images=6, size=64, mask_fraction=0.0)
    monkeypatch.chdir(root)
    res = runner.invoke(app, ["add-batch", str(src / "images"), "--name", "line2", "--coco", str(src / "annotations.json")])
    assert res.exit_code == 0, res.output
    ran = set(stages_run(dvc(root, "repro")))
    assert {"import@line2", "teach@line2"} <= ran and not ran & {"import@demo", "teach@demo"}, ran
    assert (root / "data/imported/demo.json").read_bytes() == imported_before
    assert stages_run(dvc(root, "repro")) == []


@pytest.mark.slow
def test_the_recipe_without_any_manual_mask_runs_on_its_defaults(tmp_path: Path) -> None:
    """No manual mask anywhere: every stage still runs, each choice takes its documented default (the
    fallback teacher, the first candidate's final masks, the first distilled student with the argmax), nothing
    is scored, and the summary says so once."""
    root = make_project(tmp_path)
    _edit_params(root / "params.yaml", {"demos.demo.mask_fraction": 0.0})
    params = yaml.safe_load((root / "params.yaml").read_text())
    p = dvc(root, "repro")
    assert set(stages_run(p)) == recipe_stages(params), stages_run(p)
    teachers = json.loads((root / "data/teachers/choice.json").read_text())
    assert set(teachers["choice"].values()) == {params["teach"]["fallback"]} and teachers["calib"] is False
    combined = json.loads((root / "data/combined/choice.json").read_text())
    assert set(combined["choice"].values()) == {f"students.{params['candidates'][0]}"}
    dep = json.loads((root / "data/model/choice.json").read_text())
    assert dep["chosen"] == f"distilled.{params['distill'][0]}" and "no calib" in dep["reason"]
    assert json.loads((root / "data/model/rule.json").read_text())["rule"]["kind"] == "argmax"
    assert not list((root / "data/eval/metrics").glob("*.json"))
    out = " ".join(p.stdout.split())
    assert out.count("no calib masks anywhere") == 1 and "nothing was scored" in out
    assert (root / "data/export/semantic").is_dir() and (root / "data/model/model.onnx").is_file()


def _check_export_sources(root: Path) -> None:
    from b2p.dataset import load_batch
    from b2p.labels import label_map_key, label_map_path, read_label_map

    batch = load_batch(root / "data/imported/demo.json")
    unboxed = 0
    for im in batch.images:
        exported = root / "data/export/semantic/ann_dir" / im.split / f"demo__{label_map_key(im.file_name)}.png"
        src = root / ("data/final" if im.boxes else "data/model/masks")
        unboxed += not im.boxes
        np.testing.assert_array_equal(read_label_map(exported, (im.height, im.width)),
                                      read_label_map(label_map_path(src, "demo", im.file_name), (im.height, im.width)))
    assert unboxed < len(batch.images), "every demo image lacks boxes: nothing checked the final masks"


@pytest.mark.parametrize("content", ["[1]", '{"miou": "high"}', "not json"])
def test_summary_refuses_a_malformed_metrics_file(tmp_path: Path, content: str) -> None:
    (tmp_path / "eval" / "metrics").mkdir(parents=True)
    bad = tmp_path / "eval" / "metrics" / "final.json"
    bad.write_text(content)
    for d, f, body in (("teachers", "choice.json", {"choice": {}}), ("teachers", "scores.json", {"calib_images": 0}),
                       ("model", "choice.json", {"chosen": "x", "reason": "r"}), ("model", "rule.json", {"rule": {"kind": "argmax"}})):
        (tmp_path / d).mkdir(exist_ok=True)
        (tmp_path / d / f).write_text(json.dumps(body))
    r = runner.invoke(app, ["summary", "--eval", str(tmp_path / "eval"), "--teachers", str(tmp_path / "teachers"), "--model", str(tmp_path / "model")])
    assert r.exit_code == 1 and "Traceback" not in r.output and str(bad) in " ".join(r.output.split()), r.output
