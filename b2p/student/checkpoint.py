"""model.pt: a plain dict that `torch.load(..., weights_only=True)` reads, and the loader that rebuilds it.

    {"format": "b2p-student", "version": 2, "config": StudentConfig as JSON-able dict,
     "class_names": [K defect names], "provenance": {backbone, pretrained, source},
     "state_dict": the EMA weights (backbone included, so predicting needs no backbone download),
     "info": {epoch, val metrics, ...}}

Version 2 (issue 12): the config records the geometry the model was trained in (`scale`, `max_side`,
`tile_size`, `multiple`: aspect-preserving tiles at model scale) and the backbone's own input statistics
(`mean`, `std`). Version 1 models (square `input_size` resize, ImageNet statistics for every backbone) still
load: their config is marked `legacy_input_size`, and prediction resizes to that square with the
statistics stored in them, exactly as they were trained.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from b2p.errors import B2PError
from b2p.fileio import write_bytes_atomic

FORMAT = "b2p-student"
VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
MODEL_FILE = "model.pt"


def save_checkpoint(
    path: str | Path, config: Any, class_names: list[str], provenance: dict, state_dict: dict, info: dict | None = None
) -> None:
    obj = {
        "format": FORMAT,
        "version": VERSION,
        "config": config.to_dict(),
        "class_names": list(class_names),
        "provenance": dict(provenance),
        "state_dict": {k: v.detach().to("cpu").clone() for k, v in state_dict.items()},
        "info": info or {},
    }
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes_atomic(path, buf.getvalue())


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise B2PError("trained student not found (run `b2p train` first)", path)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = (str(e).splitlines() or ["empty or truncated file"])[0]  # EOFError has no message
        raise B2PError(f"could not read the model file ({type(e).__name__}: {reason})", path) from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise B2PError("not a b2p student model file", path)
    if ck.get("version") not in SUPPORTED_VERSIONS:
        raise B2PError(f"model file version {ck.get('version')} is not supported (expected one of {list(SUPPORTED_VERSIONS)})", path)
    check_checkpoint(ck, path)
    if ck["version"] == 1:
        ck["config"] = legacy_v1_config(ck["config"])
    ck["path"] = str(path)
    return ck


def check_checkpoint(ck: dict, path: str | Path) -> None:
    """Refuse a model file whose parts are missing or contradict each other (class names vs class count)."""
    missing = [k for k, t in (("config", dict), ("class_names", list), ("state_dict", dict), ("provenance", dict)) if not isinstance(ck.get(k), t)]
    if missing:
        raise B2PError(f"model file lacks or has a malformed {', '.join(missing)} (not written by `b2p train`?)", path)
    names, k = ck["class_names"], ck["config"].get("num_classes")
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise B2PError(f"model file's class names {names} must be distinct non-empty strings", path)
    if k != len(names) + 1:  # config.num_classes counts background
        raise B2PError(f"model file holds {len(names)} class names {names} but its config says {k} classes (background included)", path)


def check_class_lists(model_names: list[str], batch_names: list[str], model_path: str | Path) -> None:
    """A model predicts class ids; they mean the same classes only if the batch's list starts with the model's.

    A batch list may have appended classes since training (the model never predicts them); any other
    difference (another order, a renamed class) would silently give pixels the wrong class.
    """
    from b2p.labels import normalize_class_name

    model_names = [normalize_class_name(n) for n in model_names]  # a model saved before names were normalised
    if [normalize_class_name(n) for n in batch_names[: len(model_names)]] != model_names:
        raise B2PError(
            f"the model was trained on classes {list(model_names)} (ids 1..{len(model_names)}) but the batches' class "
            f"list is {list(batch_names)}: class ids would mean other classes; retrain on these batches",
            model_path,
        )


def legacy_v1_config(config: dict) -> dict:
    """LEGACY: a version-1 config dict -> a current one that predicts the way the model was trained.

    Version 1 resized every image to an `input_size` square and normalised with the stored mean/std
    (ImageNet for every backbone, the dataclass default then). Both are kept: `legacy_input_size` selects
    the square-resize path in predict.py, and the stored statistics are never replaced by the backbone's.
    """
    from b2p.student.backbones import IMAGENET_MEAN, IMAGENET_STD

    c = dict(config)
    size = c.pop("input_size", None)
    if not isinstance(size, int) or size < 16:
        raise B2PError(f"version-1 model config has no valid input_size ({size!r})")
    c["legacy_input_size"] = size
    if c.get("mean") is None or c.get("std") is None:  # never the case in files b2p wrote; be exact anyway
        c["mean"], c["std"] = list(IMAGENET_MEAN), list(IMAGENET_STD)
    return c


def load_student(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the trained student from `path` (model.pt or its folder); returns (model in eval mode, ckpt)."""
    from b2p.student.model import StudentConfig, build_model

    ck = read_checkpoint(path)
    config = StudentConfig.from_dict(ck["config"])
    model = build_model(config, load_weights=False)  # structure only: the state dict holds every weight
    try:
        model.load_state_dict(ck["state_dict"], strict=True)
    except RuntimeError as e:
        raise B2PError(f"model file does not fit its own config: {str(e).splitlines()[0]}", ck["path"]) from None
    model.provenance = ck["provenance"]
    return model.to(device).eval(), ck
