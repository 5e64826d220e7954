"""`fileio.staged_dirs`: an output folder is one run's output or the previous one, never a mix; what a killed
run left beside it is undone by the next run."""

from __future__ import annotations

from pathlib import Path

import pytest

from b2p.fileio import staged_dirs


def _files(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): p.read_text() for p in sorted(d.rglob("*")) if p.is_file()}


def test_success_replaces_whole_failure_keeps_the_old_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "final"
    (out / "b").mkdir(parents=True)
    (out / "b" / "old.png").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_dirs([out]) as (stage,):
            (stage / "new.png").write_text("new")
            raise RuntimeError("late failure")
    assert _files(out) == {"b/old.png": "old"} and sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    with staged_dirs([out]) as (stage,):
        (stage / "new.png").write_text("new")
    assert _files(out) == {"new.png": "new"} and sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_a_killed_runs_leftovers_are_undone_first(tmp_path: Path) -> None:
    out = tmp_path / "final"
    # killed while building: a hidden build folder; killed mid-swap: the old output moved aside, out missing
    (tmp_path / ".final.k1.building").mkdir()
    (tmp_path / ".final.k1.building" / "half.png").write_text("half")
    (tmp_path / ".final.k2.old" / "final").mkdir(parents=True)
    (tmp_path / ".final.k2.old" / "final" / "done.png").write_text("complete")
    (tmp_path / ".finalize-notes").mkdir()  # not b2p's: kept
    with pytest.raises(RuntimeError):
        with staged_dirs([out]):
            assert _files(out) == {"done.png": "complete"}  # put back before this run starts
            raise RuntimeError("this run fails too")
    assert _files(out) == {"done.png": "complete"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".finalize-notes", "final"]
