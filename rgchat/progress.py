"""Progress on stderr for long steps (downloads, conversion): rich bars on a terminal, plain periodic lines
otherwise (logs, CI), never on stdout."""

from __future__ import annotations

import sys
import time
from typing import TextIO

PLAIN_EVERY_S = 5.0  # a plain progress line at most this often per task


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class Task:
    """One bar (or one plain line now and then): `advance(n)` as work is done, `done()` at the end."""

    def __init__(self, reporter: Reporter, description: str, total: int, unit: str):
        self.reporter, self.description, self.total, self.unit = reporter, description, total, unit
        self.completed = 0
        self.started = self.last_print = time.monotonic()
        self.rich_id = reporter.bars.add_task(description, total=total) if reporter.bars is not None else None

    def advance(self, n: int) -> None:
        self.completed += n
        if self.rich_id is not None:
            self.reporter.bars.update(self.rich_id, completed=self.completed)
        elif time.monotonic() - self.last_print >= PLAIN_EVERY_S:
            self._print()

    def done(self) -> None:
        if self.rich_id is not None:
            self.reporter.bars.update(self.rich_id, completed=self.total)
        else:
            self.completed = self.total
            self._print()

    def _print(self) -> None:
        self.last_print = now = time.monotonic()
        pct = 100 * self.completed / self.total if self.total else 100.0
        if self.unit == "bytes":
            rate = self.completed / max(now - self.started, 1e-9)
            amount = f"{_size(self.completed)} of {_size(self.total)}, {_size(rate)}/s"
        else:
            amount = f"{self.completed} of {self.total}"
        print(f"rgchat: {self.description}: {pct:.0f}% ({amount})", file=self.reporter.stream, flush=True)


class Reporter:
    """Owns the display; use as a context manager around the work."""

    def __init__(self, stream: TextIO | None = None, rich: bool | None = None):
        self.stream = stream or sys.stderr
        self.bars = None
        if rich if rich is not None else self.stream.isatty():
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self.bars = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=Console(file=self.stream))

    def task(self, description: str, total: int, unit: str = "bytes") -> Task:
        return Task(self, description, total, unit)

    def __enter__(self) -> Reporter:
        if self.bars is not None:
            self.bars.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bars is not None:
            self.bars.stop()
