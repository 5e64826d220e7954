"""The suite's rows against a user's own run of the same batch: prints and writes a comparison; not a test.

    python benchmarks/as_a_user.py --root /work/shared/datasets/magnetic-tile [--per-class 20] [--seed 1]
        [--threads 2] [--set recipe.train.epochs=2 ...] [--out reports/benchmarks]

1. `b2p suite --root ROOT` for one seed (no oracle), in a fresh copy of this project: boxes simulated from the
   dataset's masks (`b2p masks-to-boxes`: a COCO batch with the manual masks of a share of the images);
2. as a user would: another fresh copy, the demo removed from params.yaml, `dvc init`, `b2p add-batch` of that
   COCO batch under the dataset's name, `dvc repro`;
3. every source both scored (box fill, teacher, combined, final, the shipped student, each candidate) side
   by side: the user's data/eval/metrics/<source>.json against the suite's row for that seed.
Both runs use the same torch threads (the suite one stage at a time, `--jobs 1 --threads T`), so the same
arithmetic: the figures should agree to rounding. `--set` items go to the suite; `recipe.*` ones also to the
user's params.yaml (the suite's recipe overrides), so a short budget can be checked as well as the full one.
Writes OUT/as_a_user_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent
METRICS = ("binary_iou", "anomaly_miou")


def run(cwd: Path, *cmd: str, env: dict | None = None) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    return time.perf_counter() - t


def fresh_project(root: Path) -> Path:
    """This project's recipe, params, code and suite params in a new git repository (what a clone holds)."""
    root.mkdir(parents=True)
    for f in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / f, root / f)
    shutil.copytree(REPO / "b2p", root / "b2p", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (root / "pipelines" / "suite").mkdir(parents=True)
    for f in ("params.yaml", ".gitignore"):
        shutil.copy(REPO / "pipelines" / "suite" / f, root / "pipelines" / "suite" / f)
    run(root, "git", "init", "-q")
    run(root, "git", "add", "-A")
    run(root, "git", "-c", "user.name=b2p", "-c", "user.email=b2p@localhost", "commit", "-qm", "project")
    return root


def edit_params(path: Path, changes: dict[str, object]) -> None:
    """Set dotted keys of a params file, comments kept (the round trip `b2p add-batch` uses)."""
    from b2p.pipeline.batches import dump_params, load_params

    data = load_params(path)
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path.write_text(dump_params(data))


def subset(root: Path, per_class: int, into: Path) -> Path:
    """A copy of the folder dataset `root` (ROOT/<CLASS>/Imgs/NAME.jpg + NAME.png) with the first `per_class`
    images (by name) of every class folder: a check in minutes instead of hours."""
    out = into / f"{root.name}-{per_class}-per-class"
    for imgs in sorted(root.glob("*/Imgs")):
        stems = sorted({p.stem for p in imgs.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".bmp", ".tif", ".tiff")})[:per_class]
        (out / imgs.parent.name / "Imgs").mkdir(parents=True)
        for p in imgs.iterdir():
            if p.stem in stems:
                shutil.copy(p, out / imgs.parent.name / "Imgs" / p.name)
    return out


def main() -> None:
    from b2p.params import parse_yaml
    from b2p.pipeline.suite import dataset_name_of

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="a dataset with manual masks (b2p suite --root)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of both runs (a user's dvc repro: every core)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE for the suite; recipe.* also for the user's params.yaml")
    ap.add_argument("--per-class", type=int, default=None, help="only the first N images (by name) of each class folder")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "benchmarks")
    a = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    with tempfile.TemporaryDirectory() as tmp:
        root = a.root.resolve() if a.per_class is None else subset(a.root.resolve(), a.per_class, Path(tmp) / "data")
        name = dataset_name_of(root)
        suite_root = fresh_project(Path(tmp) / "suite")
        sets = [f"seeds=[{a.seed}]", "oracle_seeds=[]", *a.sets]
        print(f"suite on {name}, seed {a.seed} ...", flush=True)
        suite_s = run(suite_root, str(BIN / "b2p"), "suite", "--root", str(root), "--jobs", "1", "--threads", str(a.threads),
                      *[x for s in sets for x in ("--set", s)], env=env)
        results = json.loads((suite_root / "reports" / name / "results.json").read_text())
        suite_rows = {r["source"]: r for r in results["rows"]}

        user = fresh_project(Path(tmp) / "user")
        recipe = {k.removeprefix("recipe."): parse_yaml(v) for k, _, v in (s.partition("=") for s in a.sets) if k.startswith("recipe.")}
        edit_params(user / "params.yaml", {"demos": {}, "batches": {}, "base.seed": a.seed, **recipe})
        run(user, str(BIN / "dvc"), "init", "-q", env=env)
        coco = suite_root / "pipelines" / "suite" / name / "source" / "boxes.json"
        run(user, str(BIN / "b2p"), "add-batch", str(root), "--name", name, "--coco", str(coco), "--add-classes", env=env)
        print("the same batch as a user would: b2p add-batch, dvc repro ...", flush=True)
        user_s = run(user, str(BIN / "dvc"), "repro", env=env)
        mine = {p.stem: json.loads(p.read_text()) for p in (user / "data" / "eval" / "metrics").glob("*.json")}
        images = len(json.loads(coco.read_text())["images"])

    rows = []
    for source in [s for s in results.get("order", []) if s in mine] + sorted(set(mine) - set(results.get("order", []))):
        if source not in suite_rows:
            continue
        row = {"source": source}
        for m in METRICS:
            theirs = suite_rows[source][m]["values"][0] if suite_rows[source].get(m) else None
            row[m] = {"suite": theirs, "user": mine[source].get(m)}
        rows.append(row)
    diffs = [abs(r[m]["suite"] - r[m]["user"]) for r in rows for m in METRICS if r[m]["suite"] is not None and r[m]["user"] is not None]
    data = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "dataset": str(a.root), "per_class": a.per_class,
        "name": name, "seed": a.seed, "images": images,
        "threads": a.threads, "sets": a.sets, "suite_seconds": suite_s, "user_repro_seconds": user_s, "rows": rows,
        "max_abs_difference": max(diffs) if diffs else None, "compared": len(diffs),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()},
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"as_a_user_{name}.json").write_text(json.dumps(data, indent=1))
    fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [
        f"# {name}: the suite against a user's `b2p add-batch` + `dvc repro` (generated by benchmarks/as_a_user.py)",
        "",
        f"{data['date']}, commit {data['git']}, {data['machine']['cores']} cores, {a.threads} torch thread(s) in both runs; seed {a.seed}; "
        f"settings: {', '.join(a.sets) or 'the recipe as committed'}.",
        f"Data: {a.root}" + (f", the first {a.per_class} images of each class folder" if a.per_class else "") + f"; the batch: {images} images.",
        "Command: `python benchmarks/as_a_user.py --root " + str(a.root) + (f" --per-class {a.per_class}" if a.per_class else "")
        + f" --seed {a.seed} --threads {a.threads}" + "".join(f" --set {s}" for s in a.sets) + "`.",
        f"Suite (one seed, no oracle, one stage at a time): {suite_s:.0f} s; the user's `dvc repro` (import to summary): {user_s:.0f} s.",
        f"Largest difference over {len(diffs)} figures: {fmt(data['max_abs_difference'])}.",
        "",
        "| source | binary IoU, suite | binary IoU, user | anomaly mIoU, suite | anomaly mIoU, user |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['source']} | {fmt(r['binary_iou']['suite'])} | {fmt(r['binary_iou']['user'])} | "
                     f"{fmt(r['anomaly_miou']['suite'])} | {fmt(r['anomaly_miou']['user'])} |")
    (a.out / f"as_a_user_{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
