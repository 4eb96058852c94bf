"""The lazy search as the pipeline runs it: built from params.yaml, its loop over jobs.

`search_from_config(cfg, bon, ...)` is the one place a `core.search.LazySearch` is wired from the
settings (tolerances, budget, repairs, noise) and the best-of-N reference; `search_loop` owns
the ask/tell loop: each round asks for up to runner.workers weights, runs their jobs through the
orchestrator's `run_jobs` and tells the search each measured value vector. The align stage, the
retraining run and the evaluate stage's PALM method all use both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from palm_tasks import gate
from palm_tasks.best_of_n import BestOfN, paired_evidence
from palm_tasks.config import PalmConfig
from palm_tasks.core.search import LazySearch
from palm_tasks.jobs import Job, RunJobs
from palm_tasks.paths import Paths
from palm_tasks.schema import Policy


def search_from_config(cfg: PalmConfig, bon: BestOfN, initial: list[Policy] = ()) -> LazySearch:
    """The lazy search of params.yaml (tolerances, budget, repairs) certifying at confidence
    1 - coverage.alpha against best-of-N; `initial` policies (with their per-prompt tables) count
    as oracle rows already trained (a retraining run's re-measured pool), servable as they pass
    the quality gate (palm_tasks.gate)."""
    rows = {}
    if initial:
        servable = gate.rule(cfg, bon.samples)
        rows = {"initial_weights": np.array([p.weights for p in initial]),
                "initial_values": np.array([p.values for p in initial]),
                "initial_std_errors": np.array([p.std_errors for p in initial]),
                "initial_tables": [p.scores.scores for p in initial],
                "initial_servable": [servable(p) for p in initial]}
    return LazySearch(cfg.d, cfg.coverage.eps, cfg.coverage.delta, cfg.search.max_trainings, reference=bon,
                      max_repairs=cfg.search.max_repairs, repair_beaten=cfg.search.repair_beaten,
                      paired=paired_evidence(cfg, bon), **rows)


@dataclass
class SearchRun:
    """What search_loop did. rows: the rows' policies, `initial` first, then in the order they
    were first trained (a repaired row holds the better of its trainings); prompts: what each
    policy the search saw was measured on, by key (a repair not kept included: its measurement
    was spent); cost: after each training, the trainings, rows, answers measured and seconds
    since the loop began (the price of precision against compute, docs/theory.md section 14)."""
    rows: list[Policy]
    prompts: dict[str, int]
    cost: list[dict] = field(default_factory=list)

    def answers(self, per_prompt: int) -> int:
        return sum(self.prompts.values()) * per_prompt


def search_loop(search: LazySearch, run_jobs: RunJobs, paths: Paths, initial=(), workers: int = 1,
                store: str = "models/members", servable: Callable[[Policy], bool] | None = None,
                warm_start: bool = False) -> SearchRun:
    """Measure, ask, train, tell until the search is done (SearchRun).

    Before each proposal the rows of the certificate's open decisions are measured on more
    prompts, a planned look at a time, while none fails and each is below the cap
    (LazySearch.evaluation_needed, docs/theory.md section 13). Each round then asks the search
    for up to `workers` weights (runner.workers; docs/search.md, parallel proposals), runs them
    through run_jobs at once and tells each result. `store`: where new policies go (the evaluate
    stage keeps its own). `servable`: policy -> whether it passes the quality gate (gate.rule;
    None: every policy), told with each measurement, so that the search certifies with members
    that may be served. warm_start (search.warm_start): a new weight's job (every one but the
    first extreme) starts from the adapter of the servable row whose value at that weight is the
    best told (a repair always starts from the row that beat it)."""
    servable = servable or (lambda policy: True)
    rows: list[Policy] = list(initial)
    run = SearchRun(rows, {p.key: _prompts(p) for p in rows})
    prompts, started = run.prompts, time.time()
    per_prompt = rows[0].scores.answers_per_prompt if rows and rows[0].scores is not None else 0
    while True:
        while need := search.evaluation_needed():
            order = sorted(need)
            measured = run_jobs([Job.evaluate(paths.relative(rows[r].path), need[r], store=store) for r in order])
            for r, policy in zip(order, measured):
                rows[r] = policy
                prompts[policy.key] = policy.scores.prompts
                search.update(r, policy.scores.scores, servable=servable(policy))
        batch = search.ask_batch(workers)
        if not batch:
            return run
        pending = search.pending_all[:len(batch)]
        jobs = []
        for w, todo in zip(batch, pending):
            if todo["source"] == "repair":
                row, by = todo["row"], todo["by"]
                start = rows[by] if by >= 0 else rows[row]
                jobs.append(Job.train(w, store=store, init_from=paths.relative(start.path),
                                      attempt=search.repairs[row] + 1))
            elif warm_start and (served := [p for p in rows if servable(p)]):
                # the servable row best at w, extremes after the first included: measured to
                # certify with fewer rounds and a tighter bound than fresh extremes (docs/search.md)
                best = served[int(np.argmax([p.values @ np.asarray(w, float) for p in served]))]
                jobs.append(Job.train(w, store=store, init_from=paths.relative(best.path)))
            else:
                jobs.append(Job.train(w, store=store))
        policies = run_jobs(jobs)
        for w, todo, policy in zip(batch, pending, policies):
            prompts[policy.key] = max(prompts.get(policy.key, 0), _prompts(policy))
            if search.paired is None:  # a search on value vectors alone (exact oracles, benchmarks)
                step = search.tell(w, policy.values, policy.std_errors)
            else:
                step = search.tell(w, scores=policy.scores.scores, servable=servable(policy))
            if todo["source"] != "repair":
                rows.append(policy)
            elif step["kept"] == "new":
                rows[todo["row"]] = policy
            step["key"] = policy.key
            step["prompts"] = _prompts(policy)
            per_prompt = policy.scores.answers_per_prompt if policy.scores is not None else 0
            run.cost.append({"trainings": search.trainings, "rows": len(search.W),
                             "answers": sum(prompts.values()) * per_prompt, "seconds": round(time.time() - started, 1)})


def _prompts(policy: Policy) -> int:
    """The evaluation prompts a policy was measured on (0 for one told by value alone)."""
    return policy.scores.prompts if getattr(policy, "scores", None) is not None else 0
