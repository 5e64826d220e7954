"""`b2p suite-select`: the effect of the `train.select` rule, measured. A model trained with
`keep_rule_models: true` holds the epoch every rule keeps (b2p/student/selection.py); each is predicted on the
held-out split and scored as the student alone, as `b2p predict` + `b2p evaluate` score the saved model."""

from __future__ import annotations

from pathlib import Path

from b2p.errors import B2PError


def score_rules(
    model_dir: str | Path,
    batch_files: list[Path],
    split: str = "test",
    window: int | None = None,
    device: str = "auto",
    progress: bool = True,
    precision: str = "float32",
    tta: str = "none",
) -> dict:
    """The effect of the rule on held-out masks: the epoch each rule keeps (MODEL_DIR/metrics.json `rules`),
    scored as the student alone (argmax, as `b2p predict` + `b2p evaluate` score it) against the manual masks
    of `split`. Rules that keep the same epoch share one prediction. Needs the rule models of
    `train.keep_rule_models: true` for every rule whose epoch differs from the saved one. `window`, `precision`
    and `tta` as the suite's `b2p predict` of this model uses them."""
    from rich.progress import Progress

    from b2p.dataset import class_list_of, load_batches
    from b2p.evaluate.evaluate import select_images
    from b2p.evaluate.metrics import ConfusionMatrix, scores
    from b2p.fileio import read_image, read_json, safe_join
    from b2p.student.checkpoint import check_class_lists, load_student
    from b2p.student.predict import check_precision, check_tta, inference_setup, predict_image
    from b2p.student.train import pick_device

    model_dir = Path(model_dir)
    metrics = read_json(model_dir / "metrics.json", "training metrics")
    rules = _read_rules(metrics, model_dir / "metrics.json")
    for rule, r in rules.items():
        if r["file"] is None:
            raise B2PError(f"rule {rule!r} keeps epoch {r['epoch']}, but its model was not written: train with keep_rule_models: true", model_dir)
        safe_join(model_dir, r["file"], f"rule {rule!r}'s model file")  # a file of this model folder only
    batches = load_batches(batch_files)
    names = list(class_list_of(batches).names)
    images = select_images(batches, split)  # refuses a split without manual masks
    check_precision(precision)
    check_tta(tta)
    dev = pick_device(device)
    truths = [im.manual_label_map() for im in images]
    by_file: dict[str, dict] = {}
    files = sorted({r["file"] for r in rules.values()})
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"{len(files)} rule model(s) x {len(images)} images", total=len(files) * len(images))
        for file in files:
            model, ck = load_student(model_dir / file, dev)
            arithmetic, used = inference_setup(model, dev, precision)
            check_class_lists(ck["class_names"], names, ck["path"])
            cm = ConfusionMatrix(len(names) + 1)
            for im, truth in zip(images, truths):
                with arithmetic:
                    lm, _ = predict_image(model, read_image(im.path), dev, window=window, tta=tta)
                cm.update(lm, truth)
                bar.advance(task)
            s = scores(cm.matrix, names)
            by_file[file] = {"binary_iou": s["binary_iou"], "anomaly_miou": s["anomaly_miou"], "miou": s["miou"],
                             "per_class_iou": {c: v["iou"] for c, v in s["per_class"].items()}}
    return {
        "split": split, "images": len(images), "window": window, "tta": tta, "precision": used if files else None, "select": metrics["select"].get("rule") if isinstance(metrics.get("select"), dict) else None,
        "rules": {rule: {"epoch": r["epoch"], "val_score": r["score"], "file": r["file"], split: by_file[r["file"]]} for rule, r in rules.items()},
    }


def _read_rules(metrics: object, path: Path) -> dict[str, dict]:
    """metrics.json's `rules` ({rule: {"epoch", "score", "file"}}, b2p/student/train.py), or one error naming
    the file: an older model has none, a hand-edited or foreign file may hold anything."""
    if not isinstance(metrics, dict):
        raise B2PError(f"training metrics must be a JSON object, not {type(metrics).__name__} (not written by `b2p train`?)", path)
    rules = metrics.get("rules")
    if not rules:
        raise B2PError("no per-rule epochs (`rules`): this model was trained before they were recorded; retrain it", path)
    if not isinstance(rules, dict):
        raise B2PError(f"`rules` must map each rule to its epoch, score and file, not be {type(rules).__name__}: retrain the model", path)
    for rule, r in rules.items():
        ok = (
            isinstance(r, dict)
            and isinstance(r.get("epoch"), int) and not isinstance(r.get("epoch"), bool)
            and (r.get("score") is None or isinstance(r["score"], (int, float)))
            and (r.get("file") is None or isinstance(r["file"], str))
        )
        if not ok:
            raise B2PError(f"`rules.{rule}` must be {{\"epoch\": int, \"score\": number or null, \"file\": path or null}}, got {r!r}: retrain the model", path)
    return {rule: {"epoch": r["epoch"], "score": r.get("score"), "file": r.get("file")} for rule, r in rules.items()}
