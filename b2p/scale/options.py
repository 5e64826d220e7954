"""The engine's command-line options, shared by `b2p teach`, `b2p predict` and `b2p finalize` (engine.py)."""

from __future__ import annotations

from pathlib import Path

import typer

ENGINE = typer.Option(None, "--engine", help="local (this process, the default) or ray (workers on a Ray cluster) [params `engine.name`].")
WORKERS = typer.Option(None, "--workers", help="ray: worker actors, each loading the model once [as many as the cluster's CPUs allow].")
ADDRESS = typer.Option(
    None, "--address", help="ray: auto (the cluster `ray start` runs here), HOST:PORT or ray://HOST:10001; none starts a local cluster for the run."
)
GPUS_PER_WORKER = typer.Option(None, "--gpus-per-worker", help="ray: GPUs each worker reserves [0].")
ENGINE_PARAMS = typer.Option(None, "--params", help="YAML file whose `engine:` section sets the engine (the options above win).")


def engine_from_options(params: Path | None, engine: str | None, workers: int | None, address: str | None, gpus_per_worker: float | None):
    """The EngineConfig of params file + options (None = not given), checked."""
    from b2p.scale.engine import engine_config

    return engine_config(params, name=engine, workers=workers, address=address, gpus_per_worker=gpus_per_worker)
