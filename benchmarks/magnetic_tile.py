"""End-to-end benchmark on the Magnetic-Tile defect dataset, driven through the `b2p` commands.

    python benchmarks/magnetic_tile.py --work /tmp/mt-bench [--dataset ../shared/datasets/magnetic-tile]
        [--free-images 60] [--input-size 256] [--epochs 16] [--threads 1] [--jobs 2] [--seed 42]

Stages (each a `b2p` command, timed): masks-to-boxes + import (boxes simulated from the manual masks, manual
masks kept for the test split only), teach (box, grabcut), train (students: Boxes2Pixels with and without
self-correction, the from-scratch U-Net; one set per teacher), predict (test split: plain predictions and
box-guided masks, `--boxes-out`), evaluate (against the manual masks). Writes WORK/results.json and WORK/results.md: the paper's metrics for every teacher and
student, training seconds, inference images/s, and every stage's wall time.

Why `--threads 1`: on a 2-core machine shared with other work, PyTorch's 2-thread pool spends most of its
time waiting at barriers (measured here: a decoder training step 4x slower with 2 threads than with 1);
`--jobs 2` instead runs two single-threaded trainings side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

METRICS = ("miou", "anomaly_miou", "binary_iou", "binary_precision", "binary_recall", "binary_f1")
HEADS = ("mIoU", "anomaly mIoU", "binary IoU", "binary P", "binary R", "binary F1")
TEACHERS = ("box", "grabcut")


def student_params(args: argparse.Namespace) -> dict[str, dict]:
    """The `train:` section of each student (shared settings + what distinguishes it)."""
    common = {
        "adaptation": args.adaptation,
        "input_size": args.input_size,
        "decoder_dim": args.decoder_dim,
        "augment": args.augment,
        "epochs": args.epochs,
        "batch_size": 4,
        "lr": args.lr,
        "patience": args.epochs,  # short schedules: keep the best-by-val checkpoint, never stop early
        "device": "cpu" if args.cpu else "auto",
        "seed": args.seed,
    }
    b2p = {**common, "self_correction": True, "tau": 0.9}
    for k in ("self_correction_region", "outside_box_bg_weight"):
        if getattr(args, k) is not None:
            b2p[k] = getattr(args, k)
    return {
        "b2p": b2p,
        "b2p-nosc": {**b2p, "self_correction": False},
        "unet": {**{k: v for k, v in common.items() if k not in ("adaptation", "decoder_dim")}, "arch": "unet", "unet_base": args.unet_base},
    }


def run(cmd: list[str], log: Path, env: dict) -> float:
    """Run one b2p command, its output to `log`; returns wall seconds; stops the benchmark on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    dt = time.perf_counter() - t
    if rc != 0:  # raised, not sys.exit: a worker thread's SystemExit would not stop the benchmark
        raise RuntimeError(f"failed ({rc}): {' '.join(cmd)}; see {log}")
    print(f"{dt:8.1f} s  {' '.join(cmd[:3])} ... -> {log.name}", flush=True)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--dataset", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic-tile")
    ap.add_argument("--free-images", type=int, default=60)
    ap.add_argument("--val", type=float, default=0.15)
    ap.add_argument("--test", type=float, default=0.15)
    ap.add_argument("--input-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--adaptation", default="bitfit", help="bitfit (paper), frozen (cached features) or full")
    ap.add_argument("--decoder-dim", type=int, default=64, help="decoder width (64: a CPU-sized decoder)")
    ap.add_argument("--augment", default="flips", help="none | flips")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--unet-base", type=int, default=16)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--self-correction-region", default=None, help="all (paper) | boxes")
    ap.add_argument("--outside-box-bg-weight", type=float, default=None)
    # the settings pipelines/magnetic-tile/params.yaml uses (README: GrabCut 0.374 -> 0.720 binary IoU)
    ap.add_argument("--grabcut-min-fill", type=float, default=0.02, help="teach.grabcut.min_fill (0 = off)")
    ap.add_argument("--grabcut-min-context-ratio", type=float, default=1.0, help="teach.grabcut.min_context_ratio (0 = off)")
    ap.add_argument("--teachers", default="grabcut", help=f"comma-separated, of {','.join(TEACHERS)}; box fill is scored in any case")
    ap.add_argument("--students", default="b2p,b2p-nosc,unet")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (OMP_NUM_THREADS)")
    ap.add_argument("--jobs", type=int, default=2, help="trainings run side by side")
    ap.add_argument("--cpu", action="store_true", help="force the CPU even where a GPU exists")
    args = ap.parse_args()

    import yaml

    w = args.work.resolve()
    w.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    b2p = [sys.executable, "-m", "b2p"]
    teachers = [t for t in args.teachers.split(",") if t]
    students = [s for s in args.students.split(",") if s]
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    # 1. boxes from the manual masks, then the canonical batch (same split fractions in both)
    split = ["--val", str(args.val), "--test", str(args.test)]
    times["masks_to_boxes"] = run(
        [*b2p, "masks-to-boxes", str(args.dataset), "--out", str(w / "raw/mt.json"), "--batch", "mt",
         "--strip-prefix", "MT_", "--free-images", str(args.free_images), *split], w / "logs/masks_to_boxes.log", env)
    times["import"] = run(
        [*b2p, "import", "--images", str(args.dataset), "--coco", str(w / "raw/mt.json"), "--batch", "mt", *split,
         "--classes", str(w / "data/classes.json"), "--out", str(w / "data/imported/mt.json")], w / "logs/import.log", env)

    # 2. teachers (resume off: a stale folder must not pass for a fresh timing)
    gc = {k: v for k, v in (("min_fill", args.grabcut_min_fill), ("min_context_ratio", args.grabcut_min_context_ratio)) if v is not None}
    (w / "params").mkdir(exist_ok=True)
    (w / "params/teach.yaml").write_text(yaml.safe_dump({"teach": {"grabcut": gc}}, sort_keys=False))
    for t in teachers:
        times[f"teach/{t}"] = run(
            [*b2p, "teach", str(w / "data/imported/mt.json"), "--out", str(w / "teach" / t), "--teacher", t,
             "--params", str(w / "params/teach.yaml"), "--no-resume", "--quiet"], w / f"logs/teach_{t}.log", env)

    # 3. students: train + predict the test split, two at a time
    params = student_params(args)
    for s, p in params.items():
        (w / "params").mkdir(exist_ok=True)
        (w / f"params/{s}.yaml").write_text(yaml.safe_dump({"train": p}, sort_keys=False))

    def train_predict(ts: tuple[str, str]) -> None:
        t, s = ts
        md, pd, bd = w / "models" / t / s, w / "predict" / t / s, w / "predict_boxes" / t / s
        times[f"train/{t}/{s}"] = run(
            [*b2p, "train", "--imported", str(w / "data/imported"), "--teacher-root", str(w / "teach" / t),
             "--out", str(md), "--params", str(w / f"params/{s}.yaml")], w / f"logs/train_{t}_{s}.log", env)
        times[f"predict/{t}/{s}"] = run(
            [*b2p, "predict", "--model", str(md), "--imported", str(w / "data/imported"), "--split", "test",
             "--out", str(pd), "--boxes-out", str(bd), "--batch-size", "8"] + (["--device", "cpu"] if args.cpu else []),
            w / f"logs/predict_{t}_{s}.log", env)

    pairs = [(t, s) for t in teachers for s in students if s in params]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as ex:
        futures = [ex.submit(train_predict, p) for p in pairs]
        errors = [str(f.exception()) for f in futures if f.exception() is not None]
    if errors:
        sys.exit("benchmark stopped:\n" + "\n".join(errors))

    # 4. evaluate: one run per teacher, its students as sources
    for t in teachers:
        first, rest = students[0], students[1:]
        srcs = [x for s in rest for x in ("--source", f"{s}={w / 'predict' / t / s}")]
        srcs += [x for s in students for x in ("--source", f"{s}_boxes={w / 'predict_boxes' / t / s}")]
        times[f"evaluate/{t}"] = run(
            [*b2p, "evaluate", "--imported", str(w / "data/imported"), "--teacher-root", str(w / "teach" / t),
             "--pred-root", str(w / "predict" / t / first), *srcs, "--out", str(w / "eval" / t)],
            w / f"logs/evaluate_{t}.log", env)
    total = time.perf_counter() - t_all
    write_results(w, teachers, students, params, times, total, args)


def _n_test(w: Path) -> int:
    d = json.loads((w / "data/imported/mt.json").read_text())
    return sum(1 for im in d["images"] if im["split"] == "test")


def write_results(w: Path, teachers, students, params, times, total, args) -> None:
    """results.json + results.md: one row per teacher, the box fill, and every (teacher, student)."""
    n_test = _n_test(w)
    rows = []
    for t in teachers:
        m = json.loads((w / "eval" / t / "metrics.json").read_text())
        prov = json.loads((w / "teach" / t / "mt/provenance.json").read_text())
        n_img = prov["counts"]["images"]
        rows.append({"row": f"teacher {t}", "teacher": t, "student": None, **{k: m["teacher"].get(k) for k in METRICS},
                     "per_class_iou": {c: v["iou"] for c, v in m["teacher"]["per_class"].items()},
                     "teach_s_per_image": round(prov["time"]["seconds"] / max(n_img, 1), 4)})
        for i, s in enumerate(students):
            sec = m["student"] if i == 0 else m[s]
            tm = json.loads((w / "models" / t / s / "metrics.json").read_text())
            rows.append({"row": f"{s} <- {t}", "teacher": t, "student": s, **{k: sec.get(k) for k in METRICS},
                         "per_class_iou": {c: v["iou"] for c, v in sec["per_class"].items()},
                         "train_s": tm["train_seconds"], "epochs": tm["epochs_run"], "best_epoch": tm["best_epoch"],
                         "trainable_params": tm["params"]["trainable"], "total_params": tm["params"]["total"],
                         "predict_img_per_s": round(n_test / times[f"predict/{t}/{s}"], 2),
                         "val_anomaly_miou_vs_pseudo": (tm.get("val") or {}).get("anomaly_miou")})
            bsec = m[f"{s}_boxes"]
            rows.append({"row": f"{s} <- {t} (+ boxes)", "teacher": t, "student": s, "box_guided": True,
                         **{k: bsec.get(k) for k in METRICS},
                         "per_class_iou": {c: v["iou"] for c, v in bsec["per_class"].items()}})
    box = json.loads((w / "eval" / teachers[0] / "metrics.json").read_text())["box"]
    rows.insert(0, {"row": "box fill (the boxes themselves)", "teacher": "box", "student": None,
                    **{k: box.get(k) for k in METRICS}, "per_class_iou": {c: v["iou"] for c, v in box["per_class"].items()}})
    out = {"dataset": str(args.dataset), "test_images": n_test, "settings": vars(args) | {"work": str(args.work), "dataset": str(args.dataset)},
           "student_params": params, "stage_seconds": {k: round(v, 1) for k, v in times.items()},
           "total_seconds": round(total, 1), "rows": rows}
    (w / "results.json").write_text(json.dumps(out, indent=1))
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"# Magnetic-Tile benchmark ({n_test} test images with manual masks)", "",
             "| row | " + " | ".join(HEADS) + " | train s | predict img/s |", "|" + " --- |" * (len(HEADS) + 3)]
    for r in rows:
        lines.append(f"| {r['row']} | " + " | ".join(f(r.get(k)) for k in METRICS)
                     + f" | {r.get('train_s', '-')} | {r.get('predict_img_per_s', '-')} |")
    classes = list(rows[0]["per_class_iou"])
    lines += ["", "Per-class IoU", "", "| row | " + " | ".join(classes) + " |", "|" + " --- |" * (len(classes) + 1)]
    for r in rows:
        lines.append(f"| {r['row']} | " + " | ".join(f(r["per_class_iou"].get(c)) for c in classes) + " |")
    lines += ["", f"Stage wall times (s), total {total:.0f} s:", ""] + [f"- {k}: {v:.1f}" for k, v in times.items()]
    (w / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
