"""Benchmark of the engines (b2p/scale): prints figures measured side by side in this one run; not a test.

    python benchmarks/bench_scale.py [--images 200] [--teach-images 1000] [--epochs 1] [--repeats 3] [--out reports/benchmarks]

On Magnetic-Tile (/work/shared/datasets/magnetic-tile: boxes from its masks, `b2p masks-to-boxes`), images of
the imported batch spread over it: `--teach-images` for teach (GrabCut is cheap per image: fewer would measure
the cluster's fixed costs), `--images` (a subset of those) for predict and training:
  1. teach (GrabCut) and predict (a student trained for one epoch: real model, real cost) on the local engine
     (torch and OpenCV on 1 thread, the share one worker gets, and on every core), and on the Ray engine with
     1 and 2 workers of 1 CPU each, on one local Ray cluster started once (its start is timed apart: on an
     existing `ray start` cluster it is not paid), in `--repeats` rounds (medians reported, every round
     listed). Each engine's outputs are checked equal to the local ones. In the same rounds, the machine's own
     limit: 2 plain copies (no engine), 2 processes each running the local engine on 1 thread over the whole
     batch side by side, timed from their start of work to the later one's end: twice the work in that time is
     what any engine's 2 workers could reach on this machine (vCPUs that share a host core or its memory
     bandwidth give less than 2x);
  2. training on 1 process (on all cores, and on 1 thread: one rank's share) vs 2 processes (`--processes`),
     same global batch.
Figures: the speed-up of 2 workers over 1 (goal >= 1.7x) and over the 1-thread local run, the overhead of
1 worker over the 1-thread local run (goal <= 10 %), and the plain copies' throughput over the 1-thread local
run (the ceiling). Writes OUT/scale_cpu.json and OUT/scale_cpu.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATASET = Path("/work/shared/datasets/magnetic-tile")


def b2p(*args: str, cwd: Path, env: dict | None = None) -> None:
    r = subprocess.run([sys.executable, "-m", "b2p", *args], cwd=cwd, capture_output=True, text=True, env=None if env is None else {**os.environ, **env})
    if r.returncode != 0:
        raise SystemExit(f"b2p {' '.join(args)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")


def prepare(work: Path, n_images: int, boxes: Path | None = None) -> Path:
    """Boxes from the masks (or the `boxes` file made so before), imported; the batch cut to `n_images` of its
    images, evenly spread."""
    if boxes is None:
        b2p("masks-to-boxes", str(DATASET), "--out", "raw/boxes.json", "--batch", "mt", cwd=work)
    else:
        (work / "raw").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(boxes, work / "raw" / "boxes.json")
    b2p("import", "--batch", "mt", "--images", str(DATASET), "--coco", "raw/boxes.json", "--out", "imported/mt.json", cwd=work)
    path = work / "imported" / "mt.json"
    batch = json.loads(path.read_text())
    step = max(1, len(batch["images"]) // n_images)  # spread over the classes and splits
    keep = {im["id"] for im in batch["images"][::step][:n_images]}
    batch["images"] = [im for im in batch["images"] if im["id"] in keep]
    for key, value in batch.items():  # annotations, manual masks: whatever names an image
        if isinstance(value, list) and value and isinstance(value[0], dict) and "image_id" in value[0]:
            batch[key] = [a for a in value if a["image_id"] in keep]
    path.write_text(json.dumps(batch))
    return path


def threads(n: int) -> None:
    import cv2
    import torch

    torch.set_num_threads(n)
    cv2.setNumThreads(n)


def same_tree(a: Path, b: Path, skip: tuple[str, ...]) -> bool:
    files = lambda r: {p.relative_to(r).as_posix(): p.read_bytes() for p in r.rglob("*") if p.is_file() and p.name not in skip}  # noqa: E731
    return files(a) == files(b)


# one plain copy of the ceiling: 1 thread, the local engine, the whole batch. Both start their work together
# (each says "ready" after its imports, then waits for "go"), as a running pool's workers would; the work
# timed is the local run's (predict's includes loading the model)
PLAIN = """
import json, sys, time
from pathlib import Path
import cv2, torch
cv2.setNumThreads(1); torch.set_num_threads(1)
stage, batch, out, model = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
if stage == "teach":
    from b2p.teach.base import teach_batch
    from b2p.teach.grabcut import GrabCutTeacher
    run = lambda: teach_batch(batch, out, GrabCutTeacher(), progress=False)
else:
    from rich.console import Console
    from b2p.student.predict import items_from_batches, run_prediction
    items = items_from_batches([batch], "all", out, probs=True)
    run = lambda: run_prediction(model, items, device="cpu", console=Console(quiet=True), progress=False)
print("ready", flush=True)
sys.stdin.readline()
t = time.perf_counter()
run()
print(json.dumps({"seconds": time.perf_counter() - t}), flush=True)
"""


def plain_copies(stage: str, batch: Path, work: Path) -> list[float]:
    """Seconds of work of each of 2 plain processes doing the same whole batch side by side (see PLAIN): twice
    the work in the later one's time is what 2 cores give. Halves of a batch would measure how evenly it was
    cut (GrabCut's cost grows with an image's boxes), not the machine."""
    procs = []
    for k in (0, 1):
        out = work / f"{stage}_plain{k}"
        shutil.rmtree(out, ignore_errors=True)
        args = [sys.executable, "-c", PLAIN, stage, str(batch), str(out), str(work / "model")]
        procs.append(subprocess.Popen(args, cwd=work, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            raise SystemExit(f"a plain {stage} process failed:\n{p.communicate()[1][-2000:]}")
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    seconds = []
    for p in procs:
        stdout, stderr = p.communicate()  # closes stdin
        if p.returncode != 0:
            raise SystemExit(f"a plain {stage} process failed:\n{stderr[-2000:]}")
        seconds.append(json.loads(stdout.strip().splitlines()[-1])["seconds"])
    return seconds


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_engines(work: Path, batch: Path, teach_batch_file: Path, repeats: int) -> dict:
    import ray

    from b2p.scale.engine import Engine, EngineConfig
    from b2p.scale.engines import open_engine
    from b2p.student.predict import items_from_batches, run_prediction
    from b2p.teach.base import teach_batch
    from b2p.teach.grabcut import GrabCutTeacher
    from rich.console import Console

    quiet = Console(stderr=True, quiet=True)

    def teach(out: str, engine) -> float:
        shutil.rmtree(work / out, ignore_errors=True)
        return timed(lambda: teach_batch(teach_batch_file, work / out, GrabCutTeacher(), progress=False, engine=engine))

    def predict(out: str, engine) -> float:
        shutil.rmtree(work / out, ignore_errors=True)
        items = items_from_batches([batch], "all", work / out, probs=True)
        return timed(lambda: run_prediction(work / "model", items, device="cpu", console=quiet, progress=False, engine=engine))

    res: dict = {"teach": {}, "predict": {}, "rounds": repeats}
    runs: dict = {"teach": {}, "predict": {}}  # config -> seconds of every round

    def record(stage: str, config: str, seconds: float) -> None:
        runs[stage].setdefault(config, []).append(seconds)

    threads(os.cpu_count() or 1)
    for stage, fn in (("teach", teach), ("predict", predict)):
        res[stage]["local_all_threads"] = fn(f"{stage}_local_all", Engine())  # once: for reference only
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    res["ray_cluster_start_s"] = time.perf_counter() - t
    try:
        # rounds of every configuration one after the other: the machine's pace drifts over minutes, and a
        # ratio within one round compares runs made under the same pace
        for _ in range(repeats):
            for stage, fn in (("teach", teach), ("predict", predict)):
                threads(1)
                record(stage, "local_1_thread", fn(f"{stage}_local1", Engine()))
                each = plain_copies(stage, {"teach": teach_batch_file, "predict": batch}[stage], work)
                record(stage, "plain_2_copies", max(each))
                runs[stage].setdefault("plain_2_copies_each", []).append(each)
                for workers in (1, 2):
                    with open_engine(EngineConfig(name="ray", workers=workers)) as eng:
                        record(stage, f"ray_{workers}", fn(f"{stage}_ray{workers}", eng))
                    # a worker runs 1 torch thread: its maps are those of the 1-thread local run (torch's CPU
                    # arithmetic may round differently with another thread count)
                    out = {"teach": ("mt", "provenance.json"), "predict": ("", "predict.json")}[stage]
                    same = same_tree(work / f"{stage}_local1" / out[0], work / f"{stage}_ray{workers}" / out[0], (out[1],))
                    key = f"ray_{workers}_same_files"
                    res[stage][key] = res[stage].get(key, True) and same
    finally:
        ray.shutdown()
    res["predict"]["local_1_vs_all_threads_same_files"] = same_tree(work / "predict_local1", work / "predict_local_all", ("predict.json",))
    for stage in ("teach", "predict"):
        r, t = res[stage], runs[stage]
        r["seconds"] = t
        for config, values in t.items():
            if config != "plain_2_copies_each":
                r[config] = statistics.median(values)
        speedup = [a / b for a, b in zip(t["ray_1"], t["ray_2"])]
        overhead = [a / b - 1 for a, b in zip(t["ray_1"], t["local_1_thread"])]
        r["speedup_2_over_1_worker_rounds"] = speedup
        r["overhead_1_worker_over_local_1_thread_rounds"] = overhead
        r["speedup_2_over_1_worker"] = statistics.median(speedup)
        r["overhead_1_worker_over_local_1_thread"] = statistics.median(overhead)
        r["speedup_2_workers_over_local_1_thread"] = statistics.median(a / b for a, b in zip(t["local_1_thread"], t["ray_2"]))
        ceiling = [2 * a / b for a, b in zip(t["local_1_thread"], t["plain_2_copies"])]
        r["ceiling_2_plain_copies_over_local_1_thread_rounds"] = ceiling
        r["ceiling_2_plain_copies_over_local_1_thread"] = statistics.median(ceiling)
    return res


def bench_training(work: Path, epochs: int) -> dict:
    """1 process on every core (how `b2p train` runs by default), 1 process on 1 thread (the share of one rank:
    the base of the processes' scaling), 2 processes of 1 thread each."""
    params = work / "train.yaml"
    params.write_text(f"train:\n  epochs: {epochs}\n  batch_size: 4\n  crops_per_image: 2\n  select: last\n")
    out = {}
    # a lone process sets no thread count of its own: OMP_NUM_THREADS is what torch then takes
    for name, n, env in (("processes_1", 1, None), ("processes_1_one_thread", 1, {"OMP_NUM_THREADS": "1"}), ("processes_2", 2, None)):
        shutil.rmtree(work / name, ignore_errors=True)
        t = time.perf_counter()
        b2p("train", "--imported", "imported", "--teacher-root", "teach_local", "--out", name, "--params", str(params), "--processes", str(n), cwd=work, env=env)
        out[f"{name}_s"] = time.perf_counter() - t
        out[f"{name}_final_train_loss"] = json.loads((work / name / "metrics.json").read_text())["final_train"]["train_loss"]
    out["speedup_2_over_1"] = out["processes_1_s"] / out["processes_2_s"]
    out["speedup_2_over_1_one_thread"] = out["processes_1_one_thread_s"] / out["processes_2_s"]
    return out


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "load_before": os.getloadavg(), "python": platform.python_version()}


def write_report(out: Path, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale_cpu.json").write_text(json.dumps(data, indent=1))
    lines = [
        f"# Engines on a CPU: Magnetic-Tile, teach on {data['teach_images']} images, predict and training on {data['images']} (generated by benchmarks/bench_scale.py)",
        "",
        f"{data['date']}, {data['machine']['cpu']}, {data['machine']['cores']} cores; load average before: "
        + ", ".join(f"{v:.2f}" for v in data["machine"]["load_before"]) + f", after: {', '.join(f'{v:.2f}' for v in data['load_after'])}.",
        f"Ray cluster start (once, not paid on a running cluster): {data['engines']['ray_cluster_start_s']:.1f} s.",
        f"{data['engines']['rounds']} rounds of local 1 thread, 2 plain copies, Ray 1 worker, Ray 2 workers, one after the other: "
        "medians of the rounds, and the ratios are medians of each round's own ratio (local on all cores: one run).",
        "2 plain copies: no engine, 2 processes each running the local engine on 1 thread over the whole batch, side by side; "
        "the later one's seconds of work. Twice the 1-thread local run's work in that time is this machine's ceiling for any "
        "engine's 2 workers.",
        "",
        "| stage | local 1 thread (s) | local all cores (s) | 2 plain copies (s) | Ray 1 worker (s) | Ray 2 workers (s) | 2 vs 1 worker | ceiling: 2 plain copies' throughput vs local 1 thread | 1-worker overhead | same files as local 1 thread |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for stage in ("teach", "predict"):
        r = data["engines"][stage]
        lines.append(
            f"| {stage} | {r['local_1_thread']:.1f} | {r['local_all_threads']:.1f} | {r['plain_2_copies']:.1f} | {r['ray_1']:.1f} | {r['ray_2']:.1f} | "
            f"{r['speedup_2_over_1_worker']:.2f}x | {r['ceiling_2_plain_copies_over_local_1_thread']:.2f}x | "
            f"{100 * r['overhead_1_worker_over_local_1_thread']:+.1f} % | {r['ray_1_same_files'] and r['ray_2_same_files']} |"
        )
    lines.append("")
    for stage in ("teach", "predict"):
        r = data["engines"][stage]
        lines.append(
            f"- {stage}, every round: 2 vs 1 worker " + ", ".join(f"{v:.2f}x" for v in r["speedup_2_over_1_worker_rounds"])
            + "; ceiling " + ", ".join(f"{v:.2f}x" for v in r["ceiling_2_plain_copies_over_local_1_thread_rounds"])
            + "; 1-worker overhead " + ", ".join(f"{100 * v:+.1f} %" for v in r["overhead_1_worker_over_local_1_thread_rounds"])
            + "; seconds (local 1 thread / plain copies, each / Ray 1 / Ray 2) "
            + ", ".join(
                f"{a:.1f} / {e[0]:.1f}, {e[1]:.1f} / {b:.1f} / {c:.1f}"
                for a, e, b, c in zip(r["seconds"]["local_1_thread"], r["seconds"]["plain_2_copies_each"], r["seconds"]["ray_1"], r["seconds"]["ray_2"])
            )
        )
    t = data["training"]
    lines += [
        "",
        f"Predict, local on 1 thread vs on all cores: the same files: {data['engines']['predict']['local_1_vs_all_threads_same_files']}.",
        "",
        f"Training ({data['epochs']} epochs, global batch 4, process start included): 1 process on all cores {t['processes_1_s']:.1f} s, "
        f"1 process on 1 thread {t['processes_1_one_thread_s']:.1f} s, 2 processes of 1 thread {t['processes_2_s']:.1f} s "
        f"({t['speedup_2_over_1']:.2f}x over the first, {t['speedup_2_over_1_one_thread']:.2f}x over the second; final train loss "
        f"{t['processes_1_final_train_loss']:.6f}, {t['processes_1_one_thread_final_train_loss']:.6f}, {t['processes_2_final_train_loss']:.6f}).",
        "",
    ]
    (out / "scale_cpu.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--teach-images", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the engine runs; the report gives medians and every round")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "benchmarks")
    a = ap.parse_args()
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        batch = prepare(work, a.images)
        teach_set = prepare(work / "teachset", a.teach_images, boxes=work / "raw" / "boxes.json")
        b2p("teach", "imported/mt.json", "--out", "teach_local", "--quiet", cwd=work)
        (work / "m.yaml").write_text("train:\n  epochs: 1\n  select: last\n")
        b2p("train", "--imported", "imported", "--teacher-root", "teach_local", "--out", "model", "--params", "m.yaml", cwd=work)
        engines = bench_engines(work, batch, teach_set, a.repeats)
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "scale_cpu.partial.json").write_text(json.dumps(engines, indent=1))  # kept if training fails
        training = bench_training(work, a.epochs)
    data = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": info, "load_after": os.getloadavg(),
        "images": a.images, "teach_images": a.teach_images, "epochs": a.epochs, "engines": engines, "training": training,
    }
    write_report(a.out, data)
    (a.out / "scale_cpu.partial.json").unlink()


if __name__ == "__main__":
    main()
