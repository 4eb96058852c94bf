"""The evaluate flow: PALM against the baselines (palm_tasks.evaluate), jobs as Prefect tasks.

Each alignment job is a task with retries, one at a time; a job the align stage (or an earlier
evaluation) finished is reused, and new ones go to the evaluate stage's own job cache.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from palm_tasks import stages
from palm_tasks.align import load_member
from palm_tasks.config import load_config
from palm_tasks.evaluate import evaluate_stage, members_dir


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, task_run_name="evaluate-job-{weights}",
      log_prints=False)  # as flows.stages.align_job: a job's lines go straight to the terminal
def evaluate_job(params: str, root: str, weights: list[float]) -> str:
    """One alignment job (or its finished member); returns the member's directory."""
    return str(stages.run_job(load_config(params), Path(root), weights, members_dir(Path(root))).path)


@flow(name="evaluate", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def evaluate_flow(params: str = "params.yaml", root: str = ".") -> dict:
    def run_jobs(weights: list[list[float]]):
        futures = [evaluate_job.submit(params, root, w) for w in weights]
        return [load_member(Path(f.result())) for f in futures]

    return evaluate_stage(load_config(params), Path(root), run_jobs)
