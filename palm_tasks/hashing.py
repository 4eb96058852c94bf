"""sha256 of files, read in 1 MiB chunks: job checksums, member checks, the base model's and
reward models' weights (one way to hash a file, whatever it is for)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

CHUNK = 1 << 20


def _update(h, path: Path) -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)


def file_sha256(path: Path) -> str:
    """sha256 of one file's bytes."""
    h = hashlib.sha256()
    _update(h, Path(path))
    return h.hexdigest()


def files_sha256(paths: Iterable[Path]) -> str:
    """sha256 over several files, each as its name then its bytes, in the order given: a set of
    weight files (a model's *.safetensors) is one identity, and renaming a file changes it."""
    h = hashlib.sha256()
    for path in paths:
        path = Path(path)
        h.update(path.name.encode())
        _update(h, path)
    return h.hexdigest()
