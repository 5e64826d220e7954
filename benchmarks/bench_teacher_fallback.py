"""Which teacher teaches every class when a project has no calib masks (`teach.fallback`).

With calib masks the recipe chooses the teacher per class on them (`b2p choose-teacher`). Without them the
choice cannot be measured on the user's data, so the default is chosen on more than one dataset: every
teacher candidate of `b2p choose-teacher` labels the calib images of each dataset below, imported with the
recipe's params.yaml, and the candidate with the best mean of binary IoU + anomaly mIoU over the datasets is
the fallback. Datasets: the embedded demo (its default draw and a second one) and, when present,
Magnetic-Tile (../shared/datasets/magnetic-tile, boxes from its masks as `b2p suite` makes them).

    python benchmarks/bench_teacher_fallback.py [--mt PATH] [--out reports/defaults]

Writes OUT/teacher_fallback.json and .md (generated, dated, machine named) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def import_dataset(tmp: Path, name: str, images: Path, coco: Path, masks: Path | None) -> Path:
    from b2p.ingest.importer import import_batch
    from b2p.schema import resolve

    rule = resolve("import", REPO / "params.yaml").split_rule()
    r = import_batch(name, images, coco=coco, masks_dir=masks, classes_path=tmp / f"{name}-classes.json", add_classes=True,
                     rule=rule, out=tmp / "imported" / name / f"{name}.json")
    return r.out


def datasets(tmp: Path, mt: Path | None) -> dict[str, Path]:
    from b2p.ingest.demo import make_demo_data
    from b2p.params import read_params_file

    out = {}
    demo = read_params_file(REPO / "params.yaml")["demos"]["demo"]
    for label, seed in (("demo", demo["seed"]), ("demo (second draw)", 7)):
        src = tmp / f"demo-{seed}"
        make_demo_data(src, seed=seed, images=demo["images"], size=demo["size"], mask_fraction=demo["mask_fraction"])
        out[label] = import_dataset(tmp, f"demo{seed}", src / "images", src / "annotations.json", src / "masks")
    if mt is not None and mt.is_dir():
        from b2p.pipeline.suite import simulate_batch, suite_settings

        src = simulate_batch(mt, "magnetic-tile", tmp / "mt", suite_settings(REPO))
        out["magnetic-tile"] = import_dataset(tmp, "magnetic-tile", src.images, src.coco, None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mt", type=Path, default=REPO.parent / "shared" / "datasets" / "magnetic-tile")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "defaults")
    args = ap.parse_args()
    from b2p.dataset import load_batches
    from b2p.fileio import write_json_atomic, write_text_atomic
    from b2p.teach.auto import build_candidates, score_candidates
    from b2p.teach.config import build_config

    cfg = build_config(REPO / "params.yaml")
    table: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, batch_file in datasets(Path(tmp), args.mt).items():
            cands, _ = build_candidates(cfg, progress=False)
            scores, n = score_candidates(load_batches([batch_file]), cands, progress=True)
            table[label] = {c: (s["binary_iou"] or 0.0) + (s["anomaly_miou"] or 0.0) for c, s in scores.items()}
            table[label]["_calib_images"] = n
            print(label, n, "calib images:", {c: round(v, 4) for c, v in table[label].items()})
    cands = [c for c in next(iter(table.values())) if not c.startswith("_")]
    mean = {c: sum(t[c] for t in table.values()) / len(table) for c in cands}
    best = max(cands, key=lambda c: mean[c])  # ties: the earlier (simpler) candidate
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    record = {"generated": stamp, "machine": platform.processor() or platform.machine(), "score": "binary IoU + anomaly mIoU on calib",
              "datasets": table, "mean": mean, "best": best, "configured_fallback": cfg.fallback}
    write_json_atomic(args.out / "teacher_fallback.json", record)
    heads = list(table)
    lines = ["# The teacher without calib masks (`teach.fallback`)", "",
             f"Every candidate teacher on each dataset's calib images, binary IoU + anomaly mIoU (`benchmarks/bench_teacher_fallback.py`, {stamp}). "
             f"Best mean: **{best}**; params.yaml has `teach.fallback: {cfg.fallback}`.", "",
             "| teacher | " + " | ".join(f"{h} ({table[h]['_calib_images']} images)" for h in heads) + " | mean |",
             "| --- |" + " --- |" * (len(heads) + 1)]
    for c in cands:
        lines.append(f"| {c} | " + " | ".join(f"{table[h][c]:.3f}" for h in heads) + f" | {mean[c]:.3f} |")
    write_text_atomic(args.out / "teacher_fallback.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
