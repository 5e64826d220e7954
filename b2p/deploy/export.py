"""`b2p export-onnx`: the trained student (model.pt, + rule.json where the folder has one) as an ONNX model.

The network is exported with torch.onnx's TorchScript exporter (`dynamo=False`): it needs only torch and
the `onnx` package, where the dynamo exporter also needs onnxscript. Batch, height and width are dynamic;
the metadata (onnx_model.DeployMetadata) carries the rest. Before it is written, the file is run once in
ONNX Runtime against torch at two window sizes (the training tile, and a wider non-square one, so a size
the tracer had fixed shows): class probabilities must agree within PARITY_ATOL. Written atomically.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch

from b2p import __version__
from b2p.deploy.onnx_model import DEFAULT_OPSET, EDGE_INPUTS, IMAGE_INPUT, METADATA_KEY, MIN_OPSET, ONNX_FORMAT, OUTPUT, DeployMetadata, OnnxStudent
from b2p.errors import B2PError
from b2p.fileio import sha256_file, write_bytes_atomic
from b2p.student.rules import DeploySettings, read_deploy_settings
from b2p.student.windows import WindowModel, softmax_

PARITY_ATOL = 1e-4  # max |p_onnx - p_torch| over every class and pixel of the check
MAX_OPSET = 20  # the newest opset of the TorchScript exporter


class _FineLogits(torch.nn.Module):
    """The student as ONNX sees it: normalised image (+ edge distances) -> fine-head logits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, edge_rows: torch.Tensor | None = None, edge_cols: torch.Tensor | None = None) -> torch.Tensor:
        edges = None if edge_rows is None else (edge_rows, edge_cols)
        return self.model(image, edges=edges)["fine"]


def _sample_inputs(c, batch: int, h: int, w: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, h, w, generator=g)
    if not c.edges:
        return (x,)
    return x, torch.rand(batch, h, generator=g) * h / 2, torch.rand(batch, w, generator=g) * w / 2


def metadata_of(model: torch.nn.Module, ck: dict, deploy: DeploySettings, opset: int) -> DeployMetadata:
    c = model.config
    wm = WindowModel.of_config(c)
    return DeployMetadata(
        format=ONNX_FORMAT, class_names=tuple(ck["class_names"]), mean=tuple(c.mean), std=tuple(c.std), scale=float(c.scale),
        max_side=c.max_side, multiple=int(c.multiple), tile_size=int(c.tile_size), edges=bool(c.edges),
        window=wm.nominal_window(deploy.window), overlap=float(deploy.overlap), tta=deploy.tta, rule=deploy.rule.to_dict(),
        opset=int(opset), source={"model": ck["path"], "sha256": sha256_file(ck["path"]), "rule_source": deploy.source or None},
        b2p_version=__version__,
    )


def onnx_bytes(model: torch.nn.Module, opset: int) -> bytes:
    """The network, exported (dynamic batch, height, width); no metadata yet."""
    c = model.config
    names = [IMAGE_INPUT, *(EDGE_INPUTS if c.edges else ())]
    dyn = {IMAGE_INPUT: {0: "batch", 2: "height", 3: "width"}, OUTPUT: {0: "batch", 2: "height", 3: "width"}}
    if c.edges:
        dyn.update({EDGE_INPUTS[0]: {0: "batch", 1: "height"}, EDGE_INPUTS[1]: {0: "batch", 1: "width"}})
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python-side shape arithmetic: the parity check decides
        torch.onnx.export(
            _FineLogits(model).eval(), _sample_inputs(c, 1, c.tile_size, c.tile_size, 0), buf, dynamo=False,
            input_names=names, output_names=[OUTPUT], dynamic_axes=dyn, opset_version=opset, do_constant_folding=True,
        )
    return buf.getvalue()


def with_metadata(data: bytes, meta: DeployMetadata) -> bytes:
    import onnx

    proto = onnx.load_from_string(data)
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta.to_json()
    proto.doc_string = f"b2p student ({len(meta.class_names)} defect classes: {', '.join(meta.class_names)}); metadata key '{METADATA_KEY}'"
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def check_parity(model: torch.nn.Module, path: Path, data: bytes) -> float:
    """Largest |p_onnx - p_torch| at the tile and at a wider non-square window; refused above PARITY_ATOL."""
    import tempfile

    c = model.config
    t, m = c.tile_size, c.multiple
    worst = 0.0
    with tempfile.TemporaryDirectory() as d:
        probe = Path(d) / path.name
        probe.write_bytes(data)
        onnx_model = OnnxStudent(probe)  # the checks a runtime makes, on the file as it will be written
        for i, (b, h, w) in enumerate([(2, t, t), (1, t, t + 2 * m)]):
            inputs = _sample_inputs(c, b, h, w, 1 + i)
            with torch.no_grad():
                want = _FineLogits(model)(*inputs).float().numpy()
            arrays = [a.numpy() for a in inputs] + [None] * (3 - len(inputs))
            got = onnx_model.forward(*arrays)
            pw, pg = (np.stack([softmax_(x.copy()) for x in a]) for a in (want, got))
            worst = max(worst, float(np.abs(pw - pg).max()))
            if worst > PARITY_ATOL:
                raise B2PError(
                    f"the exported network disagrees with torch on a {h}x{w} window (max |p difference| {worst:.2g} > "
                    f"{PARITY_ATOL:g}): not written", path,
                )
    return worst


def export_onnx(model_dir: str | Path, out: str | Path | None = None, opset: int = DEFAULT_OPSET) -> tuple[Path, DeployMetadata, float]:
    """Export MODEL_DIR/model.pt (+ rule.json) to `out` (default MODEL_DIR/model.onnx); returns (path,
    metadata, the parity check's largest probability difference). The model directory's rule.json gives the
    rule and the prediction settings; without one: the argmax, no TTA, the default window and overlap."""
    from b2p.student.checkpoint import load_student

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise B2PError(f"--opset {opset}: b2p exports at opsets {MIN_OPSET} to {MAX_OPSET} (the TorchScript exporter's newest)")
    model, ck = load_student(model_dir, "cpu")
    if model.config.legacy_input_size is not None:
        raise B2PError("a version-1 model (square input) cannot be exported: retrain it with this b2p", ck["path"])
    names = list(ck["class_names"])
    deploy = read_deploy_settings(model_dir, names) or DeploySettings(class_names=tuple(names))
    deploy.rule.check_classes(len(names) + 1, ck["path"])
    path = Path(out) if out is not None else Path(ck["path"]).parent / "model.onnx"
    if path.is_dir():
        raise B2PError("is a folder; give the ONNX file to write", path)
    meta = metadata_of(model, ck, deploy, opset)
    data = with_metadata(onnx_bytes(model, opset), meta)
    worst = check_parity(model, path, data)
    write_bytes_atomic(path, data)
    return path, meta, worst
