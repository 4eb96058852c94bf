"""Stage align: train the policies the search asks for (docs/theory.md section 5).

Reads:  data/grid.json, data/prompts, models/base, models/rewards; the params in PARAMS
Writes: models/members/<key>/ (one finished job each, reused by every later run with the same
        key), data/pool.json (schema.Pool of the trained policies, in search order),
        metrics/align.json

The lazy search is an ask/tell object (core.search.LazySearch): this stage owns the loop, asks
for the next weight, runs the job through `run_jobs` (the orchestrator's runner) and tells the
search the measured value vector. The other modes train a fixed set of weights as one batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from palm_tasks import schema
from palm_tasks.config import PalmConfig
from palm_tasks.core import grid as gridlib
from palm_tasks.core import simplex
from palm_tasks.core.search import LazySearch
from palm_tasks.jobs import Job, RunJobs, remove_half_written, run_here
from palm_tasks.log import say
from palm_tasks.paths import Paths
from palm_tasks.schema import Policy, Pool

PARAMS = ("task", "traits", "seed", "device", "data", "search", "training", "evaluation", "rewards",
          "coverage.eps", "coverage.delta", "coverage.z")
DEPS = ("data/grid.json", "data/prompts", "models/base", "models/rewards")
OUTS = ("models/members", "data/pool.json")
METRICS = ("metrics/align.json",)
PLOTS = ()
RUNS_JOBS = True


def run(cfg: PalmConfig, root: Path, run_jobs: RunJobs | None = None) -> dict:
    run_jobs = run_jobs or run_here(cfg, root)
    paths = Paths(root)
    remove_half_written(paths.members)
    finished_before = {p.name for p in paths.members.glob("*")} if paths.members.is_dir() else set()
    history = {}
    if cfg.search.mode == "lazy":
        search = LazySearch(cfg.d, cfg.coverage.eps, cfg.coverage.delta, cfg.search.max_trainings,
                            z=cfg.coverage.z)
        policies = search_loop(search, run_jobs)
        history = {"stopped": search.stopped, "steps": search.history}
    else:
        weights = mode_weights(cfg)
        if len(weights) > cfg.search.max_trainings:
            raise ValueError(
                f"search.mode = {cfg.search.mode!r} asks for {len(weights)} trainings, more than "
                f"search.max_trainings = {cfg.search.max_trainings}; raise the budget or use search.mode: lazy")
        policies = run_jobs([Job.train(w) for w in weights])
    reused = sum(p.key in finished_before for p in policies)
    pool = Pool(kind="trained", mode=cfg.search.mode, policies=tuple(policies), history=history,
                trained=len(policies) - reused, reused=reused)
    schema.write(paths.pool, pool)
    metrics = {"mode": pool.mode, "jobs": len(policies), "trained": pool.trained, "reused": pool.reused,
               "stopped": history.get("stopped", "")}
    schema.write(paths.metrics / "align.json", metrics)
    say(f"align: pool of {len(policies)} policies ({cfg.search.mode} search)")
    return metrics


def search_loop(search: LazySearch, run_jobs: RunJobs) -> list[Policy]:
    """Ask, train, tell until the search is done; the policies in the order they were trained."""
    policies = []
    while (w := search.ask()) is not None:
        (policy,) = run_jobs([Job.train(w)])
        search.tell(w, policy.values, policy.std_errors)
        policies.append(policy)
    return policies


def mode_weights(cfg: PalmConfig) -> np.ndarray:
    """The weights a non-lazy search mode trains."""
    s, d = cfg.search, cfg.d
    if s.mode == "coarse":
        w = np.vstack([simplex.extreme_weights(d), simplex.simplex_lattice(d, s.coarse_divisions)])
        return np.unique(w.round(12), axis=0)
    if s.mode == "grid":
        return gridlib.palm_grid(d, cfg.coverage.eps, cfg.coverage.delta)
    if s.mode == "uniform":
        return simplex.uniform_weights(d, s.k)
    if s.mode == "random":
        return simplex.random_weights(d, s.k, cfg.seed)
    raise ValueError(f"search.mode = {s.mode!r}: unknown")
