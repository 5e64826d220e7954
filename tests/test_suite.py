"""The benchmark suite (pipelines/suite/): boxes and the oracle from masks, results over seeds, the README
sections, and the whole suite end to end on tiny datasets in the Magnetic-Tile layout (`dvc repro` and
`b2p suite`)."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from suite_data import make_folder_dataset
from test_pipeline import _edit_params, _run, dvc, make_project, stages_run
from typer.testing import CliRunner

from b2p.cli import app
from b2p.dataset import load_batch
from b2p.fileio import read_json
from b2p.ingest.from_masks import common_prefix, masks_to_boxes
from b2p.labels import label_map_path, read_label_map
from b2p.pipeline.results import (
    check_readme,
    fmt_stat,
    markers,
    mean_std,
    readme_section,
    readme_sections,
    update_readme,
)

REPO = Path(__file__).resolve().parents[1]
B2P = str(Path(sys.executable).parent / "b2p")
runner = CliRunner()


def _tiny_suite_params(params: Path, **changes: object) -> None:
    """Seconds per stage: 64 px, one epoch, one teacher, one student (+ the oracle, one boxes-only student,
    round 2 of the student and the student distilled from the combined masks)."""
    _edit_params(params, {
        "teachers": ["grabcut"], "students": ["b2p"], "oracle.students": ["b2p"], "boxes_only.students": ["boxes-pairwise"],
        "round2.students": ["b2p"], "distill.students": ["b2p"], "seeds": [1, 2], "split.val": 0.2, "split.test": 0.3, "split.calib": 0.25,
        "masks_to_boxes.free_images": 2,
        "train.epochs": 1, "train.tile_size": 64, "evaluate.worst": 1, "report.speed_images": 2, **changes,
    })
    # a variant that sets its own budget (students/unet.yaml, boxes-pairwise.yaml) would override train.epochs
    for variant in (params.parent / "students").glob("*.yaml"):
        if "epochs" in (yaml.safe_load(variant.read_text()) or {}).get("train", {}):
            _edit_params(variant, {"train.epochs": 1})


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


def test_mean_std_and_format() -> None:
    s = mean_std([0.5, 0.7, None])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1), abs=1e-6) and s["n"] == 2
    assert mean_std([0.4]) == {"mean": 0.4, "std": None, "n": 1}
    assert mean_std([None]) == {"mean": None, "std": None, "n": 0}
    assert fmt_stat(s) == "0.600 ± 0.141" and fmt_stat(mean_std([0.4])) == "0.400" and fmt_stat(None) == "-"


def _tiny_results(name: str, iou: float) -> dict:
    m = {k: {"mean": iou, "std": 0.01, "n": 2} for k in ("miou", "anomaly_miou", "binary_iou", "binary_precision", "binary_recall", "binary_f1")}
    return {"dataset": {"name": name}, "seeds": [1, 2], "total_seconds": 120.0, "command": "b2p suite --root x",
            "machine": {"cpu": "a CPU", "cores": 2, "gpu": None}, "git": {"commit": "0123456789abcdef", "dirty": False},
            "rows": [{"name": "b2p <- grabcut", "seeds": [1, 2], "metrics": m, "train_seconds": {"mean": 60.0, "std": 2.0, "n": 2}}]}


def test_readme_sections_rewritten_and_checked(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    for name, iou in (("parts", 0.5), ("tiles", 0.25)):
        (reports / name).mkdir(parents=True)
        (reports / name / "results.json").write_text(json.dumps(_tiny_results(name, iou)))
    readme = tmp_path / "README.md"
    b, e = markers("parts")
    readme.write_text(f"# x\n\n## Results\n{b}\nold table\n{e}\n\ntext after\n")
    # tiles has no markers: an error showing the lines to add, the README untouched
    res = runner.invoke(app, ["suite-readme", str(reports / "tiles" / "results.json"), "--readme", str(readme)])
    assert res.exit_code == 1 and "b2p-results:tiles begin" in res.output and "old table" in readme.read_text()
    assert check_readme(readme, reports) == [
        f"README section 'parts' differs from {reports / 'parts' / 'results.json'}: run `b2p suite-readme {reports / 'parts' / 'results.json'}`",
        f"{reports / 'tiles' / 'results.json'} has no README section (markers `{markers('tiles')[0]}`)",
    ]
    res = runner.invoke(app, ["suite-readme", str(reports / "parts" / "results.json"), "--readme", str(readme)])
    assert res.exit_code == 0, res.output
    text = readme.read_text()
    assert text.startswith("# x\n\n## Results\n") and text.endswith(f"{e}\n\ntext after\n") and "old table" not in text
    body = readme_sections(text)["parts"]
    assert body == readme_section(_tiny_results("parts", 0.5), "reports/parts")
    assert "| b2p <- grabcut | 0.500 ± 0.010 |" in body and "2 seed(s)" in body and "2.0 min" in body
    # a hand edit inside the section is caught
    readme.write_text(text.replace("0.500 ± 0.010", "0.900 ± 0.010", 1))
    assert any("differs" in p for p in check_readme(readme, reports))
    res = runner.invoke(app, ["suite-readme", str(reports / "parts" / "results.json"), "--readme", str(readme), "--check"])
    assert res.exit_code == 1 and "differs" in res.output
    # the two marker lines the error asks for, added as printed (nothing between them), are filled in
    begin, end = markers("tiles")
    readme.write_text(f"{begin}\n{end}\n")
    res = runner.invoke(app, ["suite-readme", str(reports / "tiles" / "results.json"), "--readme", str(readme)])
    assert res.exit_code == 0, res.output
    assert readme_sections(readme.read_text())["tiles"] == readme_section(_tiny_results("tiles", 0.25), "reports/tiles")


def test_readme_matches_the_committed_reports() -> None:
    """Every generated README section equals what reports/<name>/results.json gives, and every report has one."""
    assert check_readme(REPO / "README.md", REPO / "reports") == []


# --- the suite end to end -------------------------------------------------------------------------------


def _rows(results: dict) -> dict[str, dict]:
    return {r["name"]: r for r in results["rows"]}


@pytest.mark.slow
def test_suite_dvc_repro_on_the_demo_with_seeds_and_oracle(tmp_path: Path) -> None:
    """`dvc repro` of the suite on a tiny demo in the Magnetic-Tile layout: 2 seeds, calib, final masks, the
    oracle, a boxes-only student, round 2, the report."""
    root = make_project(tmp_path, with_pipelines=True)
    folders = make_folder_dataset(tmp_path / "demo-tiles", "MT_", "Free", images=16)
    suite = root / "pipelines" / "suite"
    _tiny_suite_params(suite / "params.yaml", **{"dataset.root": "../../../demo-tiles", "dataset.name": "demo-tiles"})
    p = dvc(root, "repro", "pipelines/suite/dvc.yaml")
    ran = {s.split(":", 1)[1] for s in stages_run(p)}
    steps = ("train", "predict", "finalize", "evaluate")
    assert ran == {"prepare", "import", "teach@grabcut", "teach_boxes_only", "report"} | {
        f"{st}@grabcut-b2p-{s}" for st in steps for s in (1, 2)} | {
        f"{st}_oracle@oracle-b2p-{s}" for st in steps for s in (1, 2)} | {
        f"{st}_boxes_only@boxes-only-boxes-pairwise-{s}" for st in steps for s in (1, 2)} | {
        f"{st}_round2@grabcut-b2p-{s}" for st in steps for s in (1, 2)} | {
        f"{st}_distill@grabcut-b2p-{s}" for st in steps for s in (1, 2)} | {
        f"{st}@grabcut-{s}" for st in ("combine", "evaluate_combine") for s in (1, 2)} | {
        f"{st}@grabcut-b2p-{s}" for st in ("select", "select_distill") for s in (1, 2)}, ran

    out = root / "reports" / "demo-tiles"
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"]["name"] == "demo-tiles" and res["seeds"] == [1, 2]
    assert res["dataset"]["classes"] == sorted(c for c in folders.values() if c != "defect-free")  # MT_ stripped
    rows = _rows(res)
    runs = ["b2p <- grabcut", "b2p <- grabcut, round 2", "b2p <- manual masks (oracle)", "boxes-pairwise <- boxes only"]
    combined = "combined: per class the best final masks on calib (grabcut)"
    distilled = "b2p <- combined masks (grabcut)"
    suffixes = ("", " (+ boxes)", " (final masks)", " (alone, rule chosen on calib)")
    assert list(rows) == ["box fill (the boxes themselves)", "teacher: grabcut"] + [
        f"{r}{suffix}" for r in runs for suffix in suffixes] + [combined] + [f"{distilled}{suffix}" for suffix in suffixes]
    for name in [*runs, distilled]:
        r = rows[name]
        assert r["seeds"] == [1, 2] and set(r["per_seed"]) == {"1", "2"}
        for m, stat in r["metrics"].items():  # the mean and sd really are over the two seeds' evaluations
            vals = [r["per_seed"][s][m] for s in ("1", "2")]
            if None not in vals:
                assert stat["mean"] == pytest.approx(np.mean(vals), abs=1e-6)
                assert stat["std"] == pytest.approx(np.std(vals, ddof=1), abs=1e-6)
        ev = read_json(root / "pipelines/suite/work/eval" / r["teacher"] / r["student"] / "2" / "metrics.json")
        assert r["per_seed"]["2"]["binary_iou"] == ev["student"]["binary_iou"]
        assert rows[f"{name} (final masks)"]["per_seed"]["2"]["binary_iou"] == ev["final"]["binary_iou"]
        assert rows[f"{name} (alone, rule chosen on calib)"]["per_seed"]["2"]["anomaly_miou"] == ev["calibrated"]["anomaly_miou"]
        assert r["train_seconds"]["n"] == 2 and r["epochs_run"] == [1, 1] and r["ms_per_image"] > 0
        assert set(r["per_class_iou"]) == {"background", *res["dataset"]["classes"]}
    assert rows["b2p <- grabcut, round 2"]["student"] == "b2p.round2" and rows["b2p <- grabcut, round 2"]["round"] == 2
    # the distilled student learnt from the combine stage's masks of its seed: its evaluation's "teacher" is
    # exactly those masks (the same test scores as the combined row), its final masks blend them
    assert rows[distilled]["student"] == "b2p.distill" and rows[distilled]["distilled"] and rows[distilled]["kind"] == "student"
    for seed in ("1", "2"):
        ev = read_json(suite / "work/eval/grabcut/b2p.distill" / seed / "metrics.json")
        assert ev["teacher"] == read_json(suite / "work/eval/grabcut/combined" / seed / "metrics.json")["combined"]
        th = read_json(suite / "work/final_distill/grabcut/b2p" / seed / "thresholds.json")
        assert th["sources"]["teacher"] == f"work/combined/grabcut/{seed}" and th["sources"]["probs"] == f"work/predict/grabcut/b2p.distill/{seed}"
    assert "`S <- combined masks (T)`" in readme_section(res, "reports/demo-tiles")
    # the distilled rows are predicted (and their epochs scored) with test-time flips (`distill.tta`), the others not
    for seed in ("1", "2"):
        assert [r["settings"]["tta"] for r in read_json(suite / "work/predict/grabcut/b2p.distill" / seed / "predict.json")["runs"]] == ["flips"]
        assert [r["settings"]["tta"] for r in read_json(suite / "work/predict/grabcut/b2p" / seed / "predict.json")["runs"]] == ["none"]
        assert read_json(suite / "work/select/grabcut/b2p.distill" / f"{seed}.json")["tta"] == "flips"
    assert "predicted with test-time flips" in readme_section(res, "reports/demo-tiles")
    # which epoch is kept: every rule's epoch per seed, scored on test; the saved model's rule (box) scores
    # exactly what its student row does (the same model, window and test images)
    sel = {r["name"]: r for r in res["selection"]}
    assert set(sel) == {"b2p <- grabcut", distilled}
    for name, r in sel.items():
        assert [ru["rule"] for ru in r["rules"]] == ["box", "pseudo", "last"] and [ru["chosen"] for ru in r["rules"]] == [True, False, False]
        assert all(ru["epochs"] == {"1": 1, "2": 1} for ru in r["rules"])  # one epoch: every rule keeps it
        box = r["rules"][0]
        assert box["binary_iou"]["mean"] == pytest.approx(rows[name]["metrics"]["binary_iou"]["mean"], abs=1e-6)
        assert box["anomaly_miou"]["n"] == 2
    assert "Which epoch is kept" in (out / "results.md").read_text() and "| b2p <- grabcut | box * | 1, 1 |" in (out / "results.md").read_text()
    assert "| b2p <- grabcut | box * | 1, 1 |" in readme_section(res, "reports/demo-tiles")  # the README shows it too
    assert rows["boxes-pairwise <- boxes only"]["kind"] == "boxes-only"
    assert rows["boxes-pairwise <- boxes only"]["params"] == read_json(suite / "work/models/boxes-only/boxes-pairwise/1/metrics.json")["params"]
    # the oracle trained on the manual masks: its teacher folder is them, and it never saw the test images
    batch = load_batch(root / "pipelines/suite/work/imported/demo-tiles.json")
    for im in batch.split("test"):
        truth = im.manual_label_map()
        oracle = read_label_map(label_map_path(root / "pipelines/suite/work/teach/oracle", "demo-tiles", im.file_name))
        assert np.array_equal(oracle, truth)
    # calib: manually masked images outside test and train, the one place the final masks' settings come from
    calib = batch.split("calib")
    assert calib and all(im.has_manual_mask for im in calib) and res["dataset"]["images"]["calib"] == len(calib)
    final = suite / "work/final"
    for run, teacher in (("grabcut/b2p", "work/teach/grabcut"), ("grabcut/b2p.round2", "work/final/grabcut/b2p/1"),
                         ("boxes-only/boxes-pairwise", "work/teach/boxes-only"), ("oracle/b2p", None)):
        th = read_json(final / run / "1" / "thresholds.json")
        assert th["calib_images"] == len(calib) and th["sources"]["teacher"] == teacher, (run, th["sources"])
        assert th["sources"]["probs"] == f"work/predict/{run}/1"
        # every boxed image has its final mask (round 2 trains on them; the oracle's: calib and test only),
        # painted inside its boxes only
        for im in batch.split("calib", "test") if run == "oracle/b2p" else batch.images:
            lm = read_label_map(label_map_path(final / run / "1", "demo-tiles", im.file_name))
            inside = np.zeros(lm.shape, bool)
            for x0, y0, x1, y1 in np.asarray(im.boxes_xyxy(), float).reshape(-1, 4):
                inside[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = True
            assert not (lm[~inside] > 0).any()
    assert not any(label_map_path(final / "oracle/b2p/1", "demo-tiles", im.file_name).exists() for im in batch.split("train", "val"))
    # the student alone, its rule chosen on calib, for the images of every split finalize wrote
    st = read_json(suite / "work/calibrated/grabcut/b2p/1/threshold.json")
    assert st["reason"] == "best binary IoU + anomaly mIoU on calib" and len(st["grid"]) == 11 and st["snap_sure"] is None  # --no-student-snap
    assert all(label_map_path(suite / "work/calibrated/grabcut/b2p/1", "demo-tiles", im.file_name).is_file() for im in batch.images)
    # combine: every class taught by a candidate scored on calib, never the oracle; the choice is in the report
    cands = {"box", "grabcut", "grabcut+ctx1", "grabcut+fill0.2", "grabcut+ctx1+fill0.2", "grabcut+rim0.2", "grabcut+rim0.5", "b2p", "b2p.round2", "boxes-only:boxes-pairwise"}
    for seed in ("1", "2"):
        prov = read_json(suite / "work/combined/grabcut" / seed / "demo-tiles/provenance.json")["auto"]
        assert set(prov["iou_on_calib"]) == cands and prov["calib_images"] == len(calib)
        assert rows[combined]["choice"][seed] == prov["choice"] and set(prov["choice"]) == set(res["dataset"]["classes"])
        assert rows[combined]["per_seed"][seed]["binary_iou"] == read_json(suite / "work/eval/grabcut/combined" / seed / "metrics.json")["combined"]["binary_iou"]
    assert rows[combined]["kind"] == "combined" and "source chosen per class" in (out / "results.md").read_text()
    # the oracle's final masks blend no teacher (its folder holds the test masks): alpha 1 for every class
    assert {c["alpha"] for c in read_json(final / "oracle/b2p/1/thresholds.json")["per_class"].values()} == {1.0}
    section = readme_section(res, "reports/demo-tiles")
    assert "| b2p <- grabcut (final masks) |" in section and "| b2p <- grabcut, round 2 (final masks) |" in section
    assert "| boxes-pairwise <- boxes only |" in section and "`(final masks)`" in section and "`round 2`" in section
    assert res["stage_seconds"] is None and "b2p suite" in res["times_note"]  # dvc repro does not time stages
    assert res["machine"]["cores"] >= 1 and res["machine"]["cpu"]
    md = (out / "results.md").read_text()
    assert "| b2p <- manual masks (oracle) |" in md and "| b2p <- grabcut (final masks) |" in md and " ± " in md and "Per-class IoU" in md
    assert stages_run(dvc(root, "repro", "pipelines/suite/dvc.yaml")) == []


@pytest.mark.slow
def test_suite_runner_on_other_folder_names(tmp_path: Path) -> None:
    """`b2p suite --root`: another layout's folder names and class prefix, reported under its own name and classes."""
    root = make_project(tmp_path, with_pipelines=True)
    folders = make_folder_dataset(tmp_path / "Line 7 Parts", "qc-", "OK", images=14, seed=5)
    suite = root / "pipelines" / "suite"
    _tiny_suite_params(suite / "params.yaml")
    _run(root, "git", "add", "-A")
    _run(root, "git", "commit", "-qm", "suite")
    before = (suite / "params.yaml").read_text()
    p = _run(root, B2P, "suite", "--root", str(tmp_path / "Line 7 Parts"), "--set", "seedz=[3]", check=False)
    assert p.returncode == 1 and "no key 'seedz'" in p.stderr and (suite / "params.yaml").read_text() == before
    # a misspelt variant is refused before any stage runs (it would fail only when its training came up)
    p = _run(root, B2P, "suite", "--root", str(tmp_path / "Line 7 Parts"), "--set", "distill.students=[b2p-lit]", check=False)
    assert p.returncode == 1 and "`distill.students` names b2p-lit" in p.stderr and "params.yaml" in p.stderr
    assert (suite / "params.yaml").read_text() == before and not (suite / "work").exists()
    p = _run(root, B2P, "suite", "--root", str(tmp_path / "Line 7 Parts"), "--set", "seeds=[3]")
    assert "done in" in p.stdout, p.stdout
    params = yaml.safe_load((suite / "params.yaml").read_text())
    assert params["dataset"] == {"root": "../../../Line 7 Parts", "name": "line-7-parts"} and params["seeds"] == [3]
    assert "# The benchmark suite's parameters" in (suite / "params.yaml").read_text()  # comments kept

    res = json.loads((root / "reports" / "line-7-parts" / "results.json").read_text())
    classes = sorted(c for c in folders.values() if c != "defect-free")
    assert res["dataset"]["name"] == "line-7-parts" and res["dataset"]["classes"] == classes
    assert res["dataset"]["folders"] == folders and all(not c.startswith("qc") for c in classes)
    assert res["title"].endswith(": line-7-parts")
    rows = _rows(res)
    assert {"teacher: grabcut", "b2p <- grabcut", "b2p <- grabcut (final masks)", "b2p <- grabcut, round 2 (final masks)",
            "b2p <- manual masks (oracle)", "boxes-pairwise <- boxes only (final masks)"} <= set(rows)
    assert rows["b2p <- grabcut"]["seeds"] == [3] and rows["b2p <- grabcut"]["metrics"]["binary_iou"]["std"] is None
    # this runner's record: the command, every stage's wall time, the commit it ran on
    assert res["command"] == f"b2p suite --root '{tmp_path / 'Line 7 Parts'}' --set 'seeds=[3]'"
    steps = ("train", "predict", "finalize", "evaluate")
    assert set(res["stage_seconds"]) == {"prepare", "import", "teach@grabcut", "teach_boxes_only"} | {
        f"{st}{kind}@{run}-3" for st in steps for kind, run in (("", "grabcut-b2p"), ("_oracle", "oracle-b2p"),
                                                               ("_boxes_only", "boxes-only-boxes-pairwise"), ("_round2", "grabcut-b2p"),
                                                               ("_distill", "grabcut-b2p"))} | {
        "combine@grabcut-3", "evaluate_combine@grabcut-3", "select@grabcut-b2p-3", "select_distill@grabcut-b2p-3"}
    assert all(v > 0 for v in res["stage_seconds"].values()) and res["total_seconds"] > 0
    assert res["stage_order"] == "stage count (no earlier stage times)"  # no earlier report of this dataset
    head = _run(root, "git", "rev-parse", "HEAD").stdout.strip()
    assert res["git"] == {"commit": head, "dirty": True}  # params.yaml now names the dataset
    md = (root / "reports" / "line-7-parts" / "results.md").read_text()
    assert re.search(r"\| train@grabcut-b2p-3 \| \d+\.\d \|", md) and "line-7-parts" in md
    assert not list((root / "reports").glob("magnetic-tile*"))
    # a stage that fails stops the runner with one clear line naming its log
    _edit_params(suite / "params.yaml", {"teachers": ["no-such-teacher"]})
    p = _run(root, B2P, "suite", check=False)
    assert p.returncode == 1 and "stage teach@no-such-teacher failed" in p.stderr and "teach_no-such-teacher.log" in p.stderr


def test_stages_with_the_longest_waiting_chain_start_first() -> None:
    from b2p.pipeline.suite import SuiteStage, chain_lengths

    def st(name: str, *after: str) -> SuiteStage:
        return SuiteStage(name, "true", Path("."), [], [], set(after))

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
    from b2p.pipeline.suite import TIMES_FILE, expected_seconds, previous_stage_seconds

    # a stage not run before takes the median of its kind (a new seed), else of all stages
    prev = {"train@a-1": 300.0, "train@a-2": 100.0, "train@a-3": 200.0, "predict@a-1": 10.0}
    est = expected_seconds(["train@a-1", "train@a-4", "predict@a-9", "combine@a-1"], prev)
    assert est == {"train@a-1": 300.0, "train@a-4": 200.0, "predict@a-9": 10.0, "combine@a-1": 150.0}
    assert expected_seconds(["train@a-1"], {}) is None
    suite = tmp_path / "pipelines" / "suite"
    (suite / "work").mkdir(parents=True)
    report = tmp_path / "reports" / "tiles" / "results.json"
    report.parent.mkdir(parents=True)
    assert previous_stage_seconds(suite, "tiles") == ({}, None)
    report.write_text(json.dumps({"stage_seconds": {"train@a-1": 12.5, "bad": "x", "zero": 0}}))
    assert previous_stage_seconds(suite, "tiles") == ({"train@a-1": 12.5}, report.resolve())
    assert previous_stage_seconds(suite, "other") == ({}, None)
    (suite / TIMES_FILE).write_text("{not json")  # unreadable: the report still serves
    assert previous_stage_seconds(suite, "tiles")[1] == report.resolve()
    (suite / TIMES_FILE).write_text(json.dumps({"stage_seconds": {"train@a-1": 7.0}}))  # this folder's own run first
    assert previous_stage_seconds(suite, "tiles") == ({"train@a-1": 7.0}, (suite / TIMES_FILE).resolve())


def test_suite_params_name_only_existing_student_variants(tmp_path: Path) -> None:
    """Every student list of the suite's params is checked against students/<name>.yaml before anything is written."""
    from b2p.errors import B2PError
    from b2p.pipeline.suite import set_dataset

    suite = tmp_path / "suite"
    shutil.copytree(REPO / "pipelines" / "suite" / "students", suite / "students")
    shutil.copy(REPO / "pipelines" / "suite" / "params.yaml", suite / "params.yaml")
    before = (suite / "params.yaml").read_text()
    assert set_dataset(suite, None, None, ["round2.students=[unet]"])[1] == "magnetic-tile"  # a real variant: written
    for spec, said in (("oracle.students=[b2p, nope]", "`oracle.students` names nope"),
                       ("distill.students=b2p-lite", "`distill.students` must be a list"),
                       ("select.students=[b2p-lite]", "`select.students` names b2p-lite, not in `students:`")):
        written = (suite / "params.yaml").read_text()
        with pytest.raises(B2PError, match=said) as e:
            set_dataset(suite, None, None, [spec])
        assert "params.yaml" in str(e.value) and (suite / "params.yaml").read_text() == written
    assert written != before and yaml.safe_load(written)["round2"]["students"] == ["unet"]


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
