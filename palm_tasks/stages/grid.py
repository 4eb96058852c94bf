"""Stage grid: the PALM grid of docs/theory.md section 2, its proven size bound, baseline weights.

Reads:  the params in PARAMS
Writes: data/grid.json (the grid points, or only their number when there are more than
        MAX_GRID_POINTS_STORED; the uniform and random weights of search.k),
        metrics/grid.json
"""

from __future__ import annotations

from pathlib import Path

from palm_tasks import schema
from palm_tasks.config import PalmConfig
from palm_tasks.core import grid as gridlib
from palm_tasks.core import simplex
from palm_tasks.dvc_metrics import write_metrics
from palm_tasks.log import say
from palm_tasks.paths import Paths

PARAMS = ("traits", "coverage.eps", "coverage.delta", "search.k", "seed")
DEPS = ()
OUTS = ("data/grid.json",)
METRICS = ("metrics/grid.json",)
PLOTS = ()
RUNS_JOBS = False
MAX_GRID_POINTS_STORED = 200_000  # millions of points at d >= 4: the file then records the size only


def run(cfg: PalmConfig, root: Path, run_jobs=None) -> dict:
    d, eps, delta, k = cfg.d, cfg.coverage.eps, cfg.coverage.delta, cfg.search.k
    if delta == 0:
        return _no_grid(cfg, Paths(root))
    points = gridlib.palm_grid(d, eps, delta)
    bound = gridlib.grid_size_bound(d, eps, delta)
    paths = Paths(root)
    schema.write(paths.grid, {
        "traits": cfg.traits, "eps": eps, "delta": delta, "size": int(len(points)), "bound": int(bound),
        "points": points.round(9).tolist() if len(points) <= MAX_GRID_POINTS_STORED else None,
        "uniform": simplex.uniform_weights(d, k).round(9).tolist(),
        "random": simplex.random_weights(d, k, cfg.seed).round(9).tolist(),
    })
    metrics = {"grid_size": int(len(points)), "grid_size_bound": int(bound)}
    write_metrics(root, METRICS[0], metrics)
    say(f"grid: {len(points)} PALM grid points (proven bound {bound}) for d={d}, eps={eps}, delta={delta}")
    return metrics


def _no_grid(cfg: PalmConfig, paths: Paths) -> dict:
    """delta = 0: there is no finite PALM grid (docs/guarantee.md), only the baseline weights.
    The lazy search certifies at delta = 0 without one; search.mode grid is refused in params."""
    d, k = cfg.d, cfg.search.k
    schema.write(paths.grid, {
        "traits": cfg.traits, "eps": cfg.coverage.eps, "delta": 0.0, "size": None, "bound": None, "points": None,
        "note": "delta = 0: no finite PALM grid",
        "uniform": simplex.uniform_weights(d, k).round(9).tolist(),
        "random": simplex.random_weights(d, k, cfg.seed).round(9).tolist(),
    })
    metrics = {"grid_size": None, "grid_size_bound": None}
    write_metrics(paths.root, METRICS[0], metrics)
    say("grid: no PALM grid at delta = 0 (it would be infinite); the lazy search needs none")
    return metrics
