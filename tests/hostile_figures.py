"""The hostile-input suite's figures (tests/test_hostile_suite.py), right under any order, a
subset (-k, --lf) and pytest-xdist (-n 2).

Each case's verdict is asserted by the test that produced it, where it is produced; this module
only counts. Every pytest process that runs hostile cases (the only one, or each xdist worker)
writes its counts to its own file in a directory that the session shares, when its session ends;
the process that reports (the only one, or xdist's controller) sums the files and prints the
figures below the test results. conftest.py loads this module as a plugin (pytest_plugins).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

VERDICTS = ("clean error", "accepted", "accepted wrongly", "traceback", "data lost")
BAD = ("accepted wrongly", "traceback", "data lost")

# this process's counts: surface -> verdict -> n; the tests that counted; what went wrong
COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
TESTS: set[str] = set()
WRONG: list[str] = []

_DIR = pytest.StashKey[Path]()
_INPUT = "palm_hostile_figures"  # the directory's name in an xdist worker's workerinput


def count(surface: str, verdict: str, what_went_wrong: str = "") -> None:
    """One case's verdict, counted for the figures (the caller asserts it)."""
    if verdict not in VERDICTS:
        raise ValueError(f"{verdict!r} is not a verdict: {VERDICTS}")
    COUNTS[surface][verdict] += 1
    TESTS.add(os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0])  # the test's node id
    if verdict in BAD:
        WRONG.append(what_went_wrong)


def _directory(config) -> Path:
    """The session's directory of counts: made by the reporting process when first needed; an
    xdist worker gets it from the controller (pytest_configure_node)."""
    if _DIR not in config.stash:
        workerinput = getattr(config, "workerinput", None)
        config.stash[_DIR] = (Path(workerinput[_INPUT]) if workerinput is not None
                              else Path(tempfile.mkdtemp(prefix="palm-hostile-figures-")))
    return config.stash[_DIR]


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """xdist, in the controller: each worker writes into the controller's directory."""
    node.workerinput[_INPUT] = str(_directory(node.config))


def pytest_sessionfinish(session):
    if not TESTS:
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    out = _directory(session.config) / f"{worker}-{os.getpid()}.json"
    out.write_text(json.dumps({"counts": COUNTS, "tests": sorted(TESTS), "wrong": WRONG}))


def totals(directory: Path) -> tuple[dict[str, collections.Counter], int, list[str]]:
    """Every process's counts summed: (surface -> verdict -> n, number of tests, what went wrong)."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    tests: set[str] = set()
    wrong: list[str] = []
    for path in sorted(directory.glob("*.json")):
        data = json.loads(path.read_text())
        for surface, by_verdict in data["counts"].items():
            counts[surface].update(by_verdict)
        tests.update(data["tests"])
        wrong += data["wrong"]
    return counts, len(tests), wrong


def summary(counts: dict[str, collections.Counter], n_tests: int, wrong: list[str]) -> list[str]:
    total = collections.Counter()
    rows = []
    for surface, by_verdict in sorted(counts.items()):
        total.update(by_verdict)
        rows.append(f"  {surface:32} {sum(by_verdict.values()):5} cases: "
                    + ", ".join(f"{v} {by_verdict[v]}" for v in VERDICTS))
    head = (f"hostile-input suite ({n_tests} tests ran): {sum(total.values())} cases tried, "
            f"{total['clean error']} clean errors, {total['accepted']} accepted (valid), tracebacks "
            f"{total['traceback']}, accepted wrongly {total['accepted wrongly']}, data lost {total['data lost']}")
    return [head, *rows, *wrong[:50]]


def pytest_terminal_summary(terminalreporter, config):
    if getattr(config, "workerinput", None) is not None or _DIR not in config.stash:
        return  # a worker, or no hostile-suite case was counted anywhere
    counts, n_tests, wrong = totals(config.stash[_DIR])
    if not counts:
        return
    terminalreporter.write_sep("-", "hostile-input suite figures (docs/hardening.md)")
    for line in summary(counts, n_tests, wrong):
        terminalreporter.write_line(line)


def pytest_unconfigure(config):
    if getattr(config, "workerinput", None) is None and _DIR in config.stash:
        shutil.rmtree(config.stash[_DIR], ignore_errors=True)
