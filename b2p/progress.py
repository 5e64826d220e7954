"""A rich progress bar over a known number of steps, or a no-op (quiet runs, logs)."""

from __future__ import annotations


class Progress:
    """A rich progress bar over images, or a no-op."""

    def __init__(self, enabled: bool, description: str, total: int):
        self.enabled, self.description, self.total = enabled, description, total

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        self.p.__enter__()
        task = self.p.add_task(self.description, total=self.total)
        return lambda n: self.p.advance(task, n)

    def __exit__(self, *exc):
        if self.enabled:
            self.p.__exit__(*exc)
        return False
