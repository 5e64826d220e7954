"""Student training speed: frozen backbone + tile feature cache vs BitFit, per epoch, side by side (prints).

    python benchmarks/bench_student.py [--work DIR] [--images 40] [--image-size 256] [--tile 256] [--scale 1.0]
        [--epochs 3] [--batch-size 4] [--backbone efficientnet_lite0] [--decoder full|lite] [--decoder-dim N] [--threads 1] [--no-breakdown | --breakdown-only]
    python benchmarks/bench_student.py --imported DIR --teacher-root DIR ...   (an existing workspace)

Without --imported, builds a demo batch in WORK (`b2p demo-data`, `b2p import`, `b2p teach --teacher box`).
Then trains the same student twice through `b2p.student.train.train_student`, the real training path
(tiles at the training scale, losses, EMA, validation on whole val images): BitFit without a cache, and the
frozen backbone with the tile feature cache, at the same scale, tile size, batch size and epochs. Prints the
seconds of every epoch (train + val; the cached run's epoch 1 also computes the features), the steady-state
ratio (mean of epochs 2.. of BitFit / of cached) and the ratio over all epochs.

The breakdown (on by default) times one training step on a batch of tiles piece by piece, forward +
backward: the backbone under BitFit (what the cache saves) and each decoder part (what it cannot save). The
cached path's best possible speed-up is (backbone + decoder) / decoder. DINOv2 uses RANDOM weights (no
pretrained DINOv2 can be downloaded here): timings are valid, predictions are not.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def b2p(*args: str, cwd: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "b2p", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"b2p {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")


def demo_workspace(work: Path, images: int, size: int) -> tuple[Path, Path]:
    """A demo batch with box-fill teacher masks in WORK; returns (imported folder, teacher root)."""
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "imported" / "demo.json").is_file():
        b2p("demo-data", "--out", "raw", "--images", str(images), "--size", str(size), "--mask-fraction", "0.2", cwd=work)
        b2p("import", "--batch", "demo", "--images", "raw/images", "--coco", "raw/annotations.json", "--masks", "raw/masks",
            "--classes", "classes.json", "--out", "imported/demo.json", cwd=work)
    if not (work / "teach" / "demo").is_dir():
        b2p("teach", "imported/demo.json", "--teacher", "box", "--out", "teach", "--quiet", cwd=work)
    return work / "imported", work / "teach"


def epoch_seconds(model_dir: Path) -> list[float]:
    with open(model_dir / "curves.csv") as f:
        return [float(r["seconds"]) for r in csv.DictReader(f)]


def train_run(name: str, imported: Path, teach: Path, out: Path, a: argparse.Namespace, **kw) -> list[float]:
    from rich.console import Console

    from b2p.project import resolve_batch_files
    from b2p.student.train import TrainParams, train_student

    params = TrainParams(
        backbone=a.backbone, weights="random" if a.backbone.startswith("dinov2") else None, tile_size=a.tile, scale=a.scale,
        epochs=a.epochs, batch_size=a.batch_size, patience=a.epochs + 1, device="cpu", seed=0, decoder_dim=a.decoder_dim, **{"decoder": a.decoder, **kw},
    )
    t = time.perf_counter()
    train_student(resolve_batch_files(imported, None), teach, out, params, console=Console(stderr=True, quiet=True), progress=False)
    secs = epoch_seconds(out)
    print(f"{name:34s} total {time.perf_counter() - t:7.1f} s; per epoch: " + ", ".join(f"{s:.2f}" for s in secs), flush=True)
    return secs


def _timed(fn, n: int) -> float:
    """Fastest of n calls after a warm-up: on a machine shared with other work the minimum is the stable figure."""
    fn()
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def breakdown(a: argparse.Namespace, steps: int = 3) -> None:
    """Forward + backward seconds (fastest of `steps`) of each part of one training step on random tiles."""
    from b2p.student.model import StudentConfig, build_model

    cfg = StudentConfig(num_classes=4, backbone=a.backbone, tile_size=a.tile, decoder_dim=a.decoder_dim, decoder=a.decoder)
    model = build_model(cfg, weights="random" if a.backbone.startswith("dinov2") else None).train()
    x = torch.randn(a.batch_size, 3, a.tile, a.tile)

    def loss_of(out: dict) -> torch.Tensor:
        return sum(v.float().logsumexp(1).mean() for v in out.values() if v is not None)

    full = _timed(lambda: loss_of(model(x)).backward(), steps)
    with torch.no_grad():
        feats = [f.detach() for f in model.backbone_features(x)]
    bitfit_backbone = _timed(lambda: sum(f.float().mean() for f in model.backbone_features(x)).backward(), steps)
    trainable = {n: p.requires_grad for n, p in model.backbone.named_parameters()}
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    cached = _timed(lambda: loss_of(model(x, feats)).backward(), steps)
    # inputs of each decoder part, captured from one forward pass
    parts = {"decoder fusion": None, **{f"up-step {i + 1}": u for i, u in enumerate(model.decoder.up)}, "detail branch": model.detail,
             "mixer": model.mixer, "fine head": model.fine_head, "binary head": model.binary_head}
    captured: dict = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, k=k: captured.__setitem__(k, (inp, out)))
             for k, m in parts.items() if m is not None]
    hooks.append(model.decoder.up[0].register_forward_pre_hook(lambda mod, inp: captured.__setitem__("fusion out", inp[0])))
    with torch.no_grad():
        model(x, feats)
    for h in hooks:
        h.remove()

    def fusion() -> torch.Tensor:  # projections + top-down fusion, the decoder up to its first up-step
        d = model.decoder
        import torch.nn.functional as F

        size = max((f.shape[-2:] for f in feats), key=lambda s: s[0] * s[1])
        p = [proj(f) for proj, f in zip(d.proj, feats)]
        p = [q if q.shape[-2:] == size else F.interpolate(q, size=size, mode="bilinear", align_corners=False) for q in p]
        y = p[-1]
        for i in range(len(p) - 2, -1, -1):
            y = d.fuse[len(p) - 2 - i](y, p[i])
        return y

    rows = [("decoder fusion", _timed(lambda: fusion().float().sum().backward(), steps), tuple(captured["fusion out"].shape))]
    for k, m in parts.items():
        if m is None or k == "decoder fusion":
            continue
        if k.endswith("head"):  # the heads read the mixer's output (their first x2 is shared, timed in each)
            inp, out = (captured["mixer"][1],), m(captured["mixer"][1])
        else:
            inp, out = captured[k]
        grad_in = k != "detail branch"  # the detail branch reads the image, which needs no gradient
        rows.append((k, _timed(lambda m=m, inp=inp, g=grad_in: m(inp[0].detach().requires_grad_(g)).float().sum().backward(), steps),
                     tuple(out.shape)))
    for n, p in model.backbone.named_parameters():
        p.requires_grad_(trainable[n])
    print(f"\nbreakdown of one training step ({a.backbone}, {a.batch_size} tiles of {a.tile} px, forward + backward, s):")
    print(f"  BitFit step {full:.3f}   cached-features step {cached:.3f}   (x{full / cached:.2f} per step)")
    print(f"  backbone under BitFit {bitfit_backbone:.3f}  <- what the cache saves")
    for k, s, shape in rows:
        print(f"  {k:16s} {s:.3f}  -> {shape}")
    dec = sum(s for _, s, _ in rows)
    print(f"  decoder parts together {dec:.3f}: best possible cached speed-up about x{(bitfit_backbone + dec) / dec:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/b2p-bench-student"))
    ap.add_argument("--imported", type=Path, help="Existing folder of batch files (skips the demo workspace).")
    ap.add_argument("--teacher-root", type=Path, help="Teacher label maps of --imported.")
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--decoder", default="full", choices=["full", "lite"], help="the paper's decoder or the lite one (model.py)")
    ap.add_argument("--decoder-dim", type=int, default=None, help="decoder channels (default: the model's, 128 CNN / 256 ViT)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: see benchmarks/magnetic_tile.py)")
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--breakdown-only", action="store_true", help="only the per-part step breakdown (no data, no training)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU ({os.cpu_count()} cores); {a.backbone}, "
          f"{a.decoder} decoder, tile {a.tile} px, scale {a.scale:g}, batch {a.batch_size}, {a.epochs} epochs", flush=True)
    if a.breakdown_only:
        breakdown(a)
        return
    if a.imported:
        if not a.teacher_root:
            raise SystemExit("--imported needs --teacher-root")
        imported, teach = a.imported, a.teacher_root
    else:
        imported, teach = demo_workspace(a.work, a.images, a.image_size)
        print(f"demo workspace {a.work}: {a.images} images of {a.image_size} px, box-fill teacher", flush=True)
    runs = a.work / "runs"
    bitfit = train_run("BitFit (no cache)", imported, teach, runs / "bitfit", a, adaptation="bitfit", feature_cache="off")
    cached = train_run("frozen + tile feature cache", imported, teach, runs / "frozen", a, adaptation="frozen", feature_cache="memory")
    def steady(secs: list[float]) -> float:
        return sum(secs[1:]) / (len(secs) - 1) if len(secs) > 1 else secs[0]

    steady_b, steady_c = steady(bitfit), steady(cached)
    print(f"per-epoch ratio BitFit / cached: x{steady_b / steady_c:.2f} from epoch 2 on ({steady_b:.2f} s vs {steady_c:.2f} s; "
          f"epoch 1 of the cached run computes the features), x{sum(bitfit) / sum(cached):.2f} over all {a.epochs} epochs; target x5",
          flush=True)
    if a.decoder == "lite":  # the paper's student (BitFit + full decoder) in the same run, as the reference
        paper = train_run("BitFit + full decoder (paper)", imported, teach, runs / "paper", a, adaptation="bitfit", feature_cache="off",
                          decoder="full")
        print(f"per-epoch ratio paper's student / cached lite: x{steady(paper) / steady_c:.2f} from epoch 2 on "
              f"({steady(paper):.2f} s vs {steady_c:.2f} s), x{sum(paper) / sum(cached):.2f} over all {a.epochs} epochs", flush=True)
    if not a.no_breakdown:
        breakdown(a)


if __name__ == "__main__":
    main()
