"""The PALM weight grid and its size bound (docs/theory.md section 2).

The grid rounds every coordinate of a weight w *down* to a level in
L = {0} U {tau * (1 + eps')^k : k = 0..K} and normalizes; training one policy per grid point is
(eps, delta)-covering. docs/guarantee.md derives the size bound implemented in `grid_size_bound`.

Grid points are built from integer level indices and normalized by one function (`_points`), so
`snap_to_grid(w)` returns bit-for-bit a row of `palm_grid`.
"""
import math

import numpy as np

from palm_tasks.core.simplex import check_d, check_tolerances, check_weights

EDGE_TOL = 1e-12  # slack on the sum constraint when enumerating level combinations


def grid_levels(d, eps, delta):
    """(levels, 1 + eps') of docs/theory.md section 2: the nonzero levels tau * (1 + eps')^k, k = 0..K.

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


def grid_size_upper(d, eps, delta):
    """An upper bound on `grid_size_bound` (hence on the grid) from the formula alone, building
    nothing: d * (M + 2)^(d - 1) with M = floor(log(1 / tau) / log(1 + eps')) + 1 (the + 1 absorbs
    float rounding). Cheap for any eps: tiny eps would make `grid_levels` allocate its K levels."""
    d = check_d(d)
    eps, delta = check_tolerances(eps, delta)
    if delta == 0:
        raise ValueError("delta must be > 0 for the PALM grid (tau = delta/(d-1) would be 0)")
    tau = min(delta / (d - 1), 1.0 / d)
    log_ratio = -math.log1p(-eps)  # log(1 + eps') = -log(1 - eps), accurate for tiny eps
    levels = math.log(1.0 / tau) / log_ratio
    if not math.isfinite(levels):  # eps below ~1e-308: more levels than a float counts
        return math.inf
    return d * (math.floor(levels) + 3) ** (d - 1)


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
