"""`b2p browse` end to end in a real browser: the CLI builds a tiny dataset and serves the App on
127.0.0.1; headless Chromium loads it; the DOM must show the dataset name, the sample count and loaded
sample tiles, and the screenshot must show the teacher's mask fill in its class colour.

Artifacts (kept for a human to look at): test-artifacts/browse_app.png and browse_app_dom.html.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_synthetic_batch

from b2p.labels import label_map_path, write_label_map

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,900", "--virtual-time-budget=15000",
]


def _chromium() -> str:
    from b2p.browse.fo_env import chromium_path

    path = chromium_path()
    if path is None:
        msg = "headless Chromium is needed for this test: apt-get install -y chromium (Debian)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + " -- it must be installed in CI")
        pytest.skip(msg)
    return path


def _run_chromium(chromium: str, url: str, *extra: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url],
                              capture_output=True, text=True, timeout=120)


def _field_colored_pixels(png: Path, color_hex: str) -> int:
    """Pixels of the screenshot whose dominant channel is that of the field's colour (mask fill drawn at
    opacity 0.6 over gray keeps that channel at least 40 above the other two)."""
    import cv2

    rgb = cv2.cvtColor(cv2.imread(str(png)), cv2.COLOR_BGR2RGB).astype(int)
    color = [int(color_hex[i : i + 2], 16) for i in (1, 3, 5)]
    ch = int(np.argmax(color))
    others = [c for c in range(3) if c != ch]
    return int(np.count_nonzero((rgb[..., ch] > rgb[..., others[0]] + 40) & (rgb[..., ch] > rgb[..., others[1]] + 40)))


def _page_problems(dom: str, shot: Path, name: str, n: int) -> list[str]:
    """What is missing from the rendered App page (empty when it shows the dataset, its samples and masks)."""
    problems = []
    # the DOM: dataset name, sample count, one loaded tile per sample, mask fields in the sidebar
    if name not in dom:
        problems.append("dataset name not in the page")
    count = re.search(r'data-cy="entry-count-part"[^>]*>(\d+)</span>\s*samples', dom)
    if not count or int(count.group(1)) != n:
        problems.append(f"sample count {count.group(1) if count else None} instead of {n}")
    loaded = dom.count('canvas-loaded="true"')
    if loaded != n:
        problems.append(f"{loaded} loaded tiles instead of {n}")
    problems += [f"no {f} field in the sidebar" for f in ("boxes", "manual", "teacher", "student") if f'data-cy="{f}-field"' not in dom]
    # the screenshot: the teacher's block is drawn on the tiles in the teacher field's colour (a box outline or
    # the small spot give a few hundred such pixels per tile; the block alone about 88x88 on a 176 px tile)
    from b2p.browse.build import FIELD_COLORS

    drawn = _field_colored_pixels(shot, FIELD_COLORS["teacher"])
    if drawn <= (n - 1) * 5000:
        problems.append(f"mask fill not visible in the screenshot: {drawn} pixels of the teacher field's colour")
    return problems


@pytest.mark.browser
@pytest.mark.slow
def test_app_renders_samples_and_masks(tmp_path):
    chromium = _chromium()
    from b2p.browse.app import wait_http_ok
    from b2p.browse.fo_env import PrivateMongod, free_port

    n = 4
    _, truth = make_synthetic_batch(tmp_path, "b1", n_images=n)
    for fname, lm in truth.items():
        t = lm.copy()
        t[32:, :32] = 2  # a filled quarter-image block: clearly a mask, not a box outline
        write_label_map(label_map_path(tmp_path / "teach", "b1", fname), t)
        write_label_map(label_map_path(tmp_path / "predict", "b1", fname), lm)

    ARTIFACTS.mkdir(exist_ok=True)
    shot, dom_file, log_file = ARTIFACTS / "browse_app.png", ARTIFACTS / "browse_app_dom.html", ARTIFACTS / "browse_app.log"
    shot.unlink(missing_ok=True)
    name = "b2p-app-test"
    with PrivateMongod(tmp_path / "db") as uri:
        port = free_port()
        env = {**os.environ, "FIFTYONE_DATABASE_URI": uri, "FIFTYONE_DO_NOT_TRACK": "true", "COLUMNS": "200"}
        cmd = [sys.executable, "-m", "b2p", "browse", "--imported", str(tmp_path / "imported"),
               "--teacher-root", str(tmp_path / "teach"), "--pred-root", str(tmp_path / "predict"),
               "--name", name, "--address", "127.0.0.1", "--port", str(port)]
        t0 = time.perf_counter()
        with open(log_file, "w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                wait_http_ok(f"http://127.0.0.1:{port}/", timeout=180)
            except Exception:
                pytest.fail(f"App did not come up; b2p browse exited {proc.poll()}:\n{log_file.read_text()[-3000:]}")
            startup = time.perf_counter() - t0
            url = f"http://127.0.0.1:{port}/datasets/{name}"
            # the grid loads asynchronously; on a busy 2-core machine a capture can land before the tiles
            # are drawn, so look again (a fresh browser each time) before calling it a failure
            for attempt in range(1, 4):
                res = _run_chromium(chromium, url, f"--screenshot={shot}")
                assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
                dom = _run_chromium(chromium, url, "--dump-dom").stdout
                dom_file.write_text(dom)
                problems = _page_problems(dom, shot, name, n)
                if not problems:
                    break
                print(f"attempt {attempt}: {problems}")
        finally:
            proc.terminate()  # SIGTERM: b2p closes the App session and exits
            try:
                rc = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
    out = log_file.read_text()
    print(f"b2p browse: build + App ready in {startup:.1f} s")
    assert rc == 0, out[-2000:]
    assert f"{n} samples" in out and url in out

    assert not problems, f"after {attempt} attempts: {problems} (see {shot}, {dom_file})"
