"""Opening the engine a run asks for: the local one, or a Ray cluster (ray_engine.py, imported only then)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from b2p.scale.engine import Engine, EngineConfig, print_warning


@contextlib.contextmanager
def open_engine(config: EngineConfig | None = None, warn: Callable[[str], None] | None = None) -> Iterator[Engine]:
    """The engine `config` names, ready to map (a Ray cluster connected or started: an unreachable address
    is refused here, before any output is written); closed (a cluster started for the run stopped) after."""
    config = config or EngineConfig()
    if config.name == "local":
        yield Engine()
        return
    from b2p.scale.ray_engine import open_ray_engine

    with open_ray_engine(config, warn or print_warning) as engine:
        yield engine
