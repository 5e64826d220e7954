"""`b2p export-onnx`: a thin Typer command over b2p.deploy.export."""

from __future__ import annotations

from pathlib import Path

import typer


def export_onnx(
    model: Path = typer.Option(Path("data/model"), "--model", help="The deployable student's folder (model.pt, + rule.json) or its model.pt."),
    out: Path = typer.Option(None, "--out", help="ONNX file to write (default: MODEL/model.onnx)."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset to export at (17-20)."),
) -> None:
    """Export the student as an ONNX model that predicts without torch (`b2p-run predict`).

    Dynamic batch, height and width; the model's metadata carries the class list, the normalisation, the
    window geometry (scale, multiple, tile, max side), the window / overlap / TTA and the decision rule of
    MODEL/rule.json (without one: the argmax, no TTA), and the model.pt's sha256. The file is run once in
    ONNX Runtime against torch before it is written (class probabilities within 1e-4), then written
    atomically. Needs the `onnx` extra (pip install "b2p[onnx]").
    """
    from b2p.errors import B2PError

    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise B2PError(f"export-onnx needs the onnx and onnxruntime packages ({e.name} is missing): pip install \"b2p[onnx]\"") from None
    from b2p.deploy.export import export_onnx as run

    path, meta, worst = run(model, out, opset)
    typer.echo(
        f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB, opset {meta.opset}): {len(meta.class_names)} classes, window {meta.window} px, "
        f"overlap {meta.overlap:g}, TTA {meta.tta}, rule {meta.rule['kind']}; ONNX Runtime vs torch: max |p difference| {worst:.1e}"
    )
