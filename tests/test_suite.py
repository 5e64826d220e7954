"""The benchmark suite (`b2p suite`, b2p/pipeline/suite.py): the recipe on a dataset over seeds, one workspace
per seed; boxes and the oracle from masks, results over seeds, the README sections."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from suite_data import make_folder_dataset
from test_pipeline import TINY, _edit_params, _env, _run, dvc, stages_run
from typer.testing import CliRunner

from b2p.cli import app
from b2p.fileio import read_json
from b2p.ingest.from_masks import common_prefix, masks_to_boxes
from b2p.labels import label_map_path, read_label_map
from b2p.pipeline.results import check_text, fmt_stat, mean_std, readme_section

REPO = Path(__file__).resolve().parents[1]
B2P = str(Path(sys.executable).parent / "b2p")
runner = CliRunner()


# --- boxes, class names and the oracle from masks ------------------------------------------------------


def test_common_prefix() -> None:
    assert common_prefix(["MT_Blowhole", "MT_Break", "MT_Free"]) == "MT_"
    assert common_prefix(["def-Crack", "def-Dent"]) == "def-"
    assert common_prefix(["crack_a", "crack_b"]) == "crack_"
    assert common_prefix(["Crack", "Cavity"]) == ""  # no separator: nothing stripped
    assert common_prefix(["MT_Crack"]) == ""


def test_masks_to_boxes_auto_prefix_and_oracle(tmp_path: Path) -> None:
    folders = make_folder_dataset(tmp_path / "ds", "QC-", "Good", images=12)
    r = masks_to_boxes(tmp_path / "ds", tmp_path / "boxes.json", "ds", strip_prefix="auto", oracle_out=tmp_path / "oracle")
    assert r.folders == folders and set(r.categories) == {c for c in folders.values() if c != "defect-free"}
    coco = read_json(tmp_path / "boxes.json")
    cat = {c["name"]: c["id"] for c in coco["categories"]}
    # the oracle holds every image's manual mask with its folder's class id, test images included
    for im in coco["images"]:
        lm = read_label_map(label_map_path(tmp_path / "oracle", "ds", im["file_name"]))
        folder = im["file_name"].split("/")[0]
        raw = read_label_map(tmp_path / "ds" / Path(im["file_name"]).with_suffix(".png")) >= 128
        if folders[folder] == "defect-free":
            assert not lm.any()
        else:
            assert set(np.unique(lm)) <= {0, cat[folders[folder]]}
            # every mask component of at least min_area (10) pixels, and nothing else
            n, comp, stats, _ = cv2.connectedComponentsWithStats(raw.astype(np.uint8), connectivity=8)
            kept = np.isin(comp, [k for k in range(1, n) if stats[k, cv2.CC_STAT_AREA] >= 10])
            assert np.array_equal(lm > 0, kept) and kept.any()


# --- results over seeds and the README ------------------------------------------------------------------


def test_masks_to_boxes_keeps_the_masks_of_a_hashed_share(tmp_path: Path) -> None:
    make_folder_dataset(tmp_path / "ds", "QC-", "Good", images=16)
    r = masks_to_boxes(tmp_path / "ds", tmp_path / "boxes.json", "ds", strip_prefix="auto", masked=0.5)
    coco = read_json(tmp_path / "boxes.json")
    masked = [im["file_name"] for im in coco["images"] if im["has_manual_mask"]]
    assert 0 < len(masked) == r.masked_images < len(coco["images"])
    again = masks_to_boxes(tmp_path / "ds", tmp_path / "boxes2.json", "ds", strip_prefix="auto", masked=0.5)
    assert read_json(tmp_path / "boxes2.json") == coco and again.masked_images == r.masked_images  # the same share every time


# --- results over seeds and the README ------------------------------------------------------------------


def test_mean_std_and_format() -> None:
    s = mean_std([0.5, 0.7, None])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1), abs=1e-6) and s["n"] == 2
    assert mean_std([0.4])["std"] is None and mean_std([None])["mean"] is None
    assert fmt_stat(s) == "0.600 ± 0.141" and fmt_stat(mean_std([0.4])) == "0.400" and fmt_stat(None) == "-"


def _tiny_results(name: str, iou: float) -> dict:
    stat = {"mean": iou, "std": 0.01, "n": 2, "values": [iou - 0.01, iou + 0.01]}
    rows = [{"source": s, "label": s, "seeds": [1, 2], **{m: stat for m in ("miou", "anomaly_miou", "binary_iou", "binary_precision", "binary_recall", "binary_f1")},
             "per_class_iou": {}} for s in ("box", "final", "student")]
    return {"name": name, "seeds": [1, 2], "rows": rows, "command": f"b2p suite --root {name}", "generated": "2026-12-06 10:00 UTC",
            "machine": {"cpu": "a CPU", "cores": 2, "gpu": None}, "git": {"commit": "0123456789abcdef", "dirty": False}}


def test_readme_sections_rewritten_and_checked(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    (reports / "parts").mkdir(parents=True)
    (reports / "parts" / "results.json").write_text(json.dumps(_tiny_results("parts", 0.5)))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- b2p-results:parts begin -->\nold table\n<!-- b2p-results:parts end -->\ntext after\n")
    assert check_text(readme, reports) and "differs" in check_text(readme, reports)[0]
    res = runner.invoke(app, ["suite-readme", str(reports / "parts" / "results.json"), "--readme", str(readme)])
    assert res.exit_code == 0, res.output
    text = readme.read_text()
    assert "old table" not in text and text.endswith("<!-- b2p-results:parts end -->\ntext after\n")
    assert readme_section(_tiny_results("parts", 0.5), "reports/parts") in text and "| final | 0.500 ± 0.010 |" in text
    assert "Reproduce by `b2p suite --root parts`" in text and check_text(readme, reports) == []
    readme.write_text(text.replace("0.500 ± 0.010", "0.900 ± 0.010", 1))  # a hand edit is caught
    res = runner.invoke(app, ["suite-readme", str(reports / "parts" / "results.json"), "--readme", str(readme), "--check"])
    assert res.exit_code == 1 and "differs" in res.output


def test_every_generated_table_matches_the_committed_reports() -> None:
    """Every generated section of the README and of docs/ equals its reports/<name>/results.json."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    assert [p for page in pages for p in check_text(page, REPO / "reports")] == []


# --- the suite end to end -------------------------------------------------------------------------------


def _suite_project(tmp_path: Path) -> Path:
    """A fresh copy of the project (its recipe, params, code, the suite's params) as a git repository."""
    import shutil

    root = tmp_path / "proj"
    root.mkdir(parents=True)
    for f in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / f, root / f)
    shutil.copytree(REPO / "b2p", root / "b2p", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (root / "pipelines" / "suite").mkdir(parents=True)
    shutil.copy(REPO / "pipelines" / "suite" / "params.yaml", root / "pipelines" / "suite" / "params.yaml")
    shutil.copy(REPO / "pipelines" / "suite" / ".gitignore", root / "pipelines" / "suite" / ".gitignore")
    _edit_params(root / "params.yaml", {k: v for k, v in TINY.items() if not k.startswith("demos.")})
    _run(root, "git", "init", "-q")
    _run(root, "git", "add", "-A")
    _run(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    return root


@pytest.mark.slow
def test_the_suite_runs_the_recipe_per_seed_and_leaves_dvc_up_to_date(tmp_path: Path) -> None:
    root = _suite_project(tmp_path)
    ds = tmp_path / "Line 7 Parts"
    make_folder_dataset(ds, "QC-", "Good", images=14, size=64)
    sets = ["seeds=[1,2]", "oracle_seeds=[1,2]", "masks_to_boxes.masked=0.6", "masks_to_boxes.free_images=2", "recipe.students.lite.train.epochs=1"]
    p = _run(root, B2P, "suite", "--root", os.path.relpath(ds, root), *[a for s in sets for a in ("--set", s)])
    home = root / "pipelines" / "suite" / "line-7-parts"
    res = read_json(root / "reports" / "line-7-parts" / "results.json")
    rows = {r["source"]: r for r in res["rows"]}
    assert {"box", "teacher", "combined", "final", "student", "oracle.lite", "oracle.lite.final", "students.bitfit", "distilled.lite.final"} <= set(rows)
    assert all(rows[s]["seeds"] == [1, 2] for s in ("final", "student", "oracle.lite"))
    assert rows["box"]["binary_iou"]["std"] == pytest.approx(0.0, abs=1e-12)  # untrained rows are the same on every seed
    # the seed-free stages ran once: the second workspace copied their outputs
    logs = {f.stem: f.read_text() for f in (home / "logs").glob("*.log")}
    assert logs["seed-2_teachers"].startswith("copied") and not logs["seed-1_teachers"].startswith("copied")
    assert not logs["seed-2_train_bitfit"].startswith("copied")
    # every workspace is a project whose lock records each stage as it finished: `dvc repro` there runs nothing
    for seed in (1, 2):
        ws = home / f"seed-{seed}"
        assert (ws / "dvc.yaml").is_symlink() and yaml.safe_load((ws / "params.yaml").read_text())["base"]["seed"] == seed
        assert stages_run(dvc(ws, "repro")) == [], seed
    md = (root / "reports" / "line-7-parts" / "results.md").read_text()
    assert "shipped student" in md and "seeds 1, 2" in md and (root / "reports" / "line-7-parts" / "history" / "index.md").is_file()
    # a second run (the dataset named by its absolute path now: the same batch) finds everything up to date
    p = _run(root, B2P, "suite", "--root", str(ds), *[a for s in sets for a in ("--set", s)])
    assert "(0 stages run)" in " ".join(p.stdout.split())
    # a user's own batch (COCO + masks) goes through the same recipe, without the oracle
    _run(root, B2P, "suite", "--images", str(ds), "--coco", str(home / "source" / "boxes.json"), "--name", "user-batch",
         "--set", "seeds=[1]", "--set", "recipe.students.lite.train.epochs=1")
    user = {r["source"]: r for r in read_json(root / "reports" / "user-batch" / "results.json")["rows"]}
    assert {"final", "student", "combined"} <= set(user) and not any(s.startswith("oracle") for s in user)
    # as a user would: a fresh project, `b2p add-batch` of that COCO batch under the dataset's name, `dvc repro`:
    # the same final masks and shipped student as the suite's seed 1 (same batch, recipe and seed; one thread)
    user_root = _suite_project(tmp_path / "user")
    _edit_params(user_root / "params.yaml", {"demos": {}, "batches": {}, "base.seed": 1, "students.lite.train.epochs": 1})
    _run(user_root, "dvc", "init", "-q")
    _run(user_root, B2P, "add-batch", str(ds), "--name", "line-7-parts", "--coco", str(home / "source" / "boxes.json"), "--add-classes")
    env = {**_env(user_root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    import subprocess

    p = subprocess.run(["dvc", "repro"], cwd=user_root, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for src in ("final", "student", "combined"):
        mine = read_json(user_root / "data" / "eval" / "metrics" / f"{src}.json")["binary_iou"]
        assert mine == pytest.approx(rows[src]["binary_iou"]["values"][0], abs=1e-9), src


def test_a_bad_suite_setting_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    from b2p.errors import B2PError
    from b2p.pipeline.suite import suite_settings

    (tmp_path / "pipelines" / "suite").mkdir(parents=True)
    (tmp_path / "pipelines" / "suite" / "params.yaml").write_text((REPO / "pipelines" / "suite" / "params.yaml").read_text())
    assert suite_settings(tmp_path, ["seeds=[4, 5]", "oracle_seeds=[4]"])["seeds"] == [4, 5]
    for spec, said in (("seeds=[1, 1]", "distinct"), ("sedes=[1]", "no key 'sedes'"), ("masks_to_boxes.maskd=0.3", "no key")):
        with pytest.raises(B2PError, match=said):
            suite_settings(tmp_path, [spec])
    assert suite_settings(tmp_path, ["recipe.train.epochs=2"])["recipe"]["train"]["epochs"] == 2  # the recipe's keys pass through


def test_stages_with_the_longest_waiting_chain_start_first() -> None:
    from b2p.pipeline.suite import SuiteStage, chain_lengths

    def st(name: str, *after: str) -> SuiteStage:
        return SuiteStage(name, "true", Path("."), [], [], after=set(after))

    # train@a feeds a round 2 (predict -> finalize -> train_round2 -> ...); train@b only an evaluation
    stages = [st("train@b"), st("train@a"), st("predict@b", "train@b"), st("predict@a", "train@a"), st("finalize@a", "predict@a"),
              st("train_round2@a", "finalize@a"), st("evaluate_round2@a", "train_round2@a"), st("evaluate@b", "predict@b")]
    chain = chain_lengths(stages)
    assert chain["train@a"] == 5 and chain["train@b"] == 3 and chain["evaluate@b"] == 1
    assert sorted((s.name for s in stages), key=lambda n: -chain[n])[:2] == ["train@a", "predict@a"]
    # with expected seconds a long stage outweighs a longer chain of short ones: train@b waits on a 100 s evaluation
    cost = {s.name: 1.0 for s in stages} | {"evaluate@b": 100.0}
    chain = chain_lengths(stages, cost)
    assert chain["train@b"] == 102.0 and chain["train@a"] == 5.0
    assert sorted((s.name for s in stages), key=lambda n: -chain[n])[:2] == ["train@b", "predict@b"]


def test_expected_stage_seconds_come_from_the_last_run_or_the_committed_report(tmp_path: Path) -> None:
    from b2p.pipeline.suite import expected_seconds, previous_stage_seconds

    # a stage not run before takes the median of its kind (a new student), else of all stages
    prev = {"train@a": 300.0, "train@b": 100.0, "train@c": 200.0, "predict@a": 10.0}
    est = expected_seconds(["seed-1/train@a", "seed-4/train@d", "seed-2/predict@z", "seed-1/combine"], prev)
    assert est == {"seed-1/train@a": 300.0, "seed-4/train@d": 200.0, "seed-2/predict@z": 10.0, "seed-1/combine": 150.0}
    assert expected_seconds(["train@a"], {}) is None
    own, report = tmp_path / "stage_times.json", tmp_path / "results.json"
    assert previous_stage_seconds([own, report]) == ({}, None)
    report.write_text(json.dumps({"stage_seconds": {"seed-1/train@a": 12.0, "seed-2/train@a": 14.0, "bad": "x", "zero": 0}}))
    assert previous_stage_seconds([own, report]) == ({"train@a": 13.0}, report.resolve())  # the median over seeds
    own.write_text("{not json")  # unreadable: the report still serves
    assert previous_stage_seconds([own, report])[1] == report.resolve()
    own.write_text(json.dumps({"stage_seconds": {"seed-1/train@a": 7.0}}))  # the last run's own record first
    assert previous_stage_seconds([own, report]) == ({"train@a": 7.0}, own.resolve())


def test_git_info_ignores_the_reports_own_outputs(tmp_path: Path) -> None:
    """The runner removes the report's outputs before the report stage runs: they must not mark the tree dirty."""
    from b2p.pipeline.results import git_info

    _run(tmp_path, "git", "init", "-q")
    (tmp_path / "reports" / "x").mkdir(parents=True)
    (tmp_path / "reports" / "x" / "results.json").write_text("{}")
    (tmp_path / "code.py").write_text("a = 1\n")
    _run(tmp_path, "git", "add", "-A")
    _run(tmp_path, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    (tmp_path / "pipelines" / "suite").mkdir(parents=True)
    (tmp_path / "reports" / "x" / "results.json").unlink()
    # asked from the repository's root and, as the report stage does, from the suite's folder
    for where in (tmp_path, tmp_path / "pipelines" / "suite"):
        assert git_info(where)["dirty"] is True
        assert git_info(where, [tmp_path / "reports" / "x"])["dirty"] is False
    (tmp_path / "code.py").write_text("a = 2\n")
    for where in (tmp_path, tmp_path / "pipelines" / "suite"):
        assert git_info(where, [tmp_path / "reports" / "x"])["dirty"] is True


