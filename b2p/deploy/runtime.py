"""Predict a folder of images with a b2p ONNX model, without torch: what `b2p predict --images DIR --out DIR`
does with model.pt, with the same windows, blending, flips and decision rule (b2p/student/windows.py,
rules.py) and the same outputs: OUT/<key>.png label maps at each image's size (+ OUT/probs/<key>.npz with
`probs`) and OUT/predict.json naming the model (the ONNX file's path and sha256, and the model.pt it was
exported from), the settings and the maps, all moved in only once every map is built.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from b2p.errors import B2PError
from b2p.fileio import read_image, sha256_file
from b2p.labels import check_label_map_keys, load_class_list, write_label_map
from b2p.student import windows
from b2p.student.outputs import check_roots_apart, commit_roots, items_from_folder, relative_to_root, staged_roots, write_probs


@dataclass
class RunResult:
    images: int
    defect_pixels: int
    unsnapped: int
    seconds: float
    out: Path


class _Progress:
    """'predict i/n' on stderr, rewritten in place on a terminal, every tenth of the run otherwise (the runtime
    carries no progress-bar library)."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.enabled, self.tty = total, enabled, sys.stderr.isatty()
        self.step = max(1, total // 10)

    def __call__(self, done: int) -> None:
        if not self.enabled:
            return
        if self.tty:
            print(f"\rpredict {done}/{self.total}", end="\n" if done == self.total else "", file=sys.stderr, flush=True)
        elif done % self.step == 0 or done == self.total:
            print(f"predict {done}/{self.total}", file=sys.stderr, flush=True)


def predict_folder(
    model_path: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    classes_file: str | Path | None = None,
    probs: bool = False,
    tile_batch: int = windows.DEFAULT_TILE_BATCH,
    providers: list[str] | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> RunResult:
    """Label maps of every image under `images_dir` into `out_dir` (module docstring). `classes_file` (a b2p
    class list, e.g. data/classes.json): refuse a model whose class ids mean other classes there."""
    from b2p.deploy.onnx_model import OnnxStudent

    images_dir, out_dir = Path(images_dir), Path(out_dir)
    windows.check_tile_batch(tile_batch)
    if out_dir.exists() and not out_dir.is_dir():
        raise B2PError("is a file; label maps are written into a folder here", out_dir)
    check_roots_apart({"--out": out_dir}, images_dir=images_dir)  # else the maps overwrite the images
    items = items_from_folder(images_dir, out_dir, probs)
    check_label_map_keys([it.image_path.relative_to(images_dir).as_posix() for it in items], images_dir)
    model = OnnxStudent(model_path, providers, threads)
    if classes_file is not None:
        model.check_classes(list(load_class_list(classes_file).names))
    m, rule = model.meta, model.rule
    wm = m.window_model()
    names = ["background", *m.class_names]
    t0 = time.perf_counter()
    n_defect = unsnapped = 0
    tick = _Progress(len(items), progress)
    with staged_roots({"student": out_dir}) as stages:
        for i, it in enumerate(items, 1):
            img = read_image(it.image_path)
            p = windows.image_probs(model.forward, img, wm, m.overlap, tile_batch, m.window, m.tta)
            lm, snapped = rule.label_map(p, img)
            unsnapped += rule.kind == "snap" and not snapped
            write_label_map(stages["student"] / relative_to_root(it.label_out, out_dir), lm)
            if it.probs_out is not None:
                write_probs(stages["student"] / relative_to_root(it.probs_out, out_dir), p, names)
            n_defect += int(np.count_nonzero(lm))
            tick(i)
        run = {
            "model": {"path": str(model.path), "sha256": sha256_file(model.path), "exported_from": m.source},
            "settings": {"window": m.window, "overlap": m.overlap, "tta": m.tta, "rule": rule.to_dict(), "runtime": "onnxruntime"},
            "inputs": {"images": str(images_dir)},
            "probs": probs,
            "maps": sorted(relative_to_root(it.label_out, out_dir).as_posix() for it in items),
        }
        commit_roots({"student": out_dir}, stages, {"student": run})
    return RunResult(len(items), n_defect, unsnapped, time.perf_counter() - t0, out_dir)
