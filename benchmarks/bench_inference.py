"""Student speed on any device, side by side in one run (prints; not a test).

    python benchmarks/bench_inference.py [--device auto|cpu|cuda] [--size 518] [--iters 50]

--size is the tile side: rounded down to each backbone's multiple (DINOv2 14, EfficientNet-Lite0 32, U-Net 8).

For the paper's DINOv2-S/14 student (RANDOM weights: no pretrained DINOv2 can be had here, so timings are
valid and predictions are not), the embedded EfficientNet-Lite0 student and the U-Net baseline: parameters
(total / trainable), forward GFLOPs, inference latency at batch 1 (ms, FPS; bf16 autocast on CUDA as the
paper's mixed precision), and one training step per image with BitFit vs with cached frozen features.
Paper reference (H100, 518 px): 27.6 M params, 5.6 M trainable, 43.4 GFLOPs, 6.2 ms / 161 FPS.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from b2p.student.losses import LossParams, StudentLoss
from b2p.student.model import StudentConfig, build_model, count_params


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, iters: int) -> float:
    """Mean seconds per call after warm-up."""
    for _ in range(3):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t) / iters


def bench(name: str, cfg: StudentConfig, weights: str | None, device: torch.device, iters: int) -> None:
    model = build_model(cfg, weights=weights).to(device)
    pc = count_params(model)
    s = cfg.tile_size  # one square tile of the sliding window
    x = torch.randn(1, 3, s, s, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    gflops = fc.get_total_flops() / 2e9  # multiply-adds, the convention papers quote

    def infer():
        with torch.no_grad(), amp:
            model(x)

    lat = timed(infer, device, iters)
    # training step per image: full BitFit path vs cached frozen features (decoder and heads only)
    y = torch.zeros(1, s, s, dtype=torch.long, device=device)
    y[:, s // 3 : s // 2, s // 3 : s // 2] = 1
    loss_fn = StudentLoss(LossParams(), cfg.num_classes)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)

    def step(feats=None):
        with amp:
            out = model(x, feats)
            loss, _ = loss_fn(out, {"target": y})
        opt.zero_grad()
        loss.backward()
        opt.step()

    steps = max(3, iters // 5)
    t_full = timed(step, device, steps)
    t_cached = None
    if cfg.arch == "b2p":
        with torch.no_grad():
            feats = [f.detach() for f in model.backbone_features(x)]
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
        t_cached = timed(lambda: step(feats), device, steps)
    cached = f"cached-frozen {t_cached * 1e3:7.1f} ms (x{t_full / t_cached:4.1f})" if t_cached else ""
    print(
        f"{name:40s} {s}px  params {pc['total'] / 1e6:5.1f} M ({pc['trainable'] / 1e6:4.1f} M trainable)  "
        f"{gflops:6.1f} GFLOPs  infer {lat * 1e3:7.2f} ms = {1 / lat:6.1f} FPS  train step {t_full * 1e3:7.1f} ms  {cached}",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, default=518)
    ap.add_argument("--iters", type=int, default=50)
    a = ap.parse_args()
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else ("cpu" if a.device == "auto" else a.device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} on {name}")
    s = a.size
    bench("Boxes2Pixels DINOv2-S/14 BitFit (RANDOM w)", StudentConfig(num_classes=2, backbone="dinov2_s", tile_size=s - s % 14), "random", device, a.iters)
    bench("Boxes2Pixels EffNet-Lite0 (embedded)", StudentConfig(num_classes=2, tile_size=s - s % 32), None, device, a.iters)
    bench("U-Net from scratch (baseline)", StudentConfig(num_classes=2, arch="unet", tile_size=s - s % 8), None, device, a.iters)


if __name__ == "__main__":
    main()
