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

from flows.runners import job_resources, task_runner
from palm_tasks import stages
from palm_tasks.align import load_member
from palm_tasks.config import load_config
from palm_tasks.layout import Layout


# Errors that the same inputs raise again (bad values, missing files, bugs): retrying them only
# trains the job again to fail the same way. Anything else (a lost worker, a locked database,
# CUDA out of memory next to another job, a full disk) is retried.
DETERMINISTIC_ERRORS = (ValueError, TypeError, KeyError, AttributeError, FileNotFoundError,
                        ImportError, NotImplementedError)


def _transient(task, task_run, state) -> bool:
    exc = state.data
    while isinstance(exc, BaseException) and exc.__cause__ is not None:
        exc = exc.__cause__  # judge the original error, not a wrapper that names the reward
    return not isinstance(exc, DETERMINISTIC_ERRORS)


# log_prints=False on job tasks: a job's lines go straight to the terminal. Forwarded to Prefect's
# logger they would carry bytecode listings: the datasets library hashes through dill, which
# reads dis.dis output from a captured stdout, and Prefect's patched print logs it instead.
@task(cache_policy=NO_CACHE, retry_condition_fn=_transient, task_run_name="align-job-{weights}",
      log_prints=False)
def align_job(params: str, root: str, weights: list[float]) -> str:
    """One alignment job (or its finished member); returns the member key."""
    return stages.run_job(load_config(params), Path(root), weights).key


@flow(name="rewards", log_prints=True)
def rewards_flow(params: str = "params.yaml", root: str = ".") -> dict:
    return stages.rewards_stage(load_config(params), Path(root))


@flow(name="grid", log_prints=True)
def grid_flow(params: str = "params.yaml", root: str = ".") -> dict:
    return stages.grid_stage(load_config(params), Path(root))


@flow(name="align", log_prints=True)
def align_flow(params: str = "params.yaml", root: str = ".") -> dict:
    """Jobs run on the task runner params.yaml `runner` names (flows/runners.py), with retries.

    A batch waits for all its jobs: one that fails leaves the others to finish (and be kept)
    before its error is raised.
    """
    cfg, lay = load_config(params), Layout(Path(root))
    job = align_job.with_options(retries=cfg.runner.retries,
                                 retry_delay_seconds=cfg.runner.retry_delay_seconds)
    with task_runner(cfg) as runner:

        def run_jobs(weights: list[list[float]]):
            with job_resources(cfg):
                futures = [runner.submit(job, {"params": params, "root": root,
                                               "weights": [float(x) for x in w]})
                           for w in weights]
            for f in futures:
                f.wait()
            return [load_member(lay.member(f.result())) for f in futures]

        return stages.align_stage(cfg, Path(root), run_jobs)


@flow(name="soups", log_prints=True)
def soups_flow(params: str = "params.yaml", root: str = ".") -> dict:
    return stages.soups_stage(load_config(params), Path(root))


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
    "soups": soups_flow,
    "coverage": coverage_flow,
    "register": register_flow,
}
