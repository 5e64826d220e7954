"""The deployable student as an ONNX model: `b2p export-onnx` writes it (export.py, torch), and `b2p-run`
predicts with it through ONNX Runtime without torch (onnx_model.py, runtime.py, run_cli.py), with the
sliding window and decision rules of b2p/student/windows.py and rules.py. Everything here but export.py
and commands.py is torch-free and ships in the small `b2p-runtime` distribution (runtime/ in the repository).
"""
