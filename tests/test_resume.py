"""Never lose or redo work: a pipeline killed mid-align resumes without retraining finished
jobs; a job failing for good fails with its own error and the others are kept; a transient
failure is retried by Prefect."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import copy_project

pytestmark = pytest.mark.slow


def finished_members(root: Path) -> dict[str, tuple[int, str]]:
    """key -> (adapter mtime, MLflow run id) of every finished member: both change if retrained."""
    from palm_tasks.jobs import load_policy

    out = {}
    for path in (root / "models" / "members").glob("[!.]*"):
        m = load_policy(path)
        out[m.key] = ((m.adapter / "adapter_model.safetensors").stat().st_mtime_ns, m.training["mlflow_run_id"])
    return out


def in_progress(root: Path) -> list[Path]:
    return list((root / "models" / "members").glob(".*.tmp-*"))


def palm_run(root: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--root", str(root),
                             "--params", str(root / "params.yaml")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, killed whole below


def test_a_run_killed_mid_align_resumes_without_retraining(prepared_project, tmp_path, prefect_harness):
    import mlflow
    from prefect.settings import PREFECT_API_URL

    from palm_tasks.params_yaml import load_config
    from palm_tasks.tracking import tracking_uri

    root = copy_project(prepared_project, tmp_path / "project",
                        search={"mode": "uniform", "k": 3, "max_trainings": 3},
                        training={"steps": 8})
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # the harness's server

    proc = palm_run(root, env)
    deadline = time.time() + 300
    try:
        while not (finished_members(root) and in_progress(root)):
            assert proc.poll() is None, f"palm run ended before it could be killed:\n{proc.stdout.read()}"
            assert time.time() < deadline, "no finished job next to a running one within 300 s"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # no cleanup handler runs: as if the machine died
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = finished_members(root)
    half_written = in_progress(root)
    assert len(before) < 3 and half_written, "the kill came mid-align, with a job half written"

    proc = palm_run(root, env)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    after = finished_members(root)
    assert len(after) == 3
    assert {k: after[k] for k in before} == before, "a finished member was trained again"
    assert not in_progress(root), "the half-written job's directory is gone"

    cfg = load_config(root / "params.yaml")
    client = mlflow.MlflowClient(tracking_uri(cfg, root))
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id
    status = {r.info.run_id: r.info.status
              for r in client.search_runs([experiment], "tags.`palm.stage` = 'align'")}
    assert all(status[run_id] == "FINISHED" for _, run_id in after.values())
    # the killed job's run, if it had started one, is closed as KILLED by the rerun
    assert sorted(status.values()) == ["FINISHED"] * 3 + ["KILLED"] * (len(status) - 3)


def test_a_failing_job_fails_alone_and_a_transient_failure_is_retried(
        prepared_project, tmp_path, prefect_harness, monkeypatch):
    from flows.stages import STAGE_FLOWS
    from palm_tasks.jobs import load_policy
    from palm_tasks.llm import train

    root = copy_project(prepared_project, tmp_path / "project",
                        search={"mode": "uniform", "k": 3, "max_trainings": 3},
                        training={"method": "grpo"},  # the faulty reward runs inside TRL's GRPO loop
                        runner={"retry_delay_seconds": 0})
    broken, flaky = (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
    flag = tmp_path / "fail-once"
    flag.touch()

    class Faulty:
        """A real reward that, inside the real GRPO training loop, returns out-of-range scores
        (a deterministic bug) or raises a connection error once (a transient fault)."""

        def __init__(self, reward, mode):
            self.reward, self.mode, self.name, self.version = reward, mode, reward.name, reward.version

        def __call__(self, prompts, completions):
            if self.mode == "broken":
                return np.full(len(completions), 2.0)
            if flag.exists():
                flag.unlink()
                raise ConnectionError("reward service unreachable")
            return self.reward(prompts, completions)

    attempts = {}
    real_train_grpo = train.train_grpo

    def train_grpo(base_path, rewards, prompts, weights, *args, **kwargs):
        attempts[tuple(weights)] = attempts.get(tuple(weights), 0) + 1
        mode = {broken: "broken", flaky: "flaky"}.get(tuple(weights))
        if mode:
            rewards = [Faulty(rewards[-1], mode) if r is rewards[-1] else r for r in rewards]
        return real_train_grpo(base_path, rewards, prompts, weights, *args, **kwargs)

    monkeypatch.setattr(train, "train_grpo", train_grpo)
    with pytest.raises(ValueError, match=r"reward 'brevity' returned .*2\.0"):
        STAGE_FLOWS["align"](str(root / "params.yaml"), str(root))

    assert attempts == {(1.0, 0.0, 0.0): 1, broken: 1, flaky: 2}, "retried the transient failure only"
    kept = {tuple(m.weights) for m in map(load_policy, (root / "models" / "members").glob("[!.]*"))}
    assert kept == {(1.0, 0.0, 0.0), flaky}
    assert not in_progress(root) and not flag.exists()
