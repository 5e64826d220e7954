"""One training step of the main job's student on this CPU, side by side in one run (prints).

    python benchmarks/bench_cpu_step.py [--params params.yaml] [--threads N] [--steps 20] [--tile 128] [--batch-size 4]

Builds the student of params.yaml's `train:` section (features precomputed, as the frozen backbone's cache
gives them) and times forward + backward + AdamW on one batch of tiles, for each layout and precision the
trainer can use on a CPU: NCHW float32 (torch's default), NHWC float32 (what `b2p train` uses on a CPU,
train.cpu_layout), NHWC bfloat16 autocast (train.cpu_bf16; emulated, and slow, on a CPU without AMX /
AVX512-BF16). Also the per-step overheads the trainer cut: AdamW per parameter vs foreach, and the
training confusion matrix's argmax vs class_map. Then sliding-window inference of one --predict-size
square image (`image_logits`, windows of the training tile) with the model in NCHW (what `b2p predict`
uses) vs NHWC. Timings only: the loss is a stand-in, the image noise.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import yaml

from b2p.student.model import build_model, class_map
from b2p.student.predict import image_logits
from b2p.student.train import TrainParams, cpu_layout, cpu_native_bf16


def timed(fn, steps: int) -> float:
    """Mean ms per call after 3 warm-up calls."""
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, as `dvc repro` runs)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tile", type=int, default=None, help="default: train.tile_size")
    ap.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size")
    ap.add_argument("--classes", type=int, default=3, help="defect classes (the demo has 3)")
    ap.add_argument("--predict-size", type=int, default=1024, help="side of the square image timed in inference")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    sec = yaml.safe_load(open(a.params))["train"]
    tp = TrainParams(**{k: v for k, v in sec.items() if k in TrainParams.__dataclass_fields__})
    tile, bs = a.tile or tp.tile_size or 128, a.batch_size or tp.batch_size
    cpu = torch.device("cpu")
    print(f"student {tp.arch} / {tp.backbone} ({tp.adaptation}, decoder {tp.decoder}, context {tp.context}, refine {tp.refine});"
          f" batch {bs} x {tile}x{tile}; {torch.get_num_threads()} threads; native bf16: {cpu_native_bf16()}")

    rows = []
    for name, nhwc, bf16 in (("NCHW float32", False, False), ("NHWC float32 (b2p train)", True, False), ("NHWC bfloat16 (cpu_bf16)", True, True)):
        torch.manual_seed(0)
        model = build_model(tp.student_config(a.classes), weights=tp.weights)
        x = torch.randn(bs, 3, tile, tile)
        with torch.no_grad():
            feats = [f.detach() for f in model.backbone_features(x)]
        edges = (torch.rand(bs, tile), torch.rand(bs, tile))
        if nhwc:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, foreach=True)
        model.train()

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(cpu_layout(x, cpu) if nhwc else x, cpu_layout(feats, cpu) if nhwc else feats, edges)
            loss = sum(t.float().square().mean() for t in out.values() if t is not None)
            opt.zero_grad()
            loss.backward()
            opt.step()

        rows.append((name, timed(step, a.steps)))
    base = rows[0][1]
    for name, ms in rows:
        print(f"  step {name:28s} {ms:7.1f} ms  x{base / ms:.2f}")

    torch.manual_seed(0)
    model = build_model(tp.student_config(a.classes), weights=tp.weights)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    for foreach in (False, True):
        opt = torch.optim.AdamW(params, lr=1e-3, foreach=foreach)
        print(f"  AdamW step, foreach={foreach!s:5s}         {timed(opt.step, a.steps):7.2f} ms ({len(params)} tensors)")
    logits = torch.randn(bs, a.classes + 1, tile, tile)
    print(f"  argmax over classes               {timed(lambda: logits.argmax(1), a.steps):7.2f} ms")
    print(f"  class_map (max(1).indices)        {timed(lambda: class_map(logits, 1), a.steps):7.2f} ms")

    img = np.random.default_rng(0).integers(0, 256, (a.predict_size, a.predict_size, 3), dtype=np.uint8)
    model.eval()
    times = {}
    for name, m in (("NCHW (b2p predict)", model), ("NHWC", model.to(memory_format=torch.channels_last))):
        with torch.no_grad():
            times[name] = timed(lambda: image_logits(m, img, window=tile), max(2, a.steps // 10)) / 1000
    (n0, t0), (n1, t1) = times.items()
    print(f"  predict {a.predict_size}x{a.predict_size} in {tile} px windows: {n0} {t0:.2f} s, {n1} {t1:.2f} s (x{t0 / t1:.2f})")


if __name__ == "__main__":
    main()
