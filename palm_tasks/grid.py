"""Weight vectors on the simplex: the PALM grid (theory.md section 2) and the baseline sets.

A user is a weight vector w >= 0 with sum(w) = 1. The PALM grid rounds every coordinate of w
*down* to a level in L = {0} U {tau * (1 + eps')^k : k = 0..K} and normalizes; training one
policy per grid point is (eps, delta)-covering. docs/guarantee.md derives the size bound
implemented in `grid_size_bound`.

Grid points are built from integer level indices and normalized by one function
(`_points`), so `snap_to_grid(w)` returns bit-for-bit a row of `palm_grid`.
"""
import math
from itertools import combinations

import numpy as np

SUM_TOL = 1e-6  # how far from 1 a weight vector's sum may be (float noise from user input)
NEG_TOL = 1e-12  # how negative a coordinate may be before it counts as negative
EDGE_TOL = 1e-12  # slack on the sum constraint when enumerating level combinations


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


# ----------------------------------------------------------------------------- the PALM grid

def grid_levels(d, eps, delta):
    """(levels, eps') of theory.md section 2: the nonzero levels tau * (1 + eps')^k, k = 0..K.

    tau = min(delta / (d - 1), 1 / d). The cap at 1/d (a finer grid, so the guarantee still
    holds) keeps g(w) nonzero: the largest coordinate of w is >= 1/d >= tau.
    """
    d = check_d(d)
    eps, delta = check_tolerances(eps, delta)
    if delta == 0:
        raise ValueError("delta must be > 0 for the PALM grid (tau = delta/(d-1) would be 0)")
    tau = min(delta / (d - 1), 1.0 / d)
    ratio = 1.0 + eps / (1.0 - eps)  # 1 + eps', so that 1 / ratio = 1 - eps
    K = math.ceil(math.log(1.0 / tau) / math.log(ratio))
    levels = tau * ratio ** np.arange(K + 1, dtype=float)
    if levels[-1] < 1.0:  # float rounding in log: make sure the top level reaches 1
        levels = np.append(levels, levels[-1] * ratio)
    return levels, ratio


def _top_index(levels):
    """M: the largest k with level_k <= 1 (the max coordinate of g(w) is at most 1)."""
    return int(np.searchsorted(levels, 1.0 + EDGE_TOL, side="right")) - 1


def grid_size_bound(d, eps, delta):
    """Proven upper bound on len(palm_grid(d, eps, delta)): d * (M + 2)^(d - 1).

    M = floor(log_{1+eps'}(1 / tau)) is the largest level index whose level is <= 1. A normalized
    grid point is fixed by the index i of its largest coordinate (d choices) and, for each other
    coordinate, its ratio to the largest: 0 or (1 + eps')^(-m) with m in 0..M (M + 2 choices).
    See docs/guarantee.md for the derivation.
    """
    levels, _ = grid_levels(d, eps, delta)
    return int(d) * (_top_index(levels) + 2) ** (int(d) - 1)


def _relative_indices(idx):
    """Each coordinate's distance in levels below the largest one (-1: a zero coordinate).

    Only the direction of g(w) matters, so this is the identity of a grid point; idx holds
    level indices with -1 for level 0.
    """
    top = idx.max(axis=1, keepdims=True)
    return np.where(idx < 0, -1, top - idx)


def _points(rel, ratio):
    """Normalized grid points from relative indices: coordinate ratio^(-rel), 0 where rel = -1."""
    points = np.where(rel < 0, 0.0, ratio ** (-rel.astype(float)))
    return points / points.sum(axis=1, keepdims=True)


def palm_grid(d, eps, delta):
    """The PALM grid: distinct normalized g(w) over all w in the simplex, sorted lexicographically.

    g(w)_i = largest level <= w_i. A combination of level intervals [a_i, b_i) is some g(w)
    exactly when sum(a) <= 1 < sum(b), so we enumerate coordinate by coordinate, keeping only
    prefixes whose lower ends still fit under 1, and pick the last coordinate's levels by range.
    Combinations equal up to scale are merged through their relative indices.
    """
    d = check_d(d)
    levels, ratio = grid_levels(d, eps, delta)
    lower = np.concatenate([[0.0], levels])  # level index k - 1 covers [lower[k], upper[k])
    upper = np.concatenate([levels, [np.inf]])
    idx = np.zeros((1, 0), dtype=np.int16)  # stored as level index + 1
    lo = np.zeros(1)
    hi = np.zeros(1)
    for coord in range(d):
        k_max = np.searchsorted(lower, 1.0 - lo + EDGE_TOL, side="right") - 1
        k_min = np.zeros_like(k_max)
        if coord == d - 1:  # the last interval must also reach past 1 - (the others' upper ends)
            k_min = np.searchsorted(upper, 1.0 - hi - EDGE_TOL, side="right")
        count = np.maximum(k_max - k_min + 1, 0)
        parent = np.repeat(np.arange(len(lo)), count)
        k = np.repeat(k_min - (np.cumsum(count) - count), count) + np.arange(count.sum())
        idx = np.column_stack([idx[parent], k.astype(np.int16)])
        if coord < d - 1:
            lo = lo[parent] + lower[k]
            hi = hi[parent] + upper[k]
    idx = idx[(idx > 0).any(axis=1)].astype(np.int64) - 1  # all-zero: impossible, max w_i >= 1/d >= tau
    rel = _relative_indices(idx)
    base = len(levels) + 2
    if base ** d < 2 ** 62:  # one int64 code per point: a much faster unique than rows
        codes = (rel + 1) @ (base ** np.arange(d, dtype=np.int64))
        _, first = np.unique(codes, return_index=True)
    else:
        _, first = np.unique(rel, axis=0, return_index=True)
    points = _points(rel[first], ratio)
    return points[np.lexsort(points.T[::-1])]


def snap_to_grid(w, d, eps, delta):
    """g(w) normalized: the PALM grid point of w (one vector or rows), bit-identical to a grid row."""
    w = check_weights(w, d)
    levels, ratio = grid_levels(d, eps, delta)
    rows = np.atleast_2d(w)
    idx = np.searchsorted(levels, rows, side="right") - 1  # -1: below tau, rounded to 0
    points = _points(_relative_indices(idx), ratio)
    return points[0] if w.ndim == 1 else points


# ----------------------------------------------------------------------------- baseline sets

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
    chosen = [int(np.flatnonzero((lattice == np.eye(d)[i]).all(axis=1))[0]) for i in range(min(k, d))]
    dist = np.min(np.linalg.norm(lattice[:, None] - lattice[chosen][None], axis=2), axis=1)
    while len(chosen) < k:
        nxt = int(np.argmax(dist))  # argmax returns the first maximum: deterministic ties
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(lattice - lattice[nxt], axis=1))
    return lattice[chosen]


def dirichlet_users(d, k, seed, alpha=1.0):
    """k weights drawn from Dirichlet(alpha, ..., alpha) with a fixed seed (a user population)."""
    d = check_d(d)
    return np.random.default_rng(seed).dirichlet(np.full(d, float(alpha)), size=int(k))


def random_weights(d, k, seed):
    """k Dirichlet(1) weights (uniform on the simplex): the random-portfolio baseline."""
    return dirichlet_users(d, k, seed, alpha=1.0)
