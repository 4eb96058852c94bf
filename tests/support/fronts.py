"""Synthetic fronts with exact optima, for tests and benchmarks, and the floor: the smallest
(eps, delta)-covering portfolio of such a front (docs/theory.md section 11).

With an exact oracle (a front whose optimal policy for every weight is known) the smallest
covering portfolio can be computed on finite sets: the candidates are the oracle's policies at a
dense set of weights, the elements a dense set of test weights, and the exact set cover
(scipy.optimize.milp) gives the minimum k*; its LP relaxation gives a lower bound. k* bounds
from below both the portfolio size and the trainings of any search that trains only optimal
policies, up to the discretisation (a cover of the whole simplex may need one member more, or
a candidate weight the dense set lacks may need one fewer).

Fronts (all values in [0, 1]^d):

- `PNormFront(d, p, scales)`: the positive part of {v : sum (v_i / s_i)^p <= 1}; p = 2 with unit
  scales is the sphere. The maximiser of w . v is v_i = s_i u_i with u ~ (w_i s_i)^(q - 1),
  1/p + 1/q = 1, normalised to the unit p-norm.
- `FiniteFront(points)`: a finite set of policies; the maximiser is the best point (ties: first).

Pure numpy/scipy. Not part of the product: it lives with the tests, and the benchmarks import it
from here (benchmarks put tests/ on their path).
"""
from dataclasses import dataclass

import numpy as np
from scipy.optimize import LinearConstraint, linprog, milp

from palm_tasks.core.simplex import check_d, check_tolerances, check_weights, simplex_lattice


class PNormFront:
    """Exact oracle of the positive part of a p-norm ball with per-trait scales (p > 1)."""

    def __init__(self, d, p=2.0, scales=None):
        self.d = check_d(d)
        self.p = float(p)
        if not self.p > 1.0:
            raise ValueError(f"p must be > 1, got {p}")
        self.scales = np.ones(self.d) if scales is None else np.asarray(scales, float)
        if self.scales.shape != (self.d,) or not ((self.scales > 0) & (self.scales <= 1)).all():
            raise ValueError(f"scales must be {self.d} numbers in (0, 1], got {scales!r}")

    def __call__(self, w):
        w = np.asarray(w, float)
        q = self.p / (self.p - 1.0)
        u = (w * self.scales) ** (q - 1.0)
        norm = np.linalg.norm(u, ord=self.p, axis=-1, keepdims=True)
        return self.scales * u / norm

    def opt(self, W):
        """OPT(w) = max w . v over the front, for each row of W."""
        W = np.atleast_2d(W)
        return np.einsum("ij,ij->i", W, self(W))


class FiniteFront:
    """Exact oracle of a finite set of policies (rows of points in [0, 1]^d)."""

    def __init__(self, points):
        self.points = np.atleast_2d(np.asarray(points, float))
        self.d = check_d(self.points.shape[1])

    def __call__(self, w):
        w = np.asarray(w, float)
        return self.points[np.argmax(np.atleast_2d(w) @ self.points.T, axis=1)].reshape(w.shape)

    def opt(self, W):
        return (np.atleast_2d(W) @ self.points.T).max(axis=1)


@dataclass(frozen=True)
class Floor:
    """The minimum cover k* (size), its LP lower bound, the chosen candidate weights and values."""
    size: int
    lp_bound: float
    optimal: bool
    weights: np.ndarray
    values: np.ndarray
    n_candidates: int
    n_test: int


def covers_matrix(values, test_weights, opt, eps, delta):
    """covers[i, t]: policy i is within (1 - eps) OPT(t) - delta at test weight t."""
    return (values @ test_weights.T) >= (1.0 - eps) * opt[None, :] - delta - 1e-12


def minimum_cover(front, eps, delta, candidate_res, test_res, time_limit=60.0):
    """Exact minimum (eps, delta)-cover of `front` (docs/theory.md section 11).

    candidate_res, test_res: resolutions of the simplex lattices (step 1/res) of candidate
    weights (the oracle at each is a candidate policy) and of test weights (the elements).
    Returns a Floor; `optimal` is False if milp did not prove optimality within time_limit s.
    """
    eps, delta = check_tolerances(eps, delta)
    for name, res in (("candidate_res", candidate_res), ("test_res", test_res)):
        if int(res) < 1:
            raise ValueError(f"{name} must be >= 1, got {res}")
    cand_w = simplex_lattice(front.d, int(candidate_res))
    _, first = np.unique(front(cand_w), axis=0, return_index=True)  # finite fronts repeat policies
    cand_w = cand_w[np.sort(first)]
    cand_v = front(cand_w)
    test_w = simplex_lattice(front.d, int(test_res))
    covers = covers_matrix(cand_v, test_w, front.opt(test_w), eps, delta)
    if not covers.any(axis=0).all():
        raise ValueError("some test weight is covered by no candidate: raise candidate_res")
    A = LinearConstraint(covers.T.astype(float), lb=1)
    n = len(cand_v)
    lp = linprog(np.ones(n), A_ub=-covers.T.astype(float), b_ub=-np.ones(covers.shape[1]),
                 bounds=(0, 1), method="highs")
    res = milp(np.ones(n), constraints=A, integrality=np.ones(n), bounds=(0, 1),
               options={"time_limit": float(time_limit)})
    chosen = np.flatnonzero(res.x > 0.5)
    return Floor(size=len(chosen), lp_bound=float(lp.fun), optimal=res.status == 0,
                 weights=cand_w[chosen], values=cand_v[chosen], n_candidates=n, n_test=len(test_w))


def true_worst_slack(front, values, eps, delta, test_weights):
    """max over test weights of (1 - eps) OPT(t) - delta - max_j t . R_j against the exact OPT
    (<= 0: the portfolio truly covers every test weight)."""
    test_weights = check_weights(np.atleast_2d(test_weights))
    best = (test_weights @ np.atleast_2d(values).T).max(axis=1)
    return float(((1.0 - eps) * front.opt(test_weights) - delta - best).max())
