"""A policy's answers to evaluation prompts, scored: the data behind its value vector
(docs/theory.md sections 1, 6, 13).

`answer_chunk` answers one chunk of prompts, `evaluation.samples_per_prompt` sampled answers
each, and scores every answer with every reward and the answer-quality rules (degenerate,
relevance). palm_tasks/scores.py calls it chunk by chunk; `evaluate` answers a list of prompts
at once (the benchmarks' measurement).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from palm_tasks.config import EvaluationConfig
from palm_tasks.llm.models import generate, tokens_counted
from palm_tasks.llm.rewards import score_all
from palm_tasks.schema import ValueVector


@dataclass(frozen=True)
class Answers:
    """k answers to each of some prompts, prompt by prompt: the texts, each trait's reward
    (n k, d), whether each is degenerate and its relevance (llm.validity)."""
    prompts: list[str]
    completions: list[str]
    rewards: np.ndarray
    degenerate: np.ndarray
    relevance: np.ndarray
    tokens: int = 0  # tokens sampled for these answers


def answer_chunk(model, tokenizer, rewards, prompts: list[str], ev: EvaluationConfig, seed: int) -> Answers:
    """ev.samples_per_prompt answers to each prompt, sampled with `seed`, and their scores."""
    from palm_tasks.llm.validity import degenerate, relevance

    flat = [p for p in prompts for _ in range(ev.samples_per_prompt)]
    with tokens_counted() as count:
        completions = generate(model, tokenizer, flat, ev.max_new_tokens, ev.temperature, ev.batch_size, seed)
    return Answers(flat, completions, np.asarray(score_all(rewards, flat, completions)),
                   degenerate(flat, completions), relevance(flat, completions), count.tokens)


def evaluate(model, tokenizer, rewards, eval_prompts: list[str], ev: EvaluationConfig, seed: int):
    """(value vector, prompts, completions, per-answer scores) of `model` on the first
    ev.n_prompts eval prompts, in one go (the benchmarks' measurement)."""
    answers = answer_chunk(model, tokenizer, rewards, eval_prompts[: ev.n_prompts], ev, seed)
    value = ValueVector.from_scores(answers.rewards, ev.samples_per_prompt)
    return value, answers.prompts, answers.completions, answers.rewards
