"""Stage soups: Rewarded-Soups candidates, interpolated adapters of the d specialists, evaluated.

Reads:  data/pool.json, models/members, models/base, models/rewards, data/prompts; the params in PARAMS
Writes: models/soups/<key>/ (like a trained policy, kind "soup"), data/soups.json (schema.Pool
        of the soups; empty, with the reason, when soups are off or a specialist is missing),
        metrics/soups.json

A soup is a free candidate (docs/theory.md section 5): it may serve users, never bounds OPT.
"""

from __future__ import annotations

from pathlib import Path

from palm_tasks import schema
from palm_tasks.config import PalmConfig
from palm_tasks.dvc_metrics import write_metrics
from palm_tasks.jobs import Job, RunJobs, remove_half_written, run_here
from palm_tasks.llm.soups import soup_lambdas, specialists
from palm_tasks.log import say
from palm_tasks.paths import Paths
from palm_tasks.schema import Pool, load_pool

PARAMS = ("task", "traits", "seed", "device", "precision", "data", "training", "evaluation", "rewards", "soups")
DEPS = ("custom", "data/pool.json", "models/members", "models/base", "models/rewards", "data/prompts")
OUTS = ("models/soups", "data/soups.json")
METRICS = ("metrics/soups.json",)
PLOTS = ()
RUNS_JOBS = True


def run(cfg: PalmConfig, root: Path, run_jobs: RunJobs | None = None) -> dict:
    paths = Paths(root)
    paths.soups.mkdir(parents=True, exist_ok=True)  # a DVC output, even when empty
    remove_half_written(paths.soups)
    ingredients = specialists(list(load_pool(root).policies), cfg.d)
    note = None
    if not cfg.soups.enabled or cfg.soups.max_soups == 0:
        note = "soups.enabled is false or soups.max_soups is 0"
    elif ingredients is None:
        note = "the pool lacks a specialist (w = e_i) for some trait: soups mix the d specialists"
    soups = []
    if note is None:
        finished_before = {p.name for p in paths.soups.glob("*")}
        dirs = [paths.relative(m.path) for m in ingredients]
        soups = (run_jobs or run_here(cfg, root))(
            [Job.soup(dirs, lam) for lam in soup_lambdas(cfg.d, cfg.soups.divisions, cfg.soups.max_soups)])
        reused = sum(s.key in finished_before for s in soups)
    else:
        reused = 0
    pool = Pool(kind="soup", mode="soups", policies=tuple(soups), trained=len(soups) - reused,
                reused=reused, note=note, history={"ingredients": [m.key for m in ingredients or []]})
    schema.write(paths.soup_pool, pool)
    metrics = {"enabled": cfg.soups.enabled, "soups": len(soups), "built": pool.trained,
               "reused": pool.reused}
    write_metrics(root, METRICS[0], metrics)
    say(f"soups: {len(soups)} soups ({pool.trained} evaluated, {pool.reused} reused)"
        + (f"; none: {note}" if note else ""))
    return metrics
