"""The b2p ONNX model: its metadata, the checks made when it is loaded, and the network as windows.py calls it.

The file is a plain ONNX model (the student network: normalised image Bx3xHxW float32, plus each row's and
column's distance to the image edges, BxH and BxW, for a model that reads them, in; fine-head logits
Bx(K+1)xHxW float32 out; batch, height and width dynamic) whose metadata_props hold one key, METADATA_KEY,
with a JSON document (DeployMetadata) that tells a runtime everything else: the b2p format version, the class
list, the normalisation, the geometry (scale, multiple, tile, max side), the window / overlap / TTA, the
decision rule and the source model's sha256.

Loading checks, each one clear error naming the file: readable and complete (a truncated file), written by
b2p (the metadata is there and of a known format), the opset it was exported at (the one recorded, at least
MIN_OPSET, and one this ONNX Runtime runs), the inputs and output the metadata names, and, where the caller
gives one, the class list against the batch's. The header is read here (a few protobuf fields) without the
`onnx` package, which the runtime does not need.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from b2p.errors import B2PError
from b2p.student.rules import DecisionRule
from b2p.student.windows import TTA_MODES, WindowModel, check_overlap

ONNX_FORMAT = 1
METADATA_KEY = "b2p"
MIN_OPSET = 17  # LayerNormalization (DINOv2) is an ONNX op from 17 on; b2p exports at DEFAULT_OPSET
DEFAULT_OPSET = 17
IMAGE_INPUT, EDGE_INPUTS, OUTPUT = "image", ("edge_rows", "edge_cols"), "logits"


@dataclass(frozen=True)
class DeployMetadata:
    """What a runtime needs besides the network (module docstring). `window` is the nominal window (model px,
    already resolved: windows.WindowModel.nominal_window), capped per image as `b2p predict` does."""

    format: int
    class_names: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float
    max_side: int | None
    multiple: int
    tile_size: int
    edges: bool
    window: int
    overlap: float
    tta: str
    rule: dict
    opset: int
    source: dict  # {"model": model.pt path, "sha256": its sha256, "rule_source": rule.json's "source" or null}
    b2p_version: str

    def window_model(self) -> WindowModel:
        return WindowModel(self.scale, self.max_side, self.multiple, self.tile_size, self.mean, self.std, False, self.edges)

    def decision_rule(self) -> DecisionRule:
        return DecisionRule.from_dict(self.rule)

    @property
    def inputs(self) -> tuple[str, ...]:
        return (IMAGE_INPUT, *EDGE_INPUTS) if self.edges else (IMAGE_INPUT,)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, path: str | Path) -> DeployMetadata:
        try:
            d = json.loads(text)
        except ValueError as e:
            raise B2PError(f"the model's b2p metadata is not JSON ({e})", path) from None
        if not isinstance(d, dict) or d.get("format") != ONNX_FORMAT:
            got = d.get("format") if isinstance(d, dict) else None
            raise B2PError(f"b2p ONNX format {got!r}, this b2p reads format {ONNX_FORMAT}: export the model again with this b2p", path)
        want = set(cls.__dataclass_fields__)
        if set(d) != want:
            raise B2PError(f"the model's b2p metadata lacks {sorted(want - set(d))} and has unknown {sorted(set(d) - want)}", path)
        try:
            m = cls(**{**d, "class_names": tuple(d["class_names"]), "mean": tuple(d["mean"]), "std": tuple(d["std"])})
            m.check()
        except (B2PError, TypeError, ValueError) as e:
            raise B2PError(f"malformed b2p metadata: {getattr(e, 'problem', e)}", path) from None
        return m

    def check(self) -> None:
        names = self.class_names
        if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise B2PError(f"class names {list(names)} must be distinct non-empty strings")
        nums = [*self.mean, *self.std, self.scale, self.overlap]
        if len(self.mean) != 3 or len(self.std) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in nums) or min(self.std) <= 0:
            raise B2PError(f"mean {self.mean} / std {self.std} / scale {self.scale} / overlap {self.overlap} are not valid numbers")
        ints = (self.multiple, self.tile_size, self.window, self.opset)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in ints) or self.scale <= 0:
            raise B2PError(f"multiple {self.multiple}, tile {self.tile_size}, window {self.window}, opset {self.opset} must be positive integers")
        if self.tile_size % self.multiple or self.window % self.multiple or self.window < self.tile_size:
            raise B2PError(f"tile {self.tile_size} and window {self.window} must be multiples of {self.multiple}, the window at least the tile")
        if self.tta not in TTA_MODES:
            raise B2PError(f"unknown test-time augmentation {self.tta!r}")
        check_overlap(self.overlap)
        self.decision_rule().check_classes(len(names) + 1)


# --- the ONNX header, read without the onnx package -------------------------------------------------------
# ModelProto fields (onnx.proto): 1 ir_version, 7 graph, 8 opset_import (1 domain, 2 version), 14
# metadata_props (1 key, 2 value). Protobuf wire types: 0 varint, 1 fixed 8 bytes, 2 length-delimited, 5 fixed 4.


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("a number runs past the end")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of one protobuf message; ValueError if it is cut short or not protobuf."""
    out, i = [], 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(buf, i)
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            if i + n > len(buf):
                raise ValueError("a fixed-size field runs past the end")
            v, i = buf[i : i + n], i + n
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise ValueError(f"field {num} needs {n} bytes, {len(buf) - i} are left")
            v, i = buf[i : i + n], i + n
        else:
            raise ValueError(f"wire type {wire}")
        if num == 0:
            raise ValueError("field number 0")
        out.append((num, v))
    return out


def read_header(data: bytes, path: str | Path) -> tuple[dict[str, int], dict[str, str]]:
    """({opset domain: version}, metadata_props) of a serialised ONNX model; refused when truncated or not ONNX."""
    try:
        fields = _fields(data)
        opsets, meta = {}, {}
        for num, v in fields:
            if num == 8:
                sub = dict(_fields(v))
                opsets[bytes(sub.get(1, b"")).decode()] = int(sub.get(2, 0))
            elif num == 14:
                sub = dict(_fields(v))
                meta[bytes(sub.get(1, b"")).decode()] = bytes(sub.get(2, b"")).decode()
    except (ValueError, UnicodeDecodeError) as e:
        raise B2PError(f"not a complete ONNX model (truncated or another kind of file: {e})", path) from None
    if not any(num == 7 for num, _ in fields) or not any(num == 1 for num, _ in fields):
        raise B2PError("not an ONNX model (no graph or IR version; truncated or another kind of file)", path)
    return opsets, meta


def check_header(opsets: dict[str, int], meta: dict[str, str], path: str | Path) -> DeployMetadata:
    if METADATA_KEY not in meta:
        raise B2PError(f"an ONNX model without b2p metadata ('{METADATA_KEY}'): not written by `b2p export-onnx`, so nothing says its classes, normalisation or windows", path)
    m = DeployMetadata.from_json(meta[METADATA_KEY], path)
    opset = opsets.get("", opsets.get("ai.onnx"))
    if opset != m.opset:
        raise B2PError(f"the model's ONNX opset is {opset} but b2p exported it at {m.opset}: converted or edited by another tool; export it again", path)
    if opset < MIN_OPSET:
        raise B2PError(f"ONNX opset {opset}: b2p models need opset {MIN_OPSET} or newer; export again with --opset {DEFAULT_OPSET}", path)
    return m


def _check_io(session, m: DeployMetadata, path: str | Path) -> None:
    """The session's inputs and output are those the metadata names, of the expected rank and type."""
    ins = {i.name: i for i in session.get_inputs()}
    outs = {o.name: o for o in session.get_outputs()}
    if tuple(ins) != m.inputs or OUTPUT not in outs:
        raise B2PError(f"the network's inputs {list(ins)} and outputs {list(outs)} are not the b2p ones ({list(m.inputs)} -> {OUTPUT})", path)
    ranks = {IMAGE_INPUT: 4, **dict.fromkeys(EDGE_INPUTS, 2)}
    for name, arg in [*ins.items(), (OUTPUT, outs[OUTPUT])]:
        rank = ranks.get(name, 4)
        if arg.type != "tensor(float)" or len(arg.shape) != rank:
            raise B2PError(f"the network's {name} is a {arg.type} of shape {arg.shape}: b2p's is a float tensor of rank {rank}", path)
    shape = ins[IMAGE_INPUT].shape
    if shape[1] != 3 or any(isinstance(s, int) for s in (shape[0], shape[2], shape[3])):
        raise B2PError(f"the network's image input has shape {shape}: b2p's is [batch, 3, height, width] with the batch, height and width free", path)


class OnnxStudent:
    """A b2p ONNX model loaded in ONNX Runtime and checked (module docstring)."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise B2PError("ONNX model not found (write it with `b2p export-onnx`)", self.path)
        data = self.path.read_bytes()
        self.meta = check_header(*read_header(data, self.path), self.path)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(data, opts, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # ORT's own error types: InvalidProtobuf, InvalidGraph, NotImplemented (opset), Fail
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise B2PError(f"ONNX Runtime {ort.__version__} cannot load this model (opset {self.meta.opset}): {first}", self.path) from None
        _check_io(self.session, self.meta, self.path)
        self.window_model = self.meta.window_model()
        self.rule = self.meta.decision_rule()
        self.num_classes = len(self.meta.class_names) + 1

    def check_classes(self, batch_names: list[str]) -> None:
        """Refuse a batch (or project) class list under which the model's class ids would mean other classes."""
        from b2p.labels import check_class_lists

        check_class_lists(list(self.meta.class_names), list(batch_names), self.path)

    def forward(self, tiles: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """windows.Forward: normalised windows (+ edge distances) -> fine logits."""
        feed = {IMAGE_INPUT: np.ascontiguousarray(tiles, np.float32)}
        if self.meta.edges:
            feed[EDGE_INPUTS[0]], feed[EDGE_INPUTS[1]] = np.ascontiguousarray(rows, np.float32), np.ascontiguousarray(cols, np.float32)
        out = self.session.run([OUTPUT], feed)[0]
        if out.shape[1] != self.num_classes:
            raise B2PError(f"the network gave {out.shape[1]} classes, its metadata names {self.num_classes} (background included)", self.path)
        return out
