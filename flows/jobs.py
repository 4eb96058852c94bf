"""The one way every flow runs jobs (train, soup, evaluate): a Prefect task on the task runner
params.yaml `runner` names (flows/runners.py), retried after transient errors only.

A job's caching is its key on disk (palm_tasks.jobs), not Prefect's result cache, so a job
finished by any earlier run, flow or `dvc repro` is reused. A batch waits for all its jobs: one
that fails leaves the others to finish (and be kept) before its error is raised.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.runners import job_resources, task_runner
from palm_tasks.config import PalmConfig
from palm_tasks.params_yaml import load_config
from palm_tasks.jobs import Job, RunJobs, run_job
from palm_tasks.log import progress
from palm_tasks.schema import Policy

# Errors that the same inputs raise again (bad values, missing files, bugs): retrying them only
# runs the job again to fail the same way. Anything else (a lost worker, a locked database,
# CUDA out of memory next to another job, a full disk) is retried.
DETERMINISTIC_ERRORS = (ValueError, TypeError, KeyError, AttributeError, FileNotFoundError,
                        ImportError, NotImplementedError)


def _transient(task, task_run, state) -> bool:
    exc = state.data
    while isinstance(exc, BaseException) and exc.__cause__ is not None:
        exc = exc.__cause__  # judge the original error, not a wrapper that names the reward
    return not isinstance(exc, DETERMINISTIC_ERRORS)


# log_prints=False: a job's lines go straight to the terminal. Forwarded to Prefect's logger they
# would carry bytecode listings: the datasets library hashes through dill, which reads dis.dis
# output from a captured stdout, and Prefect's patched print logs it instead.
@task(cache_policy=NO_CACHE, retry_condition_fn=_transient, task_run_name="{job[kind]}-job",
      log_prints=False)
def policy_job(params: str, root: str, job: dict) -> dict:
    """One job (or its finished result): the policy as JSON, with its directory."""
    policy = run_job(load_config(params), Path(root), Job.from_dict(job))
    return {**policy.to_json(), "path": str(policy.path)}


@contextmanager
def job_runner(cfg: PalmConfig, params: str, root: str) -> Iterator[RunJobs]:
    """run_jobs(list of Job) -> policies, on the configured task runner, for one flow's lifetime."""
    job = policy_job.with_options(retries=cfg.runner.retries,
                                  retry_delay_seconds=cfg.runner.retry_delay_seconds)
    with task_runner(cfg) as runner:

        def run_jobs(jobs: list[Job]) -> list[Policy]:
            with job_resources(cfg):
                futures = [runner.submit(job, {"params": params, "root": root, "job": j.to_dict()})
                           for j in jobs]
            for f in progress(futures, len(futures), "jobs"):
                f.wait()
            return [Policy.from_json(r, Path(r["path"])) for r in (f.result() for f in futures)]

        yield run_jobs
