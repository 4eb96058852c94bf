"""Stage register: the portfolio's members and the portfolio in the MLflow model registry.

Reads:  portfolio.json, models/members, models/soups, models/base; the params in PARAMS
Writes: registered model versions and aliases in the MLflow store (palm_tasks.registry),
        metrics/register.json
"""

from __future__ import annotations

from pathlib import Path

from palm_tasks import schema
from palm_tasks.config import PalmConfig
from palm_tasks.log import say, warn
from palm_tasks.paths import Paths

PARAMS = ("mlflow", "task", "traits", "coverage.share_lattice")
DEPS = ("portfolio.json", "models/members", "models/soups", "models/base")
OUTS = ()
METRICS = ("metrics/register.json",)
PLOTS = ()
RUNS_JOBS = False


def run(cfg: PalmConfig, root: Path, run_jobs=None) -> dict:
    from palm_tasks.registry import register_portfolio

    result = register_portfolio(cfg, root)
    schema.write(Paths(root).metrics / "register.json", result)
    say(f"register: portfolio {result['portfolio_id']} is version {result['portfolio_version']} "
        f"(alias {result['alias']}), {result['created']} new registry entries")
    if result.get("warning"):
        warn(result["warning"])
    return result
