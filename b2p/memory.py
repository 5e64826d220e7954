"""Peak memory of this process, for the memory tests and benchmarks."""
from __future__ import annotations

import resource
import sys
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB.

    On Linux it reads VmHWM, the high-water mark of this process's own address space. ``ru_maxrss`` is not used
    there: the kernel carries it over fork + exec, so a child started by a big parent (pytest after hundreds of
    tests) reports the parent's peak as its own.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"{status} has no VmHWM line")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS counts bytes, the BSDs KiB
