"""A scheduled retraining run: keep the portfolio certified while training as little as possible.

Rewards change, prompt data grows (or `data.split_seed` draws a new split), the base model is
updated. `retrain` then:

1. refreshes the data and rewards (the rewards and grid stages, as `palm run` does);
2. re-evaluates every member of the previous pool under the current rewards and eval prompts,
   without retraining it. A member keeps its key, which names what it was *trained* on; its
   new value vector is stored beside it as `models/members/<key>/evaluations/<eval key>.json`,
   where the eval key hashes everything that determines an evaluation (base model, traits,
   reward versions, eval prompts, evaluation settings, seed). metrics/align.json lists which
   evaluation each kept member counts with, and the coverage stage uses it;
3. runs the lazy search starting from those members (`initial_weights`): if the certificate
   still holds nothing is trained, otherwise only the weights where it fails are trained;
4. recomputes the certificate and portfolio (coverage stage) and registers it; `production`
   moves only when the new portfolio is certified, so users never get a worse one;
5. logs a `retrain` MLflow run with the reward drift per trait (mean value change of the kept
   members), the members kept, added and dropped and why, and writes metrics/retrain.json.

A changed base model invalidates every member (an adapter belongs to the weights it was
trained on, and the job key changes with them): they are all dropped, the summary says so,
and the search starts from scratch. When the project is a DVC repository the run ends with
`dvc commit -f`, so dvc.lock records its outputs and a later `dvc repro` finds them current.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from palm_tasks.align import Member, find_member
from palm_tasks.config import PalmConfig
from palm_tasks.layout import Layout

EVALUATIONS = "evaluations"


def read_evaluation(member: Member, eval_key: str) -> tuple[np.ndarray, np.ndarray]:
    """The values and standard errors of `member` under the evaluation `eval_key`."""
    path = member.path / EVALUATIONS / f"{eval_key}.json"
    if not path.is_file():
        raise FileNotFoundError(f"member {member.key}: evaluation {path} is missing; "
                                "run `palm retrain` again to re-evaluate it")
    data = json.loads(path.read_text())
    return np.asarray(data["values"], float), np.asarray(data["std_errors"], float)


def evaluation_key(cfg: PalmConfig, jobs) -> str:
    """Hash of everything that determines a member's evaluation (not its training)."""
    payload = {"traits": list(cfg.traits), "base_model_sha256": jobs.base_sha,
               "reward_versions": list(jobs.reward_versions),
               "eval_sha256": hashlib.sha256((jobs.lay.prompts / "eval.jsonl").read_bytes()).hexdigest(),
               "evaluation": cfg.evaluation.model_dump(), "seed": cfg.seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def reevaluate(member: Member, cfg: PalmConfig, jobs, eval_key: str) -> tuple[np.ndarray, np.ndarray]:
    """The member's value vector under the current rewards and eval prompts (stored once)."""
    path = member.path / EVALUATIONS / f"{eval_key}.json"
    if path.is_file():
        return read_evaluation(member, eval_key)
    from palm_tasks.align import evaluate, load_policy, resolve_device
    from palm_tasks.base_model import resolve_base_model
    from palm_tasks.prompts import read_prompts

    model, tokenizer = load_policy(resolve_base_model(jobs.lay.base), member.adapter,
                                   resolve_device(cfg.device))
    values, se, *_ = evaluate(model, tokenizer, jobs.rewards,
                              read_prompts(jobs.lay.prompts / "eval.jsonl"), cfg)
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"eval_key": eval_key, "traits": cfg.traits, "values": values.tolist(),
                               "std_errors": se.tolist()}, indent=2))
    tmp.replace(path)
    return values, se


def _previous(lay: Layout) -> tuple[dict | None, list[str], dict[str, np.ndarray]]:
    """The portfolio, pool and pool values as the last run left them (all empty if none)."""
    from palm_tasks.stages import load_pool

    portfolio = json.loads(lay.portfolio.read_text()) if lay.portfolio.is_file() else None
    align = lay.metrics / "align.json"
    pool = json.loads(align.read_text())["pool"] if align.is_file() else []
    try:
        values = {m.key: m.values for m in load_pool(lay.root)}
    except (OSError, ValueError, KeyError, RuntimeError):  # damaged members are handled below
        values = {}
    return portfolio, pool, values


def retrain(cfg: PalmConfig, root: Path, run_jobs=None) -> dict:
    """One retraining run (see the module docstring); returns what changed and why."""
    from palm_tasks import stages
    from palm_tasks.coverage import lazy_search
    from palm_tasks.stages import JobFactory, _write_json, say

    root = Path(root)
    lay = Layout(root)
    old_portfolio, old_pool, old_values = _previous(lay)
    if run_jobs is None:
        run_jobs = lambda ws: [stages.run_job(cfg, root, w) for w in ws]  # noqa: E731

    stages.rewards_stage(cfg, root)
    stages.grid_stage(cfg, root)
    jobs = JobFactory(cfg, root)
    eval_key = evaluation_key(cfg, jobs)

    # Which members of the previous pool are still members, and why the others are not.
    invalid: dict[str, str] = {}
    kept_pool: list[Member] = []
    base_changed = False
    for key in old_pool:
        member = find_member(lay.members, key)  # a damaged member is named and removed here
        if member is None:
            invalid[key] = "its files are missing or damaged"
            continue
        trained_on = member.info["job"]["base_model_sha256"]
        if trained_on != jobs.base_sha:
            base_changed = True
            invalid[key] = (f"the base model changed (weights {trained_on[:12]} -> "
                            f"{jobs.base_sha[:12]}): its adapter belongs to the old one")
        elif list(member.traits) != list(cfg.traits):
            invalid[key] = f"the traits changed ({member.traits} -> {cfg.traits})"
        else:
            kept_pool.append(member)
    if base_changed:
        say("retrain: [yellow]the base model changed: every existing member is invalid "
            "(their keys change with it); retraining from scratch[/]")

    say(f"retrain: re-evaluating {len(kept_pool)} existing members under the current rewards")
    evaluated = {m.key: reevaluate(m, cfg, jobs, eval_key) for m in kept_pool}
    drift = {t: (float(np.mean([evaluated[k][0][i] - old_values[k][i]
                                for k in evaluated if k in old_values]))
                 if any(k in old_values for k in evaluated) else 0.0)
             for i, t in enumerate(cfg.traits)}

    started = time.time()
    new_members: list[Member] = []

    def oracle(w):
        (member,) = run_jobs([np.asarray(w, float).tolist()])
        new_members.append(member)
        return member.values, member.std_errors

    initial = {}
    if kept_pool:
        initial = {"initial_weights": np.array([m.weights for m in kept_pool]),
                   "initial_values": np.array([evaluated[m.key][0] for m in kept_pool]),
                   "initial_std_errors": np.array([evaluated[m.key][1] for m in kept_pool])}
    search = lazy_search(oracle, cfg.d, cfg.coverage.eps, cfg.coverage.delta,
                         cfg.search.max_trainings, z=cfg.coverage.z, **initial)
    pool = kept_pool + new_members
    # Trained by this run = written by it (a member found finished on disk is older).
    trained = [m.key for m in new_members if (m.path / "member.json").stat().st_mtime >= started]
    _write_json(lay.metrics / "align.json", {
        "mode": "retrain",
        "pool": [m.key for m in pool],
        "weights": [m.weights.tolist() for m in pool],
        "jobs": len(new_members),
        "trained": len(trained),
        "reused": len(new_members) - len(trained),
        "evaluations": {m.key: eval_key for m in kept_pool},
        "history": {"stopped": search.stopped, "steps": search.history},
    })
    # The stages after align (soups, coverage, ...) as the pipeline runs them; register last.
    later = stages.STAGES[stages.STAGES.index("align") + 1:]
    results = {name: stages.STAGE_FUNCTIONS[name](cfg, root) for name in later if name != "register"}
    coverage = results["coverage"]
    portfolio = json.loads(lay.portfolio.read_text())

    before = {m["key"] for m in old_portfolio["members"]} if old_portfolio else set()
    after = [m["key"] for m in portfolio["members"]]
    pruned = "pruned: the other members cover its weights under the current values"
    summary = {
        "previous_portfolio": old_portfolio["id"] if old_portfolio else None,
        "portfolio": portfolio["id"],
        "certified": bool(portfolio["certificate"]["certified"]),
        "base_model_changed": base_changed,
        "eval_key": eval_key,
        "data_split_seed": cfg.seed if cfg.data.split_seed is None else cfg.data.split_seed,
        "reward_versions": dict(zip(cfg.traits, jobs.reward_versions)),
        "reward_drift": drift,
        "reevaluated": sorted(evaluated),
        "kept": [k for k in after if k in before],
        "added": {k: _why_added(k, trained, evaluated, pool) for k in after if k not in before},
        "dropped": {k: invalid.get(k, pruned) for k in sorted(before) if k not in after},
        "invalid": invalid,
        "trained": trained,
        "search_stopped": search.stopped,
    }
    say(f"retrain: kept {len(summary['kept'])}, added {len(summary['added'])}, dropped "
        f"{len(summary['dropped'])}, trained {len(trained)}; reward drift "
        + ", ".join(f"{t} {v:+.3f}" for t, v in drift.items()))
    summary["register"] = stages.register_stage(cfg, root)
    summary["dvc_commit"] = _dvc_commit(root)
    summary["mlflow_run_id"] = _log_retrain_run(cfg, root, summary, coverage)
    _write_json(lay.metrics / "retrain.json", summary)
    return summary


def _why_added(key: str, trained: list[str], evaluated: dict, pool: list[Member]) -> str:
    if key in trained:
        return "trained where the certificate failed"
    if key in evaluated:
        return "an existing member, needed under the current values"
    if key in {m.key for m in pool}:
        return "trained by an earlier run for this weight, now needed"
    return "a soup (weight-space mix) of pool members, built by the soups stage"


def _dvc_commit(root: Path) -> str:
    """Record the retraining run's outputs in dvc.lock, in projects that `dvc repro` runs.

    Registration is done by now, so a failure here is reported, not raised: nothing is lost,
    and `dvc commit -f` by hand does the same.
    """
    from palm_tasks.stages import say

    if not (root / "dvc.lock").is_file():
        return "skipped: no dvc.lock (the pipeline was not run with dvc repro)"
    proc = subprocess.run([sys.executable, "-m", "dvc", "commit", "-f"], cwd=root,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip()[-500:]
        say(f"retrain: [yellow]dvc commit failed ({message}); run `dvc commit -f` by hand[/]")
        return f"failed: {message}"
    return "done"


def _log_retrain_run(cfg: PalmConfig, root: Path, summary: dict, coverage: dict) -> str:
    import mlflow

    from palm_tasks.tracking import lineage_tags, setup_mlflow

    setup_mlflow(cfg, root)
    tags = {"palm.stage": "retrain", "portfolio_id": summary["portfolio"], **lineage_tags(root)}
    with mlflow.start_run(run_name=f"retrain-{summary['portfolio'][:10]}", tags=tags) as run:
        mlflow.log_params({"previous_portfolio": summary["previous_portfolio"],
                           "data_split_seed": summary["data_split_seed"],
                           "eval_key": summary["eval_key"],
                           "base_model_changed": summary["base_model_changed"],
                           **{f"reward_version.{t}": v for t, v in summary["reward_versions"].items()}})
        mlflow.log_metrics({**{f"drift.{t}": v for t, v in summary["reward_drift"].items()},
                            "n_kept": len(summary["kept"]), "n_added": len(summary["added"]),
                            "n_dropped": len(summary["dropped"]), "n_trained": len(summary["trained"]),
                            "n_reevaluated": len(summary["reevaluated"]),
                            "certified": float(summary["certified"]),
                            "max_eps": float(coverage["max_eps"])})
        mlflow.log_dict({k: v for k, v in summary.items() if k != "register"}, "retrain.json")
    return run.info.run_id
