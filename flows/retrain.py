"""The retraining flow `palm-retrain` and its schedule (a thin wrapper over palm_tasks.retrain).

`palm retrain` runs it once; `palm schedule --cron "0 3 * * 0"` serves it as a Prefect
deployment that runs on that schedule (`flow.serve`); prefect.yaml defines the same deployment
for a work pool. The flow holds the project lock, so a scheduled run never overlaps a
`palm run` on the same project: it fails at once saying who holds the lock.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.jobs import job_runner
from flows.stages import STAGE_FLOWS
from palm_tasks import retrain, schema
from palm_tasks.config import ConfigError
from palm_tasks.params_yaml import load_config
from palm_tasks.lock import project_lock
from palm_tasks.paths import Paths
from palm_tasks.tracking import log_retrain_run

DEPLOYMENT = "palm-retrain-weekly"
DEFAULT_CRON = "0 3 * * 0"  # Sundays at 03:00


@flow(name="palm-retrain", log_prints=True)
def retrain_flow(params: str = "params.yaml", root: str = ".") -> dict:
    """Refresh data, re-evaluate the pool, train only where the certificate fails, register."""
    cfg = load_config(params)
    with project_lock(Path(root), "palm retrain"):
        before = retrain.previous(Path(root))
        for name in ("rewards", "grid"):
            STAGE_FLOWS[name](params, root)
        with job_runner(cfg, params, root) as run_jobs:
            refresh = retrain.refresh_pool(cfg, Path(root), run_jobs, before)
        for name in ("soups", "coverage"):
            STAGE_FLOWS[name](params, root)
        summary = retrain.summarize(cfg, Path(root), before, refresh)
        summary["register"] = STAGE_FLOWS["register"](params, root)
        summary["dvc_commit"] = retrain.dvc_commit(Path(root))
        summary["mlflow_run_id"] = log_retrain_run(cfg, Path(root), summary)
        schema.write(Paths(Path(root)).metrics / "retrain.json", summary)
        return summary


def check_cron(cron: str) -> str:
    """The cron string, or ConfigError saying what a cron expression looks like."""
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValueError:
        raise ConfigError(f"--cron {cron!r}: not a cron expression; five fields "
                          "'minute hour day-of-month month day-of-week', e.g. \"0 3 * * 0\" "
                          "(Sundays 03:00)") from None
    return cron


def deployment(cron: str = DEFAULT_CRON, params: str = "params.yaml", root: str = ".",
               name: str = DEPLOYMENT):
    """The scheduled deployment of retrain_flow (what `palm schedule` serves)."""
    return retrain_flow.to_deployment(name=name, cron=check_cron(cron),
                                      parameters={"params": params, "root": root})


def serve(cron: str = DEFAULT_CRON, params: str = "params.yaml", root: str = ".",
          name: str = DEPLOYMENT) -> None:
    """Serve the deployment until interrupted: runs retrain_flow on the cron schedule."""
    retrain_flow.serve(name=name, cron=check_cron(cron),
                       parameters={"params": params, "root": root})
