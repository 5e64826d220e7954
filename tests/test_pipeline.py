"""The DVC pipeline (dvc.yaml) and `b2p bench-report` (the benchmark suite: tests/test_suite.py).

The slow tests copy the project's dvc.yaml / params.yaml / code into tmp_path, `git init` + `dvc init`
there, shrink the demo (12 images of 64 px, 1 epoch) and run the real `dvc repro`, asserting which stages
ran from DVC's own "Running stage" lines.
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

MAIN_STAGES = {"demo_data", "import@demo", "teach@demo", "train", "predict", "export", "evaluate", "summary"}


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
SMALL_MAIN_JOB = {"demo.images": 12, "demo.size": 64, "demo.mask_fraction": 0.4, "train.epochs": 1, "train.tile_size": 64, "evaluate.worst": 2}


def make_project(tmp_path: Path, with_pipelines: bool = False) -> Path:
    """A fresh copy of the project (dvc.yaml, params.yaml, class list, code) as its own git + DVC repo."""
    root = tmp_path / "proj"
    root.mkdir()
    for f in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / f, root / f)
    (root / "data").mkdir()
    shutil.copy(REPO / "data" / "classes.json", root / "data" / "classes.json")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "b2p", root / "b2p", ignore=ignore)  # stages depend on their code
    if with_pipelines:
        shutil.copytree(REPO / "pipelines", root / "pipelines", ignore=shutil.ignore_patterns("work", "dvc.lock"))
    _edit_params(root / "params.yaml", SMALL_MAIN_JOB)
    _run(root, "git", "init", "-q")
    dvc(root, "init", "-q")
    dvc(root, "config", "core.analytics", "false")
    return root


# --- fast checks of the pipeline files ---------------------------------------------------------------------


def test_stage_params_exist_and_sections_are_accepted_by_the_commands() -> None:
    """Every param a stage tracks exists in params.yaml, and each stage's section is valid for its command."""
    from b2p.student.train import TrainParams
    from b2p.teach.config import load_teach_params

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, st in stages.items():
        st = st.get("do", st)
        for key in st.get("params", []):
            node = params
            for part in key.split("."):
                assert part in node, f"stage {name} tracks {key}, missing from params.yaml"
                node = node[part]
    TrainParams.from_dict(params["train"], "params.yaml")
    load_teach_params(REPO / "params.yaml")
    # every batch entry is what `b2p import` takes
    for b, entry in params["batches"].items():
        assert entry["format"] in ("coco", "yolo")
        assert set(entry["files"]) <= {"images", "coco", "yolo-labels", "yolo-classes", "masks"}


def test_one_suite_definition() -> None:
    """The benchmark suite is one dvc.yaml + params.yaml; every listed student variant is a file of `train:` keys."""
    suites = sorted((REPO / "pipelines").glob("**/dvc.yaml"))
    assert suites == [REPO / "pipelines" / "suite" / "dvc.yaml"]
    p = yaml.safe_load((REPO / "pipelines" / "suite" / "params.yaml").read_text())
    assert {"dataset", "split", "masks_to_boxes", "teachers", "students", "oracle", "seeds", "train", "evaluate", "report"} <= set(p)
    assert set(p["dataset"]) == {"root", "name"} and len(p["seeds"]) == 3
    for s in {*p["students"], *p["oracle"]["students"]}:
        variant = yaml.safe_load((REPO / "pipelines" / "suite" / "students" / f"{s}.yaml").read_text())
        assert set(variant) == {"train"}, s
    assert not (REPO / "benchmarks" / "magnetic_tile.py").exists()  # `b2p suite` replaced it


def test_dvc_parses_every_pipeline(tmp_path: Path) -> None:
    """DVC itself resolves the root pipeline and each suite (interpolation, foreach / matrix) into stages."""
    env = {**_env(tmp_path / "x"), "DVC_SITE_CACHE_DIR": str(tmp_path / "site")}
    out = {}
    for target in ("dvc.yaml", "pipelines/suite/dvc.yaml"):
        p = subprocess.run([str(BIN / "dvc"), "stage", "list", target], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        out[target] = {line.split()[0].rsplit(":", 1)[-1] for line in p.stdout.splitlines() if line.strip()}
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert out["dvc.yaml"] == {"demo_data", "train", "predict", "export", "evaluate", "summary"} | {
        f"{s}@{b}" for s in ("import", "teach") for b in params["batches"]}
    p = yaml.safe_load((REPO / "pipelines" / "suite" / "params.yaml").read_text())
    seeds = p["seeds"]
    runs = {f"{t}-{s}-{seed}" for t in p["teachers"] for s in p["students"] for seed in seeds}
    groups = {  # stage suffix -> its matrix (teacher-student-seed)
        "": runs,
        "_oracle": {f"oracle-{s}-{seed}" for s in p["oracle"]["students"] for seed in seeds},
        "_boxes_only": {f"boxes-only-{s}-{seed}" for s in p["boxes_only"]["students"] for seed in seeds},
        "_round2": {f"{t}-{s}-{seed}" for t in p["teachers"] for s in p["round2"]["students"] for seed in seeds},
        "_distill": {f"{t}-{s}-{seed}" for t in p["teachers"] for s in p["distill"]["students"] for seed in seeds},
    }
    assert out["pipelines/suite/dvc.yaml"] == {"prepare", "import", "report", "teach_boxes_only"} | {
        f"teach@{t}" for t in p["teachers"]} | {
        f"{stage}{suffix}@{run}" for stage in ("train", "predict", "finalize", "evaluate")
        for suffix, group in groups.items() for run in group} | {
        f"{stage}@{t}-{seed}" for stage in ("combine", "evaluate_combine") for t in p["teachers"] for seed in seeds} | {
        f"select@{t}-{s}-{seed}" for t in p["teachers"] for s in p["select"]["students"] for seed in seeds} | {
        f"select_distill@{run}" for run in groups["_distill"]}


# --- bench-report on real evaluate outputs ----------------------------------------------------------------


def test_bench_report_tables(tmp_path: Path, synthetic_batch) -> None:
    """Runs laid out <teacher>/<student>: a perfect teacher, a perfect and an empty student."""
    from b2p.dataset import load_batch
    from b2p.evaluate.evaluate import evaluate
    from b2p.labels import label_map_path, write_label_map
    from b2p.pipeline.report import build_report, find_runs, report_markdown

    batch_file, truth = synthetic_batch
    b = load_batch(batch_file)
    roots = {"teach/perfect": truth, "pred/good": truth, "pred/empty": {k: np.zeros_like(v) for k, v in truth.items()}}
    for root, maps in roots.items():
        for im in b.images:
            write_label_map(label_map_path(tmp_path / root, b.name, im.file_name), maps[im.file_name])
    from b2p.evaluate.evaluate import MaskSource
    from b2p.pipeline.report import BOXED_SOURCE

    for student in ("good", "empty"):
        # the empty student's box-guided masks are perfect and its snapped ones empty: rows of their own, right
        # after the student, in that order
        boxed = [MaskSource("student_snap", tmp_path / "pred/empty"), MaskSource(BOXED_SOURCE, tmp_path / "pred/good")] if student == "empty" else []
        evaluate([batch_file], tmp_path / "eval" / "perfect" / student, tmp_path / "teach/perfect",
                 tmp_path / "pred" / student, extra_sources=boxed, plots=False, progress=False)
    runs = find_runs(tmp_path / "eval")
    assert [r.name for r in runs] == ["perfect/empty", "perfect/good"]
    rep = build_report(runs)
    kinds = [(r["kind"], r["name"]) for r in rep["rows"]]
    assert kinds == [("teacher", "teacher: perfect"), ("baseline", "box fill (no learning)"),
                     ("student", "empty <- perfect"), ("student+boxes", "empty <- perfect (+ boxes)"),
                     ("student+snap", "empty <- perfect (snapped to the image)"), ("student", "good <- perfect")]
    assert rep["rows"][3]["metrics"]["binary_iou"] == pytest.approx(1.0)
    assert rep["rows"][4]["metrics"]["binary_iou"] == pytest.approx(0.0)
    del rep["rows"][3:5]
    teacher, box, empty, good = rep["rows"]
    assert teacher["metrics"]["miou"] == pytest.approx(1.0) and good["metrics"]["binary_iou"] == pytest.approx(1.0)
    assert empty["metrics"]["binary_iou"] == pytest.approx(0.0) and empty["metrics"]["binary_recall"] == pytest.approx(0.0)
    assert 0 < box["metrics"]["binary_iou"] < 1 and box["metrics"]["binary_recall"] == pytest.approx(1.0)
    assert good["train_seconds"] is None and good["ms_per_image"] is None  # not recorded: shown as '-'
    md = report_markdown(build_report(runs))
    assert md.count("\n| ") == 7 and "| good <- perfect | 1.0000 |" in md and "| - |" in md
    assert "| empty <- perfect (+ boxes) | 1.0000 |" in md
    # the CLI writes both files; a folder without runs is a clear error
    res = runner.invoke(app, ["bench-report", str(tmp_path / "eval"), "--out", str(tmp_path / "results")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "results" / "report.json").read_text())["rows"][5]["name"] == "good <- perfect"
    assert (tmp_path / "results" / "report.md").read_text() == md
    res = runner.invoke(app, ["bench-report", str(tmp_path / "teach")])
    assert res.exit_code == 1 and "no metrics.json" in res.output


# --- the main job, end to end -----------------------------------------------------------------------------


@pytest.mark.slow
def test_main_pipeline_fresh_noop_param_change_and_add_batch(tmp_path: Path, monkeypatch) -> None:
    root = make_project(tmp_path)

    # 1. a fresh repro runs every stage and writes the metrics; the summary shows the FiftyOne command
    p = dvc(root, "repro")
    assert set(stages_run(p)) == MAIN_STAGES, stages_run(p)
    m = json.loads((root / "data/eval/metrics.json").read_text())
    for src in ("student", "teacher", "box"):
        assert 0.0 <= m[src]["miou"] <= 1.0 and m[src]["images"] > 0
    t = json.loads((root / "data/models/student/metrics.json").read_text())
    assert t["epochs_run"] == 1 and t["train_seconds"] > 0
    assert "b2p browse --imported data/imported --teacher-root data/teach --pred-root data/predict" in p.stdout
    assert "teacher: grabcut" in p.stdout
    # `dvc metrics show`: one readable table, the headline scores per source (details in details.json)
    shown = json.loads(dvc(root, "metrics", "show", "--json").stdout)
    declared = next(iter(shown.values()))["data"]  # the workspace's files
    assert list(declared) == ["data/eval/metrics.json"]
    from b2p.evaluate.evaluate import MAIN_METRICS

    assert {src: set(sec) for src, sec in declared["data/eval/metrics.json"]["data"].items()} == {
        src: {*MAIN_METRICS, "images"} for src in ("student", "teacher", "box", "student_boxes", "student_snap")}
    assert "per_class" in json.loads((root / "data/eval/details.json").read_text())["teacher"]
    plots = json.loads(dvc(root, "plots", "show", "--json", "-o", str(tmp_path / "plots")).stdout)["data"]
    assert set(plots) == {"training curves", "per-class IoU", "data/eval/plots/summary.png",
                          "data/eval/plots/confusion_student.png", "data/eval/plots/confusion_teacher.png"}
    curve = plots["training curves"][0]["content"]["data"]["values"]
    assert curve[0]["epoch"] == "1" and float(curve[0]["train_loss"]) > 0
    assert {v["class"] for v in plots["per-class IoU"][0]["content"]["data"]["values"]} >= {"crack", "spot", "erosion"}
    assert Path(plots["data/eval/plots/summary.png"][0]["url"]).stat().st_size > 1000

    # experiments see the same metrics and params (needs a commit)
    _run(root, "git", "add", "-A")
    _run(root, "git", "commit", "-qm", "baseline")
    ws = next(e for e in json.loads(dvc(root, "exp", "show", "--json").stdout) if e["rev"] == "workspace")["data"]
    assert ws["params"]["params.yaml"]["data"]["train"]["epochs"] == 1
    assert ws["metrics"]["data/eval/metrics.json"]["data"]["student"]["miou"] == pytest.approx(m["student"]["miou"])

    # 2. nothing changed: nothing runs
    p = dvc(root, "repro")
    assert stages_run(p) == [] and "up to date" in p.stdout

    # 3. a train param: train and what follows re-run, import / teach do not
    imported_before = (root / "data/imported/demo.json").read_bytes()
    preds_before = _tree_bytes(root / "data/predict")
    _edit_params(root / "params.yaml", {"train.epochs": 2})
    p = dvc(root, "repro")
    # DVC skips a stage whose inputs hash the same: evaluate re-runs only if the new model's masks differ
    expected = {"train", "predict", "export", "summary"} | ({"evaluate"} if _tree_bytes(root / "data/predict") != preds_before else set())
    assert set(stages_run(p)) == expected, stages_run(p)
    assert json.loads((root / "data/models/student/metrics.json").read_text())["epochs_run"] == 2

    # 4. a new batch (another demo seed): only its own import/teach, then retrain and re-evaluate
    from b2p.ingest.demo import make_demo_data

    src = tmp_path / "incoming"
    make_demo_data(src, seed=7, images=8, size=64, mask_fraction=0.4)
    monkeypatch.chdir(root)
    params_before = (root / "params.yaml").read_bytes()
    bad = runner.invoke(app, ["add-batch", str(src / "images"), "--name", "demo", "--coco", str(src / "annotations.json")])
    assert bad.exit_code == 1 and (root / "params.yaml").read_bytes() == params_before
    res = runner.invoke(app, ["add-batch", str(src / "images"), "--name", "line2", "--coco", str(src / "annotations.json"),
                              "--masks", str(src / "masks")])
    assert res.exit_code == 0, res.output
    p = dvc(root, "repro")
    assert set(stages_run(p)) == {"import@line2", "teach@line2", "train", "predict", "export", "evaluate", "summary"}, stages_run(p)
    assert "Stage 'import@demo' didn't change, skipping" in p.stdout
    assert "Stage 'teach@demo' didn't change, skipping" in p.stdout
    assert (root / "data/imported/demo.json").read_bytes() == imported_before
    assert (root / "data/teach/line2/labelmaps").is_dir()
    m2 = json.loads((root / "data/eval/metrics.json").read_text())
    assert m2["student"]["images"] > m["student"]["images"]  # the new batch's test images are scored too
    assert stages_run(dvc(root, "repro")) == []


# --- malformed metrics files: one line naming the file, never a traceback ----------------------------------


@pytest.mark.parametrize("metrics", [{"rules": 5}, [1], {"rules": {"box": 3}}, {"rules": {"box": {"epoch": "1", "score": 0.5, "file": "model.pt"}}},
                                     {"rules": {"box": {"epoch": 1, "score": 0.5, "file": "../../elsewhere.pt"}}}])
def test_suite_select_refuses_a_malformed_training_metrics_file(tmp_path: Path, synthetic_batch, metrics) -> None:
    batch_file, _ = synthetic_batch
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "metrics.json").write_text(json.dumps(metrics))
    r = runner.invoke(app, ["suite-select", str(tmp_path / "m"), "--imported", str(batch_file.parent), "--out", str(tmp_path / "s.json")])
    assert r.exit_code == 1 and "Traceback" not in r.output and not (tmp_path / "s.json").exists(), r.output
    assert str(tmp_path / "m") in r.output and ("metrics.json" in r.output or "escapes" in r.output), r.output


@pytest.mark.parametrize("section", [{"student": 3}, {"student": {"miou": 0.5}, "teacher": [1]}, {"student": {"miou": "high"}},
                                     {"student": {"miou": 0.5}, "student_boxes": "x"}])
def test_bench_report_refuses_a_malformed_evaluate_metrics_file(tmp_path: Path, section) -> None:
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(section))
    r = runner.invoke(app, ["bench-report", str(tmp_path / "eval"), "--out", str(tmp_path / "res")])
    assert r.exit_code == 1 and str(tmp_path / "eval" / "metrics.json") in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "res").exists()
    # a training metrics.json that is no object: refused the same way
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"student": {"miou": 0.5}}))
    (tmp_path / "models").mkdir(exist_ok=True)
    (tmp_path / "models" / "metrics.json").write_text("[1]")
    r = runner.invoke(app, ["bench-report", str(tmp_path / "eval"), "--models", str(tmp_path / "models"), "--out", str(tmp_path / "res")])
    assert r.exit_code == 1 and str(tmp_path / "models" / "metrics.json") in r.output, r.output
