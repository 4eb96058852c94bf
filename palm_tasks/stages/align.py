"""Stage align: train the policies the search asks for (docs/theory.md section 5).

Reads:  data/grid.json, data/prompts, data/samples, models/base, models/rewards; the params in PARAMS
Writes: models/members/<key>/ (one finished job each, reused by every later run with the same
        key), data/pool.json (schema.Pool of the trained policies, in search order),
        metrics/align.json (numbers, the seconds of each phase among them), metrics/align.details.json
        (with the mode, why the search stopped and each training's cost: palm_tasks/cost.py)

The lazy search is an ask/tell object (core.search.LazySearch): this stage owns the loop, asks
for up to runner.workers weights per round (parallel proposals, docs/search.md), runs their jobs
at once through `run_jobs` (the orchestrator's runner) and tells the search each measured value
vector. The search sees the best-of-N reference of the base's sample
pool (docs/evidence.md): its certificate uses it, and a row the evidence beats at its own weight
is repaired (docs/theory.md section 9): trained again at that weight, another seed, starting
from the policy that beat it (or from itself when best-of-N did), keeping the better of the two.
The other modes train a fixed set of weights as one batch, without repair.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from palm_tasks import cost, gate, schema
from palm_tasks.best_of_n import BestOfN
from palm_tasks.config import PalmConfig
from palm_tasks.core import grid as gridlib
from palm_tasks.core import simplex
from palm_tasks.dvc_metrics import write_metrics
from palm_tasks.jobs import Job, RunJobs, remove_half_written, run_here
from palm_tasks.log import say, warn
from palm_tasks.paths import Paths
from palm_tasks.schema import Pool
from palm_tasks.search_loop import search_from_config, search_loop

PARAMS = ("task", "traits", "seed", "device", "precision", "data", "search", "training", "evaluation", "rewards",
          "evidence", "coverage.eps", "coverage.delta", "coverage.alpha",
          "runner.workers")  # runner.workers: the weights asked per round, so which weights are trained
DEPS = ("custom", "data/grid.json", "data/prompts", "data/samples", "models/base", "models/rewards")
OUTS = ("models/members", "data/pool.json", "metrics/align.details.json")
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
        bon = BestOfN(schema.load_samples(root), cfg.training.min_relevance)
        search = search_from_config(cfg, bon)
        run_ = search_loop(search, run_jobs, paths, workers=cfg.runner.workers, servable=gate.rule(cfg, bon.samples),
                           warm_start=cfg.search.warm_start)
        policies, prompts = run_.rows, run_.prompts
        result = search.result()
        history = {"stopped": search.stopped, "steps": search.history, "beaten": result.beaten,
                   "rounds": search.rounds, "certificate": summary_of(result.full_certificate),
                   "cost": run_.cost}
        if result.beaten:
            warn(f"align: {len(result.beaten)} trained row(s) still beaten by the evidence after repair: " + "; ".join(
                f"w={_fmt(b['weight'])} short by {b['shortfall']:.3f} (interval +- {b['se']:.3f})"
                for b in result.beaten))
    else:
        weights = mode_weights(cfg)
        if len(weights) > cfg.search.max_trainings:
            raise ValueError(
                f"search.mode = {cfg.search.mode!r} asks for {len(weights)} trainings, more than "
                f"search.max_trainings = {cfg.search.max_trainings}; raise the budget or use search.mode: lazy")
        trained = run_jobs([Job.train(w) for w in weights])
        # no search decides where precision is needed: every policy is measured up to the cap
        policies = run_jobs([Job.evaluate(paths.relative(p.path), cfg.evaluation.n_prompts) for p in trained])
        prompts = {p.key: p.scores.prompts for p in policies}
    answers = sum(prompts.values()) * cfg.evaluation.samples_per_prompt
    history = {**history, "answers_evaluated": answers}  # replaced rows included: the run's cost
    reused = sum(p.key in finished_before for p in policies)
    pool = Pool(kind="trained", mode=cfg.search.mode, policies=tuple(policies), history=history,
                trained=len(policies) - reused, reused=reused)
    schema.write(paths.pool, pool)
    # every job of this search is stored: round checkpoints left are of jobs it no longer asks for
    shutil.rmtree(paths.round_checkpoints, ignore_errors=True)
    steps = history.get("steps", [])
    # every training's phases, replaced repairs included (palm_tasks/cost.py)
    costs = ([cost.job_cost(paths.members / h["key"], h["source"]) for h in steps if "key" in h] if steps
             else [cost.job_cost(p.path) for p in policies])
    metrics = {"mode": pool.mode, "jobs": len(policies), "trained": pool.trained, "reused": pool.reused,
               "trainings": len(steps) or len(policies),
               "rounds": history.get("rounds", 1 if policies else 0),  # lazy: batches of runner.workers jobs
               "repairs": sum(h["source"] == "repair" for h in steps),
               "repairs_kept": sum(h.get("kept") == "new" for h in steps),
               "still_beaten": len(history.get("beaten", [])),
               "answers_evaluated": answers,
               "prompts_per_policy": {p.key: prompts[p.key] for p in policies},
               "stopped": history.get("stopped", ""),
               "seconds": cost.totals(costs), "tokens": cost.totals(costs, "tokens"), "cost": costs}
    write_metrics(root, METRICS[0], {k: v for k, v in metrics.items() if k != "prompts_per_policy"},
                  details=metrics)  # mode, stopped, prompts per policy, each job's cost: details only
    say(f"align: pool of {len(policies)} policies ({cfg.search.mode} search)")
    return metrics


def summary_of(cert) -> dict:
    """The search's last certificate of every row, without its corner lists (portfolio.json
    holds the pruned portfolio's in full)."""
    if cert is None:
        return {}
    data = cert.to_dict()
    return {k: data[k] for k in ("certified", "alpha", "max_eps", "split") if k in data} | {
        "open_at_cap": getattr(cert, "open_at_cap", [])}


def _fmt(x) -> str:
    return "(" + ", ".join(f"{v:.2f}" for v in x) + ")"


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
