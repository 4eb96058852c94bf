"""One Prefect flow per pipeline stage, derived from palm_tasks.stages.STAGES.

Flows take the params.yaml path and the project root (plain strings, so the Prefect UI shows
them and a deployment can pass them). Stages that run jobs get the one job runner (flows/jobs.py).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.jobs import job_runner
from palm_tasks.config import load_config
from palm_tasks.stages import STAGES, Stage


def run_stage(stage: Stage, params: str, root: str) -> dict:
    """A stage's work inside the current flow, with the job runner when it runs jobs."""
    cfg = load_config(params)
    if not stage.runs_jobs:
        return stage.run(cfg, Path(root))
    with job_runner(cfg, params, root) as run_jobs:
        return stage.run(cfg, Path(root), run_jobs)


def _stage_flow(stage: Stage):
    def stage_flow(params: str = "params.yaml", root: str = ".") -> dict:
        return run_stage(stage, params, root)

    stage_flow.__doc__ = stage.module.__doc__
    return flow(name=stage.name, log_prints=True)(stage_flow)


STAGE_FLOWS = {name: _stage_flow(stage) for name, stage in STAGES.items()}
