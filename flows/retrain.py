"""The retraining flow `palm-retrain` and its schedule (a thin wrapper over palm_tasks.retrain).

`palm retrain` runs it once; `palm schedule --cron "0 3 * * 0"` serves it as a Prefect
deployment that runs on that schedule (`flow.serve`); prefect.yaml defines the same deployment
for a work pool. The flow holds the project lock, so a scheduled run never overlaps a
`palm run` on the same project: it fails at once saying who holds the lock.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.stages import align_job
from palm_tasks import retrain
from palm_tasks.align import load_member
from palm_tasks.config import ConfigError, load_config
from palm_tasks.layout import Layout
from palm_tasks.lock import project_lock

DEPLOYMENT = "palm-retrain-weekly"
DEFAULT_CRON = "0 3 * * 0"  # Sundays at 03:00


@flow(name="palm-retrain", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def retrain_flow(params: str = "params.yaml", root: str = ".") -> dict:
    """Refresh data, re-evaluate members, train only where the certificate fails, register."""
    cfg, lay = load_config(params), Layout(Path(root))

    def run_jobs(weights: list[list[float]]):
        futures = [align_job.submit(params, root, w) for w in weights]
        return [load_member(lay.member(f.result())) for f in futures]

    with project_lock(Path(root), "palm retrain"):
        return retrain.retrain(cfg, Path(root), run_jobs)


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
