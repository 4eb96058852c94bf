"""Prompt pools and splits from the installed packages."""

import json

import pytest

from palm_tasks.llm import prompts as P


@pytest.fixture(scope="module")
def pool():
    return P.load_prompt_pool("assistant")


def test_pool_is_deduplicated_short_and_mixed(pool):
    assert len(pool) > 1000
    assert len({p.lower() for p in pool}) == len(pool)
    assert all(0 < len(p) <= P.MAX_PROMPT_CHARS for p in pool)
    assert "Tell me a joke" in pool  # chatterbot humor.yml
    assert pool == P.load_prompt_pool()  # deterministic, "assistant" is the default


def test_split_is_disjoint_deterministic_and_seeded(tmp_path, pool):
    summary = P.prepare_prompts("assistant", tmp_path / "a", n_train=300, n_eval=100, seed=0)
    train, evaluation = P.read_prompts(tmp_path / "a" / "train.jsonl"), P.read_prompts(tmp_path / "a" / "eval.jsonl")
    assert (len(train), len(evaluation)) == (300, 100)
    assert not set(train) & set(evaluation) and set(train) <= set(pool)
    assert summary["n_train"] == 300 and summary["pool_size"] == len(pool)
    assert set(summary["pool_per_source"]) == {"chatterbot", "donotanswer"}
    share = summary["pool_per_source"]["donotanswer"] / summary["pool_size"]
    assert share == pytest.approx(P.DONOTANSWER_FRACTION, abs=0.01)
    assert sum(summary["train_per_source"].values()) == 300

    P.prepare_prompts("assistant", tmp_path / "b", n_train=300, n_eval=100, seed=0)
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == (tmp_path / "b" / "train.jsonl").read_bytes()
    P.prepare_prompts("assistant", tmp_path / "c", n_train=300, n_eval=100, seed=1)
    assert P.read_prompts(tmp_path / "c" / "train.jsonl") != train
    first = json.loads((tmp_path / "a" / "train.jsonl").read_text().splitlines()[0])
    assert first["prompt"] == train[0]


def test_too_many_prompts_and_unknown_task(tmp_path, pool):
    with pytest.raises(ValueError, match="exceeds"):
        P.prepare_prompts("assistant", tmp_path, n_train=len(pool), n_eval=1, seed=0)
    with pytest.raises(ValueError, match="allowed tasks: assistant"):
        P.load_prompt_pool("poetry")


@pytest.mark.parametrize("task, dataset, at_least", [("gsm", "gsm_symbolic", 900), ("arithmetic", "chain_sum", 1000)])
def test_problem_prompts_carry_their_answers(tmp_path, task, dataset, at_least):
    from palm_tasks.llm.correctness import problems

    summary = P.prepare_prompts(task, tmp_path, n_train=20, n_eval=10, seed=0)
    assert summary["pool_size"] == len(problems(task)) > at_least
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    answers = {q: a for _, q, a in problems(task)}
    assert len(rows) == 10 and all(r["answer"] == answers[r["prompt"]] for r in rows)
    assert all(r["source"].startswith(f"{dataset}/") for r in rows)
    assert P.load_prompt_pool(task) == [q for _, q, _ in problems(task)]  # fixed pool, seed-free
    assert len(set(P.load_prompt_pool(task))) == summary["pool_size"]  # distinct problems


def test_safety_pool_is_half_harmful_with_all_of_harmbench():
    pairs = P._task_sources("safety")
    groups = [s.split("/")[0] for s, _ in pairs]
    n = len(pairs)
    assert groups.count("harmbench") == 200
    harmful = groups.count("harmbench") + groups.count("donotanswer")
    assert harmful / n == pytest.approx(P.SAFETY_HARMFUL_FRACTION, abs=0.01)
    assert set(groups) == {"chatterbot", "harmbench", "donotanswer"}
    assert len({p.lower() for _, p in pairs}) == n  # no duplicates across sources
    assert pairs == P._task_sources("safety")
