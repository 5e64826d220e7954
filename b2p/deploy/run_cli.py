"""`b2p-run`: the torch-free command of the deployable student (numpy, OpenCV and ONNX Runtime only).

    b2p-run predict --model model.onnx --images DIR --out DIR [--classes data/classes.json] [--probs]
    b2p-run info --model model.onnx

argparse, not Typer: the runtime installs nothing beyond its three libraries. A refused input is one line
on stderr and exit code 1, as in `b2p` (usage errors too); nothing is written then.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from b2p.errors import B2PError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors exit 1 like every other refused input (argparse: 2)
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="b2p-run", description="Predict defect label maps with a b2p ONNX model (no torch needed).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    pr = sub.add_parser("predict", help="Label maps of every image in a folder (the layout of `b2p predict --images`).")
    pr.add_argument("--model", type=Path, required=True, help="The ONNX model (`b2p export-onnx`).")
    pr.add_argument("--images", type=Path, required=True, help="Folder of images (searched recursively).")
    pr.add_argument("--out", type=Path, required=True, help="Output folder: OUT/<key>.png label maps and OUT/predict.json.")
    pr.add_argument("--classes", type=Path, default=None, help="The project's class list (classes.json): refuse a model whose class ids mean other classes.")
    pr.add_argument("--probs", action="store_true", help="Also write OUT/probs/<key>.npz class probabilities (uint8, p x 255).")
    pr.add_argument("--batch-size", type=int, default=4, help="Windows per forward pass (default 4).")
    pr.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores).")
    pr.add_argument("--provider", action="append", default=None, help="ONNX Runtime execution provider, repeatable, in order of preference (default CPUExecutionProvider).")
    pr.add_argument("--quiet", action="store_true", help="No progress lines.")
    info = sub.add_parser("info", help="Print the model's b2p metadata (classes, geometry, windows, rule) as JSON.")
    info.add_argument("--model", type=Path, required=True, help="The ONNX model.")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        if a.command == "info":
            from b2p.deploy.onnx_model import check_header, read_header

            if not a.model.is_file():
                raise B2PError("ONNX model not found", a.model)
            meta = check_header(*read_header(a.model.read_bytes(), a.model), a.model)
            print(json.dumps(json.loads(meta.to_json()), indent=1))
            return 0
        from b2p.deploy.runtime import predict_folder

        r = predict_folder(a.model, a.images, a.out, a.classes, a.probs, a.batch_size, a.provider, a.threads, progress=not a.quiet)
    except B2PError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    note = f"; {r.unsnapped} kept the argmax (no colour model to snap with)" if r.unsnapped else ""
    print(f"wrote {r.images} label maps under {r.out} in {r.seconds:.1f} s{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
