"""One image's prediction as an engine runs it (b2p/scale/engine.py): the student loaded once per worker, then
per image the encoded files of its outputs and its counts; `run_prediction` (predict.py) writes the files
into its staged roots, so the maps are the same bytes whichever engine ran them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from b2p.errors import B2PError


@dataclass
class ImagePrediction:
    """What one image gave: `files` maps a PredictItem output attribute (label_out, probs_out, boxed_out,
    snapped_out) to the bytes of that file; the rest are counts `run_prediction` reports."""

    files: dict[str, bytes]
    defect_pixels: int = 0
    boxes: int = 0
    rescued: int = 0
    snapped: int = 0
    unsnapped: int = 0
    window: int | None = None


@dataclass
class PredictJob:
    """The prediction settings and the model's folder; `loaded` (model, device, arithmetic context) is the
    model this process already holds (the local engine uses it; pickling leaves it out, a worker loads its
    own in `setup`, on its own device)."""

    model_dir: str
    device: str
    precision: str  # as asked
    expected_precision: str  # what this process resolved it to: every worker must run the same arithmetic
    overlap: float
    tile_batch: int
    window: int | None
    tta: str
    snap: str
    snap_settings: Any
    box_threshold: float
    class_names: list[str]  # background first (probs files)
    rule: Any = None  # the model's DecisionRule (rule.json), else the argmax
    loaded: tuple | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "loaded": None}

    def setup(self) -> None:
        if self.loaded is not None:
            return
        from b2p.student.checkpoint import load_student
        from b2p.student.infer import inference_setup
        from b2p.student.train import pick_device

        dev = pick_device(self.device)
        model, _ = load_student(self.model_dir, dev)
        arithmetic, used = inference_setup(model, dev, self.precision)
        if used != self.expected_precision:
            raise B2PError(
                f"precision {self.precision} runs as {used} on this worker but as {self.expected_precision} where predict "
                "was started: give --precision float32 or bfloat16 so that every map is made alike"
            )
        self.loaded = (model, dev, arithmetic)

    def cost(self, it) -> float:
        """The network's (and the snap's) work grows with the image's pixels; 1 for an image not imported."""
        return 1.0 if it.record is None else float(it.record.width * it.record.height)

    def run(self, it) -> ImagePrediction:
        from b2p.fileio import read_image
        from b2p.labels import encode_label_map
        from b2p.student.outputs import encode_probs
        from b2p.boxes import within_boxes
        from b2p.student.infer import predict_image, window_for
        from b2p.student.snap import snap_grabcut

        model, dev, arithmetic = self.loaded
        img = read_image(it.image_path)
        legacy = model.config.legacy_input_size is not None
        out = ImagePrediction({}, window=None if legacy else window_for(model, self.window, *img.shape[:2]))
        with arithmetic:
            lm, pr = predict_image(model, img, dev, self.overlap, self.tile_batch, self.window, self.tta, self.rule)
        out.files["label_out"] = encode_label_map(lm, it.label_out)
        snapped = None
        if self.snap == "grabcut" and (it.snapped_out is not None or it.boxed_out is not None):
            snapped, ok = snap_grabcut(img, pr, self.snap_settings)
            out.snapped, out.unsnapped = int(ok), int(not ok)
        if it.snapped_out is not None:
            out.files["snapped_out"] = encode_label_map(lm if snapped is None else snapped, it.snapped_out)
        out.defect_pixels = int(np.count_nonzero(lm))
        if it.boxed_out is not None:
            # snapped: each box keeps the snapped mask's pixels (the box threshold then plays no part)
            defect = None if snapped is None else snapped > 0
            boxed, out.rescued = within_boxes(1.0 - pr[0], it.boxes_xyxy, it.box_classes, self.box_threshold, defect=defect)
            out.files["boxed_out"] = encode_label_map(boxed, it.boxed_out)
            out.boxes = len(it.box_classes)
        if it.probs_out is not None:
            out.files["probs_out"] = encode_probs(pr, self.class_names)
        return out


@dataclass
class PredictTally:
    """The counts of every image of a run, summed."""

    defect_pixels: int = 0
    boxes: int = 0
    rescued: int = 0
    snapped: int = 0
    unsnapped: int = 0
    windows: set[int] = field(default_factory=set)

    def add(self, p: ImagePrediction) -> None:
        self.defect_pixels += p.defect_pixels
        self.boxes += p.boxes
        self.rescued += p.rescued
        self.snapped += p.snapped
        self.unsnapped += p.unsnapped
        if p.window is not None:
            self.windows.add(p.window)

