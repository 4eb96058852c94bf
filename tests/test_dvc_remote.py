"""Checkpoints travel with DVC: `dvc repro` runs every stage and a second one nothing, `dvc push`
to a local remote, `git clone` and `dvc pull` elsewhere give the same portfolio with no
retraining, the clone's MLflow store is its own; every MLflow run carries the git commit and
dvc.lock hash it came from; a changed param reruns only what depends on it."""

import configparser
import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import copy_run, run_command
from palm_tasks.stages import PIPELINE

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("finished_run")]


def _run(root: Path, *cmd: str) -> str:
    return run_command(root, *cmd, stderr=True)


def _files(root: Path, under: str) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / under).rglob("*")) if p.is_file()}


def test_the_default_remote_is_a_local_directory_beside_the_project():
    config = configparser.ConfigParser()
    config.read(Path(__file__).resolve().parents[1] / ".dvc" / "config")
    assert config["core"]["remote"] == "local"
    assert config["'remote \"local\"'"]["url"] == "../../palm-dvc-store"  # relative to .dvc/


def test_push_clone_pull_gives_the_same_portfolio_without_training(finished_run, tmp_path, prefect_harness):
    import mlflow

    from palm_tasks.params_yaml import load_config
    from palm_tasks.tracking import tracking_uri

    # the README's first command ran in a fresh git repository (conftest.finished_run); a copy,
    # pointed at a remote of its own
    root = copy_run(finished_run, tmp_path / "project")
    _run(root, "dvc", "remote", "modify", "local", "url", str(tmp_path / "store"))
    assert (root / "dvc.lock").is_file() and (root / "portfolio.json").is_file()
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert list(lock) == [stage.name for stage in PIPELINE]  # every stage palm run runs, not the baseline study
    out = _run(root, "dvc", "repro")
    assert "Running stage" not in out and "up to date" in out  # palm run and dvc repro are one pipeline
    assert "Data and pipelines are up to date" in _run(root, "dvc", "status")
    metrics = _run(root, "dvc", "metrics", "show", "--json")
    assert "portfolio_size" in metrics and "grid_size_bound" in metrics
    _run(root, "git", "add", "dvc.lock", ".dvc/config")
    _run(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pipeline")
    _run(root, "dvc", "push")
    assert any((tmp_path / "store").rglob("*")), "the remote holds the outputs"
    portfolio = json.loads((root / "portfolio.json").read_text())
    members = _files(root, "models/members")
    base = _files(root, "models/base")
    store_before = _files(root, "mlruns")

    clone = tmp_path / "clone"
    _run(tmp_path, "git", "clone", "-q", str(root), str(clone))
    assert not (clone / "models").exists()
    _run(clone, "dvc", "pull")
    # persist: true outputs are cached, so they travel: base model, members, reward models
    assert _files(clone, "models/members") == {k: v for k, v in members.items()}
    assert _files(clone, "models/base") == base
    assert (clone / "models" / "rewards").is_dir() and (clone / "data" / "prompts" / "train.jsonl").is_file()

    out = _run(clone, "dvc", "repro")  # metrics and portfolio.json are git-ignored: remade
    align = json.loads((clone / "metrics" / "align.json").read_text())
    assert align["trained"] == 0, out[-2000:]
    assert _files(clone, "models/members") == members, "no member was retrained"
    again = json.loads((clone / "portfolio.json").read_text())
    assert again["id"] == portfolio["id"] and again["members"] == portfolio["members"]
    committed = hashlib.sha256(_run(clone, "git", "show", "HEAD:dvc.lock").encode()).hexdigest()
    head = _run(clone, "git", "rev-parse", "HEAD").strip()
    clone_cfg = load_config(clone / "params.yaml")
    clone_client = mlflow.MlflowClient(tracking_uri(clone_cfg, clone))
    exp = clone_client.get_experiment_by_name(clone_cfg.mlflow.experiment).experiment_id
    clone_runs = clone_client.search_runs([exp])  # every run of the clone's own store
    untagged = [r.info.run_name for r in clone_runs if "git_commit" not in r.data.tags]
    assert clone_runs and untagged == [], f"runs without lineage tags in the clone's store: {untagged}"
    for run in clone_runs:
        assert run.data.tags["git_commit"] == head
        assert re.fullmatch(r"[0-9a-f]{64}", run.data.tags["dvc_lock_sha256"])
    (rewards_run,) = [r for r in clone_runs if r.info.run_name == "rewards"]
    assert rewards_run.data.tags["dvc_lock_sha256"] == committed  # the dvc.lock it started from

    # the clone's registry is its own: every location in its store lies in its mlruns/, and its
    # registered portfolio answers with the base model registered there (no path into the original)
    import pandas as pd

    from palm_tasks.registry import portfolio_model_name
    from palm_tasks.tracking import LOCATION_COLUMNS

    assert _files(root, "mlruns") == store_before, "the clone wrote into the original project"
    import sqlite3

    con = sqlite3.connect(clone / "mlruns" / "mlflow.db")
    locations = [row[0] for table, column in LOCATION_COLUMNS
                 for row in con.execute(f"SELECT {column} FROM {table}") if str(row[0]).startswith(("file:", "/"))]
    con.close()
    own = (clone / "mlruns").resolve()
    assert locations and all(loc.startswith((own.as_uri() + "/", str(own) + "/")) for loc in locations), locations
    latest = max(clone_client.search_model_versions(f"name = '{portfolio_model_name(clone_cfg)}'"),
                 key=lambda v: int(v.version))
    mlflow.set_tracking_uri(tracking_uri(clone_cfg, clone))
    mlflow.set_registry_uri(tracking_uri(clone_cfg, clone))
    answer = mlflow.pyfunc.load_model(f"models:/{portfolio_model_name(clone_cfg)}/{latest.version}").predict(
        pd.DataFrame([{t: 1 / 3 for t in clone_cfg.traits} | {"prompt": "Tell me a joke"}]),
        params={"max_new_tokens": 4})["answer"][0]
    assert isinstance(answer, str)

    # A retraining run (a stricter brevity reward) records its outputs in dvc.lock, so
    # `dvc repro` afterwards reproduces it: everything is up to date, nothing is trained.

    from flows.retrain import retrain_flow

    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["rewards"].update(brevity_max_words=5, brevity_full_words=0)  # the plateau must stay below the max
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    summary = retrain_flow(str(clone / "params.yaml"), str(clone))
    assert summary["dvc_commit"] == "done" and summary["reward_drift"]["brevity"] < 0
    retrained = _files(clone, "models/members")
    out = _run(clone, "dvc", "repro")
    assert "Running stage" not in out and "up to date" in out, out[-2000:]
    assert _files(clone, "models/members") == retrained
    assert json.loads((clone / "portfolio.json").read_text())["id"] == summary["portfolio"]
    run = clone_client.get_run(summary["mlflow_run_id"])
    assert run.data.tags["dvc_lock_sha256"] == hashlib.sha256((clone / "dvc.lock").read_bytes()).hexdigest()

    # lineage: every MLflow run names the commit and the dvc.lock of the run that made it
    cfg = load_config(root / "params.yaml")
    client = mlflow.MlflowClient(tracking_uri(cfg, root))
    runs = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    assert len(runs) >= 3
    first_commit = _run(root, "git", "rev-list", "--max-parents=0", "HEAD").strip()
    untagged = [r.info.run_name for r in runs if "git_commit" not in r.data.tags]
    assert untagged == [], f"runs without lineage tags: {untagged}"
    for run in runs:  # `dvc repro` ran on the first commit
        assert run.data.tags["git_commit"] == first_commit
        assert re.fullmatch(r"[0-9a-f]{64}|none", run.data.tags["dvc_lock_sha256"])
    (rewards_run,) = [r for r in runs if r.info.run_name == "rewards"]
    assert rewards_run.data.tags["dvc_lock_sha256"] == "none"  # the first stage: no dvc.lock yet
    # and in the clone's store, the retraining run included: the clone's commit, a dvc.lock hash
    clone_runs_now = clone_client.search_runs([exp])
    assert summary["mlflow_run_id"] in {r.info.run_id for r in clone_runs_now}
    untagged = [r.info.run_name for r in clone_runs_now if "git_commit" not in r.data.tags]
    assert len(clone_runs_now) > len(clone_runs) and untagged == [], untagged
    for run in clone_runs_now:
        assert run.data.tags["git_commit"] == head
        assert re.fullmatch(r"[0-9a-f]{64}", run.data.tags["dvc_lock_sha256"])

    # a changed test lattice reruns coverage (and what depends on it), not the rewards stage
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["coverage"]["test_lattice"] = 12
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(root, "dvc", "repro")
    assert "Running stage 'coverage'" in out and "Running stage 'rewards'" not in out
