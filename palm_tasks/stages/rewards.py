"""Stage rewards: the base model, the prompt split, the reward functions, and the base's samples.

Reads:  the params in PARAMS
Writes: models/base (the converted base model), models/rewards (rewards the pipeline trains:
        the humor classifier), data/prompts/{train,eval}.jsonl, metrics/rewards.json
        (how each reward is normalized, the base's reward distribution, trait correlations),
        plots/base_rewards.json; an MLflow run `rewards`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from palm_tasks import schema
from palm_tasks.config import PalmConfig
from palm_tasks.log import say
from palm_tasks.paths import Paths

PARAMS = ("task", "traits", "base_model", "seed", "device", "data", "rewards", "evaluation")
DEPS = ()
OUTS = ("models/base", "models/rewards", "data/prompts")
METRICS = ("metrics/rewards.json",)
PLOTS = ("plots/base_rewards.json",)
RUNS_JOBS = False


def run(cfg: PalmConfig, root: Path, run_jobs=None) -> dict:
    from palm_tasks.llm.base_model import prepare_base_model, resolve_base_model
    from palm_tasks.llm.models import load_base, load_tokenizer, resolve_device
    from palm_tasks.llm.prompts import prepare_prompts, read_prompts
    from palm_tasks.llm.rewards import build_rewards, prepare_rewards

    paths = Paths(root)
    say(f"rewards: preparing base model {cfg.base_model!r}")
    base = prepare_base_model(cfg.base_model, paths.base)
    say("rewards: splitting prompts")
    split_seed = cfg.seed if cfg.data.split_seed is None else cfg.data.split_seed
    prompts = prepare_prompts(cfg.task, paths.prompts, cfg.data.n_train, cfg.data.n_eval, split_seed)
    say("rewards: preparing reward functions")
    reward_metrics = prepare_rewards(cfg.traits, paths.reward_models, cfg.seed, cfg.rewards.models,
                                     humor_test_fraction=cfg.rewards.humor_test_fraction)
    device = resolve_device(cfg.device)
    rewards = build_rewards(cfg.traits, paths.reward_models, cfg.rewards.brevity_max_words,
                            cfg.rewards.models, device)

    say(f"rewards: scoring {cfg.rewards.base_samples} base-model samples")
    eval_prompts = read_prompts(paths.prompts / "eval.jsonl")
    base_path = resolve_base_model(paths.base)
    scores, completions = _score_base_model(cfg, load_base(base_path, device), load_tokenizer(base_path),
                                            rewards, eval_prompts)
    corr = correlation(scores)
    distribution = {
        t: {"mean": float(s.mean()), "std": float(s.std()), "min": float(s.min()),
            "p10": float(np.quantile(s, 0.1)), "median": float(np.median(s)),
            "p90": float(np.quantile(s, 0.9)), "max": float(s.max())}
        for t, s in zip(cfg.traits, scores.T)
    }
    metrics = {
        "base_model": base,
        "prompts": prompts,
        "reward_models": reward_metrics,
        "normalization": {r.name: r.normalization for r in rewards},
        "reward_versions": {r.name: r.version for r in rewards},
        "base_samples": len(completions),
        "distribution": distribution,
        "correlation": {"traits": cfg.traits, "matrix": corr.round(4).tolist()},
    }
    schema.write(paths.metrics / "rewards.json", metrics)
    schema.write(paths.plots / "base_rewards.json",
                 [dict(zip(cfg.traits, row.round(4).tolist())) for row in scores])
    from palm_tasks.report.plots import distribution_figure
    from palm_tasks.tracking import log_rewards_run

    samples = {"prompt": eval_prompts[: len(completions)], "completion": completions,
               **{t: scores[:, i].tolist() for i, t in enumerate(cfg.traits)}}
    log_rewards_run(cfg, root, metrics, distribution_figure(cfg.traits, scores, corr), samples)
    return metrics


def _score_base_model(cfg: PalmConfig, model, tokenizer, rewards, eval_prompts):
    from palm_tasks.llm.models import generate
    from palm_tasks.llm.rewards import score_all

    prompts = [eval_prompts[i % len(eval_prompts)] for i in range(cfg.rewards.base_samples)]
    ev = cfg.evaluation
    completions = generate(model, tokenizer, prompts, ev.max_new_tokens, ev.temperature,
                           ev.batch_size, cfg.seed)
    return score_all(rewards, prompts, completions), completions


def correlation(scores: np.ndarray) -> np.ndarray:
    """Pearson correlation between traits; a constant trait correlates 0 with the others."""
    centered = scores - scores.mean(axis=0)
    norms = np.linalg.norm(centered, axis=0)
    safe = np.where(norms > 0, norms, 1.0)
    corr = (centered.T @ centered) / np.outer(safe, safe)
    corr[norms == 0, :] = 0.0
    corr[:, norms == 0] = 0.0
    np.fill_diagonal(corr, 1.0)
    return corr
