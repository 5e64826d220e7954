"""The engine that runs a per-image stage (teach, predict, finalize's masks) over its images.

`local` (the default) runs every image in this process, one after the other, as b2p always has; it never
imports Ray. `ray` runs them on a Ray cluster: the images become the rows of a Ray Dataset, mapped by a
pool of actors (`map_batches` with a callable class) that each set the stage's work up once (load the
teacher or the student) and then take images one at a time. Either way this process writes every output
file, from the bytes each image's work returns: the outputs are the same files whatever the engine, and
nothing half-written by a worker can reach an output folder. Workers read their inputs (images, models,
an earlier round's masks) by absolute path, so on a cluster of several machines those paths must be the
same on every node (shared storage, or the same checkout with `dvc pull` on each).

A stage hands the engine a job (`ImageJob`: `setup()` once per worker, `run(item)` per image, both picklable
by reference to b2p's own modules) and its items; the engine calls `on_result(index, result)` in this
process once per item, in completion order. A worker that dies is restarted and its unfinished images run
again (`max_retries`); a result that arrives twice is taken once, and a run that ends without every item
is an error, so no image is lost or counted twice. A B2PError raised by a job on a worker is raised here as
it is (one clear error, exit code 1).

Settings (params.yaml `engine:`, or the `--engine / --workers / --address` options of each stage):
  name             local | ray
  address          ray only: null starts a local Ray cluster for the run (as many CPUs as workers need);
                   "auto" joins the cluster that `ray start` runs on this machine; HOST:PORT a cluster's
                   head (GCS port, 6379 by default); ray://HOST:10001 through Ray Client (KubeRay's head
                   service)
  workers          ray only: actors in the pool (null: as many as the cluster's CPUs, or GPUs, allow)
  cpus_per_worker  CPUs each actor reserves (and its torch / OpenCV threads)
  gpus_per_worker  GPUs each actor reserves (0: CPU; 1: one GPU each, which `device: auto` then uses)
  max_retries      restarts of a dead worker, and retries of the images it held, before the run fails
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from b2p.errors import B2PError

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class EngineConfig:
    """The `engine:` section of params.yaml (b2p/schema.py checks types and ranges)."""

    name: str = "local"
    address: str | None = None
    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_retries: int = 3

    def __post_init__(self) -> None:
        check_engine_name(self.name)
        if self.workers is not None and self.workers < 1:
            raise B2PError(f"engine workers must be at least 1, got {self.workers}")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0 or self.max_retries < 0:
            raise B2PError("engine cpus_per_worker must be > 0, gpus_per_worker and max_retries >= 0")
        if self.name == "local":
            given = [k for k, v in (("address", self.address), ("workers", self.workers if self.workers != 1 else None)) if v is not None]
            if self.gpus_per_worker:
                given.append("gpus_per_worker")
            if given:
                raise B2PError(
                    f"engine {', '.join(given)} given, but the local engine runs every image in this process: "
                    "use --engine ray (or engine.name: ray) to run them on workers"
                )


def check_engine_name(name: str) -> str:
    """`name` if it is an engine, else one clear error suggesting the closest one."""
    if name not in ENGINES:
        close = difflib.get_close_matches(str(name), ENGINES, n=1, cutoff=0.4)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise B2PError(f"unknown engine {name!r}{hint}; choose one of {', '.join(ENGINES)}")
    return name


class ImageJob(Protocol):
    """The work of a per-image stage, picklable (its class lives in a b2p module): `setup` once per worker
    (load a model), `run` once per item, returning what this process needs to write that item's outputs."""

    def setup(self) -> None: ...

    def run(self, item: Any) -> Any: ...

    # optional: `cost(item) -> float`, a cheap estimate of an item's work (pixels, say), by which an engine
    # deals the items to its workers (ray_engine.block_order); without it every item counts alike


def item_cost(job: ImageJob, item: Any) -> float:
    """The job's estimate of `item`'s work (its `cost` method), 1 where it has none."""
    cost = getattr(job, "cost", None)
    return 1.0 if cost is None else float(cost(item))


@dataclass
class MapStats:
    """What one `Engine.map` call saw: items done, and results that arrived twice (a retried worker)."""

    done: int = 0
    duplicates: int = 0


class Engine:
    """An opened engine; `map` runs a job over items. `record()` is what provenance says about it."""

    name = "local"
    workers = 1
    in_process = True  # the job runs on this process's objects (a teacher's counters are already here)

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "workers": self.workers}

    def map(self, job: ImageJob, items: Sequence[Any], on_result: Callable[[int, Any], None]) -> MapStats:
        """Run `job` over `items`, calling `on_result(i, result)` here once per item (any order)."""
        if not items:
            return MapStats()
        job.setup()
        for i, item in enumerate(items):
            on_result(i, job.run(item))
        return MapStats(done=len(items))


def engine_config(params_file: str | os.PathLike | None = None, **options: Any) -> EngineConfig:
    """EngineConfig from a params file's `engine:` section and command-line options (None = not given),
    checked by the engine schema (b2p/schema.py)."""
    from b2p.schema import resolve

    m = resolve("engine", params_file, options, flags={"name": "--engine"})
    return EngineConfig(**dict(m))


def cpu_count() -> int:
    """CPUs this process may use (the affinity mask, which containers and `taskset` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def oversubscription_warning(workers: int, cpus_per_worker: float, cpus: int, what: str = "workers") -> str | None:
    """The one warning for more workers than cores (they then share cores and each runs slower)."""
    need = workers * cpus_per_worker
    if need <= cpus:
        return None
    return (
        f"{workers} {what} x {cpus_per_worker:g} CPU need {need:g} CPUs, but this machine has {cpus}: they will "
        f"share cores and each run slower (use --workers {max(1, int(cpus // cpus_per_worker))} or fewer)"
    )


def print_warning(text: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[bold yellow]warning:[/] {escape(text)}", highlight=False)
