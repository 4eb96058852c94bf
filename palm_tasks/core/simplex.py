"""Weight vectors on the simplex: input checks, baseline weight sets (docs/theory.md sections 1, 7).

A user is a weight vector w >= 0 with sum(w) = 1 (docs/theory.md section 1). The baselines of
docs/theory.md section 7 compare PALM with portfolios trained at evenly spread weights
(`uniform_weights`), at Dirichlet(1) weights (`random_weights`) and at the centroid
(`uniform_weights(d, 1)`); `simplex_lattice` and `dirichlet_users` give the test weights.
"""
import math
from itertools import combinations

import numpy as np

SUM_TOL = 1e-6  # how far from 1 a weight vector's sum may be (float noise from user input)
NEG_TOL = 1e-12  # how negative a coordinate may be before it counts as negative


# ----------------------------------------------------------------------------- input checks

def check_d(d):
    """d as an int >= 2, or a ValueError."""
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 2:
        raise ValueError(f"d must be an integer >= 2 (number of objectives), got {d!r}")
    return int(d)


def check_tolerances(eps, delta):
    """eps in (0, 1) and delta >= 0 as floats, or a ValueError naming the bad one."""
    eps, delta = float(eps), float(delta)
    if not 0.0 < eps < 1.0:  # also rejects NaN
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    if not delta >= 0.0:
        raise ValueError(f"delta must be >= 0, got {delta}")
    return eps, delta


def check_weights(w, d=None):
    """Weights as a float array (same ndim: one vector or rows), or a ValueError naming the problem.

    Checks: shape (d,) or (n, d), d >= 2, finite, no negative entry, each row summing to 1.
    """
    w = np.asarray(w, dtype=float)
    if w.ndim not in (1, 2) or w.shape[-1] == 0:
        raise ValueError(f"weights must have shape (d,) or (n, d), got shape {w.shape}")
    if d is not None and w.shape[-1] != check_d(d):
        raise ValueError(f"weights must have {d} coordinates, got shape {w.shape}")
    check_d(w.shape[-1])
    rows = w.reshape(-1, w.shape[-1])
    bad = ~np.isfinite(rows).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"weights contain NaN or inf (row {i}: {rows[i].tolist()})")
    neg = (rows < -NEG_TOL).any(axis=1)
    if neg.any():
        i = int(np.flatnonzero(neg)[0])
        raise ValueError(f"weights have negative entries (row {i}: {rows[i].tolist()})")
    sums = rows.sum(axis=1)
    off = np.abs(sums - 1.0) > SUM_TOL
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise ValueError(f"weights are off the simplex: row {i} sums to {float(sums[i])!r}, not 1")
    return w


# ----------------------------------------------------------------------------- weight sets

def extreme_weights(d):
    """The d single-objective weights e_1..e_d."""
    return np.eye(check_d(d))


def simplex_lattice(d, n):
    """All weights whose coordinates are multiples of 1/n, sorted lexicographically."""
    d = check_d(d)
    if n < 1:
        raise ValueError(f"lattice resolution n must be >= 1, got {n}")
    # stars and bars: choose d - 1 bar positions among n + d - 1 slots
    rows = []
    for bars in combinations(range(n + d - 1), d - 1):
        edges = (-1,) + bars + (n + d - 1,)
        rows.append([edges[i + 1] - edges[i] - 1 for i in range(d)])
    points = np.array(rows, dtype=float) / n
    return points[np.lexsort(points.T[::-1])]


def uniform_weights(d, k):
    """k evenly spread weights (deterministic): the uniform-grid baseline.

    k = 1: the centroid (the single-model baseline). k >= 2: farthest-point sampling on the
    coarsest simplex lattice with at least k points, starting from the extremes e_1, e_2, ...
    (so k <= d gives the first k specialists, k = lattice size gives the whole lattice).
    Ties go to the lattice point that sorts first.
    """
    d = check_d(d)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k == 1:
        return np.full((1, d), 1.0 / d)
    n = 1
    while math.comb(n + d - 1, d - 1) < k:
        n += 1
    lattice = simplex_lattice(d, n)
    extremes = [int(np.flatnonzero((lattice == np.eye(d)[i]).all(axis=1))[0]) for i in range(min(k, d))]
    return lattice[farthest_points(lattice, extremes, k)]


def farthest_points(points, start, k):
    """Row indices: `start` extended to k by farthest-point sampling (Euclidean distance to the
    rows chosen so far; ties go to the first row)."""
    chosen = list(start)
    dist = np.min(np.linalg.norm(points[:, None] - points[chosen][None], axis=2), axis=1)
    while len(chosen) < k:
        nxt = int(np.argmax(dist))  # argmax returns the first maximum: deterministic ties
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(points - points[nxt], axis=1))
    return chosen


def dirichlet_users(d, k, seed, alpha=1.0):
    """k weights drawn from Dirichlet(alpha, ..., alpha) with a fixed seed (a user population)."""
    d = check_d(d)
    return np.random.default_rng(seed).dirichlet(np.full(d, float(alpha)), size=int(k))


# The simulated user populations of `user_populations`, in report order.
POPULATIONS = ("dirichlet_1", "concentrated", "centred", "mixture")


def user_populations(d, k, seed, concentrated_alpha, centred_alpha):
    """Simulated users, k of each population (docs/theory.md section 7), as weightings of the
    traits the way PersonalLLM samples users of reward models:

    - dirichlet_1: Dirichlet(1), uniform on the simplex (the users of the coverage stage, the
      same draws: `dirichlet_users(d, k, seed)`);
    - concentrated: Dirichlet(concentrated_alpha) with alpha < 1, most weight on one trait, users
      near the corners;
    - centred: Dirichlet(centred_alpha) with alpha > 1, users near (1/d, ..., 1/d);
    - mixture: each user from one of the three above, chosen with equal probability.

    Every population has its own random stream (seed, i), so adding one changes no other.
    """
    d, k = check_d(d), int(k)
    alphas = {"dirichlet_1": 1.0, "concentrated": float(concentrated_alpha), "centred": float(centred_alpha)}
    out = {"dirichlet_1": dirichlet_users(d, k, seed)}
    for i, name in enumerate(("concentrated", "centred"), start=1):
        out[name] = np.random.default_rng([seed, i]).dirichlet(np.full(d, alphas[name]), size=k)
    rng = np.random.default_rng([seed, 3])
    component = rng.integers(0, 3, size=k)
    draws = np.stack([rng.dirichlet(np.full(d, a), size=k) for a in alphas.values()])  # (3, k, d)
    out["mixture"] = draws[component, np.arange(k)]
    return out


def random_weights(d, k, seed):
    """k Dirichlet(1) weights (uniform on the simplex): the random-portfolio baseline."""
    return dirichlet_users(d, k, seed, alpha=1.0)
