"""`b2p predict`'s arithmetic on a CPU, side by side in one run (prints; not a test).

    python benchmarks/bench_inference_cpu.py [--model DIR] [--images DIR] [--n 16] [--window PX] [--threads 1]

The sliding-window prediction (`image_logits`, as `b2p predict` runs it) of the same images three ways: the
model in NCHW float32 (before NHWC inference), NHWC float32 (`--precision float32`, the default) and NHWC
bfloat16 autocast (`--precision bfloat16` / `auto`, only where the CPU has it natively: AMX / AVX512-BF16).
Prints seconds, the speed-up over NCHW float32, the share of argmax labels that agree with it and the
largest logit difference. --model: a trained model folder (the suite's students); without it, the
`b2p-lite` student of the benchmark suite with RANDOM weights (timings valid, labels meaningless). --images:
a folder searched recursively for .jpg / .png / .bmp (every --n-th file taken, sorted); without it, random
600 x 400 images. One thread by default, as the benchmark suite runs each stage.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import numpy as np
import torch

from b2p.fileio import read_image
from b2p.student.checkpoint import load_student
from b2p.student.model import StudentConfig, build_model
from b2p.student.predict import image_logits
from b2p.student.train import cpu_native_bf16


def images_of(folder: Path | None, n: int) -> list[np.ndarray]:
    if folder is None:
        rng = np.random.default_rng(0)
        return [rng.integers(0, 256, (400, 600, 3), dtype=np.uint8) for _ in range(n)]
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp"})
    step = max(len(files) // n, 1)
    return [read_image(p) for p in files[::step][:n]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--images", type=Path)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--window", type=int, default=None, help="px (default: predict's default for the model)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.model:
        model, _ = load_student(a.model, "cpu")
        what = str(a.model)
    else:
        torch.manual_seed(0)
        cfg = StudentConfig(num_classes=5, backbone="efficientnet_lite0", decoder="lite", context="strip", decoder_dim=64, tile_size=256)
        model, what = build_model(cfg, weights="random").eval(), "b2p-lite, RANDOM weights"
    imgs = images_of(a.images, a.n)
    print(f"{what}; {len(imgs)} images; {a.threads} thread(s); native bfloat16: {cpu_native_bf16()}")

    def run(ctx) -> tuple[float, list[np.ndarray]]:
        with torch.no_grad(), ctx():
            image_logits(model, imgs[0], window=a.window)  # warm-up: oneDNN picks its kernels
            t = time.perf_counter()
            out = [image_logits(model, im, window=a.window) for im in imgs]
            return time.perf_counter() - t, out

    base_s, base = run(contextlib.nullcontext)
    rows = [("NCHW float32", base_s, base)]
    model.to(memory_format=torch.channels_last)  # what b2p predict does on a CPU (predict.inference_setup)
    rows.append(("NHWC float32", *run(contextlib.nullcontext)))
    if cpu_native_bf16():
        rows.append(("NHWC bfloat16", *run(lambda: torch.autocast("cpu", dtype=torch.bfloat16))))
    for name, s, out in rows:
        agree = np.mean([np.mean(p.argmax(0) == q.argmax(0)) for p, q in zip(out, base)])
        diff = max(float(np.abs(p - q).max()) for p, q in zip(out, base))
        print(f"{name:14s} {s:7.2f} s  x{base_s / s:4.2f}  labels agree {agree:.5f}  max |logit diff| {diff:.2g}")


if __name__ == "__main__":
    main()
