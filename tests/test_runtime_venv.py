"""The small distribution (runtime/) installs from a fresh copy of the repository into a new virtual
environment with its three libraries from the registry, has no torch, and predicts a folder of demo images
into the label maps `b2p predict` writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from b2p.cli import app
from b2p.labels import read_label_map

REPO = Path(__file__).resolve().parents[1]


def _fresh_copy(dst: Path) -> Path:
    """The files a clone would hold (tracked and not ignored, links kept as links)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    pack = subprocess.run(["tar", "--null", "-T", "-", "-cf", "-"], cwd=REPO, input=files, capture_output=True, check=True).stdout
    dst.mkdir(parents=True)
    subprocess.run(["tar", "-xf", "-"], cwd=dst, input=pack, check=True)
    return dst


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


@pytest.mark.slow
def test_runtime_distribution_installs_without_torch_and_predicts_like_b2p(tmp_path):
    from test_onnx import _random_student  # the same tiny student (tests/ is on the path, as for suite_data)

    from b2p.ingest.demo import make_demo_data

    src = _fresh_copy(tmp_path / "clone")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(src / "runtime")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = subprocess.run([str(py), "-c", "import torch"], capture_output=True, text=True)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    print(f"\nb2p-runtime virtual environment: {_size_mb(venv):.0f} MB installed")

    make_demo_data(tmp_path / "demo", seed=9, images=6, size=128, mask_fraction=0.0)
    images = tmp_path / "demo" / "images"
    folder = _random_student(tmp_path / "model", decoder="lite", context="strip", refine=True, adaptation="frozen", tile_size=64)
    for args in (["export-onnx", "--model", str(folder)],
                 ["predict", "--model", str(folder), "--images", str(images), "--out", str(tmp_path / "torch")]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
    r = subprocess.run([str(venv / "bin" / "b2p-run"), "predict", "--model", str(folder / "model.onnx"), "--images", str(images), "--out", str(tmp_path / "onnx")],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    maps = sorted(p.name for p in (tmp_path / "torch").glob("*.png"))
    assert len(maps) == 6 and maps == sorted(p.name for p in (tmp_path / "onnx").glob("*.png"))
    a = np.concatenate([read_label_map(tmp_path / "torch" / n).ravel() for n in maps])
    b = np.concatenate([read_label_map(tmp_path / "onnx" / n).ravel() for n in maps])
    assert np.mean(a == b) >= 0.9999
    assert (tmp_path / "onnx" / "predict.json").is_file()
