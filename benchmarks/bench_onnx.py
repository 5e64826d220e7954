"""The deployable student: torch eager (`b2p predict`'s path) vs ONNX Runtime (`b2p-run`'s), side by side in
one run (prints a table; writes reports/benchmarks/onnx_cpu.{json,md}; not a test).

    python benchmarks/bench_onnx.py [--model DIR] [--work DIR] [--threads 1] [--limit N] [--rounds 2]
    python benchmarks/bench_onnx.py --gpu [--model DIR]      # where a CUDA GPU exists

CPU: the Magnetic-Tile test images (the suite's hashed split, pipelines/suite/params.yaml) at native size,
each predicted whole (sliding windows, blending, flips and rule of the model's metadata: the same for both)
by the torch model in float32 and by its ONNX export in ONNX Runtime's CPU provider, each in its own
subprocess (peak RSS is the process's own), `--threads` threads each. Reported: ms per image (median and
mean, after one warm-up image), peak RSS, the share of identical label-map pixels, the largest class
probability difference, and binary IoU / anomaly mIoU on the test split's manual masks for both.
--model: a trained model folder (model.pt, + rule.json); without it a small b2p-lite student is trained in
--work first (masks-to-boxes, import, the oracle teacher = the dataset's own masks, a few epochs): it only
needs to be a real trained network, not a good one.

GPU (--gpu): the paper's DINOv2-S student (RANDOM weights: speed only) and the deployable one, at 518 x 518,
batch 1 and 16: torch eager float32 and bfloat16, torch.compile, ONNX Runtime's CUDA and TensorRT providers
where installed; images per second against the paper's 161. Writes reports/benchmarks/onnx_gpu.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MT_ROOT = Path("/work/shared/datasets/magnetic-tile")
SUITE = REPO / "pipelines" / "suite"
BATCH = "magnetic-tile"
PAPER_FPS = 161
PROBS_KEPT = 24  # images whose probabilities are compared (each child keeps them in memory)


def sh(args: list[str], cwd: Path = REPO) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, cwd=cwd, check=True)


def prepare_model(work: Path) -> Path:
    """A small trained b2p-lite student on Magnetic-Tile (module docstring), cached in `work`."""
    b2p = [sys.executable, "-m", "b2p"]
    split = ["--val", "0.15", "--test", "0.15", "--calib", "0.25"]
    if not (work / "imported" / f"{BATCH}.json").is_file():
        sh([*b2p, "masks-to-boxes", str(MT_ROOT), "--out", str(work / "raw/boxes.json"), "--batch", BATCH, *split,
            "--oracle-out", str(work / "teach/oracle"), "--params", "params.yaml"], SUITE)
        sh([*b2p, "import", "--batch", BATCH, "--images", str(MT_ROOT), "--coco", str(work / "raw/boxes.json"), *split,
            "--classes", str(work / "classes.json"), "--out", str(work / "imported" / f"{BATCH}.json")], SUITE)
    if not (work / "model" / "model.pt").is_file():
        sh([*b2p, "train", "--imported", str(work / "imported"), "--teacher-root", str(work / "teach/oracle"), "--out", str(work / "model"),
            "--params", "params.yaml", "--params", "students/b2p-lite.yaml", "--set", "epochs=6", "--set", "patience=6", "--device", "cpu"], SUITE)
    return work / "model"


def test_images(imported: Path, limit: int | None) -> list[str]:
    from b2p.dataset import load_batches

    recs = [r for b in load_batches([imported]) for r in b.split("test")]
    return [str(r.path) for r in recs[:limit]]


def child(kind: str, model_dir: Path, files: list[str], out: Path, threads: int) -> None:
    """One runtime in this process: predict every file, save label maps (+ some probabilities), print timings."""
    from b2p.deploy.onnx_model import OnnxStudent, check_header, read_header
    from b2p.fileio import read_image
    from b2p.memory import peak_rss_mb
    from b2p.student import windows
    from b2p.student.rules import DecisionRule

    path = model_dir / "model.onnx"
    m = check_header(*read_header(path.read_bytes(), path), path)  # the settings both use: the ONNX metadata
    if kind == "torch":
        import torch

        from b2p.student.checkpoint import load_student
        from b2p.student.predict import inference_setup, torch_forward

        torch.set_num_threads(threads)
        model, _ = load_student(model_dir, "cpu")
        inference_setup(model, torch.device("cpu"), "float32")  # NHWC, as b2p predict runs on a CPU
        forward = torch_forward(model, "cpu")
    else:
        forward = OnnxStudent(path, threads=threads).forward
    rule = DecisionRule.from_dict(m.rule)
    times, maps, kept = [], [], []
    for i, f in enumerate(files):
        img = read_image(f)
        t0 = time.perf_counter()
        p = windows.image_probs(forward, img, m.window_model(), m.overlap, 4, m.window, m.tta)
        lm = rule.label_map(p, img)[0]
        times.append(time.perf_counter() - t0)
        maps.append(lm)
        if i < PROBS_KEPT:
            kept.append(p.astype(np.float32))
    np.savez_compressed(out / f"{kind}.npz", **{f"m{i}": x for i, x in enumerate(maps)}, **{f"p{i}": x for i, x in enumerate(kept)})
    peak = peak_rss_mb()
    print(json.dumps({"times": times, "peak_rss_mb": peak}))


def run_child(kind: str, model_dir: Path, files: list[str], out: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    (out / "files.json").write_text(json.dumps(files))
    r = subprocess.run([sys.executable, __file__, "--child", kind, "--model", str(model_dir), "--out", str(out), "--threads", str(threads)],
                       capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{kind} child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def scores_of(maps: list[np.ndarray], imported: Path, limit: int | None) -> dict:
    from b2p.dataset import class_list_of, load_batches
    from b2p.metrics import ConfusionMatrix

    batches = load_batches([imported])
    names = list(class_list_of(batches).names)
    cm = ConfusionMatrix(len(names) + 1)
    for lm, rec in zip(maps, [r for b in batches for r in b.split("test")][:limit]):
        cm.update(lm, rec.manual_label_map())
    s = cm.scores(names)
    return {"binary_iou": s["binary_iou"], "anomaly_miou": s["anomaly_miou"]}


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), platform.processor())
    import onnxruntime
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "load_before": os.getloadavg(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "host": platform.node()}


def summarise(kind: str, r: dict, warm: int = 1) -> dict:
    t = np.asarray(r["times"][warm:] or r["times"]) * 1000  # the first image warms up (oneDNN kernels, ORT arenas)
    return {"runtime": kind, "ms_median": float(np.median(t)), "ms_mean": float(t.mean()), "peak_rss_mb": r["peak_rss_mb"], "images_timed": len(t)}


def cpu_bench(a: argparse.Namespace) -> None:
    model_dir = a.model or prepare_model(a.work)
    if not (model_dir / "model.onnx").is_file() or (model_dir / "model.onnx").stat().st_mtime < (model_dir / "model.pt").stat().st_mtime:
        sh([sys.executable, "-m", "b2p", "export-onnx", "--model", str(model_dir)])
    imported = a.work / "imported" / f"{BATCH}.json"
    if not imported.is_file():
        raise SystemExit(f"{imported} not found: the test split comes from it (run once without --model, or give --work)")
    files = test_images(imported, a.limit)
    out = a.work / "bench"
    out.mkdir(parents=True, exist_ok=True)
    m = machine()
    print(f"{len(files)} Magnetic-Tile test images, {a.threads} threads each; {m['cpu']}, load before {m['load_before']}", flush=True)
    # rounds alternate the two runtimes, so a load that changes during the run (a shared machine) shows
    rounds = [{k: run_child(k, model_dir, files, out, a.threads) for k in ("torch", "onnx")} for _ in range(a.rounds)]
    results = rounds[-1]
    z = {k: np.load(out / f"{k}.npz") for k in results}
    maps = {k: [z[k][f"m{i}"] for i in range(len(files))] for k in results}
    same = sum(int((x == y).sum()) for x, y in zip(maps["torch"], maps["onnx"])) / sum(x.size for x in maps["torch"])
    dp = max(float(np.abs(z["torch"][f"p{i}"] - z["onnx"][f"p{i}"]).max()) for i in range(min(PROBS_KEPT, len(files))))
    per_round = [{k: summarise(k, r) for k, r in rd.items()} for rd in rounds]
    rows = [{**summarise(k, {"times": [t for rd in rounds for t in rd[k]["times"][1:]], "peak_rss_mb": max(rd[k]["peak_rss_mb"] for rd in rounds)}, warm=0)}
            for k in ("torch", "onnx")]
    for row in rows:
        row.update(scores_of(maps[row["runtime"]], imported, a.limit))
    meta = json.loads(subprocess.run([sys.executable, "-m", "b2p.deploy.run_cli", "info", "--model", str(model_dir / "model.onnx")],
                                     capture_output=True, text=True, check=True).stdout)
    report = {"generated": datetime.datetime.now().isoformat(timespec="seconds"), "machine": m, "threads": a.threads,
              "model": str(model_dir), "model_note": model_note(model_dir), "settings": {k: meta[k] for k in ("window", "overlap", "tta", "rule", "tile_size", "scale")},
              "images": len(files), "rounds": a.rounds, "rows": rows,
              "round_speedups": [rd["torch"]["ms_median"] / rd["onnx"]["ms_median"] for rd in per_round],
              "load_after": os.getloadavg(), "identical_pixels": same, "max_prob_diff": dp,
              "speedup_onnx_over_torch": rows[0]["ms_median"] / rows[1]["ms_median"],
              "memory_ratio_onnx_over_torch": rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]}
    write_report(report, REPO / "reports" / "benchmarks" / "onnx_cpu")


def model_note(model_dir: Path) -> str:
    """Whether the model was trained (b2p train records its epoch), and its backbone: random weights time the
    same, but their scores mean nothing."""
    from b2p.student.checkpoint import read_checkpoint

    ck = read_checkpoint(model_dir)
    c = ck["config"]
    what = f"{c['arch']} {c['backbone']} {c['decoder']} decoder, context {c['context']}, tile {c['tile_size']}"
    if "epoch" in ck["info"]:
        return f"{what}, trained (epoch {ck['info']['epoch']})"
    return f"{what}, NOT TRAINED (backbone {ck['provenance'].get('source')}, decoder random): timings and parity valid, scores meaningless"


def write_report(r: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(r, indent=1) + "\n")
    m = r["machine"]
    lines = [
        "# The deployable student on a CPU: torch eager vs ONNX Runtime",
        "",
        f"Generated by `benchmarks/bench_onnx.py` on {r['generated']}; machine {m['host']}: {m['cpu']}, {m['cores']} cores, "
        f"load average before the run {', '.join(f'{x:.2f}' for x in m['load_before'])}; torch {m['torch']}, onnxruntime {m['onnxruntime']}, "
        f"Python {m['python']}. Each runtime in its own process, {r['threads']} threads, float32, the two alternating for {r['rounds']} rounds "
        f"(figures: all rounds' images; load average after {', '.join(f'{x:.2f}' for x in r['load_after'])}).",
        "",
        f"Model {r['model']}: {r['model_note']}; {r['images']} Magnetic-Tile test images (the suite's test split) at native size; "
        f"settings {json.dumps(r['settings'])}.",
        "",
        "| runtime | ms / image (median) | ms / image (mean) | peak RSS (MB) | binary IoU | anomaly mIoU |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['runtime']} | {row['ms_median']:.1f} | {row['ms_mean']:.1f} | {row['peak_rss_mb']:.0f} | {row['binary_iou']:.3f} | {row['anomaly_miou']:.3f} |")
    lines += ["", f"ONNX Runtime is {r['speedup_onnx_over_torch']:.2f}x the speed of torch eager (median ms; per round "
              f"{', '.join(f'{x:.2f}x' for x in r['round_speedups'])}), at {r['memory_ratio_onnx_over_torch']:.2f}x its peak RSS; "
              f"label maps identical on {100 * r['identical_pixels']:.4f} % of pixels; largest class-probability difference {r['max_prob_diff']:.1e} "
              f"(first {min(PROBS_KEPT, r['images'])} images).", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


def gpu_bench(a: argparse.Namespace) -> None:
    """Images per second at 518 x 518 (module docstring); only where CUDA is available."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA GPU here")
    from b2p.student.model import StudentConfig, build_model

    models = {"paper DINOv2-S (random weights)": build_model(StudentConfig(num_classes=6, backbone="dinov2_s"), weights="random").eval()}
    if a.model:
        from b2p.student.checkpoint import load_student

        models["deployable " + str(a.model)] = load_student(a.model, "cpu")[0]
    rows = []
    for name, model in models.items():
        for batch in (1, 16):
            rows += gpu_rows(name, model, batch, a.work / "gpu")
    report = {"generated": datetime.datetime.now().isoformat(timespec="seconds"), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "size": 518, "paper_fps": PAPER_FPS, "rows": rows}
    stem = REPO / "reports" / "benchmarks" / "onnx_gpu"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"# Student inference on {report['gpu']} at 518 x 518 ({report['generated']}; paper: {PAPER_FPS} FPS)", "",
             "| model | batch | path | images / s | x paper |", "| --- | ---: | --- | ---: | ---: |"]
    lines += [f"| {r['model']} | {r['batch']} | {r['path']} | {r['fps']:.1f} | {r['fps'] / PAPER_FPS:.2f} |" if "fps" in r else
              f"| {r['model']} | {r['batch']} | {r['path']} | not run: {r['error']} | |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _fps(fn, x, reps: int = 20) -> float:
    import torch

    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(x)
    torch.cuda.synchronize()
    return reps * x.shape[0] / (time.perf_counter() - t0)


def gpu_rows(name: str, model, batch: int, work: Path) -> list[dict]:
    """torch eager fp32 / bf16, torch.compile, ORT CUDA and TensorRT providers on one model and batch size."""
    import torch

    from b2p.deploy.export import _FineLogits, onnx_bytes

    dev = torch.device("cuda")
    net = _FineLogits(model.to(dev).eval())
    x = torch.randn(batch, 3, 518, 518, device=dev)
    rows = []

    def add(path: str, fn) -> None:
        try:
            with torch.no_grad():
                rows.append({"model": name, "batch": batch, "path": path, "fps": _fps(fn, x)})
        except Exception as e:  # a path this machine lacks (no TensorRT, a compile failure) is reported, not hidden
            rows.append({"model": name, "batch": batch, "path": path, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})

    add("torch eager float32", net)
    add("torch eager bfloat16", lambda t: torch.autocast("cuda", dtype=torch.bfloat16)(net)(t))
    compiled = torch.compile(net, mode="max-autotune")
    add("torch.compile float32", compiled)
    import onnxruntime as ort

    data = onnx_bytes(model.cpu().eval(), 17)
    model.to(dev)
    for prov in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        if prov not in ort.get_available_providers():
            rows.append({"model": name, "batch": batch, "path": f"onnxruntime {prov}", "error": "provider not installed"})
            continue
        sess = ort.InferenceSession(data, providers=[prov])
        host = x.cpu().numpy()
        add(f"onnxruntime {prov} (host input)", lambda t, s=sess, h=host: s.run(["logits"], {"image": h}))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="trained model folder (default: train a small one in --work)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/b2p-bench-onnx"), help="working folder (data, model, outputs)")
    ap.add_argument("--threads", type=int, default=1, help="threads per runtime (1: as the suite runs each stage; more oversubscribes a shared machine)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many test images")
    ap.add_argument("--rounds", type=int, default=2, help="torch then ONNX Runtime, this many times")
    ap.add_argument("--gpu", action="store_true", help="the GPU benchmark instead (module docstring)")
    ap.add_argument("--child", choices=("torch", "onnx"), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.model, json.loads((a.out / "files.json").read_text()), a.out, a.threads)
    elif a.gpu:
        gpu_bench(a)
    else:
        cpu_bench(a)


if __name__ == "__main__":
    main()
