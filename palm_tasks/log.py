"""The project's one logger, and progress for long work.

Every stage, job and command reports through `say` / `warn` (the `palm` logger, one line each on
stderr, rich markup allowed) and `progress` (a bar on a terminal, a line every tenth of the way
elsewhere, so CI logs and Prefect stay readable). Console tables are in palm_tasks.report.console.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
LOGGER = logging.getLogger("palm")


def _setup() -> None:
    if LOGGER.handlers:
        return
    from rich.console import Console
    from rich.logging import RichHandler

    handler = RichHandler(console=Console(stderr=True, highlight=False), show_time=False,
                          show_path=False, show_level=False, markup=True)
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


def progress(items: Iterable[T], total: int, description: str) -> Iterator[T]:
    """Yield `items`, showing how far along `description` is (off a terminal, a line every tenth
    of the way, for work of ten steps or more)."""
    if sys.stderr.isatty():
        from rich.progress import track

        yield from track(items, total=total, description=description, transient=True)
        return
    step = max(1, total // 10)
    for i, item in enumerate(items, 1):
        yield item
        if total >= 10 and (i % step == 0 or i == total):
            say(f"{description}: {i}/{total}")
