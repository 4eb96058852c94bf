"""The whole PALM pipeline as one Prefect flow running the stage flows in order."""

from __future__ import annotations

from prefect import flow

from flows.stages import STAGE_FLOWS
from palm_tasks.stages import PIPELINE


@flow(name="palm-pipeline", log_prints=True)
def pipeline(params: str = "params.yaml", root: str = ".") -> dict:
    """rewards -> grid -> align -> soups -> coverage -> register; returns each stage's result."""
    return {s.name: STAGE_FLOWS[s.name](params, root) for s in PIPELINE}
