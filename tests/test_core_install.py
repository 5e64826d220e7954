"""`pip install -e .` without the `app` extra (no FiftyOne): every module imports and the whole
import -> evaluate pipeline works; `b2p browse` says which extra to install.

FiftyOne is made unimportable in a child process (`sys.modules["fiftyone"] = None`), which is what an
install without the extra looks like to Python."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys
    sys.modules["fiftyone"] = None  # as if the `app` extra were not installed
    import b2p
    failed = []
    for m in pkgutil.walk_packages(b2p.__path__, "b2p."):
        if not m.name.endswith("__main__"):
            try:
                importlib.import_module(m.name)
            except Exception as e:
                failed.append(f"{m.name}: {e!r}")
    assert not failed, failed
    from typer.testing import CliRunner
    from b2p.cli import app

    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])
    steps = [
        ("demo-data", "--out", "raw", "--images", "8", "--size", "64", "--mask-fraction", "0.5"),
        ("import", "--batch", "demo", "--images", "raw/images", "--coco", "raw/annotations.json", "--masks", "raw/masks",
         "--classes", "classes.json", "--out", "imported/demo.json", "--set", "val=0.3", "--set", "test=0"),
        ("teach", "imported/demo.json", "--out", "teach", "--teacher", "box", "--quiet"),
        ("train", "--imported", "imported", "--teacher-root", "teach", "--out", "model", "--device", "cpu",
         "--set", "arch=unet", "--set", "unet_base=4", "--set", "tile_size=32", "--set", "epochs=1"),
        ("predict", "--model", "model", "--imported", "imported", "--split", "all", "--out", "pred", "--device", "cpu"),
        ("evaluate", "--imported", "imported", "--teacher-root", "teach", "--pred-root", "pred", "--out", "eval", "--no-plots"),
    ]
    for args in steps:
        r = run(*args)
        assert r.exit_code == 0, (args[0], r.output, r.exception)
    metrics = json.load(open("eval/metrics.json"))
    r = run("browse", "--imported", "imported", "--build-only")
    print(json.dumps({"sources": sorted(metrics), "browse_code": r.exit_code, "browse_output": r.output}))
    """
)


@pytest.mark.slow
def test_core_pipeline_without_fiftyone(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(REPO), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "OMP_NUM_THREADS": "1",
           "FIFTYONE_DO_NOT_TRACK": "true", "HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    import json

    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert {"student", "teacher"} <= set(out["sources"]), out
    assert out["browse_code"] == 1 and 'pip install -e ".[app]"' in out["browse_output"], out


def test_browse_refuses_a_public_address_without_allow_remote(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from b2p.cli import app

    r = CliRunner().invoke(app, ["browse", "--imported", str(tmp_path), "--address", "0.0.0.0"])
    assert r.exit_code == 1 and "--allow-remote" in r.output and "no login" in r.output, r.output
