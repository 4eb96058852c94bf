"""DVC agrees with palm (issue 16): after the real `palm run` and `palm stage`, `dvc status`
finds the pipeline up to date, `dvc metrics show` holds numbers only, and a changed tolerance
reruns only the stages that depend on it. Tiny model, real Prefect, MLflow and DVC."""

import json
import sys
import time

import pytest
import yaml

from conftest import copy_run, run_command

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("finished_run")]

PIPELINE = ["rewards", "grid", "align", "soups", "coverage", "register"]


def _leaves(data, path=()):
    """(path, value) of every leaf of a JSON value."""
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _leaves(v, (*path, i))
    else:
        yield path, data


def test_dvc_agrees_with_palm_run(finished_run, tmp_path):
    # a copy: dvc takes its repository's lock, and the shared run stays as palm run left it
    root = copy_run(finished_run, tmp_path / "project")

    def run(*cmd, timeout=900):
        return run_command(root, *cmd, timeout=timeout)

    def palm(*args):
        return run(sys.executable, "-m", "flows.cli", *args, "--root", str(root), "--params", str(root / "params.yaml"))

    def changed() -> set[str]:
        """The stages `dvc status` lists as changed."""
        return set(json.loads(run("dvc", "status", "--json")))

    assert (root / "dvc.lock").is_file()
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(PIPELINE)  # palm run records its six stages
    # dvc.yaml holds exactly the stages palm run runs: nothing is left for dvc
    assert changed() == set()
    assert "Data and pipelines are up to date" in run("dvc", "status")
    out = run("dvc", "repro", "register")
    assert "Running stage" not in out, out[-2000:]

    # dvc metrics show: numbers (and booleans) only; the text lives in the details files
    shown = json.loads(run("dvc", "metrics", "show", "--json"))
    files = {f: d["data"] for rev in shown.values() for f, d in rev["data"].items() if "data" in d}
    assert set(files) == {f"metrics/{s}.json" for s in PIPELINE}
    strings = [(f, p, v) for f, data in files.items() for p, v in _leaves(data) if isinstance(v, str)]
    assert strings == []
    assert isinstance(files["metrics/coverage.json"]["certified"], bool)
    for key in ("max_eps", "max_delta", "worst_evidence_gap", "portfolio_size", "max_multiplicative_gap"):
        assert isinstance(files["metrics/coverage.json"][key], (int, float)), key
    assert files["metrics/align.json"]["trainings"] >= 3
    details = json.loads((root / "metrics" / "register.details.json").read_text())
    assert details["alias"] in ("production", "candidate") and len(details["portfolio_id"]) == 16
    assert json.loads((root / "metrics" / "align.details.json").read_text())["mode"] == "lazy"
    assert "normalization" in json.loads((root / "metrics" / "rewards.details.json").read_text())
    status = palm("status")  # reads the moved text: normalization, registry alias
    assert f"alias {details['alias']}" in status and "reward brevity:" in status

    # one stage run by palm is recorded too
    palm("stage", "coverage")
    assert changed() == set()

    # a changed tolerance: only the stages whose params hold coverage.eps are out of date
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["coverage"]["eps"] = 0.1 if params["coverage"]["eps"] != 0.1 else 0.2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert changed() == {"grid", "align", "coverage"}
    started = time.monotonic()
    out = run("dvc", "exp", "run")  # an experiment on the workspace's params
    ran = {s for s in PIPELINE if f"Running stage '{s}'" in out}
    print(f"dvc exp run after coverage.eps = {params['coverage']['eps']} ran: {sorted(ran)} "
          f"in {time.monotonic() - started:.0f} s")
    # grid, align and coverage rerun for their params; register for the new portfolio.json;
    # soups only if align's pool changed; never the rewards stage
    assert {"grid", "align", "coverage", "register"} <= ran <= {"grid", "align", "soups", "coverage", "register"}
    assert "rewards" not in ran
    assert "Data and pipelines are up to date" in run("dvc", "status")
