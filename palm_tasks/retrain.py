"""A scheduled retraining run: keep the portfolio certified while training as little as possible.

Rewards change, prompt data grows (or `data.split_seed` draws a new split), the base model is
updated. The retraining flow (flows/retrain.py) then runs the rewards and grid stages, and here:

1. `previous`: what the last run left (portfolio, pool);
2. `refresh_pool`: re-measures every policy of the previous pool under the current rewards and
   eval prompts (evaluate jobs: its first evaluation.min_prompts prompts, chunks stored beside
   each policy under evaluations/<evaluation key>/, so a policy keeps the key that names what it
   was *trained* on), then runs the lazy search starting from them: the rows of its open
   decisions are measured further, and if the certificate holds nothing is trained, otherwise
   only the weights where it fails. The pool it writes (data/pool.json) carries the new values;
3. the flow runs the soups and coverage stages; `summarize` says what was kept, added and
   dropped and why, with the reward drift per trait; the flow registers (`production` moves only
   to a certified portfolio), records the outputs in dvc.lock (`dvc_commit`) and logs a `retrain`
   MLflow run.

A changed base model invalidates every policy (an adapter belongs to the weights it was
trained on, and the job key changes with them): they are all dropped, the summary says so, and
the search starts from scratch.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from palm_tasks import gate, schema
from palm_tasks.best_of_n import BestOfN
from palm_tasks.config import PalmConfig
from palm_tasks.jobs import Job, JobContext, RunJobs, find_finished
from palm_tasks.log import say, warn
from palm_tasks.paths import Paths
from palm_tasks.schema import ArtifactError, Pool
from palm_tasks.portfolio import Portfolio
from palm_tasks.search_loop import search_from_config, search_loop


@dataclass(frozen=True)
class Previous:
    """The portfolio and pool as the last run left them (empty if none)."""

    portfolio: Portfolio | None
    pool_keys: list[str]
    values: dict[str, np.ndarray]  # value vector each pool policy counted with


@dataclass
class Refresh:
    """What refresh_pool did."""

    eval_key: str
    reward_versions: dict
    base_changed: bool = False
    invalid: dict = field(default_factory=dict)  # key -> why it is no longer a pool policy
    reevaluated: dict = field(default_factory=dict)  # key -> new value vector
    trained: list = field(default_factory=list)  # keys trained by this run
    stopped: str = ""


def previous(root: Path) -> Previous:
    paths = Paths(root)
    portfolio = None
    if paths.portfolio.is_file():
        try:
            portfolio = schema.read(paths.portfolio, Portfolio, "coverage")
        except ArtifactError as exc:
            warn(f"retrain: the previous portfolio cannot be read ({exc}); starting without it")
    if not paths.pool.is_file():
        return Previous(portfolio, [], {})
    try:
        pool = schema.read(paths.pool, Pool, "align")
    except ArtifactError as exc:
        warn(f"retrain: the previous pool cannot be read ({exc}); starting from scratch")
        return Previous(portfolio, [], {})
    return Previous(portfolio, pool.keys, {p.key: p.values for p in pool.policies})


def refresh_pool(cfg: PalmConfig, root: Path, run_jobs: RunJobs, before: Previous) -> Refresh:
    """Re-evaluate the previous pool, search from it, write data/pool.json (module docstring)."""
    paths, ctx = Paths(root), JobContext(cfg, root)
    out = Refresh(eval_key=ctx.evaluation_key(), reward_versions=dict(zip(cfg.traits, ctx.reward_versions)))
    kept = []
    for key in before.pool_keys:
        policy = find_finished(paths.members, key)  # a damaged one is named and removed here
        if policy is None:
            out.invalid[key] = "its files are missing or damaged"
        elif policy.base_model_sha256 != ctx.base_sha:
            out.base_changed = True
            out.invalid[key] = (f"the base model changed (weights {str(policy.base_model_sha256)[:12]} -> "
                                f"{ctx.base_sha[:12]}): its adapter belongs to the old one")
        elif list(policy.traits) != list(cfg.traits):
            out.invalid[key] = f"the traits changed ({list(policy.traits)} -> {cfg.traits})"
        else:
            kept.append(policy)
    if out.base_changed:
        warn("retrain: the base model changed: every existing policy is invalid "
             "(their keys change with it); retraining from scratch")
    say(f"retrain: re-evaluating {len(kept)} existing policies under the current rewards")
    first = cfg.evaluation.first_prompts
    kept = run_jobs([Job.evaluate(paths.relative(p.path), first) for p in kept]) if kept else []
    out.reevaluated = {p.key: p.values for p in kept}

    bon = BestOfN(schema.load_samples(root), cfg.training.min_relevance)
    search = search_from_config(cfg, bon, initial=kept)
    started = time.time()
    run = search_loop(search, run_jobs, paths, initial=kept, workers=cfg.runner.workers,
                      servable=gate.rule(cfg, bon.samples), warm_start=cfg.search.warm_start)
    rows = run.rows
    new = [p for p in rows if p.key not in {k.key for k in kept}]
    # Trained by this run = written by it (a policy found finished on disk is older).
    out.trained = [p.key for p in new if (p.path / "member.json").stat().st_mtime >= started]
    out.stopped = search.stopped
    schema.write(paths.pool, Pool(kind="trained", mode="retrain", policies=tuple(rows),
                                  history={"stopped": search.stopped, "steps": search.history,
                                           "eval_key": out.eval_key, "cost": run.cost},
                                  trained=len(out.trained), reused=len(new) - len(out.trained)))
    return out


def summarize(cfg: PalmConfig, root: Path, before: Previous, refresh: Refresh) -> dict:
    """What changed and why, after the coverage stage has chosen the new portfolio."""
    paths = Paths(root)
    portfolio = schema.read(paths.portfolio, Portfolio, "coverage")
    pool = schema.read(paths.pool, Pool, "align")
    common = [k for k in refresh.reevaluated if k in before.values]
    drift = {t: float(np.mean([refresh.reevaluated[k][i] - before.values[k][i] for k in common])) if common else 0.0
             for i, t in enumerate(cfg.traits)}
    was = {m.key for m in before.portfolio.members} if before.portfolio else set()
    now = [m.key for m in portfolio.members]
    pruned = "pruned: the other members cover its weights under the current values"

    def why_added(key: str) -> str:
        if key in refresh.trained:
            return "trained where the certificate failed"
        if key in refresh.reevaluated:
            return "an existing member, needed under the current values"
        if key in pool.keys:
            return "trained by an earlier run for this weight, now needed"
        return "a soup (weight-space mix) of pool members, built by the soups stage"

    summary = {
        "previous_portfolio": before.portfolio.id if before.portfolio else None,
        "portfolio": portfolio.id,
        "certified": portfolio.certificate.certified,
        "max_eps": portfolio.certificate.max_eps,
        "base_model_changed": refresh.base_changed,
        "eval_key": refresh.eval_key,
        "data_split_seed": cfg.seed if cfg.data.split_seed is None else cfg.data.split_seed,
        "reward_versions": refresh.reward_versions,
        "reward_drift": drift,
        "reevaluated": sorted(refresh.reevaluated),
        "kept": [k for k in now if k in was],
        "added": {k: why_added(k) for k in now if k not in was},
        "dropped": {k: refresh.invalid.get(k, pruned) for k in sorted(was) if k not in now},
        "invalid": refresh.invalid,
        "trained": refresh.trained,
        "search_stopped": refresh.stopped,
    }
    say(f"retrain: kept {len(summary['kept'])}, added {len(summary['added'])}, dropped "
        f"{len(summary['dropped'])}, trained {len(refresh.trained)}; reward drift "
        + ", ".join(f"{t} {v:+.3f}" for t, v in drift.items()))
    return summary


def dvc_commit(root: Path) -> str:
    """Record the retraining run's outputs in dvc.lock, in projects that `dvc repro` runs.

    Registration is done by now, so a failure here is reported, not raised: nothing is lost,
    and `dvc commit -f rewards grid align soups coverage register` (and `evaluate`) by hand does the same.
    """
    if not (Path(root) / "dvc.lock").is_file():
        return "skipped: no dvc.lock (the pipeline was not run with dvc repro)"
    import yaml

    from palm_tasks.stages import EVALUATE, PIPELINE

    # the pipeline's stages, and evaluate only where dvc.lock already records it: after a
    # `palm run` (which writes dvc.lock too) evaluate's outputs may not exist, which fails a
    # `dvc commit -f` of every stage
    names = [s.name for s in PIPELINE]
    try:
        recorded = (yaml.safe_load((Path(root) / "dvc.lock").read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        recorded = {}
    if EVALUATE.name in recorded:
        names.append(EVALUATE.name)
    proc = subprocess.run([sys.executable, "-m", "dvc", "commit", "-f", *names], cwd=root,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip()[-500:]
        warn(f"retrain: dvc commit failed ({message}); run `dvc commit -f` by hand")
        return f"failed: {message}"
    return "done"
