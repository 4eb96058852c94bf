"""The base class of every reward: a trait's scores in [0, 1], 0 for a non-answer.

Its own module so that rewards of every kind (palm_tasks/llm/rewards.py, the built-ins and
reward models; palm_tasks/llm/reward_functions.py, your own functions) share one rule.
"""

from __future__ import annotations

import numpy as np

from palm_tasks.llm.validity import valid

VALIDITY_VERSION = "valid-v1"  # bump when palm_tasks/llm/validity.py's rule changes
_GATED = ("; a degenerate answer (empty, chat roles or template fragments only, or 1-2 words "
          "without a digit) scores 0")


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
