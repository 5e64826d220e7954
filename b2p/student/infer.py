"""The student on one image: sliding windows, test-time flips and the precision it runs in, with torch.

The window geometry, blending and flips themselves are numpy (b2p/student/windows.py, shared with the
ONNX runtime); this module runs the network on them. `b2p predict` (predict.py) runs it over a folder or a
batch, on an engine (predict_job.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch

from b2p.errors import B2PError
from b2p.student import windows
from b2p.student.geometry import Geometry
from b2p.student.rules import DecisionRule
from b2p.student.data import prepare_image
from b2p.student.windows import DEFAULT_OVERLAP, DEFAULT_TILE_BATCH, TTA_MODES, check_tta

# inference arithmetic: float32 (the default), bfloat16 autocast, or auto: bfloat16 where a CPU has it in
# hardware (AMX / AVX512-BF16), float32 elsewhere (benchmarks/bench_inference_cpu.py measures both)
PRECISIONS = ("float32", "bfloat16", "auto")


def window_model(model: torch.nn.Module) -> windows.WindowModel:
    return windows.WindowModel.of_config(model.config)


def window_of(model: torch.nn.Module, window: int | None = None) -> int:
    """The prediction window side (model px) of `model`: windows.WindowModel.nominal_window."""
    return window_model(model).nominal_window(window)


def window_for(model: torch.nn.Module, window: int | None, height: int, width: int) -> int:
    """The window an HxW image is predicted in: windows.WindowModel.window_for."""
    return window_model(model).window_for(window, height, width)


def geometry_of(model: torch.nn.Module, height: int, width: int) -> Geometry:
    """The geometry `model` was trained in, for an HxW image."""
    return window_model(model).geometry(height, width)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise B2PError(f"inference precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def inference_setup(model: torch.nn.Module, device: torch.device, precision: str = "float32") -> tuple[contextlib.AbstractContextManager, str]:
    """(the context to run the model in, the precision it runs at: float32 or bfloat16) for `precision`.

    On a CPU the model goes NHWC (channels_last): oneDNN's convolutions are faster in that layout and give the
    same logits up to float rounding (about 1e-5). bfloat16 where it would be emulated (a CPU without it in
    hardware: slower than float32) or unsupported (an older GPU) is refused; `auto` takes float32 there."""
    from b2p.student.train import cpu_native_bf16

    check_precision(precision)
    if device.type == "cpu":
        model.to(memory_format=torch.channels_last)
        native = cpu_native_bf16()
        where = "this CPU has no native bfloat16 (AMX or AVX512-BF16)"
    else:
        native = device.type == "cuda" and torch.cuda.is_bf16_supported()
        where = f"{device} has no bfloat16"
    if precision == "bfloat16" and not native:
        raise B2PError(f"bfloat16 inference asked for, but {where}; use float32 or auto")
    if precision == "float32" or (precision == "auto" and (device.type != "cpu" or not native)):
        return contextlib.nullcontext(), "float32"
    return torch.autocast(device.type, dtype=torch.bfloat16), "bfloat16"


def torch_forward(model: torch.nn.Module, device: torch.device | str) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """The network as windows.py calls it: normalised windows (+ their edge distances) in, fine logits out."""

    @torch.no_grad()
    def forward(tiles: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(tiles).to(device)
        edges = (torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device))
        return model(x, edges=edges)["fine"].float().cpu().numpy()

    return forward


def image_logits(
    model: torch.nn.Module,
    img: np.ndarray,
    device: torch.device | str = "cpu",
    overlap: float = DEFAULT_OVERLAP,
    tile_batch: int = DEFAULT_TILE_BATCH,
    window: int | None = None,
    tta: str = "none",
) -> np.ndarray:
    """Fine-head logits (K+1)xHxW float32 of an HxWx3 uint8 RGB image, at the image's size (windows.image_logits;
    a version-1 model: its square input)."""
    c = model.config
    if c.legacy_input_size is None:
        return windows.image_logits(torch_forward(model, device), img, window_model(model), overlap, tile_batch, window, tta)
    windows.check_image(img)
    views = TTA_MODES[check_tta(tta)]
    acc = _legacy_square_logits(model, img, device)
    for axes in views[1:]:
        acc += np.flip(_legacy_square_logits(model, np.ascontiguousarray(np.flip(img, axis=axes)), device), axis=tuple(a + 1 for a in axes))
    if len(views) > 1:
        acc /= np.float32(len(views))
    return acc


@torch.no_grad()
def _legacy_square_logits(model: torch.nn.Module, img: np.ndarray, device: torch.device | str) -> np.ndarray:
    """LEGACY (model.pt version 1): the image squashed to the `legacy_input_size` square (data.prepare_image),
    as those models were trained, logits resized back to the image (bilinear). Kept only so old models
    still predict as trained; new models never take this path."""
    from b2p.student.geometry import resize_bilinear

    c = model.config
    x = prepare_image(img, c.legacy_input_size, c.mean, c.std)[None].to(device)
    lg = model(x)["fine"].float()[0].cpu().numpy()
    return resize_bilinear(lg, img.shape[:2])


def _torch_exp_(x: np.ndarray) -> None:
    torch.from_numpy(x).exp_()  # in place on the numpy array: the exp b2p predict has always used


def predict_image(
    model: torch.nn.Module,
    img: np.ndarray,
    device: torch.device | str = "cpu",
    overlap: float = DEFAULT_OVERLAP,
    tile_batch: int = DEFAULT_TILE_BATCH,
    window: int | None = None,
    tta: str = "none",
    rule: DecisionRule | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(label map HxW uint8, class probabilities (K+1)xHxW float32) of an HxWx3 uint8 RGB image; the label map
    is the argmax, or `rule`'s (rules.py)."""
    p = windows.softmax_(image_logits(model, img, device, overlap, tile_batch, window, tta), exp=_torch_exp_)
    labels = windows.class_map(p) if rule is None else rule.label_map(p, img)[0]
    return labels, p


def predict_images(
    model: torch.nn.Module,
    images: list[np.ndarray],
    device: torch.device | str = "cpu",
    overlap: float = DEFAULT_OVERLAP,
    tile_batch: int = DEFAULT_TILE_BATCH,
    window: int | None = None,
    tta: str = "none",
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Predict HxWx3 uint8 RGB images of any sizes, one after the other (see `predict_image`).

    Returns (label maps HxW uint8, class probabilities (K+1)xHxW float32), at each image's own size.
    """
    out = [predict_image(model, im, device, overlap, tile_batch, window, tta) for im in images]
    return [o[0] for o in out], [o[1] for o in out]
