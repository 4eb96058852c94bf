"""Scheduled retraining on the tiny project: real Prefect, TRL, MLflow. Rewards drift, kept
members are re-evaluated (not retrained), the certificate is recomputed, and `production`
moves only to a certified portfolio."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import copy_run
from support.chunks import measured_values

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("finished_run")]


def _adapters(root: Path) -> dict[str, int]:
    return {p.parent.parent.name: p.stat().st_mtime_ns
            for p in (root / "models" / "members").glob("*/adapter/adapter_model.safetensors")}


def _edit(root: Path, **sections) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_retraining_keeps_members_records_drift_and_guards_production(finished_run, tmp_path, prefect_harness):
    import mlflow

    from flows.pipeline import pipeline
    from flows.retrain import retrain_flow
    from palm_tasks.params_yaml import load_config
    from palm_tasks.jobs import load_policy
    from palm_tasks.registry import portfolio_model_name
    from palm_tasks.schema import load_pool
    from palm_tasks.portfolio import load_portfolio
    from palm_tasks.tracking import tracking_uri

    root = copy_run(finished_run, tmp_path / "project")  # its first three trainings are reused below
    # the 3 single-trait members: enough to drift; delta = 1 certifies any portfolio (production)
    # no repair: this test follows the kept members (a repair may replace a beaten row's policy)
    _edit(root, search={"max_trainings": 3, "max_repairs": 0}, coverage={"delta": 1.0})
    params = str(root / "params.yaml")
    pipeline(params, str(root))
    first = load_portfolio(root)
    assert first.certificate.certified
    old_pool = load_pool(root).keys
    before = _adapters(root)
    old_values = {k: load_policy(root / "models" / "members" / k).values for k in old_pool}

    # The reward changes: brevity now counts 5 words as long. Every value vector drifts.
    _edit(root, rewards={"brevity_max_words": 5, "brevity_full_words": 0})  # the plateau stays below the max
    summary = retrain_flow(params, str(root))
    after = _adapters(root)
    assert all(after[k] == before[k] for k in old_pool), "kept members were not retrained"
    assert sorted(summary["reevaluated"]) == sorted(old_pool)
    pool = load_pool(root)
    assert pool.mode == "retrain" and pool.keys[:len(old_pool)] == old_pool
    assert pool.trained == len(summary["trained"]) == len(set(after) - set(before))

    # drift = mean change of the re-measured members' values, per trait, as their chunks on disk hold
    # them (each prompt's mean reward over its answers, averaged over the prompts)
    new_values = {k: measured_values(root / "models" / "members" / k, summary["eval_key"]) for k in old_pool}
    expected = np.mean([new_values[k] - old_values[k] for k in old_pool], axis=0)
    cfg = load_config(params)
    assert [summary["reward_drift"][t] for t in cfg.traits] == pytest.approx(expected.tolist())
    assert summary["reward_drift"]["brevity"] < 0  # a stricter brevity scores everyone lower

    # the pool and the certificate count with the re-evaluated values
    for p in pool.policies[:len(old_pool)]:
        assert p.values.tolist() == pytest.approx(new_values[p.key].tolist(), abs=1e-9)
    portfolio = load_portfolio(root)
    for m in portfolio.members:
        assert list(m.value.mean) == pytest.approx(pool.policies[pool.keys.index(m.key)].values.tolist(), abs=1e-6)
    assert set(summary["kept"]) | set(summary["added"]) == {m.key for m in portfolio.members}
    assert set(summary["kept"]) | set(summary["dropped"]) == {m.key for m in first.members}

    # MLflow: a retrain run with the drift, the changes and the lineage tags; production moved
    uri = tracking_uri(cfg, root)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.metrics["drift.brevity"] == pytest.approx(summary["reward_drift"]["brevity"])
    assert run.data.metrics["n_kept"] == len(summary["kept"])
    assert run.data.tags["palm.stage"] == "retrain" and "dvc_lock_sha256" in run.data.tags
    name = portfolio_model_name(cfg)
    assert summary["certified"] and summary["register"]["alias"] == "production"
    held = client.get_model_version_by_alias(name, "production")
    assert held.tags["portfolio_id"] == portfolio.id

    # eps 0.01 at 99.9% confidence on 8 prompts: no portfolio is certified, so
    # production stays put.
    _edit(root, coverage={"eps": 0.01, "delta": 0.02, "alpha": 0.001}, search={"max_trainings": 1})
    strict = retrain_flow(params, str(root))
    assert not strict["certified"] and strict["register"]["alias"] == "candidate"
    # at most the one training allowed; the search ends uncertified (out of budget, or stuck: it
    # may find no weight worth training)
    assert len(strict["trained"]) <= 1
    assert load_pool(root).history["stopped"] in {"budget", "stuck"}
    candidate = client.get_model_version_by_alias(name, "candidate")
    assert candidate.tags["portfolio_id"] == strict["portfolio"]
    assert client.get_model_version_by_alias(name, "production").version == held.version
    assert all(_adapters(root)[k] == after[k] for k in after), "nothing retrained twice"


def test_schedule_builds_a_deployment_and_refuses_a_bad_cron(tmp_path):
    from flows.retrain import DEPLOYMENT, deployment
    from palm_tasks.config import ConfigError

    dep = deployment("0 3 * * 0", "params.yaml", ".")
    assert dep.name == DEPLOYMENT and dep.flow_name == "palm-retrain"
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * 0"]
    assert dep.parameters == {"params": "params.yaml", "root": "."}
    with pytest.raises(ConfigError, match="not a cron expression"):
        deployment("every sunday")

    # prefect.yaml defines the same deployment for a work pool
    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "prefect.yaml").read_text())
    (dep_yaml,) = spec["deployments"]
    assert dep_yaml["name"] == DEPLOYMENT and dep_yaml["entrypoint"] == "flows/retrain.py:retrain_flow"
    assert dep_yaml["schedules"][0]["cron"] == "0 3 * * 0"
    assert dep_yaml["work_pool"]["name"]


def test_palm_schedule_with_a_bad_cron_is_one_clear_line(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "schedule", "--cron", "61 * * * *",
                           "--params", str(root / "params.yaml"), "--root", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "not a cron expression" in proc.stderr and "Traceback" not in proc.stderr
