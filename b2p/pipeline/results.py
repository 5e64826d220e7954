"""`b2p suite-report` and `b2p suite-readme`: the benchmark suite's results, over seeds, and the README
tables generated from them.

The suite (pipelines/suite/dvc.yaml) leaves in its work folder:

- `eval/<teacher>/<student>/<seed>/metrics.json` + `details.json` (`b2p evaluate`: one section per mask
  source: `student`, `student_boxes`, `final`, ..., plus `teacher` and `box`); teacher `oracle` is the manual
  masks, teacher `boxes-only` the boxes alone (students trained without teacher masks), student
  `<student>.round2` that student trained again on its round-1 final masks (same teacher and seed), student
  `<student>.distill` that student trained on the combined masks of the same teacher and seed (its evaluate's
  "teacher" section is those combined masks);
- `models/<teacher>/<student>/<seed>/metrics.json` + `model.pt` (`b2p train`);
- `teach/<teacher>/<batch>/provenance.json`, `imported/<name>.json`, `classes.json`, `raw/boxes.json`;
- `select/<teacher>/<student>/<seed>.json` (`b2p suite-select`, optional): the epoch each `train.select` rule
  keeps, scored on test as the student alone; the "Which epoch is kept" table.

Rows (in this order): the box fill; every teacher (its pseudo-masks); every (teacher, student) and each
mask source evaluate scored for it (`student`: the student alone; `student_boxes`: its box-guided masks;
`final`: its final masks; any further `--source` of the evaluate stage becomes a row the same way), each
student's round 2 right after it; then the oracle rows and the boxes-only rows; then the combined rows
(`eval/<teacher>/combined/<seed>`, the combine stage: b2p/pipeline/combine.py) with the choice per class; last
the students distilled from them. A trained
row holds the mean and the sample standard deviation over its seeds of every metric and of every class's
IoU, and each seed's figures; teacher and box-fill rows are not trained (one value, the same in every run).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path
from typing import Any

from b2p.errors import B2PError
from b2p.fileio import read_json, write_json_atomic, write_text_atomic
from b2p.pipeline.report import METRIC_HEADS, METRICS, measure_speed, speed_images, teacher_seconds_per_image

ORACLE = "oracle"  # the teacher folder holding the manual masks (masks-to-boxes --oracle-out)
BOXES_ONLY = "boxes-only"  # the teacher folder of the students trained from the boxes alone (the filled boxes)
ROUND2 = ".round2"  # student folder suffix: that student trained on its round-1 final masks
DISTILL = ".distill"  # student folder suffix: that student trained on the combined masks of its teacher and seed
COMBINED = "combined"  # eval/<teacher>/combined/<seed>: the combine stage's masks (b2p/pipeline/combine.py)
TEACHER, BOX, STUDENT = "teacher", "box", "student"
SOURCE_SUFFIX = {STUDENT: "", "student_boxes": " (+ boxes)", "final": " (final masks)",
                 "calibrated": " (alone, rule chosen on calib)"}  # other sources: " (<name>)"
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"


# --- statistics ------------------------------------------------------------------------------------------


def mean_std(values: list[float | None]) -> dict[str, float | int | None]:
    """Mean and sample standard deviation (n - 1) of the defined values; std None below two values."""
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return {
        "mean": round(statistics.fmean(v), 6) if v else None,
        "std": round(statistics.stdev(v), 6) if len(v) > 1 else None,
        "n": len(v),
    }


# --- where it ran ----------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """CPU model and cores, GPU (if torch sees one), OS, Python and torch versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "os": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__}


def git_info(where: Path, exclude: list[Path] = ()) -> dict[str, Any]:
    """The commit checked out at `where` and whether the tree had changes (None outside git / before a commit).
    `exclude`: paths whose changes do not count (the report's own outputs: DVC and `b2p suite` remove a
    stage's outputs before running it, so committed results would always read as changed)."""

    def git(*args: str) -> str | None:
        p = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    top = git("rev-parse", "--show-toplevel") if commit else None
    # `top`: the pathspec is from the repository's root (git reads plain ones from `where`, the suite folder)
    spec = [f":(top,exclude){os.path.relpath(Path(e).resolve(), top)}" for e in exclude] if top else []
    status = git("status", "--porcelain", "--untracked-files=no", "--", top, *spec) if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


# --- collecting the runs ---------------------------------------------------------------------------------


def _seed_key(seed: str) -> tuple[int, str]:
    return (int(seed), seed) if seed.isdigit() else (1 << 30, seed)


def _seed(seed: str) -> int | str:
    return int(seed) if seed.isdigit() else seed


def find_suite_runs(work: Path) -> dict[tuple[str, str], dict[str, Path]]:
    """{(teacher, student): {seed: eval dir}} for every work/eval/<teacher>/<student>/<seed>/metrics.json."""
    runs: dict[tuple[str, str], dict[str, Path]] = {}
    for m in sorted(work.glob("eval/*/*/*/metrics.json")):
        seed_dir = m.parent
        runs.setdefault((seed_dir.parent.parent.name, seed_dir.parent.name), {})[seed_dir.name] = seed_dir
    if not runs:
        raise B2PError("no evaluated runs (eval/<teacher>/<student>/<seed>/metrics.json): run the suite first", work)
    return {k: dict(sorted(v.items(), key=lambda kv: _seed_key(kv[0]))) for k, v in runs.items()}


def _load_eval(d: Path) -> dict[str, dict]:
    """evaluate's metrics.json with each source's per-class scores from details.json merged in."""
    metrics = read_json(d / "metrics.json", "evaluation metrics")
    details = read_json(d / "details.json", "evaluation details") if (d / "details.json").is_file() else {}
    if not isinstance(metrics, dict) or not all(isinstance(v, dict) for v in metrics.values()):
        raise B2PError("not a `b2p evaluate` metrics file", d / "metrics.json")
    return {src: {**sec, "per_class": (details.get(src) or {}).get("per_class", {})} for src, sec in metrics.items()}


def _per_class_iou(sec: dict) -> dict[str, float | None]:
    return {c: v.get("iou") for c, v in sec.get("per_class", {}).items()}


def _fixed_row(kind: str, name: str, teacher: str | None, sec: dict) -> dict:
    """A row that is not trained (a teacher's pseudo-masks, the box fill): one value per metric."""
    return {"name": name, "kind": kind, "teacher": teacher, "student": None, "source": kind, "seeds": None,
            "images": sec.get("images"), "metrics": {m: {"mean": sec.get(m), "std": None, "n": 1} for m in METRICS},
            "per_seed": None, "per_class_iou": {c: {"mean": v, "std": None, "n": 1} for c, v in _per_class_iou(sec).items()}}


def run_name(teacher: str, student: str) -> str:
    """'b2p <- grabcut', 'b2p <- grabcut, round 2', 'b2p <- manual masks (oracle)', 'boxes <- boxes only',
    'b2p-lite <- combined masks (grabcut)'."""
    if student == COMBINED:
        return f"combined: per class the best final masks on calib ({teacher})"
    if student.endswith(DISTILL):
        return f"{student.removesuffix(DISTILL)} <- combined masks ({teacher})"
    round2 = student.endswith(ROUND2)
    s = student[: -len(ROUND2)] if round2 else student
    t = {ORACLE: "manual masks (oracle)", BOXES_ONLY: "boxes only"}.get(teacher, teacher)
    return f"{s} <- {t}" + (", round 2" if round2 else "")


def selection_rows(select_root: Path) -> list[dict]:
    """`select/<teacher>/<student>/<seed>.json` per (teacher, student): for each rule the epoch it keeps per
    seed and the test scores of those epochs over the seeds (mean, sd); `chosen` is the saved model's rule."""
    out = []
    for d in sorted(p for p in select_root.glob("*/*") if p.is_dir()):
        files = sorted(d.glob("*.json"), key=lambda f: _seed_key(f.stem))
        if not files:
            continue
        per_seed = {f.stem: read_json(f, "rule scores") for f in files}
        first = next(iter(per_seed.values()))
        split = first.get("split", "test")
        rules = []
        for rule in first["rules"]:
            got = [r["rules"].get(rule) for r in per_seed.values()]
            if any(g is None for g in got):
                raise B2PError(f"rule {rule!r} is scored for some seeds only: rerun `b2p suite-select` for every seed", d)
            rules.append({"rule": rule, "chosen": rule == first.get("select"), "epochs": {s: r["rules"][rule]["epoch"] for s, r in per_seed.items()},
                          **{m: mean_std([g[split][m] for g in got]) for m in ("binary_iou", "anomaly_miou")}})
        out.append({"teacher": d.parent.name, "student": d.name, "name": run_name(d.parent.name, d.name), "split": split, "rules": rules})
    return out


def combine_choices(root: Path, seeds: dict[str, Path]) -> dict[str, dict[str, str]]:
    """{seed: {class: chosen candidate}} from the combine stage's provenance (ROOT/<seed>/<batch>/provenance.json)."""
    out: dict[str, dict[str, str]] = {}
    for seed in seeds:
        for prov in sorted((root / seed).glob("*/provenance.json")):
            choice = (read_json(prov, "combine provenance").get("auto") or {}).get("choice")
            if not isinstance(choice, dict):
                raise B2PError("no per-class choice recorded (was it taught with --teacher auto?)", prov)
            out.setdefault(seed, {}).update(choice)
    return out


def _trained_rows(teacher: str, student: str, evals: dict[str, dict], models: Path) -> list[dict]:
    """One row per mask source of this (teacher, student), aggregated over its seeds."""
    seeds = list(evals)
    train = {s: read_json(models / teacher / student / s / "metrics.json", "training metrics")
             for s in seeds if (models / teacher / student / s / "metrics.json").is_file()}
    first = next(iter(evals.values()))
    sources = [k for k in first if k not in (TEACHER, BOX)]
    rows = []
    for src in sources:
        missing = [s for s in seeds if src not in evals[s]]
        if missing:
            raise B2PError(f"source {src!r} of {teacher}/{student} was not scored for seed(s) {missing}", models.parent / "eval")
        base = run_name(teacher, student)
        per_seed = {s: {m: evals[s][src].get(m) for m in METRICS} for s in seeds}
        classes = list(_per_class_iou(evals[seeds[0]][src]))
        rows.append({
            "name": base + ("" if student == COMBINED else SOURCE_SUFFIX.get(src, f" ({src})")),
            "kind": COMBINED if student == COMBINED else {ORACLE: ORACLE, BOXES_ONLY: BOXES_ONLY}.get(teacher, STUDENT),
            "round": 2 if student.endswith(ROUND2) else 1,
            "distilled": student.endswith(DISTILL),
            "teacher": teacher, "student": student, "source": src, "seeds": [_seed(s) for s in seeds],
            "images": evals[seeds[0]][src].get("images"),
            "metrics": {m: mean_std([per_seed[s][m] for s in seeds]) for m in METRICS},
            "per_seed": per_seed,
            "per_class_iou": {c: mean_std([_per_class_iou(evals[s][src]).get(c) for s in seeds]) for c in classes},
        })
        if src == STUDENT and train:  # the training figures, once per model (not on its other sources' rows)
            rows[-1].update(train_seconds=mean_std([t.get("train_seconds") for t in train.values()]),
                            epochs_run=[t.get("epochs_run") for t in train.values()], params=next(iter(train.values())).get("params"))
    return rows


def collect_results(
    work: str | Path,
    name: str,
    root: str,
    params_file: str | Path,
    times: dict | None = None,
    speed_n: int = 0,
    device: str = "auto",
    title: str = "b2p benchmark",
    out: str | Path | None = None,
) -> dict:
    """The suite's results as a JSON-able dict (module docstring); `times` is `b2p suite`'s record."""
    import yaml

    work, params_file = Path(work), Path(params_file)
    params = yaml.safe_load(params_file.read_text()) or {}
    runs = find_suite_runs(work)
    order = {t: i for i, t in enumerate([*params.get("teachers", []), ORACLE, BOXES_ONLY])}
    s_order = {s: i for i, s in enumerate([*params.get("students", []), *(params.get("boxes_only") or {}).get("students", [])])}

    def key(k: tuple[str, str]) -> tuple:
        base = k[1].removesuffix(ROUND2).removesuffix(DISTILL)
        last = 2 if k[1].endswith(DISTILL) else int(k[1] == COMBINED)  # combined rows, then the students taught by them
        return last, order.get(k[0], len(order)), k[0], s_order.get(base, len(s_order)), base, k[1].endswith(ROUND2)

    keys = sorted(runs, key=key)
    evals = {k: {s: _load_eval(d) for s, d in runs[k].items()} for k in keys}

    rows: list[dict] = []
    any_run = next(iter(next(iter(evals.values())).values()))
    if BOX in any_run:
        rows.append(_fixed_row("box", "box fill (the boxes themselves)", None, any_run[BOX]))
    # round 2's "teacher" section is round 1's final masks, a distilled student's the combined masks, the
    # boxes-only one the box fill (its own row)
    round1 = [k for k in keys if not k[1].endswith((ROUND2, DISTILL))]
    for t in dict.fromkeys(k[0] for k in round1 if k[0] not in (ORACLE, BOXES_ONLY)):
        first = next(iter(evals[next(k for k in round1 if k[0] == t)].values()))
        if TEACHER in first:
            row = _fixed_row(TEACHER, f"teacher: {t}", t, first[TEACHER])
            row["seconds_per_image"] = teacher_seconds_per_image(work / "teach" / t)
            rows.append(row)
    for k in keys:
        rows += _trained_rows(k[0], k[1], evals[k], work / "models")
        if k[1] == COMBINED:
            rows[-1]["choice"] = combine_choices(work / COMBINED / k[0], runs[k])

    if speed_n:  # inference time of each trained student (its first seed's model), one image per pass
        images = speed_images(work / "imported", str(params.get("evaluate", {}).get("split", "test")), speed_n)
        for k in [k for k in keys if k[1] != COMBINED]:  # the combined masks have no model
            model_dir = work / "models" / k[0] / k[1] / next(iter(runs[k]))
            if not (model_dir / "model.pt").is_file():
                raise B2PError("no model.pt to time", model_dir)
            ms = measure_speed(model_dir, images, device)
            for r in rows:
                if (r["teacher"], r["student"]) == k and r["source"] == STUDENT:
                    r["ms_per_image"] = ms["ms_per_image"]
                    r["speed_device"] = ms["device"]

    batch = read_json(work / "imported" / f"{name}.json", "imported batch")
    splits: dict[str, int] = {}
    for im in batch.get("images", []):
        splits[im.get("split", "?")] = splits.get(im.get("split", "?"), 0) + 1
    boxes_info = read_json(work / "raw" / "boxes.json", "simulated boxes").get("info", {}) if (work / "raw" / "boxes.json").is_file() else {}
    students = {s: (yaml.safe_load((params_file.parent / "students" / f"{s}.yaml").read_text()) or {}).get("train", {})
                for s in dict.fromkeys([*params.get("students", []), *(params.get("oracle") or {}).get("students", []),
                                        *(params.get("boxes_only") or {}).get("students", []), *(params.get("round2") or {}).get("students", []),
                                        *(params.get("distill") or {}).get("students", [])])
                if (params_file.parent / "students" / f"{s}.yaml").is_file()}
    return {
        "title": f"{title}: {name}",
        "dataset": {"name": name, "root": root, "classes": [c["name"] for c in read_json(work / "classes.json", "class list")["classes"]],
                    "folders": boxes_info.get("folders"), "images": splits, "test_images_scored": any_run[BOX]["images"] if BOX in any_run else None},
        "seeds": params.get("seeds"),
        "metrics": list(METRICS),
        "rows": rows,
        "selection": selection_rows(work / "select") if (work / "select").is_dir() else [],
        "machine": machine_info(),
        "git": git_info(params_file.parent, [Path(out)] if out is not None else []),
        "command": (times or {}).get("command"),
        "jobs": (times or {}).get("jobs"),
        "threads_per_stage": (times or {}).get("threads_per_stage"),
        "stage_order": (times or {}).get("order"),
        "stage_seconds": (times or {}).get("stage_seconds"),
        "total_seconds": (times or {}).get("total_seconds"),
        "times_note": None if times else "stage wall times are recorded by `b2p suite` (not by `dvc repro`)",
        "params": params,
        "student_variants": students,
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# --- Markdown --------------------------------------------------------------------------------------------


def fmt_stat(stat: dict | None, digits: int = 3) -> str:
    """'0.465 ± 0.012' (std over seeds), '0.465' for one value, '-' when undefined."""
    if not stat or stat.get("mean") is None:
        return "-"
    s = f"{stat['mean']:.{digits}f}"
    return s if stat.get("std") is None else f"{s} ± {stat['std']:.{digits}f}"


def _seconds(s: float | None) -> str:
    return "-" if s is None else f"{s:.0f} s ({s / 60:.1f} min)"


def headline_table(results: dict) -> list[str]:
    """The main table: one line per row, every metric as mean ± sd over seeds."""
    heads = ["row", *METRIC_HEADS, "seeds", "train s", "ms / image"]
    lines = ["| " + " | ".join(heads) + " |", "|" + " --- |" * len(heads)]
    for r in results["rows"]:
        speed = r.get("ms_per_image")
        if speed is None and r.get("seconds_per_image") is not None:
            speed = 1000.0 * r["seconds_per_image"]
        cells = [r["name"], *(fmt_stat(r["metrics"][m]) for m in METRICS), str(len(r["seeds"])) if r["seeds"] else "-",
                 fmt_stat(r.get("train_seconds"), 0), "-" if speed is None else f"{speed:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _where(results: dict) -> str:
    m, g = results["machine"], results["git"]
    gpu = m["gpu"] or "no GPU"
    commit = (g["commit"] or "no commit")[:10] + (" (uncommitted changes)" if g.get("dirty") else "")
    return f"{m['cpu']}, {m['cores']} cores, {gpu}; commit {commit}"


def selection_table(results: dict) -> list[str]:
    """The "Which epoch is kept" table (results["selection"], `b2p suite-select`), with its legend."""
    lines = ["Which epoch is kept (`train.select`): the epoch each rule keeps on val (per seed), scored on test as the student "
             "alone (`b2p suite-select`); `*`: the rule the saved model follows. `box`: the teacher-free box-fit score; "
             "`pseudo`: val anomaly mIoU against the pseudo-masks (rewards copying them); `last`: the last epoch.", "",
             "| row | rule | epoch by seed | binary IoU | anomaly mIoU |", "| --- | --- | --- | --- | --- |"]
    for r in results.get("selection") or []:
        for i, ru in enumerate(r["rules"]):
            lines.append(f"| {r['name'] if i == 0 else ''} | {ru['rule']}{' *' if ru['chosen'] else ''} | "
                         + ", ".join(str(e) for e in ru["epochs"].values()) + f" | {fmt_stat(ru['binary_iou'])} | {fmt_stat(ru['anomaly_miou'])} |")
    return lines


def results_markdown(results: dict) -> str:
    ds = results["dataset"]
    seeds = results.get("seeds") or []
    lines = [f"# {results['title']}", ""]
    folders = ", ".join(f"{f} -> {c}" for f, c in (ds.get("folders") or {}).items())
    lines += [
        f"Dataset `{ds['name']}` ({ds['root']}): classes {', '.join(ds['classes'])}"
        + (f" (folders {folders})" if folders else "") + "; images per split "
        + ", ".join(f"{k} {v}" for k, v in sorted(ds["images"].items())) + f"; {ds['test_images_scored']} manually masked test images scored.",
        "",
        f"Trained rows: mean ± sample standard deviation over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); "
        "teacher and box-fill rows are not trained (one value). `(+ boxes)`: the student's box-guided masks; "
        "`(final masks)`: its probabilities blended with its teacher inside each box, settings per class chosen on the "
        "calib split; `round 2`: the student trained again on its round-1 final masks; `boxes only`: trained from the "
        "boxes alone (no teacher masks); `oracle`: the same student trained on the manual masks of the train / val split "
        "(the fully supervised ceiling); `(alone, rule chosen on calib)`: the student alone with the argmax, a p(defect) "
        "threshold or the argmax with per-class offsets, chosen on calib; `combined`: per class the best on calib of the "
        "box, GrabCut and every non-oracle final mask of the seed; `S <- combined masks`: student S trained on those "
        "combined masks (its final masks blend them"
        + ("" if distill_tta(results) == "none" else f"; predicted with test-time {distill_tta(results)}, `distill.tta`")
        + "). `ms / image`: student inference (batch 1, one plain forward pass) or the teacher's time per image.",
        "",
        *headline_table(results),
        "",
        "Per-class IoU",
        "",
    ]
    classes = list(results["rows"][0]["per_class_iou"]) if results["rows"] else []
    lines += ["| row | " + " | ".join(classes) + " |", "|" + " --- |" * (len(classes) + 1)]
    for r in results["rows"]:
        lines.append(f"| {r['name']} | " + " | ".join(fmt_stat(r["per_class_iou"].get(c)) for c in classes) + " |")
    for r in results["rows"]:
        if r.get("choice"):
            lines += ["", f"{r['name']}: the source chosen per class, by seed", "",
                      "| seed | " + " | ".join(classes[1:]) + " |", "|" + " --- |" * len(classes)]
            lines += [f"| {seed} | " + " | ".join(ch.get(c, "-") for c in classes[1:]) + " |" for seed, ch in r["choice"].items()]
    if results.get("selection"):
        lines += ["", *selection_table(results)]
    lines += ["", f"Machine: {_where(results)}; generated {results['generated']}.", ""]
    if results.get("stage_seconds"):
        lines += [f"Command: `{results['command']}` ({results['jobs']} stages side by side, "
                  f"{results['threads_per_stage']} thread(s) each"
                  + (f"; the ready stage with the longest waiting chain first, by {results['stage_order']}" if results.get("stage_order") else "")
                  + f"). Total wall time {_seconds(results['total_seconds'])}.", "",
                  "| stage | wall s |", "| --- | --- |"]
        lines += [f"| {k} | {v:.1f} |" for k, v in results["stage_seconds"].items()]
    else:
        lines.append(f"Stage wall times: not recorded ({results['times_note']}).")
    return "\n".join(lines) + "\n"


def write_results(results: dict, out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    write_json_atomic(out / RESULTS_JSON, results)
    write_text_atomic(out / RESULTS_MD, results_markdown(results))
    return out / RESULTS_JSON, out / RESULTS_MD


# --- the README's generated sections ---------------------------------------------------------------------


def markers(name: str) -> tuple[str, str]:
    return f"<!-- b2p-results:{name} begin (generated by `b2p suite-readme`; do not edit) -->", f"<!-- b2p-results:{name} end -->"


_LEGEND = (  # (present when, what it says)
    (lambda r: r.get("source") == "student_boxes", "`(+ boxes)`: the student's box-guided masks"),
    (lambda r: r.get("source") == "final", "`(final masks)`: the student's probabilities blended with its teacher inside "
     "each box, settings per class chosen on the calib split (`b2p finalize`)"),
    (lambda r: r.get("round") == 2, "`round 2`: the student trained again on its round-1 final masks"),
    (lambda r: r.get("kind") == BOXES_ONLY, "`boxes only`: trained from the boxes alone (no teacher masks)"),
    (lambda r: r.get("source") == "calibrated", "`(alone, rule chosen on calib)`: the student alone (no boxes), pixels "
     "labelled by the argmax, a p(defect) threshold, or the argmax with per-class offsets fitted on calib, whichever "
     "has the best binary IoU + anomaly mIoU on calib"),
    (lambda r: r.get("kind") == ORACLE, "`oracle`: trained on the manual masks (the fully supervised ceiling)"),
    (lambda r: r.get("kind") == COMBINED, "`combined`: per class, the best on calib of the box, GrabCut and every "
     "non-oracle student's final masks of the same seed (`b2p suite-combine`)"),
    (lambda r: r.get("distilled"), "`S <- combined masks (T)`: student S trained on those combined masks of the same "
     "seed (`distill.students:`; its final masks blend them)"),
)


def distill_tta(results: dict) -> str:
    """The test-time augmentation the distilled rows were predicted with (params `distill.tta`; none before it)."""
    return str(((results.get("params") or {}).get("distill") or {}).get("tta") or "none")


def legend(results: dict) -> str:
    """One line naming what the row suffixes of these results mean ('' when no row has one)."""
    parts = [text for present, text in _LEGEND if any(present(r) for r in results["rows"])]
    if distill_tta(results) != "none" and any(r.get("distilled") for r in results["rows"]):
        parts.append(f"the distilled rows are predicted with test-time {distill_tta(results)} (`distill.tta`; their "
                     "`ms / image` is one plain forward pass)")
    return ("Rows `S <- T`: student S trained on teacher T's masks; " + "; ".join(parts) + ".") if parts else ""


def readme_section(results: dict, results_dir: str) -> str:
    """What the README shows between a dataset's markers: the headline table and where it came from."""
    seeds = results.get("seeds") or []
    total = results.get("total_seconds")
    lines = [
        f"{len(seeds)} seed(s) per trained row (mean ± sd); {_where(results)}"
        + (f"; the whole suite in {_seconds(total)}" if total is not None else "")
        + (f" (`{results['command']}`)" if results.get("command") else "")
        + f". Per-class IoU and every stage's wall time: `{results_dir}/{RESULTS_MD}`.",
        "",
        *headline_table(results),
    ]
    if legend(results):
        lines += ["", legend(results)]
    if results.get("selection"):
        lines += ["", *selection_table(results)]
    return "\n".join(lines)


# the body may be empty: the two marker lines the error message asks for, one under the other
_SECTION = re.compile(r"<!-- b2p-results:([A-Za-z0-9_.-]+) begin [^>]*-->\n(?:(.*?)\n)?<!-- b2p-results:\1 end -->", re.S)


def readme_sections(readme_text: str) -> dict[str, str]:
    """{dataset name: current section text} for every marker pair in the README."""
    return {m.group(1): m.group(2) or "" for m in _SECTION.finditer(readme_text)}


def update_readme(readme: str | Path, results_files: list[str | Path]) -> list[str]:
    """Rewrite each dataset's README section from its results.json; returns the names updated.

    A dataset whose markers are not in the README is an error that shows the two lines to add.
    """
    readme = Path(readme)
    text = readme.read_text()
    done = []
    for f in results_files:
        f = Path(f)
        results = read_json(f, "suite results")
        name = results["dataset"]["name"]
        begin, end = markers(name)
        if name not in readme_sections(text):
            raise B2PError(f"no section for {name!r}: add these two lines where its table goes:\n{begin}\n{end}", readme)
        body = readme_section(results, os.path.relpath(f.parent, readme.parent))
        text = _SECTION.sub(lambda m: f"{begin}\n{body}\n{end}" if m.group(1) == name else m.group(0), text)
        done.append(name)
    write_text_atomic(readme, text)
    return done


def check_readme(readme: str | Path, reports_dir: str | Path) -> list[str]:
    """Problems between the README's generated sections and reports/<name>/results.json ([] when in sync)."""
    readme, reports_dir = Path(readme), Path(reports_dir)
    sections = readme_sections(readme.read_text())
    problems = []
    files = {p.parent.name: p for p in sorted(reports_dir.glob(f"*/{RESULTS_JSON}"))}
    for name, body in sections.items():
        if name not in files:
            problems.append(f"README section {name!r} has no {reports_dir}/{name}/{RESULTS_JSON}")
            continue
        expected = readme_section(read_json(files[name], "suite results"), os.path.relpath(files[name].parent, readme.parent))
        if body != expected:
            problems.append(f"README section {name!r} differs from {files[name]}: run `b2p suite-readme {files[name]}`")
    problems += [f"{f} has no README section (markers `{markers(n)[0]}`)" for n, f in files.items() if n not in sections]
    return problems
