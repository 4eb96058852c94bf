"""Hostile input and faults caused for real (issue 17): real files, real `palm` subprocesses,
real SQLite. Each refusal is one line `palm: error: ...` naming the problem and the file or key,
a non-zero exit, nothing written outside the project and nothing already finished lost."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from palm_tasks.config import ConfigError, parse_config
from palm_tasks.params_yaml import load_config
from palm_tasks.tracking import tracking_uri

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
TRAITS = PARAMS["traits"]
GIB = 2**30


# --- helpers -----------------------------------------------------------------------------------


def _digest(top: Path) -> dict[str, str]:
    """Every file under `top` and its sha256: what a refused command must leave as it was."""
    return {str(p.relative_to(top)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(top.rglob("*")) if p.is_file()}


@pytest.fixture
def project(tmp_path) -> Path:
    """tmp_path/a/b/project holding finished work; tmp_path around it stands for the rest of the
    machine (`../../x` from the project lands in tmp_path/a, where a digest sees it)."""
    from dataclasses import replace

    from palm_tasks.jobs import store_policy

    root = tmp_path / "a" / "b" / "project"
    key = "0123456789abcdef"
    half_written = root / "models" / "members" / f".{key}.tmp-1"  # as a job writes it, then renamed
    half_written.mkdir(parents=True)
    store_policy(half_written, root / "models" / "members" / key, replace(_pool(root)[0], key=key), [])
    (root / "metrics").mkdir()
    (root / "metrics" / "align.json").write_text('{"pool": []}')
    _write_params(root)
    return root


def _write_params(root: Path, text: str | None = None, **changes) -> Path:
    """root/params.yaml: the project's params with `changes` ({section: {key: value}} or
    top-level values), or `text` as given."""
    if text is None:
        params = json.loads(json.dumps(PARAMS))
        for key, value in changes.items():
            if isinstance(value, dict):
                params[key].update(value)
            else:
                params[key] = value
        text = yaml.safe_dump(params, sort_keys=False)
    path = root / "params.yaml"
    path.write_text(text)
    return path


# Runs the command with its address space capped and writes the command's own peak RSS (bytes)
# to argv[1]. Why a launcher: a child forked from this test process starts with a high-water RSS
# that includes this process's memory (fork and vfork both fold the parent's pages into the
# child's ru_maxrss), so after a suite that loaded models every child would "use" a gigabyte.
# The launcher is small, so what it forks reports only the command's own memory.
_LAUNCHER = """
import os, resource, subprocess, sys
cap = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
proc = subprocess.Popen(sys.argv[3:])
_, status, usage = os.wait4(proc.pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss * 1024))  # Linux: kilobytes
sys.exit(os.waitstatus_to_exitcode(status))
"""


def palm(*args, root: Path, params: Path | None = None, cwd: Path = ROOT, timeout: float = 120):
    """The real `palm` command line on the project at `root`; (CompletedProcess, peak RSS in
    bytes of that process). Its address space is capped at 4 GiB so a regression fails the test
    instead of the machine."""
    command = [sys.executable, "-m", "flows.cli", *args, "--root", str(root),
               "--params", str(params or root / "params.yaml")]
    with tempfile.TemporaryDirectory() as scratch:
        peak_file = Path(scratch) / "peak"
        launcher = [sys.executable, "-c", _LAUNCHER, str(peak_file), str(4 * GIB), *command]
        proc = subprocess.Popen(launcher, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the command under it
            proc.communicate()
            raise AssertionError(f"palm {' '.join(args)} ran past {timeout} s") from None
        peak = int(peak_file.read_text())
    done = subprocess.CompletedProcess(command, proc.returncode, out.decode(errors="replace"),
                                       err.decode(errors="replace"))
    return done, peak


def test_the_memory_measure_counts_the_command_not_this_process():
    """The peak reported by `palm` must not include the test process's memory: with 1.5 GiB
    held here, a refused command still reports its own few hundred MiB."""
    held = bytearray(3 * GIB // 2)
    held[::4096] = b"\1" * len(held[::4096])  # touch every page so it is resident
    proc, peak = palm("status", root=Path("/nonexistent-project"), params=Path("/nonexistent.yaml"))
    assert proc.returncode == 2, proc.stderr
    assert peak < GIB // 2, f"{peak / GIB:.2f} GiB"
    del held


def assert_one_error(proc, *names: str, code: int = 2) -> str:
    """Exit `code`, and stderr exactly one line `palm: error: ...` that names every one of `names`."""
    assert proc.returncode == code, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("palm: error: "), proc.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


def _refused_untouched(tmp_path, project, *args, names, code=2, params=None, cwd=ROOT):
    before = _digest(tmp_path)
    proc, peak = palm(*args, root=project, params=params, cwd=cwd)
    line = assert_one_error(proc, *names, code=code)
    assert _digest(tmp_path) == before, "a refused command changed or wrote files"
    return line, peak


def _fake_model(path: Path) -> Path:
    """A directory that looks like a Hugging Face model (what the rewards stage leaves in models/base)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (path / "tokenizer.json").write_text("{}")
    (path / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    return path


# --- 1. the pipeline's own output as its input ---------------------------------------------------


def test_base_model_inside_the_outputs_is_refused_before_the_rewards_stage_deletes_it(tmp_path, project):
    _fake_model(project / "models" / "base")
    params = _write_params(project, base_model=str(project / "models" / "base"))
    line, _ = _refused_untouched(tmp_path, project, "stage", "rewards", names=["base_model", "models/base"])
    assert "rewards stage" in line
    # relative to where palm runs, as the stage reads it; anything under an output is refused too
    _fake_model(project / "models" / "members" / "0123456789abcdef" / "model")
    for base_model in ("models/base", "models/members/0123456789abcdef/model"):
        _write_params(project, base_model=base_model)
        _refused_untouched(tmp_path, project, "stage", "rewards", names=["base_model", base_model],
                           params=Path("params.yaml"), cwd=project)
    # the stage itself refuses too (a Prefect flow or a test may call it without the CLI):
    # llm.base_model.prepare_base_model, before it empties models/base
    from palm_tasks.stages import STAGES

    _write_params(project, base_model=str(project / "models" / "base"))
    before = _digest(tmp_path)
    with pytest.raises(ValueError, match="base_model"):
        STAGES["rewards"].run(load_config(params), project)
    assert _digest(tmp_path) == before


# --- 2. a damaged MLflow store -------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"not a database, but someone's notes\n"])
def test_an_empty_or_foreign_mlflow_db_is_refused_not_replaced(tmp_path, project, content):
    db = project / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    db.write_bytes(content)
    # `palm route` opens the registry: MLflow would create its tables in the file (history gone)
    _refused_untouched(tmp_path, project, "route", "--weights", "safety=1,humor=1,brevity=1",
                       names=[str(db), "mlflow.tracking_uri"])
    assert db.read_bytes() == content


def test_a_damaged_page_is_named_on_one_line(tmp_path):
    """SQLite's quick_check answers a damaged b-tree page on two lines; the refusal is one line
    (a byte flipped in a page header: the hostile suite found it at byte 516096 of a real store)."""
    import sqlite3

    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE t (x)")
        con.executemany("INSERT INTO t VALUES (?)", [("a" * 200,)] * 200)
    con.close()
    data = bytearray(db.read_bytes())
    data[3 * 4096] = 0x07  # page 4's type byte: no b-tree page has type 7
    db.write_bytes(bytes(data))
    with pytest.raises(ConfigError) as err:
        tracking_uri(parse_config({}), tmp_path, create=False)
    message = str(err.value)
    assert "\n" not in message and str(db) in message and "Page 4" in message, message
    assert db.read_bytes() == bytes(data)


def test_a_missing_mlflow_db_is_fine(tmp_path, project):
    proc, _ = palm("status", root=project)
    assert proc.returncode == 0, proc.stderr
    assert not (project / "mlruns").exists()  # status creates nothing


# --- 3. tracking URIs checked as MLflow and SQLAlchemy read them ---------------------------------


@pytest.mark.parametrize("uri, problem", [
    ("sqlite:///%2e%2e/%2e%2e/x.db", "outside the project"),  # SQLAlchemy decodes %2e to .
    ("sqlite:///mlruns/%2E%2E/%2e%2e/%2e%2e/x.db", "outside the project"),
    ("file:%2e%2e/%2e%2e/store", "outside the project"),  # MLflow decodes file paths too
    ("%2e%2e/%2e%2e/store", "outside the project"),
    ("SQLITE:///mlruns/mlflow.db", "lower case"),
    (" sqlite:///mlruns/mlflow.db", "spaces"),
    ("sqlite:///mlruns/mlflow.db\n", "spaces"),
    ("sqlite://host/../../x.db", "sqlite:///PATH"),
    ("sqlite+pysqlite:///../../x.db", "sqlite:///PATH"),
    ("file://elsewhere/tmp/store", "not local"),
])
def test_tracking_uris_are_decoded_before_they_are_checked(tmp_path, uri, problem):
    root = tmp_path / "a" / "b" / "project"
    root.mkdir(parents=True)
    with pytest.raises(ConfigError) as err:
        tracking_uri(parse_config({"mlflow": {"tracking_uri": uri}}), root)
    assert str(err.value).startswith("mlflow.tracking_uri = ") and problem in str(err.value)
    assert [p.name for p in tmp_path.rglob("*")] == ["a", "b", "project"]  # nothing created


def test_palm_route_refuses_an_encoded_store_outside_the_project(tmp_path, project):
    _write_params(project, mlflow={"tracking_uri": "sqlite:///%2e%2e/%2e%2e/x.db"})
    _refused_untouched(tmp_path, project, "route", "--weights", "safety=1,humor=1,brevity=1",
                       names=["mlflow.tracking_uri", "outside the project"])
    assert not (tmp_path / "a" / "x.db").exists()


def test_an_encoded_path_inside_the_project_is_where_mlflow_writes(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "project"
    root.mkdir()
    uri = tracking_uri(parse_config({"mlflow": {"tracking_uri": "sqlite:///ml%20runs/mlflow.db"}}), root)
    MlflowClient(uri).search_experiments()
    assert (root / "ml runs" / "mlflow.db").read_bytes()[:16] == b"SQLite format 3\x00"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]


# --- 4. production tags: only the ones that change ------------------------------------------------


def test_register_writes_only_the_in_production_tags_that_change(tmp_path, monkeypatch):
    """A real MLflow registry on SQLite; the register stage's own tagging step, run as its
    re-runs do. A crash between two writes must never leave a production member marked false,
    so a member that stays in production is never written at all."""
    from mlflow import MlflowClient

    from palm_tasks.registry import _mark_production_members, member_model_name

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = parse_config({"mlflow": {"registered_model_prefix": "hostile"}})
    uri = tracking_uri(cfg, tmp_path)
    client = MlflowClient(uri, registry_uri=uri)
    name = member_model_name(cfg)
    client.create_registered_model(name)
    v = [str(client.create_model_version(name, source=str(tmp_path / f"m{i}"), tags={"member_key": f"m{i}"}).version)
         for i in range(3)]
    _mark_production_members(client, cfg, {"m0": v[0], "m1": v[1]})  # first registration
    stamp = {x: client.get_model_version(name, x).last_updated_timestamp for x in v}

    written = []
    real = client.set_model_version_tag
    monkeypatch.setattr(client, "set_model_version_tag",
                        lambda *a, **k: (written.append(tuple(map(str, a))), real(*a, **k))[1])
    _mark_production_members(client, cfg, {"m0": v[0], "m1": v[1]})  # the same portfolio again
    assert written == []
    assert {x: client.get_model_version(name, x).last_updated_timestamp for x in v} == stamp

    _mark_production_members(client, cfg, {"m1": v[1], "m2": v[2]})  # m0 leaves, m2 joins
    assert written == [(name, v[2], "in_production", "true"), (name, v[0], "in_production", "false")]
    assert {x: client.get_model_version(name, x).tags["in_production"] for x in v} == \
        {v[0]: "false", v[1]: "true", v[2]: "true"}


# --- 5. YAML bombs, duplicate keys, huge values -----------------------------------------------------

BILLION_LAUGHS = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{b}: &{b} [{','.join(['*' + a] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]) + "\n"


def test_a_yaml_bomb_is_refused_before_it_expands(tmp_path, project):
    assert len(BILLION_LAUGHS.encode()) < 400
    params = _write_params(project, text=BILLION_LAUGHS)
    line, peak = _refused_untouched(tmp_path, project, "status", names=[str(params), "aliases", "line 1"])
    assert peak < GIB, f"palm status used {peak / GIB:.2f} GiB on a {len(BILLION_LAUGHS)}-byte file"
    assert len(line) < 300


def test_a_bomb_under_a_known_key_is_refused_too(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(PARAMS, sort_keys=False) + "x: &x [1, 2]\ny: *x\n")
    with pytest.raises(ConfigError, match="anchors and aliases"):
        load_config(path)


def test_a_duplicate_key_is_refused_naming_it(tmp_path, project):
    text = (ROOT / "params.yaml").read_text()
    lines = text.splitlines(keepends=True)
    eps = next(i for i, line in enumerate(lines) if line.startswith("  eps:"))
    params = _write_params(project, text="".join(lines[:eps + 1] + ["  eps: 0.3\n"] + lines[eps + 1:]))
    _refused_untouched(tmp_path, project, "status", names=[str(params), "duplicate key 'coverage.eps'",
                                                         f"line {eps + 2}"])
    # a whole section given twice
    _write_params(project, text=text + "coverage: {eps: 0.3}\n")
    _refused_untouched(tmp_path, project, "status", names=["duplicate key 'coverage'"])


def test_a_huge_value_is_shown_cut_short(tmp_path, project):
    """A params file just under 1 MB whose bad value is huge: the error stays one short line
    and the command stays far below 1 GB."""
    huge = {"zz_notes": ["lol" * 10] * 20_000, "coverage": {"eps": "x" * 200_000}}
    text = yaml.safe_dump({**PARAMS, **huge}, sort_keys=False, width=10**9)
    assert 500_000 < len(text.encode()) < 2**20
    _write_params(project, text=text)
    line, peak = _refused_untouched(tmp_path, project, "status", names=["coverage.eps", "zz_notes"])
    assert len(line) < 1500 and peak < GIB


# --- 6. sizes refused before anything is allocated ------------------------------------------------


@pytest.mark.parametrize("changes, names", [
    ({"coverage": {"eps": 0.0001}}, ["coverage.eps", "points", "GiB"]),
    ({"coverage": {"eps": 1e-12}}, ["coverage.eps", "points", "GiB"]),
    ({"coverage": {"eps": 5e-324}}, ["coverage.eps", "infinitely many points"]),
    ({"search": {"k": "1e8"}}, ["search.k", "integer"]),  # PyYAML reads 1e8 as a string
    ({"search": {"k": 1e8}}, ["search.k", "100,000,000 weight vectors"]),
    ({"compare": {"k_max": 10**6}}, ["compare.k_max"]),
    ({"coverage": {"test_users": 10**9}}, ["coverage.test_users", "GiB"]),
    ({"coverage": {"share_lattice": 10**5}}, ["coverage.share_lattice", "points"]),
    ({"seed": 1e30}, ["seed"]),  # beyond 64 bits: pydantic refuses it itself
    ({"seed": 1e18}, ["seed", "4294967295"]),  # an int to pydantic, too large for sklearn and torch
    ({"seed": "1e30"}, ["seed"]),
    ({"seed": 2**32}, ["seed", "4294967295"]),
    ({"data": {"split_seed": 2**40}}, ["data.split_seed"]),
    ({"coverage": {"delta": 0}, "search": {"mode": "grid"}}, ["coverage.delta = 0", "search.mode"]),
])
def test_sizes_and_seeds_are_refused_naming_the_key(changes, names):
    params = json.loads(json.dumps(PARAMS))
    for key, value in changes.items():
        params[key] = {**params[key], **value} if isinstance(value, dict) else value
    with pytest.raises(ConfigError) as err:
        parse_config(params)
    message = str(err.value)
    assert "\n" not in message and len(message) < 500
    for name in names:
        assert name in message, (name, message)


def test_a_tiny_eps_is_refused_by_palm_stage_grid_in_little_memory(tmp_path, project):
    _write_params(project, coverage={"eps": 0.0001})
    line, peak = _refused_untouched(tmp_path, project, "stage", "grid", names=["coverage.eps", "points"])
    assert peak < GIB


def test_sizes_within_the_limits_pass():
    parse_config(PARAMS)  # the defaults
    parse_config({"coverage": {"eps": 0.01, "delta": 0.01}})  # docs/guarantee.md: 786,778 points
    parse_config({"traits": ["safety", "humor", "brevity", "relevance"]})  # d = 4: 3.2 million
    # the largest seed: a repair's last rsft round trains with seed + max_repairs + rounds
    defaults = parse_config({})
    top = 2**32 - 1 - defaults.search.max_repairs - defaults.training.rounds
    parse_config({"seed": top, "coverage": {"test_users": 20_000}})
    with pytest.raises(ConfigError, match=f"use seed <= {top}"):
        parse_config({"seed": top + 1})


def test_delta_zero_runs_without_a_grid(tmp_path):
    """delta = 0 is a purely multiplicative guarantee: the lazy search certifies it without the
    PALM grid (infinite at delta = 0), so the grid stage records no grid instead of failing."""
    from palm_tasks.core.search import LazySearch
    from palm_tasks.stages import STAGES
    from palm_tasks.stages.evaluate import selection_weights

    cfg = parse_config({**PARAMS, "coverage": {**PARAMS["coverage"], "delta": 0}})
    metrics = STAGES["grid"].run(cfg, tmp_path)
    assert metrics == {"grid_size": None, "grid_size_bound": None}
    grid = json.loads((tmp_path / "data" / "grid.json").read_text())
    assert grid["points"] is None and len(grid["uniform"]) == cfg.search.k
    assert len(selection_weights(cfg)) > 0  # evaluate judges on a lattice instead

    search = LazySearch(3, cfg.coverage.eps, 0.0, 10)
    while (w := search.ask()) is not None:  # policies that reach 1 on every trait: OPT everywhere
        search.tell(w, np.ones(3), np.zeros(3))
    assert search.result().certificate.certified

    from palm_tasks.paths import Paths
    from palm_tasks.stages.coverage import build

    from support.pools import EVALUATION, flat_sample_pool

    portfolio, *_ = build(parse_config({"coverage": {"delta": 0, "test_users": 100}, "evaluation": EVALUATION}),
                          Paths(tmp_path), _pool(tmp_path), [], samples=flat_sample_pool(TRAITS))  # at delta = 0
    assert portfolio.delta == 0 and portfolio.members


# --- 7. weights whose sum overflows ----------------------------------------------------------------


def _pool(root: Path) -> list:
    """Three specialists and a centroid as the align stage holds them, with chosen values."""
    from support.pools import policies_with_values

    W = np.vstack([np.eye(3), np.full(3, 1 / 3)])
    return policies_with_values(root, W, 0.2 + 0.6 * W, TRAITS)


def _write_portfolio(root: Path) -> Path:
    """portfolio.json as the coverage stage builds it (real prune and certificate) from _pool."""
    from palm_tasks import schema
    from palm_tasks.paths import Paths
    from palm_tasks.stages.coverage import build
    from support.pools import EVALUATION, flat_sample_pool

    cfg = parse_config({"coverage": {"eps": 0.05, "delta": 0.6, "test_users": 100}, "evaluation": EVALUATION})
    portfolio, *_ = build(cfg, Paths(root), _pool(root), [], samples=flat_sample_pool(TRAITS))
    schema.write(root / "portfolio.json", portfolio)
    return root / "portfolio.json"


def test_huge_weights_are_normalized_not_zeroed(tmp_path, project):
    from palm_tasks.serve.router import Router, parse_weights

    w, normalized = parse_weights("safety=1e308,humor=1e308,brevity=1e308", TRAITS)
    assert normalized and np.allclose(w, 1 / 3)
    w, _ = parse_weights("safety=1.7e308,humor=0,brevity=1.7e308", TRAITS)
    assert np.allclose(w, [0.5, 0, 0.5])
    path = _write_portfolio(project)
    proc, _ = palm("route", "--portfolio", str(path), "--json",
                   "--weights", "safety=1e308,humor=1e308,brevity=1e308", root=project)
    assert proc.returncode == 0, proc.stderr
    route = json.loads(proc.stdout)
    assert route["weights"] == pytest.approx({t: 1 / 3 for t in TRAITS})
    assert route["normalized"] is True
    assert route["member_key"] == Router.from_portfolio(path).route("safety=1,humor=1,brevity=1").member_key


# --- 8. a garbage portfolio.json ------------------------------------------------------------------

GARBAGE = {
    "binary": bytes(range(256)) * 4,
    "empty object": b"{}",
    "a list": b"[1, 2, 3]",
    "missing keys": json.dumps({"id": "p", "traits": TRAITS, "eps": 0.05}).encode(),
    "wrong types": json.dumps({"id": "p", "traits": TRAITS, "eps": 0.05, "delta": 0.02, "members": ["m0"],
                               "certificate": {}}).encode(),
}


@pytest.mark.parametrize("kind", [*GARBAGE, "values of the wrong length"])
def test_palm_route_names_a_garbage_portfolio(tmp_path, project, kind):
    path = project / "portfolio.json"
    if kind in GARBAGE:
        path.write_bytes(GARBAGE[kind])
    else:
        data = json.loads(_write_portfolio(project).read_text())
        for m in data["members"]:
            m["values"] = [0.5, 0.5]
        path.write_text(json.dumps(data))
    _refused_untouched(tmp_path, project, "route", "--portfolio", str(path), "--weights",
                       "safety=1,humor=1,brevity=1", names=[str(path), "palm stage coverage"], code=1)


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_palm_status_names_a_garbage_portfolio(tmp_path, project, kind):
    path = project / "portfolio.json"
    path.write_bytes(GARBAGE[kind])
    before = _digest(tmp_path)
    proc, _ = palm("status", root=project)
    assert_one_error(proc, str(path), code=1)
    assert "members: 1 finished alignment jobs" in " ".join(proc.stdout.split())  # the rest is shown
    assert _digest(tmp_path) == before


# --- 9. a base model directory that holds no model --------------------------------------------------


@pytest.mark.parametrize("files, problem", [
    ({}, "no config.json"),
    ({"notes.txt": b"hello"}, "no config.json"),
    ({"config.json": b"{}"}, "no *.safetensors"),
    ({"config.json": b"{}", "pytorch_model.bin": b"pickle"}, "no *.safetensors"),
])
def test_a_base_model_that_is_not_a_model_is_refused(tmp_path, project, files, problem):
    model = tmp_path / "model"
    model.mkdir()
    for name, content in files.items():
        (model / name).write_bytes(content)
    _write_params(project, base_model=str(model))
    _refused_untouched(tmp_path, project, "stage", "rewards", names=["base_model", str(model), problem])


def test_a_base_model_that_does_not_exist_is_refused():
    with pytest.raises(ConfigError, match="base_model = '/nonexistent/model': not 'smollm2'"):
        parse_config({"base_model": "/nonexistent/model"})


# --- 10. a SIGKILL of palm leaves no process behind ------------------------------------------------


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, or None once it is gone. The
    start time tells a process from a later one that got the same pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[1]), int(fields[19])) if fields[0] != "Z" else None  # a zombie has exited


def _descendants(pid: int) -> dict[int, int]:
    """pid -> start time of every live process whose parent chain leads to `pid` (a /proc scan)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            parents[int(entry.name)] = stat
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, started) in parents.items():
            if ppid == parent and child not in found:
                found[child] = started
                frontier.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to follow processes")
def test_a_sigkilled_palm_leaves_no_prefect_server_behind(tmp_path, project):
    """`palm stage grid` starts the temporary Prefect server (uvicorn) as a child. SIGKILL palm
    while the server runs: nothing that palm started may survive it (without the watchdog the
    server went on, adopted by init, holding ~224 MB)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the temporary server, not one of ours
    finished = _digest(project / "models")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "stage", "grid", "--root", str(project),
                             "--params", str(project / "params.yaml")], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    started = {}
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            started = _descendants(proc.pid)
            if any("prefect.server.api.server:create_app" in _cmdline(p) for p in started):
                break
            time.sleep(0.05)
        servers = [p for p in started if "prefect.server.api.server:create_app" in _cmdline(p)]
        assert servers, f"palm exited ({proc.returncode}) or ran 180 s without starting the Prefect server"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        survivors = started
        for _ in range(60):  # the watchdog polls twice a second; uvicorn then shuts down
            survivors = {p: t for p, t in started.items() if (_proc_stat(p) or (0, None))[1] == t}
            if not survivors:
                break
            time.sleep(0.5)
        assert not survivors, {p: _cmdline(p)[:200] for p in survivors}
    finally:
        for pid, start in {**started, **_descendants(proc.pid)}.items():  # never leak one into the suite
            if (_proc_stat(pid) or (0, None))[1] == start:
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert _digest(project / "models") == finished  # the finished member is untouched


# --- 11. a damaged adapter of a portfolio member ------------------------------------------------------


@pytest.fixture
def damaged_member(tmp_path, registered):
    """A copy of the registered tiny project whose member serving `weights` has its adapter
    truncated to half: (root, portfolio.json, that member's key, the truncated file, weights)."""
    from palm_tasks.serve.router import Router

    root = tmp_path / "project"
    shutil.copytree(registered[0], root)
    portfolio = root / "portfolio.json"
    weights = "safety=0,humor=0,brevity=1"
    key = Router.from_portfolio(portfolio).route(weights).member_key
    adapter = root / "models" / "members" / key / "adapter" / "adapter_model.safetensors"
    whole = adapter.read_bytes()
    adapter.write_bytes(whole[: len(whole) // 2])
    return root, portfolio, key, adapter, weights


def test_palm_status_names_a_truncated_member_and_what_to_run(tmp_path, damaged_member):
    root, _, key, adapter, _ = damaged_member
    before = _digest(tmp_path)
    proc, _ = palm("status", root=root)
    line = assert_one_error(proc, "portfolio member", key, "adapter/adapter_model.safetensors",
                            "checksum", "palm run", code=1)
    assert line.count("damaged") == 1  # only the truncated member; the two others are whole
    assert "portfolio: " in proc.stdout  # the rest is still shown
    assert _digest(tmp_path) == before


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_generate_and_serve_refuse_a_truncated_member_naming_it_and_the_file(tmp_path, damaged_member, command):
    root, portfolio, key, adapter, weights = damaged_member
    args = ["generate", "--weights", weights, "hello"] if command == "generate" else ["serve", "--port", "0"]
    _refused_untouched(tmp_path, root, *args, "--portfolio", str(portfolio), names=[key, str(adapter), "palm run"],
                       code=1)


def test_verify_member_finds_what_the_checksums_cannot(tmp_path):
    """An adapter without checksums.json (as downloaded from the registry) is checked against its
    own safetensors header: truncated by one byte, it is refused naming the file."""
    import torch
    from safetensors.torch import save_file

    from palm_tasks.llm.models import verify_member
    from palm_tasks.schema import ArtifactError

    adapter = tmp_path / "download" / "adapter"
    adapter.mkdir(parents=True)
    weights = adapter / "adapter_model.safetensors"
    save_file({"a": torch.ones(4, 4), "b": torch.zeros(3)}, str(weights))
    verify_member(adapter, "m0")  # whole: accepted
    weights.write_bytes(weights.read_bytes()[:-1])
    with pytest.raises(ArtifactError, match=rf"member m0: {re.escape(str(weights))} is \d+ bytes, .*\(truncated"):
        verify_member(adapter, "m0")


# --- 12. a read-only MLflow database -----------------------------------------------------------------


NOBODY = 65534  # an unprivileged uid for setpriv, where user namespaces are not allowed


@pytest.fixture
def non_root(tmp_path):
    """(prefix, top, env): a prefix that runs a command without root's power over file
    permissions, the directory to work in and the command's environment. As root, chmod does not stop writes, so the command runs in a
    user namespace as an ordinary user who owns the files (`unshare --user --map-user`), in
    tmp_path; where user namespaces are not allowed (a container's seccomp filter, a sysctl), as
    uid 65534 (`setpriv`), in a directory of /tmp it owns (pytest's own temp root is root's
    alone). As a normal user: no prefix, tmp_path. Root with neither is a missing real component:
    the test fails, unless PALM_TEST_MISSING_OK names non-root (tests/conftest.py)."""
    from conftest import missing_component

    if os.geteuid() != 0:
        yield [], tmp_path, dict(os.environ)
        return
    userns = ["unshare", "--user", "--map-user=1000"]  # this user owns the files, without root's override
    probe = subprocess.run([*userns, "true"], capture_output=True)
    if probe.returncode == 0:
        yield userns, tmp_path, dict(os.environ)
        return
    drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all"]
    dropped = subprocess.run([*drop, sys.executable, "-c", "import os; print(os.geteuid())"],
                             capture_output=True, text=True)
    missing_component("non-root", None if dropped.stdout.strip() == str(NOBODY) else
                      "running as root, and neither a user namespace (unshare --user: "
                      f"{probe.stderr.decode(errors='replace').strip()[:120]}) nor setpriv to uid {NOBODY} "
                      f"({dropped.stderr.strip()[:120]}) works here, so no file can be made read-only for palm")
    top = Path(tempfile.mkdtemp(prefix="palm-non-root-"))
    os.chown(top, NOBODY, NOBODY)
    try:  # a home and a Prefect home of its own: root's are not readable by uid 65534
        yield drop, top, {**os.environ, "HOME": str(top), "PREFECT_HOME": str(top / ".prefect")}
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _own_tree(top: Path, prefix: list[str], root: Path) -> None:
    """With setpriv, the files palm works on belong to the uid it runs as, and the project's base
    model is a copy it can read, in `top` (as a normal user or in a user namespace, the files
    already belong to it)."""
    if prefix and prefix[0] == "setpriv":
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["base_model"] = str(shutil.copytree(params["base_model"], top / "base-model"))
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        for p in [top, *top.rglob("*")]:
            os.chown(p, NOBODY, NOBODY, follow_symlinks=False)


def test_palm_stage_register_names_a_read_only_mlflow_db(non_root, registered):
    """A real SQLite store made read-only (chmod 444) with something left to register: one line
    naming the file and that it is read-only, exit 1, before any work, and nothing changed."""
    prefix, tmp_path, env = non_root
    root = tmp_path / "project"
    shutil.copytree(registered[0], root)
    db = root / "mlruns" / "mlflow.db"
    sqlite_copy = tmp_path / "empty-store.db"
    from mlflow import MlflowClient

    MlflowClient(f"sqlite:///{sqlite_copy}").search_experiments()  # a store with tables, nothing registered
    shutil.copyfile(sqlite_copy, db)
    sqlite_copy.unlink()
    db.chmod(0o444)
    _own_tree(tmp_path, prefix, root)
    before = _digest(tmp_path)
    command = [*prefix, sys.executable, "-m", "flows.cli", "stage", "register", "--root", str(root),
               "--params", str(root / "params.yaml")]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert_one_error(proc, str(db), "read-only", code=1)
    assert _digest(tmp_path) == before
    # the check is a probe that really writes: permission bits alone would pass as root
    db.chmod(0o644)
    from palm_tasks.tracking import check_store_writable

    check_store_writable(load_config(root / "params.yaml"), root)
    assert _digest(tmp_path) == before  # the probe's write was rolled back
