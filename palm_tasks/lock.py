"""One writer per project: `palm run`, `palm stage`, `palm retrain` hold `<root>/.palm.lock`.

Two runs on the same project would train the same jobs twice and race on portfolio.json and
the registry. The lock is `fcntl.flock` on a file in the project root: the kernel releases it
when its holder exits, however it exits (SIGKILL included), so a stale lock never blocks. The
file records the holder's pid and command so that the refusal can say who holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

from palm_tasks.log import say

LOCK_FILE = ".palm.lock"


class ProjectLockedError(RuntimeError):
    """Another palm process is working on this project."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"pid {info['pid']} ({info['command']}, since {info['since']})"
    except (OSError, ValueError, KeyError):
        return "another process"


@contextmanager
def project_lock(root: Path, command: str, wait: bool = False, poll_seconds: float = 1.0):
    """Hold the project's lock for the `with` block; refuse at once unless `wait`."""
    path = Path(root) / LOCK_FILE
    fh = open(path, "a+")  # never truncate: the holder's pid stays readable until we own it
    try:
        announced = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait:
                    raise ProjectLockedError(
                        f"project {Path(root).resolve()} is busy: {_holder(path)} holds "
                        f"{path.name}; wait for it to finish, or pass --wait to queue behind it"
                    ) from None
                if not announced:
                    say(f"waiting for {_holder(path)} to release {path}")
                    announced = True
                time.sleep(poll_seconds)
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "command": command,
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        fh.flush()
        yield
    finally:
        fh.close()  # releases the flock
