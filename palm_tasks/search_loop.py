"""The lazy search as the pipeline runs it: built from params.yaml, its loop over jobs.

`search_from_config(cfg, bon, ...)` is the one place a `core.search.LazySearch` is wired from the
settings (tolerances, budget, repairs, noise) and the best-of-N reference; `search_loop` owns
the ask/tell loop: each round asks for up to runner.workers weights, runs their jobs through the
orchestrator's `run_jobs` and tells the search each measured value vector. The align stage, the
retraining run and the evaluate stage's PALM method all use both.
"""

from __future__ import annotations

import numpy as np

from palm_tasks.best_of_n import BestOfN
from palm_tasks.config import PalmConfig
from palm_tasks.core.search import LazySearch
from palm_tasks.jobs import Job, RunJobs
from palm_tasks.paths import Paths
from palm_tasks.schema import Policy


def search_from_config(cfg: PalmConfig, bon: BestOfN, initial: list[Policy] = ()) -> LazySearch:
    """The lazy search of params.yaml (coverage tolerances and noise, search budget and repairs)
    against best-of-N; `initial` policies count as oracle rows already trained (a retraining
    run's re-evaluated pool)."""
    c = cfg.coverage
    rows = {}
    if initial:
        rows = {"initial_weights": np.array([p.weights for p in initial]),
                "initial_values": np.array([p.values for p in initial]),
                "initial_std_errors": np.array([p.std_errors for p in initial])}
    return LazySearch(cfg.d, c.eps, c.delta, cfg.search.max_trainings, z=c.z, reference=bon,
                      max_repairs=cfg.search.max_repairs, z_significant=c.z_significant, **rows)


def search_loop(search: LazySearch, run_jobs: RunJobs, paths: Paths, initial=(), workers: int = 1,
                store: str = "models/members") -> list[Policy]:
    """Ask, train, tell until the search is done; the rows' policies (`initial`, the search's
    initial rows, first), then in the order they were first trained; a repaired row holds the
    better of its trainings.

    Each round asks the search for up to `workers` weights (runner.workers; docs/search.md,
    parallel proposals), runs them through run_jobs at once and tells each result. `store`: where
    new policies go (the evaluate stage keeps its own)."""
    rows: list[Policy] = list(initial)
    while batch := search.ask_batch(workers):
        pending = search.pending_all[:len(batch)]
        jobs = []
        for w, todo in zip(batch, pending):
            if todo["source"] == "repair":
                row, by = todo["row"], todo["by"]
                start = rows[by] if by >= 0 else rows[row]
                jobs.append(Job.train(w, store=store, init_from=paths.relative(start.path),
                                      attempt=search.repairs[row] + 1))
            else:
                jobs.append(Job.train(w, store=store))
        policies = run_jobs(jobs)
        for w, todo, policy in zip(batch, pending, policies):
            step = search.tell(w, policy.values, policy.std_errors)
            if todo["source"] != "repair":
                rows.append(policy)
            elif step["kept"] == "new":
                rows[todo["row"]] = policy
            step["key"] = policy.key
    return rows
