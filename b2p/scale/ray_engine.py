"""The `ray` engine (engine.py): a Ray Data actor pool over the images, results written by the driver.

Only this module imports Ray (the optional extra `pip install "b2p[ray]"`). Each image is one row (its
index and the pickled item); rows go out in blocks (`block_count`), so a dead worker costs at most the
images of the blocks it held. Each actor unpickles the job, sets it up once, and returns per row its
index and the pickled outcome: ("ok", result) or ("error", message, path) for a B2PError, which the driver
raises as it is. Actors are restarted and their blocks retried up to `max_retries` times.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from b2p.errors import B2PError
from b2p.scale.engine import (
    Engine,
    EngineConfig,
    ImageJob,
    MapStats,
    cpu_count,
    item_cost,
    oversubscription_warning,
)

# blocks (Ray Data tasks) the images are cut into: each block costs a task's scheduling and transfer, so a few
# per worker keep the pool busy with little of that; a block holds at most MAX_BLOCK_IMAGES images, so a retry
# after a dead worker redoes little; never more than MAX_BLOCKS blocks (the planner's cost grows with them)
BLOCKS_PER_WORKER = 8
IN_FLIGHT_PER_WORKER = 1
MAX_BLOCK_IMAGES = 64
MAX_BLOCKS = 2048
CONNECT_TIMEOUT_S = 5.0


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise B2PError('engine "ray" needs Ray: pip install "b2p[ray]" (ray[data])') from None
    return ray


def check_reachable(address: str) -> None:
    """Refuse an address whose head does not answer within CONNECT_TIMEOUT_S (Ray itself would retry for
    minutes): HOST:PORT or ray://HOST:PORT. "auto" is checked by Ray (it reads this machine's session)."""
    if address == "auto":
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise B2PError(f"engine address {address!r} is not auto, HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise B2PError(
            f"cannot reach the Ray cluster at {address} ({why}): start it (`ray start --head`) or check the address "
            "(HOST:PORT is the head's GCS port, 6379 by default; ray://HOST:10001 its Ray Client server)"
        ) from None


class RayEngine(Engine):
    name = "ray"
    in_process = False

    def __init__(self, config: EngineConfig, workers: int, autoscale: bool):
        self.config, self.workers, self.autoscale = config, workers, autoscale

    def map(self, job: ImageJob, items: Sequence[Any], on_result: Callable[[int, Any], None]) -> MapStats:
        if not items:
            return MapStats()
        import ray.data

        c = self.config
        n = len(items)
        blocks = block_count(n, self.workers)
        rows = [{"i": i, "item": pickle.dumps(items[i])} for i in block_order([item_cost(job, it) for it in items], blocks)]
        # one block in flight per actor: the pool hands a block to whichever actor is free, so none sits on a
        # queue of blocks while another has run out (at the end of a run the idle one is stopped)
        sizes = {"min_size": 1, "max_size": self.workers} if self.autoscale else {"size": self.workers}
        pool = ray.data.ActorPoolStrategy(**sizes, max_tasks_in_flight_per_actor=IN_FLIGHT_PER_WORKER)
        ds = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
            MapWorker,
            batch_size=1,
            batch_format="numpy",
            compute=pool,
            fn_constructor_args=(pickle.dumps(job), c.cpus_per_worker, os.getcwd()),
            num_cpus=c.cpus_per_worker,
            num_gpus=c.gpus_per_worker or None,
            max_restarts=c.max_retries,
            max_task_retries=c.max_retries,
        )
        stats, seen = MapStats(), set()
        try:
            for row in ds.iter_rows():
                i = int(row["i"])
                outcome = pickle.loads(row["result"])
                if outcome[0] == "error":
                    raise B2PError(outcome[1], outcome[2])
                if i in seen:  # a block retried after its worker died, whose first rows had arrived
                    stats.duplicates += 1
                    continue
                seen.add(i)
                on_result(i, outcome[1])
        except B2PError:
            raise
        except Exception as e:  # a worker crashed past its retries, or raised a bug: say so in one line
            raise RuntimeError(f"the Ray engine failed ({type(e).__name__}): {_first_line(e)}") from e
        missing = sorted(set(range(n)) - seen)
        if missing:
            raise RuntimeError(f"the Ray engine returned {n - len(missing)} of {n} results (item {missing[0]} missing)")
        stats.done = n
        return stats


def block_count(images: int, workers: int) -> int:
    """How many blocks `images` rows are cut into for a pool of `workers` actors (see BLOCKS_PER_WORKER)."""
    return max(1, min(images, MAX_BLOCKS, max(workers * BLOCKS_PER_WORKER, -(-images // MAX_BLOCK_IMAGES))))


def block_order(costs: Sequence[float], blocks: int) -> list[int]:
    """The items' indices in row order, for `blocks` blocks as Ray Data cuts rows (contiguous runs, the first
    `len(costs) % blocks` one row longer), dealt so that the blocks' estimated costs are close and the costliest
    items run first. Why: batches come sorted (by class, boxed images before unboxed ones) and an image's cost
    varies a lot (GrabCut's with its boxes; an image without boxes costs almost nothing), so contiguous blocks
    put the costly images in a few blocks, and one of them started last is run alone while the other workers
    idle. The items by estimated cost, costliest first, are dealt in rounds over the blocks, each round in the
    opposite direction (the block that got the costliest item of a round gets the cheapest of the next); the
    items left over after the full rounds (the cheapest) go to the first blocks, which Ray Data makes longer.
    Every block then holds one of the `blocks` costliest items, and the pool starts the blocks in order."""
    n = len(costs)
    by_cost = sorted(range(n), key=lambda i: (-costs[i], i))
    dealt: list[list[int]] = [[] for _ in range(blocks)]
    rounds = n // blocks
    for r in range(rounds):
        chunk = by_cost[r * blocks : (r + 1) * blocks]
        for k, i in enumerate(chunk if r % 2 == 0 else chunk[::-1]):
            dealt[k].append(i)
    for k, i in enumerate(by_cost[rounds * blocks :]):
        dealt[k].append(i)
    return [i for block in dealt for i in block]


class MapWorker:
    """One actor of the pool: the job set up once, then one image per call."""

    def __init__(self, job_blob: bytes, cpus: float, cwd: str):
        # relative paths (images, models, caches) mean what they mean to the driver: the data must be at the
        # same path on every node (shared storage, or the same checkout with `dvc pull`)
        if not os.path.isdir(cwd):
            raise B2PError(f"this Ray worker ({socket.gethostname()}) cannot see the driver's working folder: put the data on storage every node mounts at the same path", cwd)
        os.chdir(cwd)
        threads = max(1, int(cpus))
        # torch reads the variable when a job first imports it: a job without torch (GrabCut) never pays its import
        os.environ["OMP_NUM_THREADS"] = str(threads)
        with contextlib.suppress(ImportError):
            import cv2

            cv2.setNumThreads(threads)
        self.job = pickle.loads(job_blob)
        self.job.setup()
        if "torch" in sys.modules:  # imported before the variable was read (by the unpickled job's module)
            sys.modules["torch"].set_num_threads(threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for blob in batch["item"]:
            try:
                outcome: tuple = ("ok", self.job.run(pickle.loads(blob)))
            except B2PError as e:
                outcome = ("error", e.problem, None if e.path is None else str(e.path))
            out.append(pickle.dumps(outcome))
        result = np.empty(len(out), dtype=object)
        result[:] = out
        return {"i": batch["i"], "result": result}


@contextlib.contextmanager
def open_ray_engine(config: EngineConfig, warn: Callable[[str], None]) -> Iterator[RayEngine]:
    """Connect to (or start) the cluster, size the pool, and yield the engine; a cluster this call started
    is stopped afterwards, one that was running (`address`, or Ray already initialised here) is left."""
    ray = _import_ray()
    if config.address is not None:
        check_reachable(config.address)
    owned = False
    if not ray.is_initialized():
        quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
        if config.address is None:  # a local cluster for this run, sized for the workers asked
            cpus = cpu_count()
            workers = config.workers or max(1, int(cpus // config.cpus_per_worker))
            text = oversubscription_warning(workers, config.cpus_per_worker, cpus)
            if text:
                warn(text)
            need = workers * config.cpus_per_worker
            gpus = {"num_gpus": int(np.ceil(workers * config.gpus_per_worker))} if config.gpus_per_worker else {}
            ray.init(num_cpus=max(cpus, int(np.ceil(need))), **gpus, **quiet)
        else:
            # the cluster runs this b2p's code (its dependencies must be installed on the nodes)
            env = {"py_modules": [str(Path(__file__).resolve().parents[1])]}
            try:
                ray.init(address=config.address, runtime_env=env, **quiet)
            except ConnectionError as e:
                raise B2PError(f"cannot join the Ray cluster at {config.address!r}: {_first_line(e)}") from None
        owned = True
    try:
        _quiet_data()
        workers, autoscale = _pool_size(ray, config, warn, sized_here=owned and config.address is None)
        yield RayEngine(config, workers, autoscale)
    finally:
        if owned:
            ray.shutdown()


def _pool_size(ray, config: EngineConfig, warn: Callable[[str], None], sized_here: bool) -> tuple[int, bool]:
    """(actors, whether the pool may run smaller) from what the cluster holds: a GPU asked of a cluster
    without one is refused; on a cluster not started for this run (`sized_here` False), more workers than
    fit run as many as fit (said once)."""
    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    if config.gpus_per_worker and gpus < config.gpus_per_worker:
        raise B2PError(f"engine gpus_per_worker {config.gpus_per_worker:g}, but the Ray cluster has {gpus:g} GPUs")
    fit = int(cpus // config.cpus_per_worker)
    if config.gpus_per_worker:
        fit = min(fit, int(gpus // config.gpus_per_worker))
    if config.workers is None:
        return max(1, fit), False
    if config.workers > fit and not sized_here:
        warn(f"{config.workers} workers asked, but the Ray cluster has room for {fit}: running as many as fit")
        return config.workers, True
    return config.workers, False


def _quiet_data() -> None:
    """No Ray Data progress bars or execution banners: the stage shows its own progress."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    with contextlib.suppress(AttributeError):
        ctx.print_on_execution_start = False
    warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated", category=Warning)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
