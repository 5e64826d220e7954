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
