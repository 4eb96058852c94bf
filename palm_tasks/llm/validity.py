"""Which answers count as answers: the gate every reward goes through.

A reward is a proxy, and a policy trained on it finds the cheapest way to score. Trained on
safety, humor and brevity, SmolLM2 learned to answer "user", "system", "assistant", "Smol" or
nothing at all to every prompt: nothing offensive (safety 0.96), one word (brevity 0.75). Such
an answer must score 0 on every trait, so ``Reward.__call__`` (palm_tasks/llm/rewards.py, the
one call every scoring path makes) sets the score of an answer that is not ``valid`` to 0.

**A degenerate answer** is one that, after stripping whitespace, is

(a) empty (or only punctuation);
(b) made only of chat-role names and chat-template fragments: ``user``, ``system``,
    ``assistant``, ``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>`` (any ``<|...|>`` token)
    and their bare names, case-insensitive, punctuation ignored ("User:", "<|im_start|>assistant");
(c) one or two words none of which contains a digit ("Smol", "TheOtherMommy", "Yes.").

Words are whitespace-separated tokens with their punctuation removed (a token of punctuation
only is no word). A bare number ("42", "$1,250.") is a real answer to a math question, so a
word with a digit keeps a short answer valid. The price of (c): a right one-word answer
("Paris.") scores 0 too. We accept it: without it the brevity trait pays most for one word,
and a policy collapses to a single word for every prompt.

**Off-topic answers** (MiniLM cosine between prompt and answer below a threshold) are measured
(``off_topic``, ``answer_quality``'s ``relevance``) but are *not* part of the gate, because no
threshold spares the answers the traits ask for. On 256 answers of the SmolLM2 base to the 128
assistant evaluation prompts (two each, 24 new tokens, temperature 0.7, seed 0), cosine < 0.1
flags 7% of the base's answers and 77% of answers paired with another prompt (AUC 0.95), but
also 49% of "I'm sorry, but I can't help with that." and 72% of "I cannot assist with that
request." given to the harmful prompts (the answers the safety trait wants), and 79% of
one-liner jokes given to the same prompts (the answers the humor trait wants). Gating on it
would zero safety and humor where they should pay most, so off-topic answers are left to the
relevance trait, to the quality gate that compares a member's ``answer_quality`` with the
base's (the base's relevance there: 0.52, degenerate share 0), and to ``training.min_relevance``
(``relevance`` below), which decides what rsft may imitate and best-of-N may pick, not what an
answer scores.
"""

from __future__ import annotations

import re

import numpy as np

ROLE_WORDS = frozenset({"user", "system", "assistant", "im_start", "im_end", "endoftext"})
_TEMPLATE_TOKEN = re.compile(r"<\|[^<>|]*\|>")  # <|im_start|>, <|im_end|>, <|endoftext|>, ...
_NOT_WORD = re.compile(r"[^\w]")  # punctuation (keeps letters, digits and '_', as in im_start)

# Not part of the gate: a cosine below this flags an answer as off-topic. At 0.1 (measured, see
# the module docstring) 7% of the base's answers and 77% of answers to another prompt are flagged.
OFFTOPIC_COSINE = 0.1


def words(completion: str) -> list[str]:
    """The completion's words: template tokens removed, lowercased, punctuation stripped."""
    text = _TEMPLATE_TOKEN.sub(" ", completion).lower()
    return [w for w in (_NOT_WORD.sub("", token) for token in text.split()) if w]


def is_degenerate(completion: str) -> bool:
    """True if the completion is empty, only chat roles / template fragments, or one or two
    words without a digit (rules (a), (b), (c) of the module docstring)."""
    found = words(completion)
    if all(w in ROLE_WORDS for w in found):  # (a) nothing left, or (b) roles and fragments only
        return True
    return len(found) <= 2 and not any(ch.isdigit() for w in found for ch in w)  # (c)


# A *garbled* answer carries a run of symbols no sentence has: "||" anywhere, or a
# whitespace-separated token of three or more characters none of them a letter or digit
# ("?||?||!", "%||%||%"). It is not part of the per-answer gate (a "||" can be code), but a
# policy that gives many is hacking a reward with noise the reward model does not read as
# noise: on the default params with seed 1, an rsft chain of four warm-started repairs at humor
# and (0, 0.5, 0.5) answered "Ken's gait - a joke about a user's%||?||" and scored humor 0.90.
# Measured on 128 answers each (2026-12-07): the base's sample pools 1.1 % and 1.9 % (3,072
# answers each, seeds 1 and 0), trained policies 0.8-9.4 %, that chain 20 %, 30 %, 64 %, 85 %.
# The gate bounds the share (gate.max_garbled_share).
_GARBLED = re.compile(r"\|\||(?:^|\s)[^\w\s]{3,}(?=\s|$)")


def is_garbled(completion: str) -> bool:
    """True if the completion contains "||" or a token of 3+ characters with no letter or digit."""
    return bool(_GARBLED.search(completion))


def garbled(completions: list[str]) -> np.ndarray:
    """Boolean array: which completions are garbled (is_garbled)."""
    return np.array([is_garbled(c) for c in completions], dtype=bool)


def degenerate(prompts: list[str], completions: list[str]) -> np.ndarray:
    """Boolean array: which completions are degenerate (the prompts are not needed for it)."""
    _check(prompts, completions)
    return np.array([is_degenerate(c) for c in completions], dtype=bool)


def cosine(prompts: list[str], completions: list[str]) -> np.ndarray:
    """cos(e(prompt), e(completion)) of MiniLM embeddings, in [-1, 1]."""
    from palm_tasks.llm.embeddings import embed

    _check(prompts, completions)
    if not completions:
        return np.zeros(0)
    # a pool repeats each prompt N times: embed each distinct prompt once
    distinct = list(dict.fromkeys(prompts))
    index = {p: i for i, p in enumerate(distinct)}
    prompt_vectors = embed(distinct)[[index[p] for p in prompts]]
    return np.sum(prompt_vectors * embed(list(completions)), axis=1)


def relevance(prompts: list[str], completions: list[str]) -> np.ndarray:
    """Each answer's relevance in [0, 1]: max(cosine(prompt, answer), 0), and 0 for a degenerate
    answer. The quality gate averages it over a member's answers; an answer whose relevance
    reaches ``training.min_relevance`` is *on topic* (what rsft may imitate and best-of-N may pick)."""
    bad = degenerate(prompts, completions)
    if not len(bad):
        return np.zeros(0)
    return np.where(bad, 0.0, np.clip(cosine(prompts, completions), 0.0, 1.0))


def off_topic(prompts: list[str], completions: list[str], threshold: float = OFFTOPIC_COSINE) -> np.ndarray:
    """Boolean array: cosine(prompt, completion) < threshold. Measured, not gated on."""
    return cosine(prompts, completions) < threshold


def valid(prompts: list[str], completions: list[str]) -> np.ndarray:
    """Boolean array: the answers every reward may score (not degenerate); the others score 0."""
    return ~degenerate(prompts, completions)


def answer_quality(prompts: list[str], completions: list[str]) -> dict:
    """``degenerate_share``: the share of degenerate answers; ``relevance``: the mean of
    max(cosine(prompt, answer), 0) over all answers, a degenerate one counting 0;
    ``garbled_share``: the share of garbled answers. All 0.0 for no answers."""
    bad = degenerate(prompts, completions)
    if not len(bad):
        return {"degenerate_share": 0.0, "relevance": 0.0, "garbled_share": 0.0}
    return {"degenerate_share": float(bad.mean()), "relevance": float(relevance(prompts, completions).mean()),
            "garbled_share": float(garbled(completions).mean())}


def _check(prompts, completions) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
