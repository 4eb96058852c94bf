"""The project's one logger, and progress for long work.

Every stage, job and command reports through `say` / `warn` (the `palm` logger, one line each on
stderr, rich markup allowed) and `steps` / `progress` (for every long step, a bar with the time elapsed and an ETA on a terminal,
a line with the same figures elsewhere, so CI logs and Prefect stay readable). Console tables are in palm_tasks.report.console.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
LOGGER = logging.getLogger("palm")


_CONSOLE = []  # one rich console for the log lines and the progress bars, so neither garbles the other
_LIVE: dict = {"progress": None, "tasks": 0}  # one rich Progress on a terminal, a task per long step


def _console():
    if not _CONSOLE:
        from rich.console import Console

        _CONSOLE.append(Console(stderr=True, highlight=False))
    return _CONSOLE[0]


def _setup() -> None:
    if LOGGER.handlers:
        return
    from rich.logging import RichHandler

    handler = RichHandler(console=_console(), show_time=False, show_path=False, show_level=False, markup=True)
    handler.setFormatter(logging.Formatter("[bold cyan]palm[/] %(message)s"))
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False  # Prefect's handlers would print every line a second time


def say(message: str) -> None:
    _setup()
    LOGGER.info(message)


def warn(message: str) -> None:
    _setup()
    LOGGER.warning(f"[yellow]warning: {message}[/]")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


@contextmanager
def steps(total: int, description: str, lines_from: int | None = 1) -> Iterator[Callable[[int], None]]:
    """A long step of `total` parts: yields advance(n=1), to call as each part finishes. On a
    terminal a bar with the parts done, the time elapsed and an ETA (a task of the one rich
    Progress, so steps inside steps show as more bars); elsewhere a line with the same figures
    after each part, or every tenth of the way for work of ten parts or more, and none for work
    of fewer than `lines_from` parts, or at all with None (CI logs and Prefect stay readable)."""
    started = time.monotonic()
    if sys.stderr.isatty():
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        if _LIVE["progress"] is None:
            _LIVE["progress"] = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                         TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                         console=_console(), transient=True)
            _LIVE["progress"].start()
        bars = _LIVE["progress"]
        task = bars.add_task(description, total=total)
        _LIVE["tasks"] += 1
        try:
            yield lambda n=1: bars.advance(task, n)
        finally:
            bars.remove_task(task)
            _LIVE["tasks"] -= 1
            if _LIVE["tasks"] == 0:
                bars.stop()
                _LIVE["progress"] = None
        return
    done = [0]
    every = max(1, total // 10) if total >= 10 else 1

    def advance(n: int = 1) -> None:
        done[0] += n
        i = done[0]
        if lines_from is not None and total >= lines_from and (i % every == 0 or i == total):
            elapsed = time.monotonic() - started
            left = f", ETA {_duration(elapsed / i * (total - i))}" if i < total else ""
            say(f"{description}: {i}/{total}, {_duration(elapsed)}{left}")
    yield advance


def progress(items: Iterable[T], total: int, description: str, lines_from: int | None = 1) -> Iterator[T]:
    """Yield `items`, showing how far along `description` is (steps(), a part per item)."""
    with steps(total, description, lines_from) as advance:
        for item in items:
            yield item
            advance()
