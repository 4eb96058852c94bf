"""The gsm task's problems and its `correctness` reward (reasoning-gym's gsm_symbolic).

gsm_symbolic generates GSM8K-style word problems from 100 templates; its scorer reads the first
number in a response and compares it with the problem's answer. The pool is generated with a
fixed size and seed, so a problem's text identifies it: the reward looks the answer up by the
prompt text (the prompt files carry it too, for reading). The pool must not depend on the split
seed, or a member's eval prompts could change meaning under it.
"""

from __future__ import annotations

import functools
from importlib.metadata import version

GSM_DATASET = "gsm_symbolic"
GSM_POOL_SIZE = 1000
GSM_POOL_SEED = 0


@functools.lru_cache(maxsize=1)
def _dataset():
    from reasoning_gym import create_dataset

    return create_dataset(GSM_DATASET, size=GSM_POOL_SIZE, seed=GSM_POOL_SEED)


def _clean(text: str) -> str:
    return " ".join(str(text).split())


@functools.lru_cache(maxsize=1)
def gsm_entries() -> dict[str, dict]:
    """Problem text (whitespace-normalized) -> its gsm_symbolic entry; first occurrence wins."""
    entries: dict[str, dict] = {}
    for entry in _dataset():
        entries.setdefault(_clean(entry["question"]), entry)
    return entries


def gsm_problems() -> list[tuple[str, str, str]]:
    """(source, question, answer) for every distinct problem of the pool, in generation order."""
    return [(f"{GSM_DATASET}/{e['metadata'].get('source_index', '')}", q, str(e["answer"]))
            for q, e in gsm_entries().items()]


def correctness_scores(prompts: list[str], completions: list[str]) -> list[float]:
    """1 when the scorer accepts the completion's answer to the prompt's problem, else 0.

    reasoning-gym gives a wrong number 0.01 (a formatting bonus); we count only exact answers,
    so a member's value is its accuracy. A prompt outside the pool is an error, not a zero.
    """
    entries, scorer = gsm_entries(), _dataset()
    out = []
    for prompt, completion in zip(prompts, completions):
        entry = entries.get(_clean(prompt))
        if entry is None:
            raise ValueError(f"correctness: prompt {prompt[:120]!r} is not a {GSM_DATASET} problem of "
                             f"the task's pool (size {GSM_POOL_SIZE}, seed {GSM_POOL_SEED})")
        out.append(1.0 if scorer.score_answer(completion, entry) >= 1.0 else 0.0)
    return out


def correctness_version() -> str:
    return f"correctness-v1-{GSM_DATASET}-n{GSM_POOL_SIZE}-s{GSM_POOL_SEED}-reasoning-gym-{version('reasoning-gym')}"
