"""What a stage writes for `dvc metrics show`: numbers only, and the rest of its record beside them.

Each stage's METRICS file (metrics/<stage>.json) holds numbers (booleans and null too), so
`dvc metrics show` is a readable table; the stage's whole record, with its text, keys, hashes and
paths, goes to the sibling details file metrics/<stage>.details.json, a plain output that DVC
does not read as metrics (docs/pipeline.md, "Metrics").
"""

from __future__ import annotations

from pathlib import Path

from palm_tasks import schema


def numbers(record: dict) -> dict:
    """The numbers of a stage's record, nested dicts kept: what `dvc metrics show` tabulates.

    Strings (descriptions, keys, hashes, paths) and lists are left out; booleans and None stay.
    A stage writes this to its METRICS file and the whole record to its details file
    (`details_path`), which is a plain output, not a metric."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            inner = numbers(value)
            if inner:
                out[key] = inner
        elif value is None or isinstance(value, (bool, int, float)):
            out[key] = value
    return out


def details_path(metrics_file: str) -> str:
    """metrics/<stage>.json -> metrics/<stage>.details.json: the stage's whole record, with the
    text, hashes and paths its metrics file leaves out (an output, not a DVC metric)."""
    return metrics_file.removesuffix(".json") + ".details.json"


def write_metrics(root: Path, metrics_file: str, metrics: dict, details: dict | None = None) -> None:
    """metrics_file (relative to root) with the numbers of `metrics` only, and, when `details`
    is given, its sibling details file with the whole record."""
    schema.write(Path(root) / metrics_file, numbers(metrics))
    if details is not None:
        schema.write(Path(root) / details_path(metrics_file), details)
