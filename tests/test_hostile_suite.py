"""A hostile-input suite that grows with the code (issue 17): cases generated from the config's
own schema (every field of palm_tasks.config, its type and its bounds), from a real portfolio.json
(every leaf of it), from a real member (every file of it) and from a real SQLite store, plus
hypothesis's random draws and a sample through the real `palm` command; and the inputs that are
the user's own (docs/your-own.md): reward functions, prompts files and base models.

Why one file of about 900 lines: it is one suite with one set of verdicts (`attempt`, `record`),
one section per surface, read top to bottom; split, each file would import the verdicts of
another test module.

Each case has one verdict:

    clean error      refused with one line naming the key or the file
    accepted         valid input, or a value the schema allows (it must then load cleanly)
    accepted wrongly a value outside the schema (wrong type, out of bounds, not finite, a size
                     above the caps), a damaged file or a changed byte, that was accepted
    traceback        any other exception, or an error of several lines or naming nothing
    data lost        a file that was there before changed (the store, a member, a portfolio)

Each case's verdict is asserted where it is produced, by the test that produced it: a
traceback, a wrong acceptance or a loss fails that test, naming the case. The counts are summed
over the whole run (any order, a subset, pytest-xdist workers) by tests/hostile_figures.py and
printed below the test results (docs/hardening.md quotes them). Add a field to the config and
its cases appear here.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import json
import math
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import typing
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from annotated_types import Ge, Gt, Le, Lt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import hostile_figures
from palm_tasks.config import ConfigError, PalmConfig, Section, parse_config
from palm_tasks.params_yaml import load_config

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
GIB = 2**30

def record(surface: str, verdict: str, case: str, detail: str = "") -> None:
    """One case's verdict: counted for the figures, and asserted here, in the test that made it."""
    what = f"{surface}: {verdict}: {case[:100]}: {' '.join(detail.split())[:300]}"
    hostile_figures.count(surface, verdict, what)
    assert verdict not in hostile_figures.BAD, what


def one_line(message: str) -> bool:
    return "\n" not in message.strip() and "Traceback" not in message and 0 < len(message) < 1500


def attempt(surface: str, case: str, call, refusals=(Exception,), clean=lambda exc: one_line(str(exc)),
            accepted=lambda result: ("accepted wrongly", "accepted")) -> str:
    """Run `call()` and record its verdict (returned): an exception of `refusals` is a clean
    error when `clean(exc)` holds (else a traceback), any other exception a traceback; a result
    is judged by `accepted(result)` -> (verdict, detail)."""
    try:
        result = call()
    except refusals as exc:
        verdict = "clean error" if clean(exc) else "traceback"
        record(surface, verdict, case, str(exc))
        return verdict
    except Exception as exc:  # noqa: BLE001 (what the suite is looking for)
        record(surface, "traceback", case, f"{type(exc).__name__}: {exc}")
        return "traceback"
    verdict, detail = accepted(result)
    record(surface, verdict, case, detail)
    return verdict


# --- the schema's own cases ------------------------------------------------------------------------

# Integer fields that are not sizes: a huge value is no allocation, so it may be accepted.
NOT_SIZES = {
    "training.lora_alpha": "a scale (alpha / r), not a size",
    "rewards.brevity_max_words": "a word count an answer is compared with",
    "rewards.brevity_full_words": "a word count an answer is compared with",
    "compare.random_seed_offset": "a seed offset for numpy's default_rng, which takes any integer",
}
HUGE_INTS = (10**12, 10**30)


def leaves(model: type[BaseModel] = PalmConfig, prefix: str = ""):
    """(dotted key, field) of every setting, sections walked; the schema as the code states it."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            yield from leaves(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def _base_type(annotation):
    """int, float, str, bool, 'literal', 'list', 'dict' for a field's annotation (Optional unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin is typing.Literal:
        return "literal"
    if origin is list:
        return "list"
    if origin is dict:
        return "dict"
    return annotation


def _optional(annotation) -> bool:
    return type(None) in typing.get_args(annotation)


def schema_cases() -> list[tuple[str, object, str]]:
    """(dotted key, value, expectation) for every field: 'refuse' where the schema forbids the
    value, 'either' where it allows it (then it must load cleanly)."""
    cases = []
    for key, field in leaves():
        kind = _base_type(field.annotation)
        bounds = {type(m): getattr(m, type(m).__name__.lower()) for m in field.metadata
                  if isinstance(m, (Ge, Gt, Le, Lt))}
        wrong_types = [[1, 2], {"zz": 1}, "zz-not-a-value"]
        if kind in (int, float):
            refuse = [*wrong_types, float("nan"), float("inf"), float("-inf"), ""]
            if kind is int:
                refuse += [1.5, "1e9"]
            if Ge in bounds:
                refuse.append(bounds[Ge] - (1 if kind is int else 0.5))
            if Gt in bounds:
                refuse.append(bounds[Gt])
            if Le in bounds:
                refuse.append(bounds[Le] + (1 if kind is int else 0.5))
            if Lt in bounds:
                refuse.append(bounds[Lt])
            either = [True, 10**6 if kind is int else 1e300]
            if kind is int and Le not in bounds and Lt not in bounds:
                (either if key in NOT_SIZES else refuse).extend(HUGE_INTS)
            cases += [(key, v, "refuse") for v in refuse] + [(key, v, "either") for v in either]
        elif kind is bool:
            cases += [(key, v, "refuse") for v in ([1, 2], "maybe", 2, {"zz": 1})]
            cases += [(key, v, "either") for v in ("true", 0)]
        elif kind == "literal":
            cases += [(key, v, "refuse") for v in ("zz-none-of-them", "", 1, [1], "X" * 100_000)]
        elif kind is str:
            cases += [(key, v, "refuse") for v in ([1, 2], {"zz": 1}, 123)]
            cases += [(key, v, "either") for v in ("x" * 100_000, "a\x00b", "../../../../etc", "")]
        elif kind == "list":
            cases += [(key, v, "refuse") for v in ("safety", [[1]], [{"zz": 1}], ["zz-none-of-them"], 5)]
            cases += [(key, v, "either") for v in ([], ["safety"] * 10_000)]
        elif kind == "dict":
            cases += [(key, v, "refuse") for v in ([1], "x", {"Bad Name": {"path": "/nonexistent"}},
                                                   {"ok": {"path": "/nonexistent"}}, {"ok": 5})]
        else:
            raise AssertionError(f"{key}: no hostile cases for {field.annotation}: add them here")
        if not _optional(field.annotation) and kind not in ("list",):
            cases.append((key, None, "refuse"))
    for section, field in PalmConfig.model_fields.items():  # a whole section replaced
        if isinstance(field.annotation, type) and issubclass(field.annotation, Section):
            cases += [(section, v, "refuse") for v in (5, "x", [1], None)]
    return cases


SCHEMA_CASES = schema_cases()


def with_value(key: str, value) -> dict:
    params = copy.deepcopy(PARAMS)
    *sections, name = key.split(".")
    target = params
    for s in sections:
        target = target[s]
    target[name] = value
    return params


def judge_params(surface: str, key: str, value, expect: str, load) -> str:
    """Run `load` (which validates the params) and record the verdict; returns it."""
    def named(exc) -> bool:
        message = str(exc)
        return one_line(message) and (key in message or (key.startswith("rewards.models")
                                                          and "rewards.models" in message))

    def judged(cfg):
        if expect == "refuse":
            return "accepted wrongly", "accepted"
        return ("accepted" if isinstance(cfg, PalmConfig) else "traceback"), ""

    return attempt(surface, f"{key} = {str(value)[:60]!r}", load, ConfigError, named, judged)


@pytest.mark.parametrize("section", sorted({k.split(".")[0] for k, _, _ in SCHEMA_CASES}))
def test_every_field_of_the_schema_refuses_what_it_forbids(section):
    """In-process (parse_config): every generated case of one section."""
    cases = [(key, value, expect) for key, value, expect in SCHEMA_CASES if key.split(".")[0] == section]
    assert cases
    for key, value, expect in cases:
        judge_params("params (schema, in-process)", key, value, expect, lambda: parse_config(with_value(key, value)))


def test_a_sample_of_the_schema_cases_as_yaml_files(tmp_path):
    """The same cases through the file: YAML written, read back by load_config."""
    path = tmp_path / "params.yaml"
    judged = 0
    for key, value, expect in random.Random(17).sample(SCHEMA_CASES, 60):
        if isinstance(value, float) and not math.isfinite(value) or value is None or isinstance(value, str) \
                and "\x00" in value:
            continue  # YAML has .nan / null / no NUL in plain text: the in-process cases hold them
        path.write_text(yaml.safe_dump(with_value(key, value), sort_keys=False, width=10**9))
        judge_params("params (schema, params.yaml)", key, value, expect, lambda: load_config(path))
        judged += 1
    assert judged >= 30  # most of the sample goes through a file


YAML_TEXTS = {
    "an integer of 5,000 digits": "seed: " + "1" * 5000 + "\n",
    "a hex integer of 5,000 digits": "seed: 0x" + "f" * 5000 + "\n",
    "nested 2,000 deep": "a: " + "[" * 2000 + "]" * 2000 + "\n",
    "a python tag": "seed: !!python/object/apply:os.system [echo hi]\n",
    "a binary tag": "base_model: !!binary aGVsbG8=\n",
    "a NUL byte": "seed: 1\x00\n",
    "a tab indent": "coverage:\n\teps: 0.1\n",
    "a key of 100,000 characters": "k" * 100_000 + ": 1\n",
    "a 1e400 float": "coverage: {eps: !!float 1e400}\n",
    "a set": "traits: !!set {safety, humor}\n",
    "a timestamp": "seed: 2001-12-14t21:59:43.10-05:00\n",
    "a merge key": "coverage:\n  <<: {eps: 0.1}\n",
    "two documents": "seed: 1\n---\nseed: 2\n",
    "a list at the top": "- 1\n- 2\n",
    "latin-1 bytes": None,
}


@pytest.mark.parametrize("name", list(YAML_TEXTS))
def test_hostile_yaml_texts(tmp_path, name):
    path = tmp_path / "params.yaml"
    if YAML_TEXTS[name] is None:
        path.write_bytes("task: caf\u00e9\n".encode("latin-1"))
    else:
        path.write_text(YAML_TEXTS[name])
    before = path.read_bytes()
    attempt("params (YAML text)", name, lambda: load_config(path), ConfigError,
            lambda exc: one_line(str(exc)) and str(path) in str(exc))
    if path.read_bytes() != before:
        record("params (YAML text)", "data lost", name, "loading changed the file")


# hypothesis: a random field, a random value from the whole space of its type (not the edges above)
@st.composite
def random_field_values(draw):
    key, field = draw(st.sampled_from(list(leaves())))
    kind = _base_type(field.annotation)
    value = draw(st.one_of(
        st.integers(min_value=-(10**40), max_value=10**40),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=30),
        st.lists(st.one_of(st.integers(), st.text(max_size=5)), max_size=4),
        st.none(), st.booleans()))
    return key, kind, value


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(random_field_values())
def test_random_values_of_every_field(case):
    """Any value in any field: a clean error naming the key, or a config that loads. (No
    expectation of refusal: a random value is often valid.)"""
    key, _, value = case
    judge_params("params (hypothesis)", key, value, "either", lambda: parse_config(with_value(key, value)))


# --- the real `palm` command: a sample of the cases ------------------------------------------------

_LAUNCHER = """
import os, resource, subprocess, sys
cap = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
proc = subprocess.Popen(sys.argv[3:])
_, status, usage = os.wait4(proc.pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss * 1024))
sys.exit(os.waitstatus_to_exitcode(status))
"""  # as in test_hostile.py: the command's own peak memory, address space capped at 4 GiB


def _digest(top: Path) -> dict[str, str]:
    return {str(p.relative_to(top)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(top.rglob("*")) if p.is_file()}


def run_palm(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, int]:
    with tempfile.TemporaryDirectory() as scratch:
        peak = Path(scratch) / "peak"
        proc = subprocess.run([sys.executable, "-c", _LAUNCHER, str(peak), str(4 * GIB), sys.executable,
                               "-m", "flows.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120)
        return proc, int(peak.read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """tmp/a/project holding finished work: a real member (adapter, checksums), a real
    portfolio, an MLflow store with its tables; tmp around it stands for the machine."""
    from test_hostile import _write_portfolio

    top = tmp_path_factory.mktemp("hostile-suite")
    root = top / "a" / "project"
    root.mkdir(parents=True)
    (root / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    _write_portfolio(root)
    make_member(root / "models" / "members", "m0")
    db = root / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    from mlflow import MlflowClient

    MlflowClient(f"sqlite:///{db}").search_experiments()
    return top, root


def make_member(store: Path, key: str) -> Path:
    """A finished member as jobs.store_policy writes it, with a real safetensors adapter."""
    import torch
    from safetensors.torch import save_file

    from palm_tasks.jobs import store_policy
    import numpy

    from palm_tasks.scores import Chunk
    from test_hostile import _pool

    tmp = store / f".{key}.tmp-1"
    (tmp / "adapter").mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    save_file({f"base_model.model.layers.{i}.lora_A.weight": torch.randn(8, 32, generator=generator)
               for i in range(4)}, str(tmp / "adapter" / "adapter_model.safetensors"))
    (tmp / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    one = Chunk("test", 0, 1, ["p"], ["c"], numpy.array([[0.5, 0.5, 0.5]]), numpy.array([False]), numpy.array([0.5]))
    store_policy(tmp, store / key, replace(_pool(store)[0], key=key), [one])
    return store / key


CLI_ARGS = [
    ["nosuch"], [], ["stage"], ["stage", "nosuch"], ["stage", "grid", "--wait=yes"],
    ["route", "--weights", "safety=1e999,humor=1,brevity=1"], ["route", "--weights", "safety=-1,humor=2,brevity=0"],
    ["route", "--weights", "x" * 100_000], ["route", "--weights", "safety=nan,humor=1,brevity=1"],
    ["route", "--weights", ""], ["generate", "--weights", "safety=1,humor=0,brevity=0", "hi", "--max-new-tokens", "-5"],
    ["generate", "--weights", "safety=1,humor=0,brevity=0", "hi", "--max-new-tokens", "99999999999"],
    ["serve", "--port", "70000"], ["serve", "--port", "-1"], ["serve", "--port", "http"],
    ["status", "--params", "/dev/zero"], ["status", "--params", "/"], ["status", "--root", "/nonexistent/x"],
]


@pytest.mark.parametrize("args", CLI_ARGS, ids=lambda a: " ".join(a)[:40])
def test_hostile_command_lines(finished, args):
    top, root = finished
    before = _digest(top)
    full = args if any(a.startswith("--params") for a in args) else [*args, "--params", str(root / "params.yaml")]
    if not any(a.startswith("--root") for a in full):
        full = [*full, "--root", str(root)]
    proc, peak = run_palm(full, ROOT)
    case = " ".join(args)[:80]
    lines = proc.stderr.strip().splitlines()
    if proc.returncode == 0:
        record("CLI arguments (palm)", "accepted wrongly", case, proc.stdout[-200:])
    elif len(lines) == 1 and lines[0].startswith("palm: error: ") and "Traceback" not in proc.stderr and peak < GIB:
        record("CLI arguments (palm)", "clean error", case)
    else:
        record("CLI arguments (palm)", "traceback", case, f"exit {proc.returncode}, {peak / GIB:.2f} GiB: "
                                                          + proc.stderr[-300:])
    if _digest(top) != before:
        record("CLI arguments (palm)", "data lost", case, "files changed")


def _subprocess_sample() -> list[tuple[str, object, str]]:
    """One refused case per section, drawn reproducibly, plus every huge size: through `palm`."""
    rng = random.Random(1717)
    by_section = collections.defaultdict(list)
    for key, value, expect in SCHEMA_CASES:
        if expect == "refuse" and value is not None and not (isinstance(value, float) and not math.isfinite(value)) \
                and not (isinstance(value, str) and "\x00" in value):
            by_section[key.split(".")[0]].append((key, value, expect))
    sample = [rng.choice(cases) for _, cases in sorted(by_section.items())]
    sample += [c for c in SCHEMA_CASES if c[1] == HUGE_INTS[1] and c[2] == "refuse"][:: 4]
    return sample


@pytest.mark.parametrize("key, value, expect", _subprocess_sample(), ids=lambda x: str(x)[:30])
def test_a_sample_through_the_real_palm(finished, key, value, expect):
    """`palm stage grid` with the bad params: one line naming the key, exit 2, below 1 GB,
    nothing changed around the project."""
    top, root = finished
    params = top / "a" / f"bad-{abs(hash((key, str(value)))) % 10**8}.yaml"
    params.write_text(yaml.safe_dump(with_value(key, value), sort_keys=False, width=10**9))
    before = _digest(top)
    proc, peak = run_palm(["stage", "grid", "--root", str(root), "--params", str(params)], ROOT)
    lines = proc.stderr.strip().splitlines()
    case = f"palm stage grid, {key} = {str(value)[:40]!r}"
    if proc.returncode == 0:
        record("params (palm)", "accepted wrongly", case, "exit 0")
    elif proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("palm: error: ") \
            and (key in lines[0] or key.startswith("rewards.models")) and peak < GIB:
        record("params (palm)", "clean error", case)
    else:
        record("params (palm)", "traceback", case, f"exit {proc.returncode}, {peak / GIB:.2f} GiB: {proc.stderr[-300:]}")
    after = _digest(top)
    if after != before:
        record("params (palm)", "data lost", case, "files changed")
    params.unlink()


# --- trait weights ---------------------------------------------------------------------------------


def test_trait_weights_from_the_config_traits():
    """Every trait of the config with every hostile number, and malformed strings."""
    from palm_tasks.serve.router import WeightsError, parse_weights

    traits = PARAMS["traits"]
    numbers = ["nan", "inf", "-inf", "-1", "1e309", "1e-320", "0", "0x10", "1_0", " 1", "", "1e999999", "٣"]
    texts = [",".join(f"{t}={n if t == bad else 1}" for t in traits) for bad in traits for n in numbers]
    texts += ["", ",,,", "=", "safety", "safety=1=2", "safety=1,safety=1", "zz=1", "\x00=1", "s" * 10_000]
    def on_the_simplex(result):
        w, _ = result
        ok = len(w) == len(traits) and all(math.isfinite(x) and x >= 0 for x in w) and abs(sum(w) - 1) < 1e-9
        return ("accepted" if ok else "accepted wrongly"), str(w)

    for text in texts:  # the CLI cuts a long message (it may quote 100 KB of input): no length limit
        attempt("trait weights", text, lambda: parse_weights(text, traits), WeightsError,
                lambda exc: "\n" not in str(exc) and str(exc).startswith("weights"), on_the_simplex)


# --- a member's files: the adapter, member.json, checksums.json --------------------------------------


def _mutations(data: bytes) -> dict[str, bytes | None]:
    """Ways a file is damaged: truncated at several points, bytes flipped, appended, emptied,
    removed (None)."""
    n = len(data)
    out = {f"truncated to {k}": data[:k] for k in sorted({0, 1, 7, 8, n // 3, n // 2, n - 1}) if k < n}
    out.update({f"byte {k} flipped": data[:k] + bytes([data[k] ^ 0xFF]) + data[k + 1:]
                for k in sorted({0, 8, n // 2, n - 1})})
    out["a byte appended"] = data + b"\0"
    out["garbage of the same length"] = bytes(random.Random(n).getrandbits(8) for _ in range(n))
    out["removed"] = None
    return out


def test_every_damage_to_a_member_file_is_named(finished, tmp_path):
    """Each file of a real member, damaged each way: `palm status` (print_status) names the
    member, generate and serve (verify_member) refuse naming it; nothing is accepted."""
    from palm_tasks.params_yaml import load_config
    from palm_tasks.llm.models import verify_member
    from palm_tasks.report.console import print_status
    from palm_tasks.schema import ArtifactError

    _, source = finished
    cfg = load_config(source / "params.yaml")
    for rel in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "member.json",
                "checksums.json", "completions.jsonl"):
        original = (source / "models" / "members" / "m0" / rel).read_bytes()
        for how, damaged in _mutations(original).items():
            root = tmp_path / "project"
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(source, root)
            member = root / "models" / "members" / "m0"
            target = member / rel
            if damaged is None:
                target.unlink()
            else:
                target.write_bytes(damaged)
            case = f"{rel} {how}"

            def status_problems():
                with open(os.devnull, "w") as sink, _stdout_to(sink):
                    return print_status(cfg, root)

            def named_once(problems):  # palm status lists what is wrong instead of raising
                named = [p for p in problems if "m0" in p and "palm run" in p]
                return ("clean error" if len(named) == 1 else "accepted wrongly"), "; ".join(problems)

            attempt("member files", f"status: {case}", status_problems, (), accepted=named_once)
            if rel.startswith("adapter/"):
                attempt("member files", f"verify: {case}", lambda: verify_member(member / "adapter", "m0"),
                        ArtifactError, lambda exc: one_line(str(exc)) and "member m0" in str(exc)
                        and str(member) in str(exc))


class _stdout_to:
    """Rich prints to sys.stdout: send it elsewhere for the duration."""

    def __init__(self, sink):
        self.sink = sink

    def __enter__(self):
        self.saved, sys.stdout = sys.stdout, self.sink

    def __exit__(self, *exc):
        sys.stdout = self.saved


# --- a job's checksums.json, as the job store reads it ----------------------------------------------

GARBAGE_CHECKSUMS = {
    "not JSON": b'{"adapter/adapter_model.safetensors": ',
    "latin-1 bytes": "{\"caf\u00e9\": 1}".encode("latin-1"),
    "a list": b"[1, 2]",
    "nested 100,000 deep": b"[" * 100_000 + b"]" * 100_000,
    "a digest that is not a string": b'{"member.json": [1]}',
    "a file outside the policy": b'{"../../../params.yaml": "00"}',
    "an absolute path": b'{"/etc/hostname": "00"}',
}


@pytest.mark.parametrize("how", list(GARBAGE_CHECKSUMS))
def test_a_garbage_checksums_file_is_named_and_its_job_trained_again(tmp_path, monkeypatch, how):
    """A real member's checksums.json replaced by garbage: jobs.load_policy (palm status, the
    register stage, a repair's starting policy, a soup's ingredients) raises a schema.ArtifactError
    of one line naming the file, not a raw JSON error; jobs.find_finished (the align and soups
    stages) names it, removes the job and reports it unfinished, so it is trained again."""
    from palm_tasks import jobs
    from palm_tasks.schema import ArtifactError

    store = tmp_path / "models" / "members"
    member = make_member(store, "m0")
    sums = member / "checksums.json"
    sums.write_bytes(GARBAGE_CHECKSUMS[how])
    with pytest.raises(ArtifactError) as caught:
        jobs.load_policy(member)
    assert one_line(str(caught.value)) and str(sums) in str(caught.value), str(caught.value)
    said: list[str] = []
    monkeypatch.setattr(jobs, "warn", said.append)
    assert jobs.find_finished(store, "m0") is None
    assert not member.exists()
    assert len(said) == 1 and str(sums) in said[0] and "run again" in said[0], said
    assert store.is_dir()  # the damaged job alone is removed


# --- portfolio.json: every leaf of a real one --------------------------------------------------------


def _json_leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _json_leaves(v, (*path, k))
    elif isinstance(node, list) and node:
        for i, v in enumerate(node[:2]):  # two members stand for all
            yield from _json_leaves(v, (*path, i))
    yield path


def _set(node, path, value):
    for p in path[:-1]:
        node = node[p]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value


_DELETE = object()


def routing_reads(leaf: tuple) -> bool:
    """Whether the router routes by this leaf: the traits, the member list, each member's key,
    values and standard errors. Damage there must be refused; elsewhere it may be accepted."""
    return (leaf[0] == "traits" or leaf == ("members",)
            or leaf[0] == "members" and len(leaf) >= 3 and leaf[2] in ("key", "values", "std_errors"))


def dotted(path: tuple) -> str:
    """A leaf's name as the schema's errors write it: members[0].values.safety."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


# The fields a leaf is checked against elsewhere: the traits key every member's per-trait fields.
CHECKED_AGAINST = {"traits": ("members",)}


def names_the_field(leaf: tuple, message: str) -> bool:
    """Whether a refusal names the damaged field: its own name, or that of an object or list
    holding it (a deletion is reported at its container, "members[0].values has no safety"; a row
    count at the table, "oracle.weights has 3 rows for 4 keys", or at a field of the same object,
    "certificate.slacks has 3 numbers, not 2"), or of a field it is checked against."""
    own = [rf"{re.escape(dotted(leaf))}(?!\w)"]  # or a part of it: traits[0] when traits was replaced
    own += [rf"{re.escape(dotted(leaf[:n]))}(?![\w[])" for n in range(len(leaf) - 1, 0, -1)]  # not members[1]
    others = [rf"{re.escape(name)}\b" for name in CHECKED_AGAINST.get(leaf[0], ())]
    return any(re.search(rf"(?<![\w.\]]){name}", message) for name in own + others)


def test_every_leaf_of_a_portfolio_damaged(finished, tmp_path):
    """Each leaf of a real portfolio.json deleted, or of another type, or not finite: the router
    loads it or refuses with one line naming the file and the field; damage to what routing reads
    is never accepted. What reads the file is schema.Portfolio.from_json, which checks every
    field's type (a member's key and path, its values and standard errors, evidence and gate as
    objects) and names the field."""
    from palm_tasks.schema import ArtifactError
    from palm_tasks.serve.router import Router

    _, root = finished
    original = json.loads((root / "portfolio.json").read_text())
    path = tmp_path / "portfolio.json"
    leaves_damaged = set()
    for leaf in _json_leaves(original):
        if not leaf:
            continue
        for how, value in (("deleted", _DELETE), ("a string", "zz"), ("a list", [1]), ("null", None),
                           ("NaN", float("nan")), ("-inf", float("-inf")), ("huge", 1e308)):
            data = copy.deepcopy(original)
            try:
                _set(data, leaf, value)
            except (KeyError, IndexError, TypeError):
                continue
            text = json.dumps(data)  # NaN and Infinity as Python writes them
            path.write_text(text)
            case = f"{'/'.join(map(str, leaf))} {how}"
            must_refuse = routing_reads(leaf) and how != "huge" and not (leaf[-1] == "key" and how == "a string")
            attempt("portfolio.json", case, lambda: Router.from_portfolio(path).route("safety=1,humor=1,brevity=1"),
                    (ArtifactError, ValueError, LookupError, FileNotFoundError, KeyError),
                    lambda exc: one_line(str(exc)) and str(path) in str(exc) and names_the_field(leaf, str(exc)),
                    lambda route: ("accepted wrongly" if must_refuse else "accepted", f"routed to {route.member_key}"))
            if path.read_text() != text:
                record("portfolio.json", "data lost", case, "routing changed the file")
            leaves_damaged.add(leaf)
    assert leaves_damaged == {leaf for leaf in _json_leaves(original) if leaf}  # each leaf at least once


# --- the MLflow store --------------------------------------------------------------------------------


def test_every_damage_to_the_mlflow_store_is_named_and_nothing_is_replaced(finished, tmp_path):
    """The real SQLite store damaged each way: the check every command runs (tracking_uri) and
    the one before writing (check_store_writable) refuse naming the file, or accept a whole
    database; the file is never changed."""
    from palm_tasks.tracking import StoreNotWritableError, check_store_writable, tracking_uri

    _, source = finished
    cfg = load_config(source / "params.yaml")
    original = (source / "mlruns" / "mlflow.db").read_bytes()
    cases = {**_mutations(original), "whole": original, "the header alone": original[:16],
             "SQLite header then zeros": original[:16] + bytes(len(original) - 16)}
    cases.pop("removed")  # a missing store is created: test_hostile.test_a_missing_mlflow_db_is_fine
    for how, content in cases.items():
        root = tmp_path / "project"
        db = root / "mlruns" / "mlflow.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        db.write_bytes(content)

        def checked():
            tracking_uri(cfg, root, create=False)
            check_store_writable(cfg, root)

        attempt("MLflow store", how, checked, (ConfigError, StoreNotWritableError),
                lambda exc: one_line(str(exc)) and str(db) in str(exc),
                lambda _: ("accepted" if _sqlite_whole(db) else "accepted wrongly", ""))
        if db.read_bytes() != content:
            record("MLflow store", "data lost", how, "the check changed the database file")
        shutil.rmtree(root)
    # a directory, a symlink out of the project, a FIFO where the database should be
    for how in ("a directory", "a symlink outside", "a fifo"):
        root = tmp_path / "project"
        db = root / "mlruns" / "mlflow.db"
        db.parent.mkdir(parents=True)
        outside = tmp_path / "outside.db"
        outside.write_bytes(original)
        if how == "a directory":
            db.mkdir()
        elif how == "a symlink outside":
            db.symlink_to(outside)
        else:
            os.mkfifo(db)
        attempt("MLflow store", how, lambda: tracking_uri(cfg, root, create=False), ConfigError)
        if outside.read_bytes() != original:
            record("MLflow store", "data lost", how, "the file outside changed")
        shutil.rmtree(root)
        outside.unlink()


def _sqlite_whole(db: Path) -> bool:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            return con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    except sqlite3.Error:
        return False


# --- your own reward functions, prompts files and base models (docs/your-own.md) -----------------------

GOOD = "def f(prompts, completions):\n    return [0.5] * len(completions)\n"
BAD_FUNCTIONS = {  # case: (MODULE:NAME, source of custom/mod.py or None)
    "a module that does not exist": ("custom.nothere:f", None),
    "a package that does not exist": ("nopackage_palm.rewards:f", None),
    "a syntax error": ("custom.mod:f", "def f(:\n"),
    "an error on import": ("custom.mod:f", "raise RuntimeError('needs a GPU')\n"),
    "an exit on import": ("custom.mod:f", "import sys\nsys.exit(3)\n"),
    "a name the module lacks": ("custom.mod:g", GOOD),
    "a name that is no function": ("custom.mod:f", "f = 3\n"),
    "one argument": ("custom.mod:f", "def f(completions):\n    return [0.5] * len(completions)\n"),
    "raises": ("custom.mod:f", "def f(p, c):\n    raise KeyError('score')\n"),
    "NaN": ("custom.mod:f", "def f(p, c):\n    return [float('nan')] * len(c)\n"),
    "infinity": ("custom.mod:f", "def f(p, c):\n    return [float('inf')] * len(c)\n"),
    "the wrong length": ("custom.mod:f", "def f(p, c):\n    return [0.5]\n"),
    "no values": ("custom.mod:f", "def f(p, c):\n    return []\n"),
    "values above 1": ("custom.mod:f", "def f(p, c):\n    return [2.0] * len(c)\n"),
    "values below 0": ("custom.mod:f", "def f(p, c):\n    return [-0.1] * len(c)\n"),
    "a string": ("custom.mod:f", "def f(p, c):\n    return 'good'\n"),
    "None": ("custom.mod:f", "def f(p, c):\n    return None\n"),
    "a dict": ("custom.mod:f", "def f(p, c):\n    return {'a': 1}\n"),
    "nested lists": ("custom.mod:f", "def f(p, c):\n    return [[0.5]] * len(c)\n"),
    "strings": ("custom.mod:f", "def f(p, c):\n    return ['x'] * len(c)\n"),
    "a generator": ("custom.mod:f", "def f(p, c):\n    return (0.5 for _ in c)\n"),
}


def _custom_project(root: Path, source: str | None) -> None:
    shutil.rmtree(root, ignore_errors=True)
    (root / "custom").mkdir(parents=True)
    (root / "custom" / "__init__.py").write_text("")
    if source is not None:
        (root / "custom" / "mod.py").write_text(source)


def test_every_bad_reward_function_is_refused_before_any_work_naming_the_trait(tmp_path):
    """Each bad function through what every `palm` command runs first (check_project_paths):
    one line naming rewards.functions.<trait>; nothing in custom/ is changed."""
    from palm_tasks.stages import check_project_paths

    root = tmp_path / "project"
    for case, (spec, source) in BAD_FUNCTIONS.items():
        _custom_project(root, source)
        cfg = parse_config({"traits": ["mine", "brevity"], "rewards": {"functions": {"mine": spec}}})
        attempt("reward function", case, lambda: check_project_paths(cfg, root), (ConfigError,),
                lambda exc: one_line(str(exc)) and "rewards.functions.mine" in str(exc))
        if source is not None and (root / "custom" / "mod.py").read_text() != source:
            record("reward function", "data lost", case, "the check changed the module")
    # a module in the project but outside custom/, which DVC does not track
    _custom_project(root, None)
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "mod.py").write_text(GOOD)
    cfg = parse_config({"traits": ["mine", "brevity"], "rewards": {"functions": {"mine": "elsewhere.mod:f"}}})
    attempt("reward function", "a module outside custom/", lambda: check_project_paths(cfg, root), (ConfigError,),
            lambda exc: one_line(str(exc)) and "custom/" in str(exc))


@pytest.mark.parametrize("case, body", [
    ("NaN on one answer", "return [float('nan') if 'boom' in a else 0.5 for a in c]"),
    ("raises on one answer", "return [1 / 0 if 'boom' in a else 0.5 for a in c]"),
    ("1.5 on one answer", "return [1.5 if 'boom' in a else 0.5 for a in c]"),
    ("too few values for a long batch", "return [0.5] * min(len(c), 2)"),
])
def test_a_function_that_passes_the_probe_and_fails_later_is_refused_naming_the_answer(tmp_path, case, body):
    from palm_tasks.llm.rewards import project_rewards, score_all

    root = tmp_path / "project"
    _custom_project(root, f"def f(p, c):\n    {body}\n")
    cfg = parse_config({"traits": ["mine", "brevity"], "rewards": {"functions": {"mine": "custom.mod:f"}}})
    rewards = project_rewards(cfg, root)  # the probe's two answers pass
    answers = ["An answer of several words.", "Another answer of several words.", "This one goes boom, sadly."]
    attempt("reward function", case, lambda: score_all(rewards, ["q"] * 3, answers), (ValueError,),
            lambda exc: one_line(str(exc)) and "rewards.functions.mine" in str(exc))


def _prompt_cases(folder: Path) -> dict[str, tuple[str, str]]:
    """case: (data.prompts_file, data.prompts_column), the files written under `folder` (custom/)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cases = {}

    def write(name: str, content: bytes | str, case: str, column: str = "prompt") -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        cases[case] = (f"custom/{name}", column)

    write("empty.jsonl", b"", "an empty file")
    write("blank.jsonl", "\n\n  \n", "blank lines only")
    write("nocol.jsonl", '{"text": "hello"}\n', "a JSONL row without the column")
    write("nocol.csv", "text\nhello\n", "a CSV header without the column")
    write("headless.csv", "", "an empty CSV")
    write("binary.jsonl", bytes(range(256)) * 64, "a binary file")
    write("nul.csv", "prompt\nhel\x00lo\n", "a NUL byte in a CSV")
    write("latin1.jsonl", '{"prompt": "caf\xe9"}\n'.encode("latin-1"), "latin-1 text")
    write("notjson.jsonl", '{"prompt": "fine"}\n{prompt: nope}\n', "a row that is not JSON")
    write("array.jsonl", '["a", "b"]\n', "a row that is a JSON array")
    write("number.jsonl", '{"prompt": 7}\n', "a number for a prompt")
    write("null.jsonl", '{"prompt": null}\n', "null for a prompt")
    write("list.jsonl", '{"prompt": ["a"]}\n', "a list for a prompt")
    write("emptyprompt.jsonl", '{"prompt": "   "}\n', "an empty prompt")
    write("emptycell.csv", "prompt,id\n,1\n", "an empty CSV cell")
    write("hugefield.csv", "prompt\n\"" + "x" * 200_000 + "\"\n", "a CSV field past the csv module's limit")
    write("garbage.parquet", b"PAR1" + bytes(100) + b"PAR1", "a damaged Parquet file")
    write("few.jsonl", '{"prompt": "only one"}\n', "fewer prompts than n_train + n_eval")
    write("nan.jsonl", '{"prompt": NaN}\n', "NaN for a prompt")
    pq.write_table(pa.table({"text": ["a", "b"]}), folder / "nocol.parquet")
    cases["a Parquet file without the column"] = ("custom/nocol.parquet", "prompt")
    pq.write_table(pa.table({"prompt": [1, 2]}), folder / "ints.parquet")
    cases["integers in a Parquet column"] = ("custom/ints.parquet", "prompt")
    big = folder / "big.jsonl"
    with big.open("wb") as f:
        f.truncate(2 * 2**30)  # 2 GiB, sparse: no disk used, and it must never be read
    cases["a 2 GiB file"] = ("custom/big.jsonl", "prompt")
    (folder / "nofiles").mkdir()
    (folder / "nofiles" / "notes.txt").write_text("prompts?")
    cases["a directory without prompt files"] = ("custom/nofiles", "prompt")
    write("prompts.txt", "one prompt per line\n", "a .txt file")
    cases["a file that does not exist"] = ("custom/missing.jsonl", "prompt")
    return cases


def test_every_bad_prompts_file_is_refused_naming_the_file_and_nothing_is_written(tmp_path):
    """Each bad prompts file through what the rewards stage runs (the check every command runs
    first, which reads the file, then the split): one line naming the file (and the row where one is at fault); the file and
    custom/ are unchanged and no split is written."""
    from palm_tasks.llm.prompts import PromptFileError, prepare_prompts
    from palm_tasks.stages import check_project_paths

    root = tmp_path / "project"
    (root / "custom").mkdir(parents=True)
    cases = _prompt_cases(root / "custom")
    outside = tmp_path / "outside.jsonl"
    outside.write_text('{"prompt": "a secret"}\n')
    (root / "custom" / "link.jsonl").symlink_to(outside)
    cases["a symlink out of the project"] = ("custom/link.jsonl", "prompt")
    before = {p: p.read_bytes() for p in (root / "custom").rglob("*") if p.is_file() and p.name != "big.jsonl"}
    for case, (path, column) in cases.items():
        cfg = parse_config({"data": {"prompts_file": path, "prompts_column": column, "n_train": 16, "n_eval": 8},
                            "evaluation": {"n_prompts": 8, "min_prompts": 8, "chunk_prompts": 8}})

        def split():
            check_project_paths(cfg, root)  # what every palm command runs first: reads the file
            return prepare_prompts(cfg.task, root / "data" / "prompts", 16, 8, 0, root / path, column)

        name = Path(path).name
        attempt("prompts file", case, split, (ConfigError, PromptFileError, ValueError),
                lambda exc: one_line(str(exc)) and name in str(exc))
        if (root / "data").exists():
            record("prompts file", "data lost", case, "a split was written from a bad file")
            shutil.rmtree(root / "data")
    after = {p: p.read_bytes() for p in before}
    if after != before:
        record("prompts file", "data lost", "all", "a file in custom/ changed")


def test_every_bad_base_model_is_refused_naming_what_it_lacks(tmp_path, tiny_model):
    """Each broken model directory or GGUF file as params.yaml's base_model: one line naming
    base_model and what is missing (or the memory it would need)."""
    def copy(name: str, drop=(), write=None) -> Path:
        target = tmp_path / name
        shutil.copytree(tiny_model, target)
        for pattern in drop:
            for f in target.glob(pattern):
                f.unlink()
        for rel, content in (write or {}).items():
            (target / rel).write_bytes(content if isinstance(content, bytes) else content.encode())
        return target

    huge = json.dumps({"w": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 0]}}).encode()
    cases = {
        "no tokenizer": copy("no-tok", ["tokenizer.json"]),
        "no chat template": copy("no-tmpl", ["chat_template.*"], {"tokenizer_config.json": "{}"}),
        "a damaged tokenizer_config.json": copy("bad-tokcfg", ["chat_template.*"], {"tokenizer_config.json": "{"}),
        "no config.json": copy("no-config", ["config.json"]),
        "no safetensors": copy("no-weights", ["*.safetensors"]),
        "pickled weights only": copy("pickle", ["*.safetensors"], {"pytorch_model.bin": b"\x80\x04K\x01."}),
        "a safetensors file of 3 bytes": copy("short", ["*.safetensors"], {"model.safetensors": b"abc"}),
        "a safetensors header that is not JSON": copy("garbled", ["*.safetensors"],
                                                      {"model.safetensors": (8).to_bytes(8, "little") + b"\xff" * 8}),
        "a safetensors header length of 2**60": copy("long", ["*.safetensors"],
                                                     {"model.safetensors": (2**60).to_bytes(8, "little")}),
        "a safetensors header that is a list": copy("list", ["*.safetensors"],
                                                    {"model.safetensors": (2).to_bytes(8, "little") + b"[]"}),
        "10^12 parameters": copy("huge", ["*.safetensors"],
                                 {"model.safetensors": len(huge).to_bytes(8, "little") + huge}),
    }
    for name, content in {"an empty .gguf": b"", "a .gguf of text": b"not a model",
                          "a .gguf with its magic only": b"GGUF", "a truncated .gguf": b"GGUF" + bytes(20)}.items():
        path = tmp_path / f"{len(cases)}.gguf"
        path.write_bytes(content)
        cases[name] = path
    cases["a text file"] = tmp_path / "notes.txt"
    cases["a text file"].write_text("a model?")
    cases["nothing there"] = tmp_path / "nothing"
    for case, path in cases.items():
        attempt("base model", case, lambda: parse_config({"base_model": str(path)}), (ConfigError,),
                lambda exc: one_line(str(exc)) and "base_model" in str(exc))
