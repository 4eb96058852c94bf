"""The whole PALM pipeline as one Prefect flow running the stage flows in order."""

from __future__ import annotations

import time

from prefect import flow

from flows.stages import STAGE_FLOWS, record_in_dvc
from palm_tasks.stages import PIPELINE


@flow(name="palm-pipeline", log_prints=True)
def pipeline(params: str = "params.yaml", root: str = ".") -> dict:
    """rewards -> grid -> align -> soups -> coverage -> register; returns each stage's result and
    `seconds`, each stage's wall time (a finished stage's work is reused: seconds, not minutes).
    At the end, dvc.lock records the six stages (flows.stages.record_in_dvc), so `dvc status`
    finds them up to date."""
    result, seconds = {}, {}
    for s in PIPELINE:
        started = time.time()
        result[s.name] = STAGE_FLOWS[s.name](params, root, record=False)
        seconds[s.name] = round(time.time() - started, 1)
    started = time.time()
    record_in_dvc(root, [s.name for s in PIPELINE], params)
    seconds["dvc commit"] = round(time.time() - started, 1)
    return {**result, "seconds": seconds}
