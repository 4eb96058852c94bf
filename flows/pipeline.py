"""The whole PALM pipeline as one Prefect flow running the stage flows in order."""

from __future__ import annotations

from prefect import flow

from flows.stages import STAGE_FLOWS, record_in_dvc
from palm_tasks.stages import PIPELINE


@flow(name="palm-pipeline", log_prints=True)
def pipeline(params: str = "params.yaml", root: str = ".") -> dict:
    """rewards -> grid -> align -> soups -> coverage -> register; returns each stage's result.
    At the end, dvc.lock records the six stages (flows.stages.record_in_dvc), so `dvc status`
    finds them up to date."""
    result = {s.name: STAGE_FLOWS[s.name](params, root, record=False) for s in PIPELINE}
    record_in_dvc(root, [s.name for s in PIPELINE], params)
    return result
