"""`pip install -e .` without extras: every module imports, the whole import -> evaluate pipeline works,
`b2p browse` says which extra to install, every third-party module b2p imports is a core dependency (or an
extra's, where that extra is used), and the main job runs end to end through `dvc repro` in a fresh venv holding the core
dependencies only.

FiftyOne is made unimportable in a child process (`sys.modules["fiftyone"] = None`), which is what an
install without the extra looks like to Python. The fresh venv is built without a network: the core
dependencies' installed files (their RECORD, as pip wrote it) are linked into a new venv, b2p is added the
way an editable install adds it (a .pth file), so nothing outside the core closure can be imported."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _requirements(extra: str | None = None) -> list[str]:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return project["dependencies"] if extra is None else project["optional-dependencies"][extra]


def _closure(requirements: list[str]) -> dict:
    """The installed distributions `requirements` need, transitively, without extras (as pip resolves them)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: dict = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name in found:
            continue
        found[name] = dist = md.distribution(req.name)
        todo += [Requirement(r) for r in dist.requires or []]
    return found


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level third-party module -> the b2p files importing it (inside functions too)."""
    out: dict[str, set[str]] = {}
    for path in sorted((REPO / "b2p").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            for n in names:
                top = n.split(".")[0]
                if top != "b2p" and top not in sys.stdlib_module_names:
                    out.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return out


def test_every_third_party_import_is_a_declared_dependency() -> None:
    """What b2p imports comes from a core dependency, or from the `app` extra (browse only, imported lazily):
    a module that only happens to be installed here (scipy through FiftyOne, once) fails a plain install."""
    import importlib.metadata as md

    from packaging.utils import canonicalize_name

    core = set(_closure(_requirements()))
    # an extra's modules may be imported only where that extra is used (lazily, with a message naming it)
    extra_home = {"app": "b2p/browse/", "ray": "b2p/scale/ray_engine.py"}
    extra_only = {x: set(_closure(_requirements(x))) - core for x in extra_home}
    providers = md.packages_distributions()
    undeclared = {}
    for module, files in _third_party_imports().items():
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        if dists & core:
            continue
        if any(dists & extra_only[x] and all(f.startswith(home) for f in files) for x, home in extra_home.items()):
            continue
        undeclared[module] = sorted(files)
    assert not undeclared, f"imported but not a core dependency (pyproject.toml): {undeclared}"


def _core_venv(dest: Path, project: Path) -> Path:
    """A new venv with the core dependencies of `project`'s pyproject.toml only, and b2p from `project`."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    site = dest / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    for name, dist in _closure(_requirements()).items():
        if name == "b2p":
            continue
        for top in sorted({f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".."}):
            src, link = Path(dist.locate_file(top)), site / top
            if src.exists() and not link.exists():
                link.symlink_to(src)
    (site / "b2p.pth").write_text(f"{project}\n")  # what `pip install -e .` writes
    for script, (module, fn) in {"b2p": ("b2p.cli", "app"), "dvc": ("dvc.cli", "main")}.items():
        path = dest / "bin" / script
        path.write_text(f"#!{dest / 'bin' / 'python'}\nimport sys\nfrom {module} import {fn}\nsys.exit({fn}())\n")
        path.chmod(0o755)
    return dest


# in the core venv: b2p comes from the clone, FiftyOne is absent, every module but the browser imports, and
# the polygons of an instance with a hole (several rings, joined with scipy) are made, as the export does
PROBE = textwrap.dedent(
    """
    import importlib, importlib.util, pkgutil
    import numpy as np
    import b2p
    print(b2p.__file__)
    print(importlib.util.find_spec("fiftyone"))
    for m in pkgutil.walk_packages(b2p.__path__, "b2p."):
        if not m.name.startswith("b2p.browse.") and not m.name.endswith("__main__"):
            importlib.import_module(m.name)
    from b2p.export.polygons import mask_to_polygon
    ring = np.zeros((9, 9), bool)
    ring[1:8, 1:8] = True
    ring[3:6, 3:6] = False
    assert len(mask_to_polygon(ring, "edge")) > 8
    """
)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="the venv layout and the console scripts written here are POSIX ones")
def test_main_job_runs_with_the_core_install_only(tmp_path: Path) -> None:
    """A fresh copy of the repository (its tracked files), the core dependencies only, `dvc repro`: exit 0 and
    the exported dataset written. The demo is shrunk to a test's size (tests/test_pipeline.py SMALL_MAIN_JOB)."""
    from test_pipeline import SMALL_MAIN_JOB, _edit_params

    project = tmp_path / "clone"
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    for rel in listed:
        if (REPO / rel).is_file():
            (project / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, project / rel)
    _edit_params(project / "params.yaml", SMALL_MAIN_JOB)
    venv = _core_venv(tmp_path / "venv", project)
    env = {"PATH": f"{venv / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(tmp_path), "DVC_NO_ANALYTICS": "1",
           "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"), "FIFTYONE_DO_NOT_TRACK": "true", "LANG": "C.UTF-8",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", PROBE], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert probe.returncode == 0 and probe.stdout.split() == [str(project / "b2p" / "__init__.py"), "None"], probe.stdout + probe.stderr
    subprocess.run(["git", "init", "-q"], cwd=project, env=env, check=True)
    p = subprocess.run([str(venv / "bin" / "dvc"), "repro"], cwd=project, env=env, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    exported = {f.name for f in (project / "data" / "export").iterdir()}
    assert {"coco", "yolo", "semantic"} <= exported, exported

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
