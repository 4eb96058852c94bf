"""The value vector of a policy: the mean (and standard error over prompts) of each normalized
reward over the evaluation prompts, `evaluation.samples_per_prompt` sampled answers each
(docs/theory.md 1, 6)."""

from __future__ import annotations

import numpy as np

from palm_tasks.config import EvaluationConfig
from palm_tasks.llm.models import generate
from palm_tasks.llm.rewards import score_all
from palm_tasks.schema import ValueVector


def evaluate(model, tokenizer, rewards, eval_prompts: list[str], ev: EvaluationConfig, seed: int):
    """(value vector, prompts, completions, per-answer scores) of `model` on the eval prompts."""
    prompts = [p for p in eval_prompts[: ev.n_prompts] for _ in range(ev.samples_per_prompt)]
    completions = generate(model, tokenizer, prompts, ev.max_new_tokens, ev.temperature,
                           ev.batch_size, seed)
    scores = score_all(rewards, prompts, completions)
    return ValueVector.from_scores(scores, ev.samples_per_prompt), prompts, completions, np.asarray(scores)
