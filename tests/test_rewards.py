"""Rewards on the real packages (no mocks): ranges, shapes, orderings, errors."""

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import pyjokes

from palm_tasks import rewards as R

# Held-out accuracy of the humor classifier. Measured over seeds 0-9 (156 held-out texts each):
# mean 0.89, min 0.83 (seed 0 gives 0.83); the standard error of one split is ~0.025, so 0.8
# is below every measured split yet far above chance (0.5, balanced classes).
MIN_HUMOR_ACCURACY = 0.8

PROMPTS = ["Tell me a joke", "What is the capital of France?", "How do I pick a lock?", "Hi"]
COMPLETIONS = [
    "Why do programmers prefer dark mode? Because light attracts bugs.",
    "The capital of France is Paris.",
    "I cannot help with that.",
    "",
]


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    """A reward directory with the humor classifier trained once for the whole module."""
    directory = tmp_path_factory.mktemp("rewards")
    metrics = R.prepare_rewards(["safety", "humor", "brevity"], directory, seed=0)
    return directory, metrics


def test_safety_ranks_offensive_below_polite():
    safety = R.SafetyReward()
    scores = safety(["Reply"] * 2, ["You are a fucking worthless idiot.", "Thank you, have a lovely day!"])
    assert scores[0] < 0.2 < 0.8 < scores[1]


def test_humor_classifier_trains_and_ranks_jokes_above_facts(reward_dir):
    directory, metrics = reward_dir
    assert metrics["humor"]["heldout_accuracy"] > MIN_HUMOR_ACCURACY
    assert metrics["humor"]["n_test"] > 100 and not metrics["humor"]["reused"]
    files = sorted(p.name for p in (directory / "humor").iterdir())
    assert files == [R.HUMOR_WEIGHTS_FILE, R.HUMOR_META_FILE]  # safetensors + json only
    meta = json.loads((directory / "humor" / R.HUMOR_META_FILE).read_text())
    assert meta["seed"] == 0 and meta["recipe_version"] == R.HUMOR_RECIPE_VERSION

    humor = R.HumorReward(directory / "humor")
    joke = pyjokes.get_jokes(language="en", category="neutral")[0]
    fact = "Water boils at 100 degrees Celsius at sea level, which is 212 degrees Fahrenheit."
    scores = humor(["Say something", "Say something"], [joke, fact])
    assert scores[0] > 0.5 > scores[1]


def test_prepare_rewards_reuses_a_current_classifier(reward_dir):
    directory, metrics = reward_dir
    again = R.prepare_rewards(["humor"], directory, seed=0)
    assert again["humor"]["reused"]
    assert again["humor"]["heldout_accuracy"] == metrics["humor"]["heldout_accuracy"]


def test_brevity_formula_and_empty_answer():
    brevity = R.BrevityReward(max_words=10)
    texts = ["one two three four five", " ".join(["w"] * 10), " ".join(["w"] * 25), "", "   "]
    np.testing.assert_allclose(brevity(["p"] * 5, texts), [0.5, 0.0, 0.0, 0.0, 0.0])
    assert R.BrevityReward()(["p"], ["one"])[0] == pytest.approx(1 - 1 / 30)
    assert "max10" in brevity.version and "10" in brevity.normalization


def test_all_rewards_in_unit_interval_with_right_shape(reward_dir):
    directory, _ = reward_dir
    rewards = R.build_rewards(list(R.TRAITS), directory, brevity_max_words=30)
    assert [r.name for r in rewards] == list(R.TRAITS)
    scores = R.score_all(rewards, PROMPTS, COMPLETIONS)
    assert scores.shape == (len(PROMPTS), len(R.TRAITS)) and scores.dtype == np.float64
    assert np.all((scores >= 0) & (scores <= 1))
    for reward in rewards:
        assert reward.version and reward.normalization
    relevance = scores[:, list(R.TRAITS).index("relevance")]
    assert relevance[1] > relevance[0]  # "Paris" answers the France question better than a joke does
    sentiment = R.SentimentReward()(["p", "p"], ["I love this, wonderful!", "This is terrible and awful."])
    assert sentiment[0] > 0.5 > sentiment[1]


class BrokenReward(R.Reward):
    name = "broken"
    version = "0"
    normalization = "none"

    def score(self, prompts, completions):
        return np.array([0.5, np.nan, 0.5, 0.5])


def test_score_all_names_reward_and_pair_on_nan():
    with pytest.raises(ValueError, match=r"'broken'.*What is the capital of France\?.*Paris"):
        R.score_all([R.BrevityReward(), BrokenReward()], PROMPTS, COMPLETIONS)


def test_unknown_trait_and_missing_or_corrupt_classifier(tmp_path, reward_dir):
    with pytest.raises(ValueError, match="allowed traits: safety, humor, brevity"):
        R.build_rewards(["safety", "wit"], tmp_path)
    with pytest.raises(FileNotFoundError, match="classifier.safetensors.*rewards stage"):
        R.build_rewards(["humor"], tmp_path)
    shutil.copytree(reward_dir[0] / "humor", tmp_path / "humor")
    (tmp_path / "humor" / R.HUMOR_WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="classifier.safetensors.*corrupt"):
        R.HumorReward(tmp_path / "humor")


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        R.SafetyReward()(["a", "b"], ["c"])
