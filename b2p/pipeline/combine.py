"""The suite's `combine` stage: per class, the best of every mask b2p delivers for a boxed image.

For one teacher and seed, the candidates of `b2p teach --teacher auto` (b2p/teach/auto.py: the box, the
GrabCut settings, SAM when its weights are on disk) are joined by the final masks (`b2p finalize`) of every
student the suite trained on that teacher with that seed, of its round-2 students, and of its boxes-only
students; never the oracle's (trained on manual masks a user does not have). Each is scored per class on
the calib split's manual masks and each class is taught by its winner. Why: one student rarely wins every
class; on Magnetic-Tile the U-Net's and the boxes-only students' final masks are far better on cracks
(thin) than b2p's, which is better on breaks and frays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from b2p.pipeline.results import BOXES_ONLY, ROUND2


def combine_candidates(work: str | Path, params: dict[str, Any], teacher: str, seed: int | str) -> dict[str, str]:
    """{candidate name: final-mask root} for `teacher` and `seed` from the suite's params (module docstring)."""
    work = Path(work)
    final = work / "final"
    out: dict[str, str] = {}
    for s in params.get("students") or []:
        out[s] = str(final / teacher / s / str(seed))
    for s in (params.get("round2") or {}).get("students") or []:
        out[s + ROUND2] = str(final / teacher / (s + ROUND2) / str(seed))
    for s in (params.get("boxes_only") or {}).get("students") or []:
        out[f"{BOXES_ONLY}:{s}"] = str(final / BOXES_ONLY / s / str(seed))
    return out
