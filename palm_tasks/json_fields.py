"""Checked decoding of the fields of a JSON value an artifact was read from.

What reads an artifact (palm_tasks/schema.py) checks each field's type with these, so a damaged
or hand-edited file is refused with the field's name (`schema.read` adds the file's) instead of
failing later in a reader (a list joined to a path, a string read as an object, a number routed
to as a member key). Each raises `FieldError`, a ValueError naming the field and what it is.
"""

from __future__ import annotations

import math
from pathlib import Path


class FieldError(ValueError):
    """A field of a decoded JSON value is missing or of the wrong type; names the field."""


def what(x) -> str:
    """The JSON type of a decoded value, for a message (the value itself may be huge)."""
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "true/false"
    if isinstance(x, (int, float)):
        return "a number"
    return {dict: "an object", list: "a list", tuple: "a list", str: "a string"}.get(type(x), type(x).__name__)


def wrong(where: str, expected: str, x) -> FieldError:
    return FieldError(f"{where} is {what(x)}, not {expected}")


def mapping(x, where: str) -> dict:
    if not isinstance(x, dict):
        raise wrong(where, "an object", x)
    return x


def optional_mapping(data: dict, key: str, where: str = "") -> dict:
    """data[key] as an object; {} when it is absent or null."""
    value = data.get(key)
    return {} if value is None else mapping(value, f"{where}{key}")


def sequence(x, where: str) -> list:
    if not isinstance(x, (list, tuple)):  # a tuple: to_json's output read back without a file
        raise wrong(where, "a list", x)
    return list(x)


def string(x, where: str, empty: bool = False) -> str:
    if not isinstance(x, str):
        raise wrong(where, "a string", x)
    if not x and not empty:
        raise FieldError(f"{where} is an empty string")
    return x


def optional_string(x, where: str) -> str | None:
    return None if x is None else string(x, where, empty=True)


def boolean(x, where: str) -> bool:
    if not isinstance(x, bool):
        raise wrong(where, "true or false", x)
    return x


def number(x, where: str, minimum: float | None = None, finite: bool = True) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise wrong(where, "a number", x)
    try:
        value = float(x)
    except OverflowError:  # an integer of hundreds of digits
        raise FieldError(f"{where} is a number too large for a float") from None
    if finite and not math.isfinite(value):
        raise FieldError(f"{where} is {value}, not a finite number")
    if minimum is not None and value < minimum:
        raise FieldError(f"{where} is {value}, below {minimum}")
    return value


def integer(x, where: str, minimum: int | None = None) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise wrong(where, "an integer", x)
    if minimum is not None and x < minimum:
        raise FieldError(f"{where} is {x}, below {minimum}")
    return x


def strings(x, where: str) -> tuple[str, ...]:
    return tuple(string(v, f"{where}[{i}]") for i, v in enumerate(sequence(x, where)))


def numbers(x, where: str, n: int | None = None, minimum: float | None = None) -> tuple[float, ...]:
    values = sequence(x, where)
    if n is not None and len(values) != n:
        raise FieldError(f"{where} has {len(values)} numbers, not {n}")
    return tuple(number(v, f"{where}[{i}]", minimum) for i, v in enumerate(values))


def trait_numbers(traits, value, where: str, minimum: float | None = None) -> tuple[float, ...]:
    """A per-trait value written either as {trait: x} (every trait, no other) or as a list in
    trait order; finite numbers."""
    if isinstance(value, dict):
        missing = [t for t in traits if t not in value]
        if missing:
            raise FieldError(f"{where} has no {', '.join(missing)}")
        unknown = [k for k in value if k not in traits]
        if unknown:
            raise FieldError(f"{where} names {len(unknown)} trait(s) the portfolio does not have")
        return tuple(number(value[t], f"{where}.{t}", minimum) for t in traits)
    if not isinstance(value, (list, tuple)):
        raise wrong(where, "an object of trait: number", value)
    return numbers(value, where, len(traits), minimum)


def required(data: dict, key: str, where: str = ""):
    if key not in data:
        raise FieldError(f"{where}{key} is missing")
    return data[key]


def relative_path(x, where: str) -> str:
    """A path inside the project, as the stages write it (Paths.relative): relative, no `..`."""
    path = string(x, where)
    parts = Path(path).parts
    if "\x00" in path or Path(path).is_absolute() or ".." in parts:
        raise FieldError(f"{where} is not a path inside the project")
    return path


def member_key(x, where: str) -> str:
    """A policy key: names a directory (models/members/<key>), so one path component."""
    key = string(x, where)
    if "/" in key or "\\" in key or "\x00" in key or key in (".", ".."):
        raise FieldError(f"{where} is not a policy key (one name, no path)")
    return key
