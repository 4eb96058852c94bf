"""Faults caused for real on the tiny project: damaged members, two palm commands at once, the
MLflow store down at registration, a reward that returns NaN or raises. (A SIGKILL during the
align stage is tests/test_resume.py.)"""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_project
from palm_tasks.config import parse_config
from palm_tasks.params_yaml import load_config

pytestmark = pytest.mark.slow


def _digest(*paths: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in paths for p in sorted(Path(root).rglob("*") if Path(root).is_dir() else [root])
            if p.is_file()}


def _adapters(root: Path) -> dict[str, int]:
    return {p.parent.parent.name: p.stat().st_mtime_ns
            for p in (root / "models" / "members").glob("*/adapter/adapter_model.safetensors")}


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model):
    """The tiny project through coverage (plain stage functions): 3 single-trait members."""
    import yaml

    from palm_tasks.stages import STAGES

    root = make_project(tmp_path_factory.mktemp("faults") / "project", tiny_model)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["search"]["max_trainings"] = 3
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = load_config(root / "params.yaml")
    for name in ("rewards", "grid", "align", "coverage"):
        STAGES[name].run(cfg, root)
    return root


def test_a_damaged_and_a_deleted_member_are_named_and_only_they_are_redone(project, capsys):
    from palm_tasks.jobs import load_policy
    from palm_tasks.stages import align
    from palm_tasks.schema import load_pool

    cfg = load_config(project / "params.yaml")
    pool = sorted(_adapters(project))
    assert len(pool) == 3
    truncated, deleted, intact = pool
    weights = project / "models" / "members" / truncated / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (project / "models" / "members" / deleted / "adapter" / "adapter_model.safetensors").unlink()
    before = _adapters(project)
    capsys.readouterr()

    align.run(cfg, project)
    log = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert f"policy {truncated}: adapter/adapter_model.safetensors does not match its checksum" in log
    assert f"policy {deleted}: adapter/adapter_model.safetensors is missing" in log
    assert f"policy {intact}" not in log  # only the damaged ones are named as damaged
    assert f"training {truncated}" in log and f"training {deleted}" in log
    assert f"training {intact}" not in log and f"{intact} w=" in log  # reused
    assert sorted(load_pool(project).keys) == pool
    after = _adapters(project)
    assert after[intact] == before[intact]
    assert after[truncated] != before[truncated]  # redone, the deleted one too (it had no file)
    assert sorted(after) == pool  # the same jobs again: same keys, whole files
    for key in pool:
        load_policy(project / "models" / "members" / key)  # checksums verify


def test_mlflow_down_at_registration_loses_nothing_and_registering_later_works(project):
    import socket

    from palm_tasks.registry import RegistryUnavailableError
    from palm_tasks.stages import register

    cfg = load_config(project / "params.yaml")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = parse_config({**cfg.model_dump(), "mlflow": {**cfg.mlflow.model_dump(),
                                                        "tracking_uri": f"http://127.0.0.1:{port}"}})
    kept = [project / "models", project / "portfolio.json"]
    before = _digest(*kept)
    with pytest.raises(RegistryUnavailableError) as err:
        register.run(down, project)
    message = str(err.value)
    assert f"127.0.0.1:{port}" in message and "safe on disk" in message
    assert "palm stage register" in message  # what to do
    assert _digest(*kept) == before
    assert not (project / "metrics" / "register.json").exists()

    adapters = _adapters(project)
    result = register.run(cfg, project)  # the store is back: register without retraining
    assert result["created"] > 0 and result["portfolio_version"] == "1"
    assert _adapters(project) == adapters


def test_a_second_palm_run_refuses_naming_the_holder_and_a_killed_holder_frees_the_lock(tmp_path):
    from palm_tasks.lock import ProjectLockedError, project_lock

    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom palm_tasks.lock import project_lock\n"
         f"with project_lock({str(root)!r}, 'palm run'):\n    print('held', flush=True)\n"
         "    time.sleep(120)\n"], stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _digest(root)
        for command in (["run"], ["stage", "grid"]):
            proc = subprocess.run([sys.executable, "-m", "flows.cli", *command, "--root", str(root),
                                   "--params", str(root / "params.yaml")],
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 3, proc.stderr
            (line,) = proc.stderr.strip().splitlines()
            assert line.startswith("palm: error: project") and f"pid {holder.pid} (palm run" in line
            assert "--wait" in line
        assert _digest(root) == before  # the refused commands wrote nothing
        with pytest.raises(ProjectLockedError):
            with project_lock(root, "test"):
                pass
        os.kill(holder.pid, signal.SIGKILL)  # dies holding the lock: the kernel releases it
        holder.wait(timeout=30)
        started = time.monotonic()
        with project_lock(root, "palm run"):
            assert f'"pid": {os.getpid()}' in (root / ".palm.lock").read_text()
        assert time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()


def test_wait_queues_behind_the_holder(tmp_path):
    from palm_tasks.lock import project_lock

    holder = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom palm_tasks.lock import project_lock\n"
         f"with project_lock({str(tmp_path)!r}, 'palm run'):\n    print('held', flush=True)\n"
         "    time.sleep(2)\n"], stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[1])
    assert holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    with project_lock(tmp_path, "second", wait=True, poll_seconds=0.1):
        waited = time.monotonic() - started
    assert waited > 1.0, "got the lock only once the holder (2 s) let it go"
    holder.wait()


# --- rewards that fail --------------------------------------------------------------------------


def _train_with(reward, prepared_project, tmp_path, monkeypatch):
    """Run one real alignment job whose second reward is `reward`; the error it fails with."""
    from conftest import copy_project
    from palm_tasks.jobs import Job, run_job
    from palm_tasks.llm import rewards as R

    root = copy_project(prepared_project, tmp_path / "project", traits=["brevity", "safety"],
                        training={"steps": 1})
    real = R.build_rewards
    monkeypatch.setattr(R, "build_rewards", lambda *args, **kwargs: [real(*args, **kwargs)[0], reward])
    with pytest.raises(Exception) as err:
        run_job(load_config(root / "params.yaml"), root, Job.train([0.5, 0.5]))
    assert not any((root / "models" / "members").iterdir()), "a failed job leaves nothing behind"
    return str(err.value)


class _Flaky:
    """A test-only reward: fine on most responses, broken on every second one."""

    name = "flaky"
    version = "flaky-test"
    normalization = "test only"

    def __init__(self, fail):
        self.fail = fail

    def __call__(self, prompts, completions):
        out = np.full(len(completions), 0.5)
        if len(completions) > 1:
            if self.fail == "nan":
                out[1] = np.nan
            else:
                raise RuntimeError(f"scoring backend failed on {completions[1]!r}")
        return out


def test_a_reward_returning_nan_fails_the_job_naming_the_reward_and_the_input(prepared_project, tmp_path,
                                                                             monkeypatch):
    message = _train_with(_Flaky("nan"), prepared_project, tmp_path, monkeypatch)
    assert "reward 'flaky' returned" in message and "nan" in message
    assert "for prompt " in message and "and completion " in message


def test_a_reward_that_raises_fails_the_job_naming_the_reward(prepared_project, tmp_path, monkeypatch):
    message = _train_with(_Flaky("raise"), prepared_project, tmp_path, monkeypatch)
    assert "scoring backend failed" in message
    assert "flaky" in message, f"the error does not name the reward: {message}"
