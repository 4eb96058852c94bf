"""Intervals for decisions taken at planned looks, and the split of an error budget
(docs/theory.md section 13).

A decision is taken on a per-prompt statistic x_1, x_2, ... in [lo, hi]: a paired difference of
two policies' scalarized rewards on common prompts (section 13). Prompts are evaluated in chunks,
and a decision is looked at after each chunk until its interval clears its threshold or the cap
is reached. Re-checking a plain interval at every look would not keep its nominal error, so the
error of each decision is *spent over its planned looks*: the looks are fixed in advance (at the
first measurement of a policy, then after every `chunk` prompts up to `cap`: K of them) and each
look is taken at alpha / K (a union bound). Whichever look a decision stops at, it errs with
probability <= alpha.

Each look's interval is Student's t interval of the mean of the statistic, its sample variance
floored at that of one extreme value among n^2 observations, so that a look at identical values
(zero sample variance) is not a point. It is a normal approximation:
the statistics are means over prompts (64 or more at the default first look) of bounded rewards,
and tests/test_confidence.py measures its coverage at the planned looks on skewed bounded data.
Its known weak spot is a reward that is almost always 0 (or 1): a 0/1 reward right 5% of the
time missed its mean at some look in 9% of simulated runs at alpha 5% (15% of the time: 3.3%),
since a sample with no success has no variance (docs/evidence.md).
Why not a confidence sequence for bounded values: on the paired differences this project
decides on (small variance in a range of width 2) the betting confidence sequences of
Waudby-Smith and Ramdas (2023) were 2-3.5 times as wide as these intervals at the same error
(benchmarks/confidence_width.py, docs/evidence.md), so a decision would need 4-12 times the
prompts; and the maintained library implementing them, confseq, ships only a source
distribution whose C++ build needs Boost.
"""
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.stats import t as student_t


@dataclass(frozen=True)
class Looks:
    """The planned looks: at `first` prompts (a whole number of chunks; default one chunk), then
    after every `chunk` more, up to `cap` (the last look may be smaller)."""
    chunk: int
    cap: int
    first: int = 0

    def __post_init__(self):
        if int(self.chunk) < 1 or int(self.cap) < int(self.chunk):
            raise ValueError(f"looks need chunk >= 1 and cap >= chunk, got chunk {self.chunk}, cap {self.cap}")
        if int(self.first) % int(self.chunk) or int(self.first) > int(self.cap):
            raise ValueError(f"the first look ({self.first} prompts) must be whole chunks of {self.chunk}, "
                             f"at most the cap {self.cap}")

    @property
    def start(self) -> int:
        return int(self.first) or int(self.chunk)

    @property
    def sizes(self) -> list[int]:
        sizes = list(range(self.start, int(self.cap), int(self.chunk)))
        return sizes + [int(self.cap)]

    @property
    def count(self) -> int:
        return len(self.sizes)

    def at(self, n: int) -> int:
        """The largest planned look of at most n prompts (0 before the first)."""
        n = min(int(n), int(self.cap))
        if n < self.start:
            return 0
        return n if n == int(self.cap) else (n // int(self.chunk)) * int(self.chunk)

    def next_after(self, n: int) -> int:
        """The first planned look beyond n prompts (the cap once there)."""
        if n < self.start:
            return self.start
        return min((self.at(n) // int(self.chunk) + 1) * int(self.chunk), int(self.cap))


def mean_interval(x, alpha, looks: Looks, lo=-1.0, hi=1.0):
    """(estimate, lower, upper, n) of the mean of the statistic x (m, n) row by row, read at the
    largest planned look <= n, each look at alpha / looks.count (two-sided). Rows of one call
    share their length. Before the first look: (mean, lo, hi, 0)."""
    X = np.atleast_2d(np.asarray(x, dtype=float))
    lo, hi, alpha = float(lo), float(hi), float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise ValueError(f"the range [lo, hi] must be finite with hi > lo, got [{lo}, {hi}]")
    if not np.isfinite(X).all():
        raise ValueError("the statistic contains NaN or inf")
    n = looks.at(X.shape[1])
    m = len(X)
    if n < 2:
        centre = X.mean(axis=1) if X.shape[1] else np.full(m, 0.5 * (lo + hi))
        return centre, np.full(m, lo), np.full(m, hi), 0
    X = X[:, :n]
    centre = X.mean(axis=1)
    # a floor on the variance (that of one extreme value among n^2): identical values are not certainty
    var = np.maximum(X.var(axis=1, ddof=1), (hi - lo) ** 2 / (4.0 * n * n))
    half = _quantile(1.0 - alpha / (2.0 * looks.count), n - 1) * np.sqrt(var / n)
    return centre, np.maximum(centre - half, lo), np.minimum(centre + half, hi), n


@lru_cache(maxsize=4096)
def _quantile(q: float, df: int) -> float:
    """Student's t quantile (scipy's is slow to call; a run reads the same few many times)."""
    return float(student_t.ppf(q, df))


@dataclass(frozen=True)
class Split:
    """An error budget alpha divided equally over the decisions of a family (a union bound):
    each decision is taken at alpha / count, and the family errs with probability <= alpha."""
    family: str
    alpha: float
    count: int

    @property
    def each(self) -> float:
        return self.alpha / max(self.count, 1)

    def to_dict(self) -> dict:
        return {"family": self.family, "alpha": self.alpha, "decisions": self.count, "each": self.each}

    def describe(self) -> str:
        return f"{self.family}: alpha {self.alpha:g} over {self.count} decision(s), {self.each:.3g} each"
