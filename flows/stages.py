"""One Prefect flow per pipeline stage, derived from palm_tasks.stages.STAGES.

Flows take the params.yaml path and the project root (plain strings, so the Prefect UI shows
them and a deployment can pass them). Stages that run jobs get the one job runner (flows/jobs.py).
A stage flow of the pipeline run by `palm stage` (or the pipeline, for all its stages at the
end) records what it did in dvc.lock (`record_in_dvc`), so `dvc status` agrees with `palm`
(docs/pipeline.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import flow

from flows.jobs import job_runner
from palm_tasks.params_yaml import load_config
from palm_tasks.log import warn
from palm_tasks.stages import PIPELINE, STAGES, Stage


def run_stage(stage: Stage, params: str, root: str) -> dict:
    """A stage's work inside the current flow, with the job runner when it runs jobs."""
    cfg = load_config(params)
    if not stage.runs_jobs:
        return stage.run(cfg, Path(root))
    with job_runner(cfg, params, root) as run_jobs:
        return stage.run(cfg, Path(root), run_jobs)


def _is_dvc_project(root: Path) -> bool:
    """A DVC project DVC can commit in: .dvc/ at the root, inside a git work tree or with
    core.no_scm set."""
    if not (root / ".dvc").is_dir():
        return False
    if any((p / ".git").exists() for p in (root, *root.parents)):
        return True
    config = root / ".dvc" / "config"
    return config.is_file() and "no_scm" in config.read_text(encoding="utf-8", errors="replace")


def record_in_dvc(root: str | Path, names: list[str], params: str | None = None) -> str:
    """`dvc commit --force NAMES`: record in dvc.lock the deps, params and outputs the stages
    just ran with, without running them, so `dvc status` and `dvc repro` find them up to date.

    Skipped under `dvc repro` (DVC_STAGE is set: DVC records the stage itself and holds the
    repository lock), outside a DVC project, and when the params file is not the project's
    params.yaml (dvc.lock records params.yaml's values, which this run did not use). Like
    `dvc repro`, the commit stores cached outputs in the DVC cache (.dvc/cache; a file already
    there with the same hash is not copied again). A failure is a warning, never an error: the
    stages' work is done, and `dvc commit --force` by hand does the same.
    """
    root = Path(root).resolve()
    if os.environ.get("DVC_STAGE"):
        return "skipped: run by dvc repro, which records the stage"
    if not _is_dvc_project(root) or not (root / "dvc.yaml").is_file():
        return "skipped: not a DVC project"
    if params is not None and Path(params).resolve() != root / "params.yaml":
        return f"skipped: params from {params}, not the project's params.yaml"
    proc = subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet", *names], cwd=root,
                          capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if proc.returncode != 0:
        message = " ".join((proc.stderr or proc.stdout).split())[-500:]
        warn(f"dvc commit of {', '.join(names)} failed ({message}); `dvc status` will list them "
             f"until `dvc commit --force {' '.join(names)}` or `dvc repro`")
        return f"failed: {message}"
    return "done"


def _stage_flow(stage: Stage):
    def stage_flow(params: str = "params.yaml", root: str = ".", record: bool = True) -> dict:
        result = run_stage(stage, params, root)
        # the pipeline records all its stages at once, after the last; evaluate is no DVC stage
        if record and stage in PIPELINE:
            record_in_dvc(root, [stage.name], params)
        return result

    stage_flow.__doc__ = stage.module.__doc__
    return flow(name=stage.name, log_prints=True)(stage_flow)


STAGE_FLOWS = {name: _stage_flow(stage) for name, stage in STAGES.items()}
