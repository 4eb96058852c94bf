"""The user store: each user's trait weights, kept so that clients need not resend them.

An SQLite database (params.yaml `serve.users_db`, by default beside the MLflow store), created on
first use. `palm users set|show|delete|list` and the server's `/v1/users/{id}/preferences`
write and read it; a request with `"user": "<id>"` is routed by the weights stored here.

Durability: write-ahead log with `synchronous=FULL`, one transaction per write, so a write that
was acknowledged survives a crash of the process (or the machine), a crash in the middle of a
write loses nothing else, and concurrent writers (the server's threads, a `palm users` command
beside a running server) wait for each other (`busy_timeout`) instead of failing. The schema is
versioned with SQLite's `user_version`: MIGRATIONS[i] takes a store from version i to i + 1, and
a store written by a newer palm is refused rather than misread.

Ids are the OpenAI `user` field: 1 to MAX_ID_CHARS characters of letters, digits and
`_ - . @ : + = ~`, not only dots (an id is also a URL path segment; one that a path could not
carry, or that reads as `.` or `..`, is refused). Weights are stored normalized, by trait name.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

MAX_ID_CHARS = 256
ID_PATTERN = re.compile(r"(?!\.+$)[A-Za-z0-9_.@:+=~-]+")  # not only dots
BUSY_TIMEOUT_MS = 10_000  # a writer waits this long for another before the write fails

MIGRATIONS = (
    # 0 -> 1: one row per user
    """CREATE TABLE users (
           id TEXT PRIMARY KEY,
           weights TEXT NOT NULL,      -- JSON {trait: weight}, normalized
           created_at REAL NOT NULL,
           updated_at REAL NOT NULL
       ) WITHOUT ROWID""",
)


class UserIdError(ValueError):
    """An id that is not a valid user id (says why)."""


class UserStoreError(RuntimeError):
    """The store cannot be used (damaged, written by a newer palm, not writable)."""


@dataclass(frozen=True)
class UserPreferences:
    user: str
    weights: dict[str, float]
    created_at: float
    updated_at: float

    def to_dict(self) -> dict:
        return {"user": self.user, "weights": self.weights, "created_at": self.created_at,
                "updated_at": self.updated_at}


def check_user_id(user: object) -> str:
    """The id itself, or UserIdError saying what is wrong with it (the id shown cut short)."""
    if not isinstance(user, str):
        raise UserIdError(f"user: expected a string id, got {type(user).__name__}")
    shown = repr(user[:40]) + ("..." if len(user) > 40 else "")
    if not 1 <= len(user) <= MAX_ID_CHARS:
        raise UserIdError(f"user: an id has 1 to {MAX_ID_CHARS} characters; {shown} has {len(user)}")
    if set(user) == {"."}:
        raise UserIdError(f"user: {shown} is not an id (only dots)")
    if not ID_PATTERN.fullmatch(user):
        raise UserIdError(f"user: {shown} has characters other than letters, digits and _ - . @ : + = ~")
    return user


class UserStore:
    """The store at `path`; each call opens its own connection (safe from any thread)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._ready = False
        # one migrator per process: the server's threads arrive together on its first requests,
        # and `PRAGMA journal_mode` may answer "locked" at once instead of waiting its busy timeout
        self._migrating = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise UserStoreError(f"the user store {self.path} cannot be opened ({exc})") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if not self._ready:
                with self._migrating:
                    if not self._ready:
                        self._migrate(conn)
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise UserStoreError(f"the user store {self.path} is not a usable SQLite database ({exc}); "
                                 "move it away to start an empty one") from None
        except UserStoreError:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA journal_mode = WAL")  # persistent: set once, kept in the file
        conn.execute("BEGIN IMMEDIATE")  # one migrator at a time; the others see its result
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise UserStoreError(f"the user store {self.path} has schema version {version}, newer than "
                                     f"this palm knows ({len(MIGRATIONS)}): upgrade palm")
            for step in range(version, len(MIGRATIONS)):
                conn.execute(MIGRATIONS[step])
                conn.execute(f"PRAGMA user_version = {step + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._ready = True

    def _run(self, fn):
        conn = self._connect()
        try:
            return fn(conn)
        except sqlite3.DatabaseError as exc:  # locked beyond the busy timeout, disk full, damaged
            raise UserStoreError(f"the user store {self.path}: {exc}") from None
        finally:
            conn.close()

    def set(self, user: str, weights: Mapping[str, float]) -> UserPreferences:
        """Store `weights` (already validated and normalized) for `user`; returns what is stored."""
        check_user_id(user)
        text = json.dumps({t: float(w) for t, w in weights.items()})
        now = time.time()

        def write(conn):
            conn.execute("INSERT INTO users (id, weights, created_at, updated_at) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT(id) DO UPDATE SET weights = excluded.weights, "
                         "updated_at = excluded.updated_at", (user, text, now, now))
            return conn.execute("SELECT id, weights, created_at, updated_at FROM users WHERE id = ?",
                                (user,)).fetchone()

        return _row(self._run(write))

    def get(self, user: str) -> UserPreferences | None:
        check_user_id(user)
        row = self._run(lambda conn: conn.execute(
            "SELECT id, weights, created_at, updated_at FROM users WHERE id = ?", (user,)).fetchone())
        return None if row is None else _row(row)

    def delete(self, user: str) -> bool:
        """True when there was a user to delete."""
        check_user_id(user)
        return self._run(lambda conn: conn.execute("DELETE FROM users WHERE id = ?", (user,)).rowcount) > 0

    def list(self, limit: int = 100, after: str = "") -> list[UserPreferences]:
        """Users in id order, `limit` of them, starting after the id `after` (paging)."""
        rows = self._run(lambda conn: conn.execute(
            "SELECT id, weights, created_at, updated_at FROM users WHERE id > ? ORDER BY id LIMIT ?",
            (after, int(limit))).fetchall())
        return [_row(r) for r in rows]

    def count(self) -> int:
        return self._run(lambda conn: conn.execute("SELECT COUNT(*) FROM users").fetchone()[0])

    def integrity(self) -> str:
        """SQLite's `PRAGMA integrity_check`: "ok" for a whole store."""
        return "; ".join(r[0] for r in self._run(lambda conn: conn.execute("PRAGMA integrity_check").fetchall()))


def _row(row) -> UserPreferences:
    return UserPreferences(user=row[0], weights=json.loads(row[1]), created_at=row[2], updated_at=row[3])


def user_store(cfg, root: str | Path) -> UserStore:
    """The project's store (params.yaml serve.users_db); ConfigError if the path leaves the project."""
    from palm_tasks.tracking import inside_project

    return UserStore(inside_project(Path(root), cfg.serve.users_db, "serve.users_db"))
