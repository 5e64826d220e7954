"""Benchmark of the teach stage (prints figures measured in this one run; not a test).

    python benchmarks/bench_teach.py [--model vit_b] [--size 1024] [--images 2] [--device auto]

Measures, on a synthetic image of `--size` x 3/4 `--size` pixels with planted dark defects:
  1. SAM encoder calls and wall time for one image with 1 box vs 16 boxes (target ratio <= 1.2);
  2. a cached re-run vs a cold run of `teach_batch` (decoder settings changed, so every image is redone
     but the encoder is skipped; target >= 10x faster);
  3. images per second of each teacher (box, grabcut, sam).
SAM uses RANDOM weights at the real size of `--model`, saved as an official-format checkpoint and loaded
through the same code users run: its timings are real, its masks are meaningless (not pretrained).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from b2p.dataset import save_batch_dict, to_coco_dict  # noqa: E402
from b2p.fileio import sha256_file, write_png_atomic  # noqa: E402
from b2p.labels import ClassList  # noqa: E402


def make_batch(root: Path, n_images: int, w: int, h: int, n_boxes: int, seed: int = 0) -> Path:
    """A canonical batch of `n_images` textured images with `n_boxes` planted dark blobs each."""
    rng = np.random.default_rng(seed)
    img_dir = root / "images"
    images, anns = [], []
    for i in range(n_images):
        img = (150 + rng.normal(0, 8, (h, w))).clip(0, 255)
        yy, xx = np.mgrid[:h, :w]
        fname = f"img_{i:03d}.png"
        for _ in range(n_boxes):
            cx, cy = rng.integers(40, w - 40), rng.integers(40, h - 40)
            a, b = rng.integers(6, 30), rng.integers(6, 30)
            blob = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1
            img[blob] = 70
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1,
                         "bbox": [int(cx - a), int(cy - b), int(2 * a + 1), int(2 * b + 1)], "area": 0, "iscrowd": 0})
        write_png_atomic(img_dir / fname, np.repeat(img.astype(np.uint8)[..., None], 3, 2))
        images.append({"id": i + 1, "file_name": fname, "width": w, "height": h, "sha256": sha256_file(img_dir / fname),
                       "batch": "bench", "split": "train", "has_manual_mask": False})
    path = root / "imported" / "bench.json"
    coco = to_coco_dict("bench", ClassList(("defect",)), images, anns, [], image_root=os.path.relpath(img_dir, path.parent))
    save_batch_dict(path, coco)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "test_tiny"])
    ap.add_argument("--size", type=int, default=1024, help="image width; height is 3/4 of it")
    ap.add_argument("--images", type=int, default=2, help="images per batch for the throughput figures")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    import torch

    from b2p.fileio import read_image
    from b2p.teach.base import teach_batch
    from b2p.teach.box import BoxTeacher
    from b2p.teach.grabcut import GrabCutTeacher
    from b2p.teach.sam import SamSettings, SamTeacher
    from b2p.teach.weights import save_random_checkpoint

    w, h = args.size, args.size * 3 // 4
    tmp = Path(tempfile.mkdtemp(prefix="bench_teach_"))
    print(f"# bench_teach: {w}x{h} images, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"CUDA {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}")
    print(f"# SAM {args.model}: RANDOM weights at real size (not pretrained; timings only)")
    t = time.perf_counter()
    ckpt = save_random_checkpoint(args.model, tmp / f"sam_{args.model}_random.pth")
    print(f"random checkpoint written: {ckpt.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - t:.1f} s")

    def sam(cache, **kw):
        return SamTeacher(SamSettings(model_type=args.model, **kw), checkpoint=ckpt, cache_dir=cache, device=args.device, progress=False)

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    # 1. one image: 1 box vs 16 boxes (no cache, so the encoder runs each time)
    one = make_batch(tmp / "one", 1, w, h, 16, seed=1)
    img = read_image(tmp / "one" / "images" / "img_000.png")
    from b2p.dataset import load_batch

    boxes16 = load_batch(one).images[0].boxes_xyxy()
    teacher = sam(None)
    teacher.predict(img[:64, :64].copy(), boxes16[:1] * 0 + np.array([[1, 1, 30, 30]], np.float32))  # warm-up
    timings = {}
    for n in (1, 16):
        calls0 = teacher.encoder_calls
        sync()
        t = time.perf_counter()
        teacher.predict(img, boxes16[:n])
        sync()
        timings[n] = time.perf_counter() - t
        print(f"[1] 1 image, {n:2d} box(es): {teacher.encoder_calls - calls0} encoder call(s), {timings[n]:.2f} s")
    print(f"[1] ratio 16 boxes / 1 box = {timings[16] / timings[1]:.2f} (target <= 1.2)")

    # 2. cold run vs cached re-run of a batch (the re-run changes the decoder rule: images redone, encoder skipped)
    batch = make_batch(tmp / "batch", args.images, w, h, 4, seed=2)
    cache = tmp / "cache"
    cold_t = sam(cache)
    sync()
    cold = teach_batch(batch, tmp / "teach_cold", cold_t, progress=False)
    sync()
    warm_t = sam(cache, mask_select="iou")
    hot = teach_batch(batch, tmp / "teach_cold", warm_t, progress=False)
    sync()
    print(f"[2] cold run: {cold.taught} images, {cold_t.encoder_calls} encoder calls, {cold.seconds:.2f} s")
    print(f"[2] cached re-run (other mask_select): {hot.taught} images redone, {warm_t.encoder_calls} encoder calls, "
          f"{warm_t.cache.hits} cache hits, {hot.seconds:.2f} s")
    print(f"[2] speed-up {cold.seconds / hot.seconds:.1f}x (target >= 10x)")

    # 3. images per second per teacher
    for name, make in (("box", BoxTeacher), ("grabcut", GrabCutTeacher)):
        r = teach_batch(batch, tmp / f"teach_{name}", make(), progress=False)
        print(f"[3] {name:8s}: {r.images / r.seconds:8.2f} images/s ({r.boxes} boxes, {r.seconds:.2f} s)")
    print(f"[3] sam {args.model} (random weights, cold, no cache hits): {cold.images / cold.seconds:8.3f} images/s "
          f"({cold.boxes} boxes, {cold.seconds:.2f} s, device {cold_t.device})")


if __name__ == "__main__":
    main()
