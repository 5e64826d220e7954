"""The suite's report: every row of the recipe's evaluation, mean and spread over seeds.

Each seed's workspace (b2p/pipeline/suite.py) holds what the recipe wrote: data/eval/metrics/<source>.json
and data/eval/details.json (every row's headline and per-class scores, `b2p evaluate`), the oracle's in
data/eval_oracle/, the choices (data/teachers, data/combined, data/final and data/model choice.json) and
every model's training record. results.json keeps all of it plus the machine, the commit, the command and
every stage's time; results.md is the same as tables. reports/<name>/history/ keeps one copy of
results.json per run and an index (date, commit, machine, headline rows).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path
from typing import Any

from b2p.errors import B2PError
from b2p.fileio import read_json, write_json_atomic, write_text_atomic

METRICS = ("miou", "anomaly_miou", "binary_iou", "binary_precision", "binary_recall", "binary_f1")
HEADS = ("mIoU", "anomaly mIoU", "binary IoU", "binary P", "binary R", "binary F1")
# the headline rows, in table order (whichever exist)
HEADLINE = ("box", "teacher", "combined", "final", "student")
HISTORY = "history"
LEGACY = "legacy"  # history/legacy/: results of the suite before it ran the recipe (another format)


def row_label(source: str) -> str:
    """A readable row name for an evaluate source of the recipe."""
    fixed = {"box": "box fill (the boxes themselves)", "teacher": "teacher (per class on calib)",
             "combined": "combined: per class the best final masks on calib", "final": "final masks (exported)",
             "student": "shipped student alone (rule chosen on calib)"}
    if source in fixed:
        return fixed[source]
    parts = source.split(".")
    if parts[0] == "teachers":
        return f"teacher: {'.'.join(parts[1:])}"
    group = {"students": "{m} <- teacher", "distilled": "{m} <- combined masks", "oracle": "{m} <- manual masks (oracle)"}.get(parts[0])
    if group is None or len(parts) < 2:
        return source
    kind = {None: "alone (rule chosen on calib)", "argmax": "alone (argmax)", "final": "final masks"}[parts[2] if len(parts) > 2 else None]
    return f"{group.format(m=parts[1])}, {kind}"


def mean_std(values: list[float | None]) -> dict[str, Any]:
    """{"mean", "std" (sample; None for one value), "n", "values"} of the values that are defined."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None, "n": 0, "values": list(values)}
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else None, "n": len(v), "values": list(values)}


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
    """The commit checked out at `where` and whether the tree had changes (None outside git). `exclude`:
    paths whose changes do not count (the report's own outputs)."""

    def git(*args: str) -> str | None:
        p = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    top = git("rev-parse", "--show-toplevel") if commit else None
    spec = [f":(top,exclude){os.path.relpath(Path(e).resolve(), top)}" for e in exclude] if top else []
    status = git("status", "--porcelain", "--untracked-files=no", "--", top, *spec) if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _seed_eval(ws: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """({source: headline scores}, {source: per-class IoU}) of one workspace, the oracle's included."""
    rows, per_class = {}, {}
    for folder in (ws / "data" / "eval", ws / "data" / "eval_oracle"):
        for p in sorted((folder / "metrics").glob("*.json")):
            rows[p.stem] = read_json(p, "evaluate metrics")
        details = folder / "details.json"
        if details.is_file():
            for src, sec in read_json(details, "evaluate details").items():
                if src != "noise":
                    per_class[src] = {n: v.get("iou") for n, v in sec.get("per_class", {}).items()}
    return rows, per_class


def _choices(ws: Path) -> dict[str, Any]:
    def choice(rel: str, key: str = "choice"):
        p = ws / "data" / rel / "choice.json"
        return read_json(p, "choice").get(key) if p.is_file() else None

    return {"teacher": choice("teachers"), "combined": choice("combined"), "final": choice("final"), "shipped": choice("model", "chosen")}


def _train_seconds(ws: Path) -> dict[str, float]:
    out = {}
    for m in sorted((ws / "data").glob("*/*/model/metrics.json")):
        rec = read_json(m, "training record")
        if rec.get("train_seconds") is not None:
            out[f"{m.parent.parent.parent.name}.{m.parent.parent.name}"] = float(rec["train_seconds"])
    return out


def collect_results(workspaces: dict[int, Path], name: str, settings: dict, times: dict | None, source: str) -> dict:
    """results.json's content from every seed's workspace (module docstring)."""
    per_seed = {seed: _seed_eval(ws) for seed, ws in workspaces.items()}
    seeds = list(workspaces)
    if not any(rows for rows, _ in per_seed.values()):
        raise B2PError("no workspace has evaluate scores (data/eval/metrics): nothing to report", next(iter(workspaces.values())))
    sources = list(dict.fromkeys(s for rows, _ in per_seed.values() for s in rows))
    order = [s for s in HEADLINE if s in sources] + [s for s in sources if s not in HEADLINE]
    rows = []
    for src in order:
        row = {"source": src, "label": row_label(src), "seeds": [s for s in seeds if src in per_seed[s][0]]}
        for m in METRICS:
            row[m] = mean_std([per_seed[s][0].get(src, {}).get(m) for s in seeds])
        classes = list(dict.fromkeys(c for s in seeds for c in per_seed[s][1].get(src, {})))
        row["per_class_iou"] = {c: mean_std([per_seed[s][1].get(src, {}).get(c) for s in seeds]) for c in classes}
        row["images"] = next((per_seed[s][0][src].get("images") for s in seeds if src in per_seed[s][0]), None)
        rows.append(row)
    first = next(iter(workspaces.values()))
    project = first.parents[3]
    return {
        "name": name,
        "title": f"b2p suite: {name}",
        "source": source,
        "seeds": seeds,
        "rows": rows,
        "choices": {str(s): _choices(ws) for s, ws in workspaces.items()},
        "train_seconds": {str(s): _train_seconds(ws) for s, ws in workspaces.items()},
        "settings": settings,
        "machine": machine_info(),
        "git": git_info(project, [project / "reports" / name]),
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **({"command": times["command"], "jobs": times["jobs"], "total_seconds": times["total_seconds"],
            "stages_run": times["stages_run"], "stage_seconds": times["stage_seconds"], "order": times.get("order")} if times else {}),
    }


def fmt_stat(stat: dict | None, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    text = f"{stat['mean']:.{digits}f}"
    return text + (f" ± {stat['std']:.{digits}f}" if stat.get("std") is not None else "")


def headline_table(results: dict, headline_only: bool = True) -> list[str]:
    rows = [r for r in results["rows"] if not headline_only or r["source"] in HEADLINE or r["source"].startswith("oracle.")]
    lines = ["| row | " + " | ".join(HEADS) + " | seeds |", "| --- |" + " --- |" * (len(HEADS) + 1)]
    for r in rows:
        lines.append(f"| {r['label']} | " + " | ".join(fmt_stat(r[m]) for m in METRICS) + f" | {len(r['seeds'])} |")
    return lines


def per_class_table(results: dict) -> list[str]:
    classes = list(dict.fromkeys(c for r in results["rows"] for c in r["per_class_iou"]))
    lines = ["| row | " + " | ".join(classes) + " |", "| --- |" + " --- |" * len(classes)]
    for r in results["rows"]:
        lines.append(f"| {r['label']} | " + " | ".join(fmt_stat(r["per_class_iou"].get(c)) for c in classes) + " |")
    return lines


def choice_table(results: dict) -> list[str]:
    lines = ["| seed | teacher per class | combined per class | final per class | shipped student |", "| --- | --- | --- | --- | --- |"]
    for seed, c in results["choices"].items():
        cells = [", ".join(f"{k}: {v}" for k, v in (c[key] or {}).items()) or "-" for key in ("teacher", "combined", "final")]
        lines.append(f"| {seed} | " + " | ".join(cells) + f" | {c['shipped'] or '-'} |")
    return lines


def results_markdown(results: dict) -> str:
    m = results["machine"]
    seeds = ", ".join(str(s) for s in results["seeds"])
    out = [f"# {results['title']}", "",
           f"The recipe (the project's dvc.yaml) on `{results['source']}`, seeds {seeds}: mean ± sample standard deviation "
           "over seeds (one value: no spread). Every score is one confusion matrix over the manually masked test images.", "",
           "## Headline", "", *headline_table(results), "",
           "## Every row", "", *headline_table(results, headline_only=False), "",
           "## Per-class IoU", "", *per_class_table(results), "",
           "## What calib chose", "", *choice_table(results), ""]
    commit = (results["git"].get("commit") or "?")[:10] + (" (uncommitted changes)" if results["git"].get("dirty") else "")
    out.append(f"Machine: {m['cpu']}, {m['cores']} cores, {'GPU ' + m['gpu'] if m['gpu'] else 'no GPU'}; commit {commit}; "
               f"generated {results['generated']}.")
    if results.get("command"):
        out += ["", f"Command: `{results['command']}` ({results['jobs']} stages side by side; {results['stages_run']} stages run). "
                    f"Total wall time {results['total_seconds']:.0f} s ({results['total_seconds'] / 60:.1f} min)."]
    return "\n".join(out) + "\n"


def write_results(results: dict, out: str | Path) -> tuple[Path, Path]:
    """OUT/results.json, OUT/results.md, and a copy under OUT/history/ with its index."""
    out = Path(out)
    j, md = out / "results.json", out / "results.md"
    write_json_atomic(j, results)
    write_text_atomic(md, results_markdown(results))
    stamp = re.sub(r"[^0-9]", "", results["generated"])[:12]
    commit = (results["git"].get("commit") or "nocommit")[:10]
    write_json_atomic(out / HISTORY / f"{stamp}-{commit}.json", results)
    write_text_atomic(out / HISTORY / "index.md", history_index(out / HISTORY))
    return j, md


def history_index(folder: Path) -> str:
    """One line per recorded run: date, commit, machine, seeds, the headline rows' binary IoU / anomaly mIoU."""
    lines = ["# Run history", "", "Generated from the results files in this folder (`b2p suite` adds one per run).", "",
             "| run | date | commit | machine | seeds | " + " | ".join(HEADLINE) + " |",
             "| --- | --- | --- | --- | --- |" + " --- |" * len(HEADLINE)]
    for p in sorted(folder.glob("*.json"), reverse=True):
        try:
            r = read_json(p, "results")
            by = {row["source"]: row for row in r["rows"]}
            cells = [f"{fmt_stat(by[s]['binary_iou'])} / {fmt_stat(by[s]['anomaly_miou'])}" if s in by else "-" for s in HEADLINE]
            lines.append(f"| [{p.stem}]({p.name}) | {r['generated']} | {(r['git'].get('commit') or '?')[:10]} | {r['machine']['cpu']} | "
                         f"{', '.join(map(str, r['seeds']))} | " + " | ".join(cells) + " |")
        except (B2PError, KeyError, TypeError):
            lines.append(f"| {p.stem} | (not a results file of this format) | | | | " + " | " * (len(HEADLINE) - 1) + " |")
    legacy = sorted((folder / LEGACY).glob("*.json"), reverse=True)
    if legacy:
        lines += ["", "## Before the suite ran the recipe", "",
                  "The suite's own stages (pipelines/suite/dvc.yaml, since replaced): other rows, named as in each file; "
                  "each file's Markdown twin is beside it.", "",
                  "| run | date | commit | machine | seeds | wall min | rows |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for p in legacy:
            try:
                r = read_json(p, "results")
                wall = f"{r['total_seconds'] / 60:.1f}" if r.get("total_seconds") else "-"
                lines.append(f"| [{p.stem}]({LEGACY}/{p.name}) | {r.get('generated', '-')} | {(r.get('git', {}).get('commit') or '?')[:10]} | "
                             f"{r.get('machine', {}).get('cpu', '?')} | {', '.join(map(str, r.get('seeds', [])))} | {wall} | {len(r.get('rows', []))} |")
            except (B2PError, KeyError, TypeError, AttributeError):
                lines.append(f"| {p.stem} | (unreadable) | | | | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # rewrite a history folder's index
    import sys

    folder = Path(sys.argv[1])
    write_text_atomic(folder / "index.md", history_index(folder))
    print(f"wrote {folder / 'index.md'}")


# --- the README's generated tables ---------------------------------------------------------------------------

_SECTION = re.compile(r"<!-- b2p-results:([A-Za-z0-9_.-]+) begin -->\n(?:(.*?)\n)?<!-- b2p-results:\1 end -->", re.S)


def readme_section(results: dict, reports_dir: str) -> str:
    """The README's generated table of one dataset: the headline rows and how to reproduce them."""
    seeds = ",".join(str(s) for s in results["seeds"])
    return "\n".join([
        *headline_table(results),
        "",
        f"Seeds {seeds}; {results['machine']['cpu']}, {results['generated']}; every row: `{reports_dir}/results.md`. "
        f"Reproduce by `{results.get('command', 'b2p suite')}`.",
    ])


def update_text(text: str, results_by_name: dict[str, dict], reports_root: str = "reports") -> tuple[str, list[str]]:
    """Rewrite every generated section whose dataset has results; returns (text, names rewritten)."""
    done = []

    def repl(m: re.Match) -> str:
        name = m.group(1)
        if name not in results_by_name:
            return m.group(0)
        done.append(name)
        body = readme_section(results_by_name[name], f"{reports_root}/{name}")
        return f"<!-- b2p-results:{name} begin -->\n{body}\n<!-- b2p-results:{name} end -->"

    return _SECTION.sub(repl, text), done


def check_text(path: Path, reports_root: Path) -> list[str]:
    """Problems: every generated section of the file must equal its reports/<name>/results.json."""
    text = path.read_text()
    problems = []
    for m in _SECTION.finditer(text):
        name = m.group(1)
        res = reports_root / name / "results.json"
        if not res.is_file():
            problems.append(f"{path}: section {name} has no {res}")
            continue
        want = readme_section(read_json(res, "results"), f"reports/{name}")
        if (m.group(2) or "") != want:
            problems.append(f"{path}: section {name} differs from {res} (run `b2p suite-readme`)")
    return problems
