"""Student timings on this machine (prints; not a test). Short runs: a few steps each.

    python benchmarks/bench_student.py [--sizes 518,224] [--steps 3] [--threads N]

For each configuration: training seconds per image (BitFit, and the frozen backbone with cached features:
decoder only), inference images/s, peak RSS. DINOv2-S uses RANDOM weights (no pretrained DINOv2 can be
downloaded here): timings are valid, predictions are not. EfficientNet-Lite0 uses its real ImageNet weights.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from b2p.student.losses import LossParams, StudentLoss
from b2p.student.model import StudentConfig, build_model, count_params


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(name: str, cfg: StudentConfig, weights: str | None, steps: int) -> dict:
    model = build_model(cfg, weights=weights)
    pc = count_params(model)
    s = cfg.input_size
    x = torch.randn(1, 3, s, s)
    y = torch.zeros(1, s, s, dtype=torch.long)
    y[:, s // 3 : s // 2, s // 3 : s // 2] = 1
    loss_fn = StudentLoss(LossParams(), cfg.num_classes)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)

    def step(feats=None):
        out = model(x, feats)
        loss, _ = loss_fn(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    model.train()
    step()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        step()
    train_s = (time.perf_counter() - t) / steps
    # cached frozen path: backbone features precomputed, only decoder + heads train
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    with torch.no_grad():
        t = time.perf_counter()
        feats = [f.half().float() for f in model.backbone_features(x)]
        feat_s = time.perf_counter() - t
    step(feats)
    t = time.perf_counter()
    for _ in range(steps):
        step(feats)
    cached_s = (time.perf_counter() - t) / steps
    model.eval()
    xb = torch.randn(2, 3, s, s)
    with torch.no_grad():
        model(xb)
        t = time.perf_counter()
        for _ in range(max(1, steps // 2)):
            model(xb)
        ips = 2 * max(1, steps // 2) / (time.perf_counter() - t)
    r = dict(name=name, size=s, total_m=pc["total"] / 1e6, trainable_m=pc["trainable"] / 1e6, train_s_per_img=train_s,
             cached_s_per_img=cached_s, speedup=train_s / cached_s, feature_once_s=feat_s, infer_img_s=ips, peak_rss_mb=rss_mb())
    print(
        f"{name:38s} {s:4d}px  params {r['total_m']:6.2f} M ({r['trainable_m']:5.2f} M trainable)  "
        f"train {train_s:6.3f} s/img  cached-frozen {cached_s:6.3f} s/img (x{r['speedup']:.1f}; features once {feat_s:.3f} s)  "
        f"infer {ips:6.2f} img/s  peak RSS {r['peak_rss_mb']:.0f} MB",
        flush=True,
    )
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="518,224")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--only", default="", help="comma list: dinov2,effnet,effnet_dim256,unet")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    only = set(filter(None, a.only.split(",")))
    for s in [int(v) for v in a.sizes.split(",")]:
        if not only or "dinov2" in only:
            bench("DINOv2-S/14 BitFit (RANDOM weights)", StudentConfig(num_classes=3, backbone="dinov2_s", input_size=s), "random", a.steps)
        if not only or "effnet" in only:
            bench("EffNet-Lite0 BitFit (ImageNet, default)", StudentConfig(num_classes=3, input_size=s), None, a.steps)
        if not only or "effnet_dim256" in only:
            bench("EffNet-Lite0 BitFit dim256 taps2,4,10,15", StudentConfig(num_classes=3, input_size=s, decoder_dim=256, taps=[2, 4, 10, 15]), None, a.steps)
        if only and "unet" in only:
            cfg = StudentConfig(num_classes=3, arch="unet", input_size=s)
            m = build_model(cfg)
            x = torch.randn(1, 3, s, s)
            t = time.perf_counter()
            for _ in range(a.steps):
                m(x)["fine"].sum().backward()
            print(f"U-Net from scratch {s}px: train-ish {(time.perf_counter() - t) / a.steps:.3f} s/img, params {count_params(m)['total'] / 1e6:.2f} M")


if __name__ == "__main__":
    main()
