"""The base model's sample pool (resumable, reused by jobs) and the quality gate, with the real
stages on the tiny model (docs/evidence.md, docs/quality-gate.md)."""

import json

import numpy as np
import pytest

from conftest import copy_project


def test_sample_pool_is_the_rewards_stage_output(prepared_project):
    from palm_tasks.params_yaml import load_config
    from palm_tasks.best_of_n import BestOfN
    from palm_tasks.core.evidence import best_of_n
    from palm_tasks.llm.validity import relevance
    from palm_tasks.schema import load_samples

    cfg = load_config(prepared_project / "params.yaml")
    pool = load_samples(prepared_project)
    assert pool.scores.shape == (cfg.evaluation.n_prompts, cfg.evidence.best_of, cfg.d)
    assert len(pool.completions) == len(pool.prompts) == cfg.evaluation.n_prompts
    assert all(len(c) == cfg.evidence.best_of for c in pool.completions)
    assert ((pool.scores >= 0) & (pool.scores <= 1)).all()
    assert set(pool.quality) >= {"degenerate_share", "relevance"}
    # each answer's relevance is kept (the on-topic rule of rsft and of best-of-N reads it)
    flat = [p for p in pool.prompts for _ in range(pool.n)], [a for c in pool.completions for a in c]
    assert pool.relevance.shape == pool.scores.shape[:2]
    assert pool.relevance.ravel().tolist() == pytest.approx(relevance(*flat).tolist(), abs=1e-5)
    assert pool.quality["relevance"] == pytest.approx(pool.relevance.mean(), abs=1e-5)
    tau = max(float(np.median(pool.relevance)), 1e-6)  # > 0: 0 means "every answer"
    on = pool.on_topic(tau)
    assert on.tolist() == (pool.relevance >= tau).tolist() and pool.on_topic(0.0) is None
    assert BestOfN(pool, tau).vectors(np.eye(cfg.d))[0].tolist() == best_of_n(pool.scores, np.eye(cfg.d), on)[0].tolist()
    train = load_samples(prepared_project, "train")  # rsft (the default method): every job's round 1
    assert train.scores.shape == (cfg.data.n_train, cfg.training.samples_per_prompt, cfg.d)
    # best-of-N in metrics/rewards.details.json (and its values in metrics/rewards.json) is the pool's
    metrics = json.loads((prepared_project / "metrics" / "rewards.details.json").read_text())
    figures = json.loads((prepared_project / "metrics" / "rewards.json").read_text())
    mean, _, _ = best_of_n(pool.scores, np.eye(cfg.d), pool.on_topic(cfg.training.min_relevance))
    assert metrics["best_of_n"]["min_relevance"] == cfg.training.min_relevance
    for i, trait in enumerate(cfg.traits):
        assert metrics["best_of_n"][trait]["value"] == pytest.approx(mean[i, i])
        assert figures["base_best_of"][trait] == metrics["best_of_n"][trait]["value"]
    assert not list((prepared_project / "data" / "samples").rglob("chunks-*")), "chunks are removed"


def test_the_rewards_stage_reuses_its_pool_when_only_the_on_topic_rule_changes(prepared_project, tmp_path, monkeypatch):
    """min_relevance re-runs the rewards stage (best-of-N in its metrics) but does not decide the
    answers: the pool is reused, not sampled again; a new sampling temperature samples again."""
    from palm_tasks.params_yaml import load_config
    from palm_tasks.llm import models
    from palm_tasks.schema import load_samples
    from palm_tasks.stages import STAGES

    root = copy_project(prepared_project, tmp_path / "project", training={"min_relevance": 0.2})
    before = (root / "data" / "samples" / "eval.json").read_bytes()
    calls, real = [], models.generate
    monkeypatch.setattr(models, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    metrics = STAGES["rewards"].run(load_config(root / "params.yaml"), root)
    assert calls == [] and (root / "data" / "samples" / "eval.json").read_bytes() == before
    assert metrics["best_of_n"]["min_relevance"] == 0.2
    copy = copy_project(root, tmp_path / "hotter", evaluation={"temperature": 0.9})
    STAGES["rewards"].run(load_config(copy / "params.yaml"), copy)
    assert calls, "a new temperature decides new answers: the pool is sampled again"
    assert load_samples(copy).sampler["temperature"] == 0.9


class Killed(BaseException):
    """Stands for the process dying: not an Exception, like KeyboardInterrupt or SystemExit."""


def test_a_sample_pool_killed_midway_resumes_at_the_first_missing_chunk(tiny_model, tmp_path, monkeypatch):
    from palm_tasks.llm import models
    from palm_tasks.llm.models import load_base, load_tokenizer
    from palm_tasks.llm.rewards import BrevityReward
    from palm_tasks.llm.samples import sample_pool

    model, tok = load_base(tiny_model, "cpu"), load_tokenizer(tiny_model)
    prompts = [f"question number {i}?" for i in range(10)]
    sampler = {"n": 2, "max_new_tokens": 4, "temperature": 1.0, "batch_size": 8, "seed": 3}
    rewards = [BrevityReward(30)]
    whole = sample_pool(model, tok, rewards, prompts, sampler, 4, tmp_path / "whole")

    real, calls, alive = models.generate, [], [True]

    def dies_on_the_second_chunk(*args, **kwargs):
        calls.append(len(args[2]))
        if alive[0] and len(calls) == 2:
            alive[0] = False
            raise Killed("killed mid-pool")
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "generate", dies_on_the_second_chunk)
    with pytest.raises(Killed):
        sample_pool(model, tok, rewards, prompts, sampler, 4, tmp_path / "resumed")
    calls.clear()
    resumed = sample_pool(model, tok, rewards, prompts, sampler, 4, tmp_path / "resumed")
    assert calls == [8, 4]  # chunks 2 (4 prompts x 2) and 3 (2 prompts x 2) only: chunk 1 was kept
    assert resumed[0] == whole[0]  # the same answers as an uninterrupted run
    assert np.array_equal(resumed[1], whole[1])


@pytest.mark.slow
def test_the_gate_keeps_a_degenerate_member_out_of_production(prepared_project, tmp_path):
    """Members evaluated with one-token answers are degenerate by definition: the gate fails
    them, the portfolio says why, and the register stage does not move `production`."""
    import mlflow

    from palm_tasks.params_yaml import load_config
    from palm_tasks.portfolio import load_portfolio
    from palm_tasks.stages import STAGES
    from palm_tasks.tracking import tracking_uri

    root = copy_project(prepared_project, tmp_path / "project",
                        search={"mode": "uniform", "k": 3, "max_trainings": 3},
                        evaluation={"max_new_tokens": 1},
                        gate={"max_degenerate_share": 0.05, "min_relevance_ratio": 0.0},
                        mlflow={"registered_model_prefix": "palmgate"})
    cfg = load_config(root / "params.yaml")
    STAGES["align"].run(cfg, root)
    STAGES["soups"].run(cfg, root)
    STAGES["coverage"].run(cfg, root)
    portfolio = load_portfolio(root)
    assert portfolio.gate["passed"] is False
    for key, g in portfolio.gate["members"].items():
        assert g["degenerate_share"] > 0.05 and not g["passed"]
        assert any("degenerate answers" in r for r in g["reasons"])
    assert any("quality gate failed" in b for b in portfolio.blockers())
    result = STAGES["register"].run(cfg, root)
    assert result["alias"] == "candidate" and "quality gate failed" in result["warning"]
    client = mlflow.MlflowClient(tracking_uri(cfg, root), registry_uri=tracking_uri(cfg, root))
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(f"palmgate-{cfg.task}-portfolio", "production")
