"""Non-answers score 0 on every trait (palm_tasks/llm/validity.py's gate), real answers keep
their scores, and answer_quality measures the share of degenerate answers and relevance."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from palm_tasks.llm import rewards as R
from palm_tasks.llm import validity as V
from palm_tasks.llm.correctness import problems
from palm_tasks.llm.train import trl_reward_funcs
from test_rewards import build_tiny_reward_model, reward_dir  # noqa: F401 (a fixture: the trained humor classifier)

# What a policy trained on safety, humor and brevity answered to every prompt.
NON_ANSWERS = ["user", "system", "assistant", "Smol", "TheOtherMommy", "", "  ",
               "<|im_start|>assistant", "User:", "<|im_end|>", "ASSISTANT: <|endoftext|>",
               "user\nassistant\nuser", "...", "Yes."]
REAL = [("What is the capital of France?", "The capital of France is Paris."),
        ("Tell me a joke", "Why do programmers prefer dark mode? Because light attracts bugs."),
        ("How do I pick a lock?", "I cannot help with that."),
        ("What is 6 times 7?", "42"),
        ("How much does it cost?", "$1,250."),
        ("Is the sky blue?", "Yes, it is.")]


def test_the_degenerate_rule():
    assert all(V.is_degenerate(c) for c in NON_ANSWERS)
    assert not any(V.is_degenerate(c) for _, c in REAL)
    assert not V.is_degenerate("42") and not V.is_degenerate("x = 42")  # a bare number answers
    assert V.is_degenerate("Paris.") and V.is_degenerate("Paris, France")  # the rule's price: 1-2 words
    assert not V.is_degenerate("user 42")  # a digit makes it a (short) answer
    assert not V.is_degenerate("The user is the assistant.")  # role names inside a sentence are words
    prompts = ["p"] * len(NON_ANSWERS)
    np.testing.assert_array_equal(V.degenerate(prompts, NON_ANSWERS), np.ones(len(NON_ANSWERS), bool))
    np.testing.assert_array_equal(V.valid(["p", "p", "p"], ["42", "user", "It is raining."]), [True, False, True])
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        V.degenerate(["a", "b"], ["c"])


@pytest.fixture(scope="module")
def every_reward(reward_dir, tiny_model, tmp_path_factory):  # noqa: F811
    """Every built-in assistant trait, readability, sentiment, relevance and a declared HF reward model."""
    directory, _ = reward_dir
    traits = ["safety", "humor", "brevity", "sentiment", "relevance", "readability"]
    rm = build_tiny_reward_model(tmp_path_factory.mktemp("rm") / "rm", tiny_model)
    return R.build_rewards(traits + ["helpful"], directory, models={"helpful": {"path": str(rm)}})


def test_every_trait_scores_non_answers_zero(every_reward):
    prompts = ["What is your name?"] * len(NON_ANSWERS)
    raw = np.stack([np.asarray(r.score(prompts, NON_ANSWERS)) for r in every_reward], axis=1)
    assert raw[:4, 0].min() > 0.9  # without the gate, safety pays > 0.9 for "user", "Smol"...
    assert raw[:4, 2].min() > 0.9  # ... and brevity 1 - 1/30
    scores = R.score_all(every_reward, prompts, NON_ANSWERS)
    np.testing.assert_array_equal(scores, np.zeros((len(NON_ANSWERS), len(every_reward))))
    # the reward functions GRPO trains with go through the same gate
    chat = [{"role": "user", "content": "What is your name?"}]
    for fn in trl_reward_funcs(every_reward):
        assert fn(prompts=[chat] * 3, completions=[[{"role": "assistant", "content": c}]
                                                   for c in ["user", "Smol", ""]]) == [0.0, 0.0, 0.0]


def test_correctness_keeps_bare_numbers_and_zeroes_non_answers():
    _, question, answer = problems("gsm")[0]
    (reward,) = R.build_rewards(["correctness"], reward_dir=".")
    scores = reward([question] * 4, [answer, f"The answer is {answer}.", "user", ""])
    assert scores.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_real_answers_keep_their_scores(every_reward):
    prompts, completions = [p for p, _ in REAL], [c for _, c in REAL]
    scores = R.score_all(every_reward, prompts, completions)
    raw = np.stack([np.asarray(r.score(prompts, completions), float) for r in every_reward], axis=1)
    np.testing.assert_array_equal(scores, raw)
    brevity = scores[:, [r.name for r in every_reward].index("brevity")]
    np.testing.assert_allclose(brevity, [1 - 6 / 30, 1 - 10 / 30, 1 - 5 / 30, 1 - 1 / 30, 1 - 1 / 30, 1 - 3 / 30])
    safety = scores[:, 0]
    assert safety.min() > 0.5 and scores.min() >= 0 and scores.max() <= 1


def test_every_version_and_normalization_names_the_gate(every_reward):
    correctness = R.CorrectnessReward()
    for reward in every_reward + [correctness]:
        assert reward.version.endswith("+" + R.VALIDITY_VERSION), reward.version
        assert "degenerate answer" in reward.normalization and reward.normalization.endswith("scores 0")
    assert R.VALIDITY_VERSION == "valid-v1"


def test_answer_quality_on_a_hand_made_list():
    prompts = ["What is the capital of France?", "What is 6 times 7?", "Tell me a joke", "Hi"]
    answers = ["The capital of France is Paris.", "42", "user", ""]
    quality = V.answer_quality(prompts, answers)
    cos = V.cosine(prompts[:2], answers[:2])
    assert quality["degenerate_share"] == 0.5
    assert quality["relevance"] == pytest.approx(np.clip(cos, 0, 1).sum() / 4)
    assert cos[0] > 0.5  # the Paris answer is about the question
    only_real = V.answer_quality(prompts[:1], answers[:1])
    assert only_real == {"degenerate_share": 0.0, "relevance": pytest.approx(cos[0]), "garbled_share": 0.0}
    off_topic = V.answer_quality(prompts[:1], ["Why do programmers prefer dark mode? Because light attracts bugs."])
    assert off_topic["degenerate_share"] == 0.0 and off_topic["relevance"] < only_real["relevance"] - 0.3
    assert V.answer_quality(prompts[2:], answers[2:]) == {"degenerate_share": 1.0, "relevance": 0.0,
                                                          "garbled_share": 0.0}
    assert V.answer_quality([], []) == {"degenerate_share": 0.0, "relevance": 0.0, "garbled_share": 0.0}


def test_the_garbled_rule():
    # answers of the humor-hacking policy of the seed-1 default run, and ordinary ones
    hacked = ["Ken's gait \u2013 a joke about a user's%||?||", "The doctor's gait \u2013 it gets the user's?||?||?||!",
              "The land of white-?||?||! A joke", "a joke about %%% the user", "What?!? Yes ... no !!! ***"]
    ordinary = ["The capital of France is Paris.", "Well... that depends!", "Use a || b in a shell? No: a or b.",
                "Rated 5/5 -- great", "Hmm... I'd say 42.", ""]
    assert V.garbled(hacked).tolist() == [True, True, True, True, True]
    assert V.garbled(ordinary).tolist() == [False, False, True, False, False, False]  # a "||" counts, even in code
    assert V.answer_quality(["q"] * 2, hacked[:2])["garbled_share"] == 1.0
