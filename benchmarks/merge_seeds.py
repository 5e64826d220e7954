"""Pool the seeds of several benchmark-suite runs into one table (prints it; not a test).

    python benchmarks/merge_seeds.py reports/magnetic-tile/results.json OTHER/results.json [--out FILE.md]

Why: the suite's 60-minute CPU budget holds 3 seeds, and seed-to-seed spread on Magnetic-Tile (~0.02 binary
IoU) is as large as most changes tried; more seeds, run as separate suites (`b2p suite --set 'seeds=[4,5]'`),
narrow the estimate without changing the budgeted run. Each run's `per_seed` figures are pooled per row;
the runs must agree on everything but the seeds (the params, the dataset, the rows), and no seed may repeat:
otherwise one clear error, exit 1. Rows without per-seed figures (box fill, teachers) are taken from the
first run (they are not trained: one value each).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from b2p.errors import B2PError  # noqa: E402
from b2p.fileio import write_text_atomic  # noqa: E402
from b2p.pipeline.results import mean_std  # noqa: E402

METRICS = ("binary_iou", "anomaly_miou", "binary_precision", "binary_recall", "miou")


def _load(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise B2PError(f"cannot read a suite report: {e}", path) from None
    for key in ("rows", "seeds", "params", "dataset"):
        if key not in d:
            raise B2PError(f"not a suite results.json (no {key!r})", path)
    return d


def merge(paths: list[Path]) -> tuple[list[dict], list[int], list[str]]:
    """(rows with pooled `per_seed` and mean / sd per metric, all seeds, each run's commit)."""
    runs = [_load(p) for p in paths]
    first = runs[0]
    seen: dict[int, Path] = {}
    for p, r in zip(paths, runs):
        others = {k: v for k, v in r["params"].items() if k != "seeds"}
        if others != {k: v for k, v in first["params"].items() if k != "seeds"}:
            diff = sorted(k for k in set(others) | set(first["params"]) if k != "seeds" and others.get(k) != first["params"].get(k))
            raise B2PError(f"its suite params differ from {paths[0]}'s in {diff}: only the seeds may differ", p)
        if [x["name"] for x in r["rows"]] != [x["name"] for x in first["rows"]]:
            raise B2PError(f"its rows differ from {paths[0]}'s", p)
        for s in r["seeds"]:
            if s in seen:
                raise B2PError(f"seed {s} is also in {seen[s]}: each seed may come from one run only", p)
            seen[s] = p
    rows = []
    for i, row in enumerate(first["rows"]):
        if not row.get("per_seed"):
            rows.append({"name": row["name"], "per_seed": None, "metrics": {m: row["metrics"][m] for m in METRICS}})
            continue
        per_seed = {}
        for r in runs:
            per_seed.update(r["rows"][i]["per_seed"] or {})
        rows.append({"name": row["name"], "per_seed": per_seed, "metrics": {m: mean_std([v.get(m) for v in per_seed.values()]) for m in METRICS}})
    return rows, sorted(seen), [r.get("git", {}).get("commit", "?")[:7] for r in runs]


def _fmt(ms: dict) -> str:
    if ms["mean"] is None:
        return "-"
    return f"{ms['mean']:.3f}" + ("" if ms.get("std") is None else f" ± {ms['std']:.3f}")


def table(rows: list[dict], seeds: list[int], commits: list[str], paths: list[Path]) -> str:
    lines = [
        f"Seeds {', '.join(map(str, seeds))} pooled from {len(paths)} suite runs ({', '.join(f'{p} at {c}' for p, c in zip(paths, commits))}): "
        "mean ± sample standard deviation over the seeds; untrained rows (one value) from the first run.",
        "",
        "| row | binary IoU | anomaly mIoU | precision | recall | per seed: binary IoU / anomaly mIoU |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        m = r["metrics"]
        ps = "-" if not r["per_seed"] else ", ".join(
            f"{s}: {r['per_seed'][s]['binary_iou']:.3f} / {r['per_seed'][s]['anomaly_miou']:.3f}" for s in sorted(r["per_seed"], key=int))
        lines.append(f"| {r['name']} | {_fmt(m['binary_iou'])} | {_fmt(m['anomaly_miou'])} | {_fmt(m['binary_precision'])} | {_fmt(m['binary_recall'])} | {ps} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path, help="results.json of each suite run")
    ap.add_argument("--out", type=Path, help="also write the table here (markdown)")
    a = ap.parse_args()
    try:
        rows, seeds, commits = merge(a.results)
        text = table(rows, seeds, commits, a.results)
        if a.out:
            write_text_atomic(a.out, text)
    except B2PError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
