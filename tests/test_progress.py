"""Progress for long steps (palm_tasks.log.steps / progress): elapsed time and an ETA, as lines
off a terminal and as bars of one rich Progress on a terminal, nested steps included."""
import io
import re

import pytest

from palm_tasks import log


def test_off_a_terminal_each_part_gets_a_line_with_elapsed_time_and_an_eta(capsys):
    with log.steps(3, "rounds") as advance:
        for _ in range(3):
            advance()
    lines = [line for line in capsys.readouterr().err.splitlines() if "rounds:" in line]
    assert len(lines) == 3
    assert re.search(r"rounds: 1/3, \d+ s, ETA \d+ s", lines[0]) and "ETA" not in lines[2]
    # ten parts or more: a line every tenth of the way; below lines_from, or None: no line
    assert len([x for x in log.progress(range(40), 40, "chunks") if x >= 0]) == 40
    assert len([line for line in capsys.readouterr().err.splitlines() if "chunks:" in line]) == 10
    list(log.progress(range(5), 5, "batches", lines_from=10))
    list(log.progress(range(50), 50, "steps", lines_from=None))
    assert capsys.readouterr().err == ""


def test_on_a_terminal_steps_inside_steps_share_one_progress_and_leave_nothing(monkeypatch):
    # rich allows one live display at a time: a second bar (sampling inside a pool chunk, SFT
    # steps inside a round) is a task of the same Progress, and the last one out stops it
    from rich.console import Console

    monkeypatch.setattr(log.sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(log, "_CONSOLE", [Console(file=io.StringIO(), force_terminal=True)])
    with log.steps(2, "outer") as outer:
        bars = log._LIVE["progress"]
        for _ in range(2):
            for _ in log.progress(range(4), 4, "inner"):
                assert log._LIVE["progress"] is bars and log._LIVE["tasks"] == 2
            outer()
        assert [t.completed for t in bars.tasks] == [2]
    assert log._LIVE == {"progress": None, "tasks": 0}
    with pytest.raises(RuntimeError):  # a failure inside a step still removes its bar
        with log.steps(3, "failing"):
            raise RuntimeError("boom")
    assert log._LIVE == {"progress": None, "tasks": 0}
