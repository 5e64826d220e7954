"""The one error type the CLI turns into a clear message and exit code 1 (never a traceback)."""

from __future__ import annotations

from pathlib import Path


class B2PError(Exception):
    """A problem with the user's input or environment that the user can fix.

    `path` names the file at fault when there is one; the message says what is wrong and, where it helps,
    what to do about it.
    """

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.problem = message
        super().__init__(f"{path}: {message}" if path is not None else message)


class Problems:
    """Collects every problem of one input, so a user fixes them all in one round instead of one per run.

    `check()` raises one B2PError listing the first `shown` problems and the total count, naming `path`
    (a single problem is raised as it is). A problem found in another file keeps that file's name.
    """

    def __init__(self, path: str | Path | None = None, what: str = "input", shown: int = 20):
        self.path = Path(path) if path is not None else None
        self.what, self.shown = what, shown
        self.items: list[B2PError] = []

    def add(self, problem: str | B2PError) -> None:
        self.items.append(problem if isinstance(problem, B2PError) else B2PError(problem, self.path))

    def __len__(self) -> int:
        return len(self.items)

    def check(self) -> None:
        if not self.items:
            return
        if len(self.items) == 1:
            raise self.items[0]
        lines = "\n  ".join(e.problem if e.path == self.path else str(e) for e in self.items[: self.shown])
        more = f"\n  ... and {len(self.items) - self.shown} more" if len(self.items) > self.shown else ""
        raise B2PError(f"{len(self.items)} problems in this {self.what}:\n  {lines}{more}", self.path)
