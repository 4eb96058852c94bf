"""A worked example of a reward function of your own (docs/your-own.md).

params.yaml names it as a trait:

    traits: [politeness, brevity]
    rewards:
      functions:
        politeness: "custom.rewards:politeness"

PALM calls it with two lists of equal length, the prompts and the answers, and expects one
number in [0, 1] per answer. Editing this file changes the trait's version, so the jobs it
scores are trained again and nothing else is.
"""

import re

POLITE = re.compile(r"\b(please|thank(s| you)|sorry|glad|happy to|you're welcome|kindly|of course)\b", re.I)


def politeness(prompts: list[str], completions: list[str]) -> list[float]:
    """1 for an answer with a polite phrase ("please", "thank you", "glad", ...), else 0."""
    return [1.0 if POLITE.search(answer) else 0.0 for answer in completions]
