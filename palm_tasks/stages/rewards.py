"""Stage rewards: the base model, the prompt split, the reward functions, and the sample pool.

Reads:  the params in PARAMS; custom/ (your own prompts file and reward functions, if named)
Writes: models/base (the converted base model), models/rewards (rewards the pipeline trains:
        the humor classifier), data/prompts/{train,eval}.jsonl, data/samples/eval.json (the
        base's evidence.best_of answers to each evaluation prompt, scored: the best-of-N
        reference and the gate's baseline) and, for rsft, data/samples/train.json (the base's
        training.samples_per_prompt answers to each training prompt: every job's first round),
        metrics/rewards.json (numbers: the base's answer quality, best-of-N at each trait and
        at the centroid, the classifiers' held-out accuracy),
        metrics/rewards.details.json (the whole record: the base model and prompts, how each
        reward is normalized and its version, the reward distribution, trait correlations),
        plots/base_rewards.json; an MLflow run `rewards`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from palm_tasks import schema
from palm_tasks.best_of_n import BestOfN
from palm_tasks.config import PalmConfig
from palm_tasks.dvc_metrics import write_metrics
from palm_tasks.log import say
from palm_tasks.paths import Paths

PARAMS = ("task", "traits", "base_model", "seed", "device", "precision", "data", "rewards", "evaluation", "evidence",
          "training.method", "training.samples_per_prompt", "training.max_completion_length",
          "training.temperature", "training.min_relevance")  # min_relevance: best-of-N in metrics/rewards.json
DEPS = ("custom",)  # your own prompts file and reward functions (palm_tasks/custom.py)
OUTS = ("models/base", "models/rewards", "data/prompts", "data/samples", "metrics/rewards.details.json")
METRICS = ("metrics/rewards.json",)
PLOTS = ("plots/base_rewards.json",)
RUNS_JOBS = False


def run(cfg: PalmConfig, root: Path, run_jobs=None) -> dict:
    from palm_tasks.custom import resolve_prompts_file
    from palm_tasks.llm.base_model import prepare_base_model, resolve_base_model
    from palm_tasks.llm.models import load_base, load_tokenizer, resolve_device, resolve_precision, tokens_counted
    from palm_tasks.llm.prompts import prepare_prompts, read_prompts
    from palm_tasks.llm.rewards import prepare_rewards, project_rewards

    paths = Paths(root)
    say(f"rewards: preparing base model {cfg.base_model!r}")
    base = prepare_base_model(cfg.base_model, paths.base)
    say("rewards: splitting prompts")
    split_seed = cfg.seed if cfg.data.split_seed is None else cfg.data.split_seed
    prompts_file = None if cfg.data.prompts_file is None else resolve_prompts_file(cfg, root)
    prompts = prepare_prompts(cfg.task, paths.prompts, cfg.data.n_train, cfg.data.n_eval, split_seed,
                              prompts_file, cfg.data.prompts_column)
    say("rewards: preparing reward functions")
    paths.reward_models.mkdir(parents=True, exist_ok=True)  # a DVC output even when no trait trains a model
    reward_metrics = prepare_rewards(cfg.traits, paths.reward_models, cfg.seed,
                                     (*cfg.rewards.models, *cfg.rewards.functions),
                                     humor_test_fraction=cfg.rewards.humor_test_fraction)
    device = resolve_device(cfg.device)
    rewards = project_rewards(cfg, root, device)

    eval_prompts = read_prompts(paths.prompts / "eval.jsonl")[: cfg.evaluation.n_prompts]
    base_path = resolve_base_model(paths.base)
    model = load_base(base_path, device, precision=resolve_precision(cfg.precision, device))
    tokenizer = load_tokenizer(base_path)
    with tokens_counted() as sampled:  # this run's sampling: a pool found whole or in part is not counted
        pools = {"eval": write_sample_pool(cfg, paths, "eval", eval_prompts, rewards, model, tokenizer)}
        if cfg.training.method == "rsft":
            train_prompts = read_prompts(paths.prompts / "train.jsonl")
            pools["train"] = write_sample_pool(cfg, paths, "train", train_prompts, rewards, model, tokenizer)
        elif (paths.samples / "train.json").exists():
            (paths.samples / "train.json").unlink()  # a stale pool of another method: not an output now
    pool = pools["eval"]
    scores = pool.scores.reshape(-1, cfg.d)
    completions = [c for answers in pool.completions for c in answers]
    answer_prompts = [p for p in pool.prompts for _ in range(pool.n)]
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
        "sample_pool": {split: {"prompts": len(p.prompts), "answers_per_prompt": p.n} for split, p in pools.items()},
        "tokens_generated": sampled.tokens,
        "base_quality": pool.quality,
        "best_of_n": best_of_n_at_traits(cfg, pool),
        "distribution": distribution,
        "correlation": {"traits": cfg.traits, "matrix": corr.round(4).tolist()},
    }
    write_metrics(root, METRICS[0], figures(metrics), details=metrics)
    schema.write(paths.plots / "base_rewards.json",
                 [dict(zip(cfg.traits, row.round(4).tolist())) for row in scores])
    from palm_tasks.report.plots import distribution_figure
    from palm_tasks.tracking import log_rewards_run

    samples = {"prompt": answer_prompts, "completion": completions,
               **{t: scores[:, i].tolist() for i, t in enumerate(cfg.traits)}}
    log_rewards_run(cfg, root, metrics, distribution_figure(cfg.traits, scores, corr), samples)
    return metrics


def figures(record: dict) -> dict:
    """The numbers of the rewards record for `dvc metrics show`: a few columns (the base's
    answer quality, best-of-N's value at each trait and the centroid, classifier accuracy); the
    distribution, correlations, standard errors and the rest stay in the details file."""
    bon = record["best_of_n"]
    return {
        "base_degenerate_share": record["base_quality"].get("degenerate_share"),
        "base_relevance": record["base_quality"].get("relevance"),
        "tokens_generated": record.get("tokens_generated"),
        "base_best_of": {name: v["value"] for name, v in bon.items() if isinstance(v, dict)},
        **{f"{t}_classifier_accuracy": m["heldout_accuracy"]
           for t, m in record["reward_models"].items() if "heldout_accuracy" in m},
    }


def write_sample_pool(cfg: PalmConfig, paths: Paths, split: str, prompts: list[str], rewards, model,
                      tokenizer) -> schema.SamplePool:
    """The base's answers to `prompts` (resumable, see llm.samples), scored, as data/samples/<split>.json.

    eval answers use the evaluation sampler (the best-of-N reference must be measured like the
    policies it judges); train answers use the training sampler (they stand in for an rsft
    job's first round of sampling)."""
    from palm_tasks.llm.base_model import base_info
    from palm_tasks.llm.models import precision_of
    from palm_tasks.llm.samples import clear_chunks, sample_pool

    ev, t = cfg.evaluation, cfg.training
    if split == "eval":
        sampler = {"n": cfg.evidence.best_of, "max_new_tokens": ev.max_new_tokens,
                   "temperature": ev.temperature, "batch_size": ev.batch_size, "seed": cfg.seed}
    else:
        sampler = {"n": t.samples_per_prompt, "max_new_tokens": t.max_completion_length,
                   "temperature": t.temperature, "batch_size": ev.batch_size, "seed": cfg.seed}
    if precision_of(model) != "fp32":  # fp32 pools of earlier runs keep their key
        sampler["precision"] = precision_of(model)
    sha = base_info(paths.base)["weights_sha256"]
    versions = tuple(r.version for r in rewards)
    decided_by = {**sampler, "split": split, "prompts": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
                  "base_model_sha256": sha, "reward_versions": list(versions)}
    path = paths.samples / f"{split}.json"
    previous = _same_answers(path, sampler, prompts, sha)
    if previous is not None and previous.reward_versions == versions:  # a setting that decides nothing here
        say(f"rewards: sample pool of the base, {split}: reused ({len(prompts)} prompts x {sampler['n']} answers)")
        return previous
    if previous is not None:  # the same answers, other rewards (a trait added, a function edited): score again
        from dataclasses import replace

        from palm_tasks.llm.rewards import score_all

        say(f"rewards: sample pool of the base, {split}: the same answers scored again by the changed rewards")
        flat_prompts = [p for p in prompts for _ in range(sampler["n"])]
        flat_answers = [c for cs in previous.completions for c in cs]
        scores = score_all(rewards, flat_prompts, flat_answers).round(6).reshape(len(prompts), sampler["n"], -1)
        pool = replace(previous, traits=tuple(cfg.traits), reward_versions=versions, scores=scores)
        schema.write(path, pool)
        return pool
    say(f"rewards: sample pool of the base, {split}: {len(prompts)} prompts x {sampler['n']} answers")
    work = paths.samples / f".{split}-work"
    completions, scores = sample_pool(model, tokenizer, rewards, prompts, decided_by, cfg.evidence.chunk_prompts,
                                      work)
    from palm_tasks.llm.validity import degenerate, garbled, relevance

    flat_prompts, flat_answers = [p for p in prompts for _ in range(sampler["n"])], [c for cs in completions for c in cs]
    answer_relevance = relevance(flat_prompts, flat_answers)
    quality = {"degenerate_share": float(degenerate(flat_prompts, flat_answers).mean()),
               "relevance": float(answer_relevance.mean()),
               "garbled_share": float(garbled(flat_answers).mean())}  # as llm.validity.answer_quality
    pool = schema.SamplePool(split=split, traits=tuple(cfg.traits), reward_versions=versions,
                             base_model_sha256=sha, sampler=sampler, prompts=tuple(prompts),
                             completions=tuple(tuple(c) for c in completions), scores=scores,
                             relevance=answer_relevance.reshape(len(prompts), sampler["n"]), quality=quality)
    schema.write(path, pool)
    clear_chunks(work)
    return pool


def _same_answers(path, sampler: dict, prompts: list[str], sha: str) -> schema.SamplePool | None:
    """The pool already at `path` when the same sampler, prompts and base model made its answers
    (whatever rewards scored them), else None."""
    try:
        pool = schema.read(path, schema.SamplePool, "rewards")
    except schema.ArtifactError:
        return None  # missing or unreadable: made again
    same = pool.sampler == sampler and pool.prompts == tuple(prompts) and pool.base_model_sha256 == sha
    return pool if same else None


def best_of_n_at_traits(cfg: PalmConfig, pool: schema.SamplePool) -> dict:
    """BoN_N at each trait's extreme weight and at the centroid: what any policy must reach
    (among on-topic answers when training.min_relevance > 0, as every certificate uses it)."""
    W = np.vstack([np.eye(cfg.d), np.full((1, cfg.d), 1.0 / cfg.d)])
    bon = BestOfN(pool, cfg.training.min_relevance)
    mean, _ = bon.vectors(W)
    scalar_se = bon.se(W)
    names = list(cfg.traits) + ["centroid"]
    return {"n": pool.n, "min_relevance": cfg.training.min_relevance,
            **{name: {"weights": w.round(4).tolist(), "value": float(w @ m), "se": float(s),
                      "values": dict(zip(cfg.traits, m.round(4).tolist()))}
               for name, w, m, s in zip(names, W, mean, scalar_se)}}


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
