"""The problems of the tasks with a right answer, and their `correctness` reward (reasoning-gym).

Two problem sets, each generated with a fixed size and seed so that a problem's text identifies
it: the reward looks the answer up by the prompt text (the prompt files carry it too, for
reading). A pool must not depend on the split seed, or a member's eval prompts could change
meaning under it.

- task "gsm": reasoning-gym's gsm_symbolic, GSM8K-style word problems from 100 templates. Scored
  by reasoning-gym's own scorer (the first number in the answer), exact answers only. SmolLM2-135M
  answers none of them: 0 of 128 samples right with 96 new tokens (docs/results/gsm.md). It is
  the task for a larger base model.
- task "arithmetic": reasoning-gym's chain_sum with two terms of one or two digits ("State the
  final answer to the following arithmetic problem: 47 - 8 ="), the same family's task that
  SmolLM2-135M can do: about 10% of its samples right at temperature 1 (docs/results/gsm.md). It
  is scored by the **last** number of the answer, the final one stated: the model tends to repeat
  the problem before answering ("4 + 3 = 7"), which the first-number rule scores as the operand.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from importlib.metadata import version


@dataclass(frozen=True)
class ProblemSet:
    """A fixed pool of reasoning-gym problems and the rule that scores an answer to one."""

    dataset: str  # reasoning-gym dataset name
    size: int  # problems generated (duplicates are dropped, so a pool has at most this many)
    seed: int
    options: dict = field(default_factory=dict)  # the dataset's generator options
    rule: str = "reasoning-gym"  # "reasoning-gym" (its scorer) | "last number"

    def describe(self) -> str:
        opts = "".join(f"-{k}{v}" for k, v in sorted(self.options.items()))
        return f"{self.dataset}-n{self.size}-s{self.seed}{opts}-{self.rule.replace(' ', '_')}"


PROBLEM_SETS = {
    "gsm": ProblemSet("gsm_symbolic", 1000, 0),
    "arithmetic": ProblemSet("chain_sum", 2000, 0, {"min_terms": 2, "max_terms": 2, "min_digits": 1,
                                                    "max_digits": 2}, rule="last number"),
}
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@functools.lru_cache(maxsize=None)
def _dataset(task: str):
    from reasoning_gym import create_dataset

    s = PROBLEM_SETS[task]
    return create_dataset(s.dataset, size=s.size, seed=s.seed, **s.options)


def _clean(text: str) -> str:
    return " ".join(str(text).split())


@functools.lru_cache(maxsize=None)
def entries(task: str) -> dict[str, dict]:
    """Problem text (whitespace-normalized) -> its reasoning-gym entry; first occurrence wins."""
    out: dict[str, dict] = {}
    for entry in _dataset(task):
        out.setdefault(_clean(entry["question"]), entry)
    return out


def problems(task: str) -> list[tuple[str, str, str]]:
    """(source, question, answer) for every distinct problem of a task's pool, in generation order."""
    dataset = PROBLEM_SETS[task].dataset
    return [(f"{dataset}/{e['metadata'].get('source_index', i)}", q, str(e["answer"]))
            for i, (q, e) in enumerate(entries(task).items())]


def last_number(text: str) -> float | None:
    """The last number written in `text` (commas between digits ignored), or None."""
    found = _NUMBER.findall(re.sub(r"(?<=\d),(?=\d)", "", str(text)))
    return float(found[-1]) if found else None


def _right(task: str, completion: str, entry: dict) -> bool:
    if PROBLEM_SETS[task].rule == "last number":
        said = last_number(completion)
        return said is not None and abs(said - float(entry["answer"])) < 1e-9
    # reasoning-gym gives a wrong number 0.01 (a formatting bonus); only exact answers count
    return _dataset(task).score_answer(completion, entry) >= 1.0


def correctness_scores(prompts: list[str], completions: list[str]) -> list[float]:
    """1 when the completion answers the prompt's problem right, by its problem set's rule, else 0
    (a member's value is its accuracy). A prompt of no problem set is an error, not a zero."""
    out = []
    for prompt, completion in zip(prompts, completions):
        key = _clean(prompt)
        task = next((t for t in PROBLEM_SETS if key in entries(t)), None)
        if task is None:
            pools = ", ".join(f"{s.dataset} (size {s.size}, seed {s.seed})" for s in PROBLEM_SETS.values())
            raise ValueError(f"correctness: prompt {prompt[:120]!r} is not a problem of the tasks' pools: {pools}")
        out.append(1.0 if _right(task, completion, entries(task)[key]) else 0.0)
    return out


def correctness_version() -> str:
    sets = "+".join(s.describe() for s in PROBLEM_SETS.values())
    return f"correctness-v2-{sets}-reasoning-gym-{version('reasoning-gym')}"
