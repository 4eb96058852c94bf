"""Prompt pools and splits from the installed packages."""

import json

import pytest

from palm_tasks import prompts as P


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
