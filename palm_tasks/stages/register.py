"""Stage register: the portfolio's members and the portfolio in the MLflow model registry.

Reads:  portfolio.json, models/members, models/soups, models/base; the params in PARAMS
Writes: registered model versions and aliases in the MLflow store (palm_tasks.registry),
        metrics/register.json (numbers: portfolio version, new registry entries, members,
        production), metrics/register.details.json (the whole result: portfolio id, alias,
        member versions, warning)
"""

from __future__ import annotations

from pathlib import Path

from palm_tasks.config import PalmConfig
from palm_tasks.dvc_metrics import write_metrics
from palm_tasks.log import say, warn

PARAMS = ("mlflow", "task", "traits", "coverage.share_lattice")
DEPS = ("portfolio.json", "models/members", "models/soups", "models/base")
OUTS = ("metrics/register.details.json",)
METRICS = ("metrics/register.json",)
PLOTS = ()
RUNS_JOBS = False


def figures(result: dict) -> dict:
    """The numbers of a registration for `dvc metrics show`."""
    return {"portfolio_version": int(result["portfolio_version"]), "created": result["created"],
            "members": len(result["member_versions"]), "production": result["alias"] == "production"}


def run(cfg: PalmConfig, root: Path, run_jobs=None) -> dict:
    from palm_tasks.registry import register_portfolio

    result = register_portfolio(cfg, root)
    write_metrics(root, METRICS[0], figures(result), details=result)
    say(f"register: portfolio {result['portfolio_id']} is version {result['portfolio_version']} "
        f"(alias {result['alias']}), {result['created']} new registry entries")
    if result.get("warning"):
        warn(result["warning"])
    return result
