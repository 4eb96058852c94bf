"""One Prefect flow per pipeline stage; each is a thin wrapper over palm_tasks.stages.

Flows take the params.yaml path and the project root (plain strings, so the Prefect UI shows
them and a deployment can pass them). Alignment jobs are Prefect tasks with retries; their
caching is the job key on disk (palm_tasks.align), not Prefect's result cache, so a job
finished by any earlier run, flow or `dvc repro` is reused.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from palm_tasks import stages
from palm_tasks.align import load_member
from palm_tasks.config import load_config
from palm_tasks.layout import Layout


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
      task_run_name="align-job-{weights}")
def align_job(params: str, root: str, weights: list[float]) -> str:
    """One alignment job (or its finished member); returns the member key."""
    return stages.run_job(load_config(params), Path(root), weights).key


@flow(name="rewards", log_prints=True)
def rewards_flow(params: str = "params.yaml", root: str = ".") -> dict:
    return stages.rewards_stage(load_config(params), Path(root))


@flow(name="grid", log_prints=True)
def grid_flow(params: str = "params.yaml", root: str = ".") -> dict:
    return stages.grid_stage(load_config(params), Path(root))


# One job at a time by default: two GRPO jobs on the same CPU cores or GPU only slow each other.
@flow(name="align", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def align_flow(params: str = "params.yaml", root: str = ".") -> dict:
    cfg, lay = load_config(params), Layout(Path(root))

    def run_jobs(weights: list[list[float]]):
        futures = [align_job.submit(params, root, w) for w in weights]
        return [load_member(lay.member(f.result())) for f in futures]

    return stages.align_stage(cfg, Path(root), run_jobs)


@flow(name="coverage", log_prints=True)
def coverage_flow(params: str = "params.yaml", root: str = ".") -> dict:
    return stages.coverage_stage(load_config(params), Path(root))


@flow(name="register", log_prints=True)
def register_flow(params: str = "params.yaml", root: str = ".") -> dict:
    return stages.register_stage(load_config(params), Path(root))


STAGE_FLOWS = {
    "rewards": rewards_flow,
    "grid": grid_flow,
    "align": align_flow,
    "coverage": coverage_flow,
    "register": register_flow,
}
