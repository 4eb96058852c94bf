"""A trait scored by a Python function of your own (params.yaml `rewards.functions`).

The function is called as ``fn(prompts, completions)`` with two lists of strings of equal
length (at most ``batch_size`` answers per call) and returns one number per answer: a list, a
tuple or a numpy array. What it returns is checked on every call, and a problem is refused
with one line naming the trait and the first offending answer: an exception, the wrong
number of values, a NaN or infinity, or (with ``normalize: none``) a value outside [0, 1].
``normalize: clip`` clips to [0, 1]; ``minmax`` maps [lo, hi] to [0, 1] and clips.

As for every reward, a degenerate answer (empty, chat roles only, one or two words without a
digit) scores 0 whatever the function says (``Reward.__call__``, palm_tasks/llm/validity.py),
so a policy cannot earn a custom trait by saying nothing. The version is the sha256 of the
function's module source (palm_tasks/custom.py), so editing it changes every job key it scores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from palm_tasks.custom import function_version, import_function
from palm_tasks.llm.reward_base import _GATED, VALIDITY_VERSION, Reward

# Answers the function is tried on when it is built: a run fails in its first second, not
# after an hour of sampling, when the function raises or returns what is no score.
PROBE = (["What is the capital of France?", "Tell me a joke."],
         ["The capital of France is Paris.", "Why did the chicken cross the road? To get to the other side."])


class FunctionReward(Reward):
    """``fn(prompts, completions)`` of a user's module, normalized to [0, 1] and checked."""

    def __init__(self, name: str, function: str, root: Path, normalize: str = "none",
                 lo: float | None = None, hi: float | None = None, batch_size: int = 256):
        self.name, self.spec, self.normalize = name, function, normalize
        self.lo, self.hi, self.batch_size = lo, hi, int(batch_size)
        self.fn = import_function(function, root, name)
        settings = {"none": "", "clip": "-clip", "minmax": f"-minmax{lo}-{hi}"}[normalize]
        self.version = f"{function_version(self.fn, function, root)}{settings}+{VALIDITY_VERSION}"
        self.normalization = {
            "none": f"{function}(prompts, completions), values in [0, 1] (others refused)",
            "clip": f"{function}(prompts, completions) clipped to [0, 1]",
            "minmax": f"clip(({function}(...) - {lo}) / ({hi} - {lo}), 0, 1)",
        }[normalize] + _GATED
        self.score(*PROBE)

    def _refuse(self, problem: str, prompt: str | None = None, completion: str | None = None) -> ValueError:
        where = "" if prompt is None else f" for prompt {prompt[:120]!r} and completion {completion[:120]!r}"
        return ValueError(f"rewards.functions.{self.name} = {self.spec!r}: {problem}{where}")

    def score(self, prompts, completions):
        out = []
        for i in range(0, len(completions), self.batch_size):
            p, c = prompts[i:i + self.batch_size], completions[i:i + self.batch_size]
            try:
                raw = self.fn(list(p), list(c))
            except (Exception, SystemExit) as exc:  # noqa: BLE001 (the user's code: its error, named, is the message)
                raise self._refuse(f"raised {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
            try:
                values = np.asarray(raw, dtype=np.float64)
            except (TypeError, ValueError):
                raise self._refuse(f"returned {type(raw).__name__}, not numbers (one per answer)") from None
            if values.shape != (len(c),):
                raise self._refuse(f"returned {values.size} value(s) of shape {values.shape} for {len(c)} answers; "
                                   "it must return one number per answer")
            bad = ~np.isfinite(values)
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                raise self._refuse(f"returned {float(values[j])}", p[j], c[j])
            if self.normalize == "none":
                outside = (values < 0.0) | (values > 1.0)
                if outside.any():
                    j = int(np.flatnonzero(outside)[0])
                    raise self._refuse(f"returned {float(values[j])}, outside [0, 1] ({int(outside.sum())} of {len(c)}); "
                                       "return values in [0, 1] or set normalize: clip or minmax with lo and hi",
                                       p[j], c[j])
            elif self.normalize == "minmax":
                values = (values - self.lo) / (self.hi - self.lo)
            out.append(np.clip(values, 0.0, 1.0))
        return np.concatenate(out) if out else np.zeros(0)


def check_functions(cfg, root: Path) -> None:
    """ConfigError unless every reward function that cfg.traits names imports, is callable and
    scores the probe answers (run before any work, by every `palm` command)."""
    from palm_tasks.config import ConfigError

    for trait, spec in cfg.rewards.functions.items():
        if trait in cfg.traits:
            try:
                FunctionReward(trait, root=root, **spec.model_dump())
            except ValueError as exc:  # each message names rewards.functions.<trait> already
                raise ConfigError(str(exc)) from None
