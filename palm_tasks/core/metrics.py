"""Metrics of a portfolio (docs/theory.md section 7): gaps, usage, output diversity.

Gaps are relative to a reference pool (OPT_est(w) = best value of the pool at w) on a set of test
weights; usage routes users with the one routing rule (routing.py). The alignment-oracle check
(section 9) is a paired decision per trained row: palm_tasks/audit.py.
"""
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from palm_tasks.core.routing import usage_shares
from palm_tasks.core.simplex import check_weights, farthest_points


# ----------------------------------------------------------------------------- gaps

@dataclass(frozen=True)
class Gaps:
    """Per test weight: multiplicative 1 - P/OPT_est and additive OPT_est - P (docs/theory.md section 7).

    Relative to the reference pool (OPT_est = best of all values) and the test weights.
    """
    multiplicative: np.ndarray
    additive: np.ndarray

    @property
    def max_multiplicative(self):
        return float(self.multiplicative.max())

    @property
    def mean_multiplicative(self):
        return float(self.multiplicative.mean())

    @property
    def max_additive(self):
        return float(self.additive.max())

    @property
    def mean_additive(self):
        return float(self.additive.mean())

    def to_dict(self):
        return {"max_multiplicative": self.max_multiplicative,
                "mean_multiplicative": self.mean_multiplicative,
                "max_additive": self.max_additive, "mean_additive": self.mean_additive,
                "n_test_weights": int(len(self.additive)),
                "relative_to": "the reference pool (best of all values) on these test weights"}


def _best(test_weights, values, chunk=262_144):
    """max_j w . values_j for each test weight, in chunks to bound memory."""
    out = np.empty(len(test_weights))
    for s in range(0, len(test_weights), chunk):
        out[s:s + chunk] = (test_weights[s:s + chunk] @ values.T).max(axis=1)
    return out


def gaps(values, members, test_weights, reference=None):
    """Gaps of the portfolio values[members] against the best of all values, per test weight.

    reference (m,): a value reachable at each test weight besides the rows, e.g. best-of-N of
    the base (core.evidence); OPT_est is then the evidence E(w) of theory section 8."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 2 or not np.isfinite(values).all():
        raise ValueError(f"values must be a finite (n, d) array, got shape {values.shape}")
    T = check_weights(np.atleast_2d(test_weights), values.shape[1])
    members = np.unique(np.asarray(members, dtype=int))
    if members.size == 0 or members.min() < 0 or members.max() >= len(values):
        raise ValueError(f"members must be non-empty row indices of values, got {members.tolist()}")
    P = _best(T, values[members])
    others = np.setdiff1d(np.arange(len(values)), members)
    opt = np.maximum(P, _best(T, values[others])) if others.size else P
    if reference is not None:
        reference = np.asarray(reference, float).reshape(-1)
        if reference.shape != (len(T),) or not np.isfinite(reference).all():
            raise ValueError(f"reference must hold one finite value per test weight ({len(T)}), "
                             f"got shape {reference.shape}")
        opt = np.maximum(opt, reference)
    with np.errstate(divide="ignore", invalid="ignore"):
        mult = np.where(opt > 0, 1.0 - P / opt, 0.0)
    return Gaps(multiplicative=mult, additive=opt - P)


def _values_with_se(values, std_errors, reference, reference_se) -> tuple[np.ndarray, np.ndarray]:
    """values and their std_errors as float arrays, checked; a reference comes with its se."""
    V, S = np.asarray(values, float), np.asarray(std_errors, float)
    if S.shape != V.shape or not np.isfinite(S).all() or (S < 0).any():
        raise ValueError(f"std_errors must be finite, >= 0 and shaped like values {V.shape}, got {S.shape}")
    if (reference is None) != (reference_se is None):
        raise ValueError("reference and reference_se go together")
    return V, S


def worst_gap_se(values, std_errors, members, test_weights, reference=None, reference_se=None) -> float:
    """Standard error of the worst multiplicative gap 1 - P(w*)/E(w*) over test_weights, at the
    weight w* where it is reached (theory section 8): the delta method on the member's value P and
    the best value E there (a row of the pool, or the reference when that is higher), taken as
    independent. Both are means over the same prompts and correlate positively, so this se is on
    the large side; it does not count that w* was chosen as the worst (a max of noisy gaps is
    biased up). 0 where the worst gap is 0 (the member is the best there).

    reference, reference_se (m,): a value reachable at each test weight and its se (best-of-N)."""
    V, S = _values_with_se(values, std_errors, reference, reference_se)
    T = check_weights(np.atleast_2d(test_weights), V.shape[1])
    g = gaps(V, members, T, reference)
    t = int(np.argmax(g.multiplicative))
    if g.multiplicative[t] <= 0:
        return 0.0
    w, at_w = T[t], V @ T[t]
    members = np.unique(np.asarray(members, dtype=int))
    m = members[np.argmax(at_w[members])]
    j = int(np.argmax(at_w))
    best, best_se = at_w[j], float(np.sqrt(((w * S[j]) ** 2).sum()))
    if reference is not None and float(reference[t]) > best:
        best, best_se = float(reference[t]), float(reference_se[t])
    value, value_se = at_w[m], float(np.sqrt(((w * S[m]) ** 2).sum()))
    return float(np.sqrt((value_se / best) ** 2 + (value * best_se / best ** 2) ** 2))


def mean_gap_noise_se(values, std_errors, members, weights, reference=None, reference_se=None,
                      draws: int = 200, seed: int = 0) -> tuple[float, float]:
    """Standard errors of the mean multiplicative and additive gap over `weights` that come from
    the evaluation noise of the values (theory section 8), by a parametric bootstrap: each draw
    moves every value by its se times an independent normal and the reference by its se times
    one normal shared by all weights (best-of-N at nearby weights comes from the same answers, so
    its errors move together; sharing is the cautious choice), then takes the mean gaps again.

    The users' own sampling is not in it (mean_se over the gaps gives that); every user sees the
    same noisy values, so this part does not shrink with more users. draws < 2: (0, 0)."""
    if draws < 2:
        return 0.0, 0.0
    V, S = _values_with_se(values, std_errors, reference, reference_se)
    W = check_weights(np.atleast_2d(weights), V.shape[1])
    rng = np.random.default_rng(seed)
    mult, add = np.empty(draws), np.empty(draws)
    for b in range(draws):
        ref = None if reference is None else (np.asarray(reference, float)
                                              + np.asarray(reference_se, float) * rng.standard_normal())
        g = gaps(V + S * rng.standard_normal(V.shape), members, W, ref)
        mult[b], add[b] = g.multiplicative.mean(), g.additive.mean()
    return float(mult.std(ddof=1)), float(add.std(ddof=1))


def mean_se(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error std(ddof=1) / sqrt(n) (0 for a single value)."""
    xs = np.asarray(xs, float)
    return float(xs.mean()), float(xs.std(ddof=1) / np.sqrt(len(xs))) if len(xs) > 1 else 0.0


def gap_summary(ref_values: np.ndarray, members: Sequence[int], lattice: np.ndarray,
                users: np.ndarray, reference=None, populations=None, std_errors=None,
                reference_se=None, noise_draws: int = 200, seed: int = 0) -> dict:
    """Gaps of ref_values[members] against the best of ref_values: max over lattice and users,
    mean over the users with its standard error (the users are a sample; with std_errors also the
    values' evaluation noise, mean_gap_noise_se with noise_draws and seed, combined in quadrature).

    reference: a function test weights (m, d) -> a value reachable at each (best-of-N of the
    base), so the gaps are against the evidence E(w) (theory section 8) instead of the pool only.
    populations: {name: users (n, d)} -> per population the mean gap (with se) and the worst,
    keys `<name>_mean_gap`, `<name>_mean_gap_se`, `<name>_worst_gap` (multiplicative).
    std_errors (n, d) of ref_values, with reference_se (a function like reference) when reference
    is given: adds `max_multiplicative_gap_se`, the worst gap's se at its weight (worst_gap_se),
    and `<name>_worst_gap_se` per population."""
    def evidence(weights):
        """(reference, its se) at weights, each None when not given."""
        return (None if reference is None else reference(weights),
                None if reference_se is None else reference_se(weights))

    def at(weights):
        return gaps(ref_values, members, weights, evidence(weights)[0])

    noise: dict[bytes, tuple[float, float]] = {}  # the Dirichlet(1) population is `users` again

    def noise_se(weights) -> tuple[float, float]:
        if std_errors is None:
            return 0.0, 0.0
        key = np.ascontiguousarray(weights, float).tobytes()
        if key not in noise:
            noise[key] = mean_gap_noise_se(ref_values, std_errors, members, weights, *evidence(weights),
                                           noise_draws, seed)
        return noise[key]

    def worst_se(weights) -> float:  # worst_gap_se refuses a reference without its se
        return worst_gap_se(ref_values, std_errors, members, weights, *evidence(weights))

    test = np.vstack([lattice, users])
    g_all, g_users = at(test), at(users)
    mult_mean, mult_se = mean_se(g_users.multiplicative)
    add_mean, add_se = mean_se(g_users.additive)
    mult_noise, add_noise = noise_se(users)
    out = {"max_multiplicative_gap": g_all.max_multiplicative,
           "max_additive_gap": g_all.max_additive,
           "mean_multiplicative_gap": mult_mean,
           "mean_multiplicative_gap_se": float(np.hypot(mult_se, mult_noise)),
           "mean_additive_gap": add_mean,
           "mean_additive_gap_se": float(np.hypot(add_se, add_noise))}
    if std_errors is not None:
        out["max_multiplicative_gap_se"] = worst_se(test)
    for name, weights in (populations or {}).items():
        g = at(weights).multiplicative
        mean, users_se = mean_se(g)
        out[f"{name}_mean_gap"] = mean
        out[f"{name}_mean_gap_se"] = float(np.hypot(users_se, noise_se(weights)[0]))
        out[f"{name}_worst_gap"] = float(g.max())
        if std_errors is not None:
            out[f"{name}_worst_gap_se"] = worst_se(weights)
    return out


def greedy_order(values: np.ndarray, k: int, selection_weights: np.ndarray) -> list[int]:
    """The first k rows of `values` (fewer if there are fewer) in the order greedy forward
    selection adds them: each step adds the row that most lowers the (worst, mean) multiplicative
    gap on the selection weights against the best of all rows; ties go to the lower index. The
    best portfolio of size j <= k is the first j of them (PALM's pruning with a size limit)."""
    R = np.asarray(values, float)
    chosen: list[int] = []
    while len(chosen) < min(k, len(R)):
        scored = []
        for j in range(len(R)):
            if j not in chosen:
                g = gaps(R, chosen + [j], selection_weights)
                scored.append((round(g.max_multiplicative, 12), round(g.mean_multiplicative, 12), j))
        chosen.append(min(scored)[2])
    return chosen


def best_subset(values: np.ndarray, k: int, selection_weights: np.ndarray) -> list[int]:
    """The greedy best k rows of `values` (greedy_order), sorted."""
    return sorted(greedy_order(values, k, selection_weights))


def spread_subset(points: np.ndarray, k: int) -> np.ndarray:
    """k rows of points spread by farthest-point sampling, starting from the extremes present."""
    points = np.asarray(points, float)
    if len(points) <= k:
        return points
    d = points.shape[1]
    chosen = [i for e in np.eye(d) for i in np.flatnonzero(np.all(np.isclose(points, e), axis=1))[:1]][:k]
    return points[farthest_points(points, chosen or [0], k)]


# ----------------------------------------------------------------------------- usage and diversity

def usage_perplexity(values, members, users):
    """exp(entropy) of the members users are routed to (routing.route: the best w . R among
    values[members], ties to the first member)."""
    values = np.asarray(values, dtype=float)
    U = check_weights(np.atleast_2d(users), values.shape[1])
    members = np.asarray(members, dtype=int)
    p = usage_shares(U, values[members])
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def perplexity_with_se(values: np.ndarray, members: Sequence[int], users: np.ndarray,
                       bootstrap: int, seed: int) -> tuple[float, float]:
    """Usage perplexity over the users and its bootstrap standard error (0 if bootstrap < 2)."""
    members = np.asarray(members, int)
    p = usage_perplexity(values, members, users)
    if bootstrap < 2:
        return p, 0.0
    rng = np.random.default_rng(seed)
    draws = [usage_perplexity(values, members, users[rng.integers(0, len(users), len(users))])
             for _ in range(bootstrap)]
    return p, float(np.std(draws, ddof=1))


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over the texts (lowercased whitespace tokens); 0 if none."""
    grams = [tuple(tokens[i:i + n]) for t in texts for tokens in [t.lower().split()]
             for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def embedding_dispersion(embeddings: np.ndarray) -> float:
    """Mean pairwise cosine distance between members' responses to the same prompt.

    embeddings: (members, prompts, dim), unit norm. Averaged over member pairs and prompts;
    one member -> 0.
    """
    E = np.asarray(embeddings, dtype=float)
    if E.ndim != 3:
        raise ValueError(f"embeddings must have shape (members, prompts, dim), got {E.shape}")
    pairs = list(combinations(range(len(E)), 2))
    if not pairs:
        return 0.0
    # clipped at 0: identical responses give 1 - cos = -1e-8 in floating point
    return float(np.mean([np.clip(1.0 - np.sum(E[a] * E[b], axis=1), 0.0, 2.0) for a, b in pairs]))
