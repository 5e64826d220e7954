"""Scaling out (b2p/scale): the Ray engine gives the local engine's files, survives a killed worker, refuses bad
engine settings, and training on 2 processes follows the 1-process curves.

One local Ray cluster (2 CPUs) serves the whole module; the engine reuses it (Ray already initialised here).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from b2p.cli import app
from b2p.scale.engine import EngineConfig
from b2p.scale.engines import open_engine

runner = CliRunner()
TESTS = Path(__file__).resolve().parent


def _cli(*args: str, cwd: Path):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(app, list(args))
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo batch (12 images, 64 px) imported, taught by GrabCut, a tiny student trained and predicted,
    all on the local engine."""
    root = tmp_path_factory.mktemp("scale")
    for args in (
        ("demo-data", "--images", "12", "--size", "64", "--out", "raw"),
        ("import", "--batch", "demo", "--images", "raw/images", "--coco", "raw/annotations.json", "--masks", "raw/masks", "--out", "imported/demo.json"),
        ("teach", "imported/demo.json", "--out", "teach_local", "--quiet"),
    ):
        r = _cli(*args, cwd=root)
        assert r.exit_code == 0, r.output
    (root / "tiny.yaml").write_text("train:\n  arch: unet\n  unet_base: 8\n  epochs: 1\n  batch_size: 2\n  tile_size: 64\n  select: last\n")
    r = _cli("train", "--imported", "imported", "--teacher-root", "teach_local", "--out", "model", "--params", "tiny.yaml", cwd=root)
    assert r.exit_code == 0, r.output
    r = _cli("predict", "--model", "model", "--imported", "imported", "--split", "all", "--out", "pred_local", "--probs", "--boxes-out", "boxes_local", cwd=root)
    assert r.exit_code == 0, r.output
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def test_ray_engine_teaches_and_predicts_the_local_engines_files(ray_cluster, demo):
    r = _cli("teach", "imported/demo.json", "--out", "teach_ray", "--quiet", "--engine", "ray", "--workers", "2", cwd=demo)
    assert r.exit_code == 0, r.output
    local, ray_ = _files(demo / "teach_local"), _files(demo / "teach_ray")
    assert local.keys() == ray_.keys() and len([k for k in local if k.startswith("demo/labelmaps/")]) == 12
    prov = "demo/provenance.json"
    assert {k: v for k, v in ray_.items() if k != prov} == {k: v for k, v in local.items() if k != prov}  # maps, parts, instances, preview
    pl, pr = json.loads(local[prov]), json.loads(ray_[prov])
    assert pl["engine"] == {"name": "local", "workers": 1} and pr["engine"] == {"name": "ray", "workers": 2}
    assert _without(pr, "engine", "time") == _without(pl, "engine", "time")

    r = _cli(
        "predict", "--model", "model", "--imported", "imported", "--split", "all", "--out", "pred_ray", "--probs", "--boxes-out", "boxes_ray",
        "--engine", "ray", "--workers", "2", cwd=demo,
    )
    assert r.exit_code == 0, r.output
    for kind in ("pred", "boxes"):
        local, ray_ = _files(demo / f"{kind}_local"), _files(demo / f"{kind}_ray")
        assert local.keys() == ray_.keys()
        assert {k: v for k, v in ray_.items() if k != "predict.json"} == {k: v for k, v in local.items() if k != "predict.json"}  # maps and probs, byte for byte
        ml, mr = json.loads(local["predict.json"]), json.loads(ray_["predict.json"])
        assert [r["engine"] for r in mr["runs"]] == [{"name": "ray", "workers": 2}]
        assert [_without(r, "engine", "inputs") for r in mr["runs"]] == [_without(r, "engine", "inputs") for r in ml["runs"]]
    assert len([k for k in _files(demo / "pred_ray") if k.endswith(".npz")]) == 12


def test_a_killed_worker_is_replaced_and_every_image_is_taught_once(ray_cluster, demo, tmp_path):
    from scale_helpers import SlowBoxTeacher

    from b2p.teach.base import PARTS_DIR, teach_batch
    from b2p.teach.box import BoxTeacher

    batch = demo / "imported" / "demo.json"
    reference = teach_batch(batch, tmp_path / "box_local", BoxTeacher(), progress=False)
    pids = tmp_path / "pids"
    pids.mkdir()
    killed: list[int] = []

    def kill_one_worker() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            seen = sorted(pids.iterdir(), key=lambda p: p.stat().st_mtime)
            parts = list((tmp_path / "box_ray" / "demo" / PARTS_DIR).glob("*.json"))
            if seen and parts:  # mid-run: some images done, a worker busy on another
                pid = int(seen[-1].name)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker)
    killer.start()
    with open_engine(EngineConfig(name="ray", workers=2)) as eng:
        report = teach_batch(batch, tmp_path / "box_ray", SlowBoxTeacher(str(pids), 0.4), progress=False, engine=eng)
    killer.join()
    assert len(killed) == 1 and killed[0] in {int(p.name) for p in pids.iterdir()}
    assert len(list(pids.iterdir())) >= 3  # the killed worker's images were taught again by a new process
    assert report.taught == 12 and report.images == 12
    inst = json.loads((tmp_path / "box_ray" / "demo" / "instances.json").read_text())
    ids = [a["box_id"] for a in inst["annotations"]]
    assert len(ids) == len(set(ids)) == report.boxes == reference.boxes  # every box exactly once
    ref = _files(tmp_path / "box_local" / "demo")
    got = _files(tmp_path / "box_ray" / "demo")
    assert _without(got, "provenance.json") == _without(ref, "provenance.json")


def test_bad_engine_settings_are_one_clear_error_and_write_nothing(ray_cluster, demo):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cases = [
        (("--engine", "ray", "--address", f"127.0.0.1:{port}"), "cannot reach the Ray cluster"),
        (("--engine", "rya"), "did you mean 'ray'?"),
        (("--workers", "2"), "use --engine ray"),
    ]
    for extra, message in cases:
        out = demo / "never"
        r = _cli("teach", "imported/demo.json", "--out", "never", "--quiet", *extra, cwd=demo)
        assert r.exit_code == 1, r.output
        assert message in " ".join(r.output.split()) and "Traceback" not in r.output
        assert not out.exists()
        r = _cli("predict", "--model", "model", "--imported", "imported", "--out", "never", *extra, cwd=demo)
        assert r.exit_code == 1 and message in " ".join(r.output.split()) and not out.exists()


def test_more_workers_than_the_cluster_holds_is_one_warning_and_still_runs(ray_cluster, demo, tmp_path):
    from b2p.teach.base import teach_batch
    from b2p.teach.box import BoxTeacher

    warnings: list[str] = []
    with open_engine(EngineConfig(name="ray", workers=3), warn=warnings.append) as eng:
        report = teach_batch(demo / "imported" / "demo.json", tmp_path, BoxTeacher(), progress=False, engine=eng)
    assert len(warnings) == 1 and "room for 2" in warnings[0]
    assert report.taught == 12


def _curves(folder: Path) -> list[dict]:
    return list(csv.DictReader((folder / "curves.csv").open()))


# 2 processes x half the global batch vs 1 process: the same tiles, loss and BatchNorm statistics, so the
# curves differ only by float rounding (float32 sums in another order; measured: losses within 2e-5, the
# argmax scores within 5e-4). The tolerance stated: losses rtol 1e-4 (the IoU-type scores move in steps of
# whole pixels, so they are not compared). A random-weight EfficientNet is too ill-conditioned for this
# (gradients of hundreds: its rounding grows to percent), hence the U-Net and the embedded pretrained weights.
LOSS_RTOL = 1e-4


@pytest.mark.parametrize(
    "config",
    [
        "arch: unet\n  unet_base: 8",  # BatchNorm everywhere: the global batch's statistics
        "adaptation: frozen\n  decoder_dim: 16",  # the frozen backbone's feature cache, per rank
    ],
)
def test_two_training_processes_follow_the_one_process_curves(demo, tmp_path, config):
    from b2p.schema import train_params
    from b2p.student.train import train_student

    params = tmp_path / "p.yaml"
    params.write_text(f"train:\n  {config}\n  epochs: 2\n  batch_size: 4\n  crops_per_image: 2\n  tile_size: 64\n  augment: flips\n  select: pseudo\n")
    batch, teach = [demo / "imported" / "demo.json"], demo / "teach_local"
    one = train_student(batch, teach, tmp_path / "one", train_params([params]), progress=False)
    two = train_student(batch, teach, tmp_path / "two", train_params([params], {"processes": 2}), progress=False)
    assert one["processes"] == 1 and two["processes"] == 2
    if "frozen" in config:
        assert one["feature_cache"]["misses"] > 0 and two["feature_cache"]["hits"] > 0  # rank 0's cache served later epochs
    a, b = _curves(tmp_path / "one"), _curves(tmp_path / "two")
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        for k in ("train_loss", "train_dice", "train_ce", "val_loss", "lr"):
            assert float(rb[k]) == pytest.approx(float(ra[k]), rel=LOSS_RTOL), (k, ra[k], rb[k])
    assert (tmp_path / "two" / "model.pt").is_file()


def test_two_processes_need_a_global_batch_of_at_least_two(demo, tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("train:\n  arch: unet\n  unet_base: 8\n  epochs: 1\n  batch_size: 1\n  tile_size: 64\n")
    r = _cli("train", "--imported", "imported", "--teacher-root", "teach_local", "--out", str(tmp_path / "m"), "--params", str(params), "--processes", "2", cwd=demo)
    assert r.exit_code == 1 and "must be at least 2" in " ".join(r.output.split())
    assert not (tmp_path / "m").exists()


def _ray_blocks(rows: list[int], blocks: int) -> list[list[int]]:
    """The rows cut as ray.data.from_items cuts them: contiguous runs, the first len % blocks one longer."""
    size, extra = divmod(len(rows), blocks)
    return [rows[k * size + min(k, extra) : (k + 1) * size + min(k + 1, extra)] for k in range(blocks)]


@pytest.mark.parametrize("n,blocks", [(1000, 16), (37, 5), (7, 7), (3, 1)])
def test_blocks_share_the_costly_images_of_a_sorted_batch(n, blocks):
    from b2p.scale.ray_engine import block_order

    # a batch as imports order it: the boxed (costly, of uneven cost) images first, the unboxed ones after
    boxed = max(1, n * 3 // 10)
    costs = [float(1 + (i * 7919) % 97) if i < boxed else 0.0 for i in range(n)]
    order = block_order(costs, blocks)
    assert sorted(order) == list(range(n))  # every image once
    cut = _ray_blocks(order, blocks)
    totals = [sum(costs[i] for i in b) for b in cut]
    top = sorted(range(n), key=lambda i: -costs[i])[:blocks]
    assert all(len({*b} & {*top}) == 1 for b in cut)  # each block starts on one of the costliest
    assert max(totals) - min(totals) <= max(costs)  # no block holds much more than another
    contiguous = [sum(costs[i] for i in b) for b in _ray_blocks(list(range(n)), blocks)]
    assert max(totals) <= max(contiguous) and (blocks == 1 or n < 2 * blocks or max(totals) < max(contiguous))


def test_jobs_estimate_their_images_cost():
    from b2p.dataset import Box, ImageRecord
    from b2p.scale.engine import item_cost
    from b2p.teach.base import TeachJob
    from b2p.teach.grabcut import GrabCutTeacher

    im = ImageRecord(1, "a.png", Path("a.png"), 50, 40, "train", "b", "0" * 64, False)
    job = TeachJob(GrabCutTeacher())
    assert item_cost(job, im) == 0.0  # no boxes, no teaching
    im.boxes = [Box(1, 1, (2.0, 3.0, 10.0, 5.0)), Box(2, 1, (0.0, 0.0, 4.0, 4.0))]
    assert item_cost(job, im) == 10 * 5 + 4 * 4
    assert item_cost(object(), im) == 1.0  # a job without an estimate: every item alike
