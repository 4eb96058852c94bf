"""params.yaml on disk: read safely and validated (`load_config`), generated from the settings.

    python -m palm_tasks.params_yaml > params.yaml         # regenerate after changing a default
    python -m palm_tasks.params_yaml --check params.yaml   # exit 1 naming the first differing line

`load_config` reads YAML without anchors, aliases, tags or duplicate keys, then validates it
with palm_tasks.config.parse_config. `load_config(path, overrides)` lays settings over the file
first: a profile (a partial params file, `profiles/<name>.yaml`) and `-S key=value` pairs, the
syntax `dvc exp run -S` takes (docs/profiles.md). params.yaml is generated from the models of
palm_tasks/config.py, each key with its description as a comment, so the file and the code
cannot drift apart (tests/test_config.py checks it).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from palm_tasks.config import YAML_COMMENTS, ConfigError, PalmConfig, Section, cut_message, parse_config
from palm_tasks.paths import WORK

class _Refused(Exception):
    """YAML that is well formed but not accepted in params.yaml, and where it is."""

    def __init__(self, problem: str, mark):
        super().__init__(problem)
        self.problem, self.mark = problem, mark


class _ParamsLoader(yaml.SafeLoader):
    """yaml.SafeLoader without anchors and aliases: a few hundred bytes of nested aliases (a
    "billion laughs") expand to a value whose every use (validating it, showing it in an error)
    costs gigabytes. params.yaml never needs them, so they are refused before anything expands."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if event.anchor is not None:  # &name on a node, or *name (an AliasEvent)
            raise _Refused(f"YAML anchors and aliases (&{event.anchor}, *{event.anchor}) are not "
                           "allowed; write the value out", event.start_mark)
        if getattr(event, "tag", None) is not None:  # !!set, !!binary, !!python/...: plain values only
            raise _Refused(f"YAML tags ({event.tag}) are not allowed; write a plain value", event.start_mark)
        return super().compose_node(parent, index)


def _check_unique_keys(node, path: tuple = ()) -> None:
    """_Refused at the first key given twice in one mapping (YAML would keep the last silently)."""
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None:
                if key == "<<" and key_node.tag == "tag:yaml.org,2002:merge":
                    raise _Refused("YAML merge keys (<<) are not allowed; write the keys out", key_node.start_mark)
                if key in seen:
                    raise _Refused(f"duplicate key {'.'.join((*path, key))!r}; give each key once",
                                   key_node.start_mark)
                seen.add(key)
            _check_unique_keys(value_node, (*path, str(key)))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, (*path, str(i)))


def _read_yaml(text: str):
    """The YAML document in `text`, refusing anchors, aliases and duplicate keys (_Refused)."""
    loader = _ParamsLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_config(path: str | Path = "params.yaml", overrides: list[Override] | None = None) -> PalmConfig:
    """Read and validate params.yaml, with `overrides` (a profile's, -S pairs) laid over it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (run palm from the project directory)")
    data = _read_file(path)
    if overrides:
        data = apply_overrides(data, overrides)
        return parse_config(data, f"{path} with {', '.join(dict.fromkeys(o.source for o in overrides))}")
    return parse_config(data, str(path))


def _read_file(path: Path):
    """The YAML document of params.yaml or a profile; ConfigError naming the file and the problem."""
    try:
        data = _read_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except _Refused as exc:
        raise ConfigError(f"{path}: {exc.problem} (line {exc.mark.line + 1}, column {exc.mark.column + 1})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be params.yaml") from None
    except ValueError as exc:  # a scalar YAML reads but Python refuses: an integer of 5,000 digits
        raise ConfigError(f"{path}: a value cannot be read ({cut_message(' '.join(str(exc).split())[:200])})") from None
    except yaml.YAMLError as exc:
        # One line, as the CLI prints it: what is wrong and where.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    return data


# ------------------------------------------------------------------ profiles and -S overrides
PROFILES = "profiles"  # named profiles: <project>/profiles/<name>.yaml


@dataclass(frozen=True)
class Override:
    """One setting laid over params.yaml: `key` dotted (training.rounds), from `source` (a
    profile file or "-S")."""

    key: str
    value: Any
    source: str

    def as_dvc(self) -> str:
        """KEY=VALUE as `dvc exp run -S` takes it (Hydra's override grammar): JSON for a list
        or a mapping (no spaces, so `$(palm profile NAME)` splits it as one word), YAML for a
        scalar."""
        if isinstance(self.value, (list, dict)):
            text = json.dumps(self.value, separators=(",", ":"))
        else:
            text = _yaml_value(self.value)
        return f"{self.key}={text}"


def _known(key: str) -> None:
    """ConfigError unless `key` names a setting of params.yaml (or lies under one whose value
    is a mapping of the user's own names, such as rewards.models)."""
    node: Any = PalmConfig().model_dump()
    parts = key.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, dict) and not node and i > 0:  # rewards.models: {} takes any name
            return
        if not isinstance(node, dict) or part not in node:
            where = ".".join(parts[:i]) or "params.yaml"
            keys = ", ".join(node) if isinstance(node, dict) else f"none: {where} is a value"
            raise ConfigError(f"unknown key {key!r} (the keys of {where}: {keys})")
        node = node[part]


def _leaves(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """A profile's nested mapping as (dotted key, value) pairs, a mapping of the user's own
    names (rewards.models) kept whole."""
    out = []
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and not prefix:  # a section: its keys (none: nothing changes)
            out += _leaves(value, dotted)
        else:
            out.append((dotted, value))
    return out


def read_profile(name: str, root: str | Path = ".") -> list[Override]:
    """The overrides of a profile: `name` is a file of profiles/ (precise, or precise.yaml) or
    a path to a YAML file holding some of params.yaml's keys."""
    root = Path(root)
    path = Path(name)
    if path.suffix not in (".yaml", ".yml") and os.sep not in name and "/" not in name:
        path = root / PROFILES / f"{name}.yaml"
    elif not path.is_absolute() and not path.is_file():
        path = root / path
    if not path.is_file():
        known = sorted(p.stem for p in (root / PROFILES).glob("*.yaml"))
        raise ConfigError(f"profile {name}: no such file {path} (profiles here: {', '.join(known) or 'none'})")
    data = _read_file(path)
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a profile is a mapping of params.yaml's keys, got {type(data).__name__}")
    out = []
    for key, value in _leaves(data):
        try:
            _known(key)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        out.append(Override(key, value, str(path.relative_to(root) if path.is_relative_to(root) else path)))
    return out


def parse_set(text: str) -> Override:
    """`-S KEY=VALUE`, as `dvc exp run -S` takes it: the value read as YAML (0.05, true, null,
    [a, b])."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"-S {text[:80]!r}: write KEY=VALUE, e.g. -S coverage.eps=0.05")
    try:
        _known(key)
    except ConfigError as exc:
        raise ConfigError(f"-S {exc}") from None
    try:
        parsed = _read_yaml(value)
    except (_Refused, yaml.YAMLError, ValueError, RecursionError):
        raise ConfigError(f"-S {key}: the value {value[:80]!r} is not a YAML value") from None
    return Override(key, parsed, "-S")


def apply_overrides(data: dict | None, overrides: list[Override]) -> dict:
    """params.yaml's mapping with each override laid over it, later ones winning."""
    merged = copy.deepcopy(data or {})
    if not isinstance(merged, dict):
        raise ConfigError(f"params.yaml: expected a mapping of keys to values, got {type(merged).__name__}")
    for o in overrides:
        node = merged
        *parents, last = o.key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = o.value
    return merged


def write_resolved(params: str | Path, overrides: list[Override], root: str | Path) -> Path:
    """params.yaml with `overrides` laid over it, written to <root>/.palm/params-<hash>.yaml for
    the stages (and the job workers) of this run to read; the same settings give the same file.
    Validated first (ConfigError), so a refused override writes nothing."""
    load_config(params, overrides)  # refused here, before anything is written
    data = apply_overrides(_read_yaml(Path(params).read_text(encoding="utf-8")), overrides)
    body = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    settings = " ".join(f"-S {o.as_dvc()}" for o in overrides)
    settings = " ".join(settings.encode("ascii", "backslashreplace").decode().split())  # one comment line
    header = (f"# {Path(params).name} with {settings}\n"
              f"# written by palm for one run's stages to read; edit params.yaml or the profile instead\n")
    text = header + body
    path = Path(root) / WORK / f"params-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
    path.parent.mkdir(exist_ok=True)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return path


# ------------------------------------------------------------------ params.yaml, generated
PARAMS_HEADER = (
    "Generated from palm_tasks/config.py: edit the defaults there, then python -m palm_tasks.params_yaml > params.yaml",
    "Try a setting without editing this file:  dvc exp run -S coverage.eps=0.1",
)
COMMENT_COLUMN = 37  # where the help comments of params.yaml start (0-based)


def _doc(model: type[BaseModel]) -> str:
    """A section's docstring (first paragraph) on one line."""
    return " ".join(inspect.cleandoc(model.__doc__ or "").split("\n\n")[0].split())


def _yaml_value(value) -> str:
    """A default in YAML flow style: [a, b], {}, null, 0.001, sqlite:///x."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1_000_000)
    return text.removesuffix("\n").removesuffix("\n...")  # a scalar ends its document with "..."


def _line(indent: str, key: str, value: str, comment: str | None) -> str:
    if not comment:
        raise ValueError(f"{key}: no description to write as its params.yaml comment")
    text = f"{indent}{key}:" + (f" {value}" if value else "")
    return f"{text:<{COMMENT_COLUMN - 2}}  # {comment}"


def _field_lines(indent: str, key: str, field, value) -> list[str]:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return ([_line(indent, key, _yaml_value(value), field.description)]
            + [f"{indent}#   {line}" for line in extra.get(YAML_COMMENTS, [])])


def _is_section(field) -> bool:
    return isinstance(field.annotation, type) and issubclass(field.annotation, Section)


def generate_params() -> str:
    """params.yaml of the defaults: each key with its description as a comment, in field order."""
    defaults = PalmConfig().model_dump()
    lines = [f"# {line}" for line in (_doc(PalmConfig), *PARAMS_HEADER)] + [""]
    for name, field in PalmConfig.model_fields.items():
        if _is_section(field):
            section = field.annotation
            lines += ["", _line("", name, "", _doc(section))]
            lines += [line for key, sub in section.model_fields.items()
                      for line in _field_lines("  ", key, sub, defaults[name][key])]
        else:
            lines += _field_lines("", name, field, defaults[name])
    return "\n".join(lines) + "\n"


def check_params(path: str | Path = "params.yaml") -> str | None:
    """None when the file is exactly the generated text, else one line naming the first difference."""
    path = Path(path)
    fix = "defaults are edited in palm_tasks/config.py, then: python -m palm_tasks.params_yaml > params.yaml"
    try:
        actual = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return f"{path}: cannot be read ({type(exc).__name__}); {fix}"
    expected = generate_params()
    if actual == expected:
        return None
    want, got = expected.splitlines(keepends=True), actual.splitlines(keepends=True)
    i = next(i for i in range(max(len(want), len(got)))
             if i >= len(want) or i >= len(got) or want[i] != got[i])
    w, g = (lines[i].removesuffix("\n") if i < len(lines) else None for lines in (want, got))
    if w == g:
        return f"{path}:{i + 1}: line ending differs from the generated text; {fix}"
    shown = [repr(x) if x is not None else "end of file" for x in (w, g)]
    return f"{path}:{i + 1}: expected {shown[0]}, found {shown[1]}; {fix}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m palm_tasks.params_yaml",
        description="Print params.yaml generated from the config defaults, or check a file against it.")
    parser.add_argument("--check", metavar="PATH",
                        help="exit 1 with one line naming the first line where PATH differs, 0 when equal")
    args = parser.parse_args(argv)
    if args.check is None:
        sys.stdout.write(generate_params())
        return 0
    problem = check_params(args.check)
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
