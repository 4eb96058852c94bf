"""The certificate of (eps, delta)-coverage over the whole simplex (docs/theory.md sections 4 and 6).

Notation. Trained pairs (w_j, R_j), values R_j in [0, 1]^d. A portfolio S is (eps, delta)-covering
when for every weight w in the simplex

    L_S(w) = max_{j in S} w . R_j  >=  (1 - eps) * OPT(w) - delta.

OPT is unknown; the certificate replaces it by an optimistic upper bound (as in Optimistic Linear
Support): U(w) = max { w . v : w_j . v <= V_j for every oracle row j, 0 <= v <= 1 }, with
V_j = max_k w_j . R_k the best value known at w_j. U(w) >= OPT(w) holds as long as each oracle row
was trained to optimality for its weight (the alignment oracle assumption), because the value
vector of the optimal policy for any w satisfies every constraint. The slack
(1 - eps) U - delta - L_S is convex on each region where L_S is linear, so checking it at the
vertices of those regions (the corner weights) checks the whole simplex.

Noise (docs/theory.md section 6): members count with their pessimistic values R - z se (the same
values the router routes with, see routing.py) and the oracle constraints use R + z se.

Numerics: every U we use is an upper bound proven by an explicit dual certificate (so LP or
Qhull round-off can only make the certificate more conservative), and a corner counts as covered
when its slack is <= TOL = 1e-9 (a reward unit is 1, so this is far below any evaluation noise).
"""
from dataclasses import dataclass
from itertools import combinations

import numpy as np
from scipy.optimize import linprog, nnls
from scipy.spatial import HalfspaceIntersection, QhullError

from palm_tasks.core.simplex import check_tolerances, check_weights

TOL = 1e-9  # slack at or below this counts as covered; also the dual-gap tolerance of U
RELATIVE_TO = ("the alignment oracle (each oracle policy optimal for its training weight), "
               "the measured value estimates, and the evaluation prompt set")


# ----------------------------------------------------------------------------- input checks

def check_values(values, n, d, name="values"):
    """values as a finite float array of shape (n, d), or a ValueError naming `name`."""
    values = np.asarray(values, dtype=float)
    if values.shape != (n, d):
        raise ValueError(f"{name} must have shape {(n, d)} (one row per training weight), got {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contain NaN or inf")
    return values


def check_z(z):
    """z (the noise margin, in standard errors) as a float >= 0, or a ValueError."""
    z = float(z)
    if not (np.isfinite(z) and z >= 0):
        raise ValueError(f"z must be a finite number >= 0, got {z}")
    return z


def check_problem(train_weights, values, eps, delta, members, std_errors, z, oracle):
    """Validated arrays: (W, R, SE, z, oracle mask, members, eps, delta)."""
    eps, delta = check_tolerances(eps, delta)
    W = check_weights(train_weights)
    if W.ndim != 2:
        raise ValueError(f"train_weights must have shape (n, d), got {W.shape}")
    n, d = W.shape
    R = check_values(values, n, d)
    if (R < -TOL).any() or (R > 1 + TOL).any():
        raise ValueError(f"values must be normalized rewards in [0, 1], got range [{R.min()}, {R.max()}]")
    SE = np.zeros((n, d)) if std_errors is None else check_values(std_errors, n, d, "std_errors")
    if (SE < 0).any():
        raise ValueError("std_errors must be >= 0")
    z = check_z(z)
    mask = np.ones(n, bool) if oracle is None else np.asarray(oracle)
    if mask.shape != (n,) or mask.dtype != bool:
        raise ValueError(f"oracle must be a boolean mask of shape ({n},), got {mask.dtype} {mask.shape}")
    if members is None:
        members = np.arange(n)
    members = np.asarray(members)
    if members.ndim != 1 or members.size == 0 or not np.issubdtype(members.dtype, np.integer):
        raise ValueError(f"members must be a non-empty 1-d array of row indices, got {members!r}")
    if members.min() < 0 or members.max() >= n:
        raise ValueError(f"members must index rows 0..{n - 1}, got {members.tolist()}")
    return W, R, SE, z, mask, np.unique(members), eps, delta


# ----------------------------------------------------------------------------- shared with routing

def pessimistic(values, std_errors=None, z=0.0):
    """R - z se: the value a member counts with, in L_S and when routing (docs/theory.md section 6)."""
    R = np.array(values, dtype=float)
    if std_errors is None:
        return R
    SE = np.asarray(std_errors, dtype=float)
    if SE.shape != R.shape:
        raise ValueError(f"std_errors must have the shape of values {R.shape}, got {SE.shape}")
    return R - check_z(z) * SE


def eps_at(value, upper, delta):
    """Smallest eps with value >= (1 - eps) * upper - delta: max(0, 1 - (value + delta) / upper),
    0 where upper <= 0. A float for scalars, an array (elementwise) for arrays."""
    value, upper = np.asarray(value, dtype=float), np.asarray(upper, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = np.where(upper > 0, np.maximum(0.0, 1.0 - (value + delta) / upper), 0.0)
    return float(eps) if eps.ndim == 0 else eps


# ----------------------------------------------------------------------------- corner weights

def _envelope_rows(R):
    """The rows of R that can be on the upper envelope: unique and not dominated by another row."""
    R = np.unique(R, axis=0)
    dominated = ((R[None, :, :] >= R[:, None, :]).all(axis=2)).sum(axis=1) > 1  # beaten by another
    return R[~dominated]


def _polish(W):
    """Clip round-off off the simplex and drop duplicate corners."""
    W = np.clip(W, 0.0, None)
    W = W / W.sum(axis=1, keepdims=True)
    _, first = np.unique(np.round(W, 12), axis=0, return_index=True)
    return W[np.sort(first)]


def corner_weights(R):
    """Vertices (weights) of the regions where w -> max_j w . R_j is linear, plus e_1..e_d.

    d = 2: the envelope's breakpoints are pairwise intersections lying on it (exact).
    d >= 3: vertices of {(x, t) : t >= w(x) . R_j, w(x) in simplex}, x = w[:d-1], by Qhull;
    a brute-force enumeration of d-subsets of constraints is the fallback if Qhull fails.
    """
    R = _envelope_rows(np.asarray(R, dtype=float))
    d = R.shape[1]
    corners = [np.eye(d)]
    if len(R) == 1:
        return np.eye(d)
    if d == 2:
        j, k = np.triu_indices(len(R), 1)
        D = R[j] - R[k]  # w . D = 0 at a = w_1 solving a D_0 + (1 - a) D_1 = 0
        denom = D[:, 0] - D[:, 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            a = -D[:, 1] / denom
        a = a[np.isfinite(a) & (a >= 0) & (a <= 1)]
        cand = np.column_stack([a, 1 - a])
        S = cand @ R.T
        on_env = np.take_along_axis(S, np.argsort(-S, axis=1)[:, :2], 1)
        cand = cand[on_env[:, 0] - on_env[:, 1] <= 1e-12]  # two lines meet at the top
        corners.append(cand)
        return _polish(np.vstack(corners))
    # halfspaces A y + b <= 0 in y = (x_1..x_{d-1}, t)
    top = R.max() + 1.0  # a cap so the polytope is bounded; its vertices are dropped below
    slopes = R[:, :-1] - R[:, -1:]
    hs = np.vstack([
        np.hstack([-np.eye(d - 1), np.zeros((d - 1, 1)), np.zeros((d - 1, 1))]),  # x_i >= 0
        np.hstack([np.ones((1, d - 1)), [[0.0]], [[-1.0]]]),  # sum x <= 1
        np.hstack([slopes, -np.ones((len(R), 1)), R[:, -1:]]),  # w . R_j <= t
        np.hstack([np.zeros((1, d - 1)), [[1.0]], [[-top]]]),  # t <= top
    ])
    centre = np.full(d, 1.0 / d)
    interior = np.append(centre[:-1], (R @ centre).max() + 0.5)
    try:
        Y = HalfspaceIntersection(hs, interior).intersections
    except (QhullError, ValueError):  # ValueError: scipy rejects a borderline interior point
        Y = _vertices_brute_force(hs)
    Y = Y[Y[:, -1] < top - 0.25]
    x = Y[:, :-1]
    corners.append(np.column_stack([x, 1 - x.sum(axis=1)]))
    return _polish(np.vstack(corners))


def _vertices_brute_force(hs):
    """All feasible points where dim constraints meet (halfspaces A y + b <= 0). Exact, slow."""
    A, b = hs[:, :-1], hs[:, -1]
    dim = A.shape[1]
    out = []
    for rows in combinations(range(len(A)), dim):
        sub = A[list(rows)]
        if abs(np.linalg.det(sub)) < 1e-12:
            continue
        y = np.linalg.solve(sub, -b[list(rows)])
        if (A @ y + b <= 1e-9).all():
            out.append(y)
    return np.array(out).reshape(-1, dim)


# ----------------------------------------------------------------------------- upper bound U

def _dual_bound(w, G, h, lam):
    """Proven upper bound on max {w . v : G v <= h, 0 <= v <= 1} from multipliers lam >= 0.

    For feasible v: w . v = lam . G v + r . v <= lam . h + sum(max(r, 0)), with r = w - G^T lam.
    """
    lam = np.clip(lam, 0.0, None)
    r = w - G.T @ lam
    return float(lam @ h + np.clip(r, 0.0, None).sum())


def _lp_duals(w, A, V):
    """Multipliers (over the rows of [A; I]) proving U(w), from one HiGHS linear program."""
    res = linprog(-w, A_ub=A, b_ub=V, bounds=(0, 1), method="highs")
    if res.status != 0:
        raise RuntimeError(f"upper-bound LP failed at w={w.tolist()}: {res.message}")
    return -np.concatenate([res.ineqlin.marginals, res.upper.marginals])


def _lp_bound(w, A, V):
    """U(w) by one HiGHS linear program, returned as its (proven) dual bound."""
    if len(A) == 0:
        return float(w.sum())  # only the box 0 <= v <= 1
    d = len(w)
    G = np.vstack([A, np.eye(d)])
    return _dual_bound(w, G, np.concatenate([V, np.ones(d)]), _lp_duals(w, A, V))


BRUTE_FORCE_SUBSETS = 300  # fewer d-subsets of constraints than this: enumerate them (exact, no Qhull)


def _polytope_vertices(G, h):
    """Vertices of {G v <= h}, or None when it has no interior (then LPs are used instead). A
    small polytope (few constraints, low d: the certificates of a handful of rows) is enumerated
    directly, which is exact and far cheaper than an LP and Qhull."""
    from math import comb

    if comb(len(G), G.shape[1]) <= BRUTE_FORCE_SUBSETS:
        verts = _vertices_brute_force(np.column_stack([G, -h]))
        return verts if len(verts) > G.shape[1] else None
    norms = np.linalg.norm(G, axis=1)
    # Chebyshev centre: the deepest interior point, to hand Qhull a strictly interior point
    res = linprog(np.append(np.zeros(G.shape[1]), -1.0), A_ub=np.column_stack([G, norms]),
                  b_ub=h, bounds=[(None, None)] * G.shape[1] + [(0, 1)], method="highs")
    if res.status != 0 or res.x[-1] < 1e-7:
        return None
    try:
        verts = HalfspaceIntersection(np.column_stack([G, -h]), res.x[:-1]).intersections
    except (QhullError, ValueError):  # ValueError: scipy rejects a borderline interior point
        return None
    return verts


class UpperBound:
    """U(w) = max w . v s.t. A v <= V, 0 <= v <= 1, for many w against the same (A, V).

    Fast path: enumerate the vertices of that polytope once (Qhull), take the best vertex per w
    and prove it optimal with non-negative multipliers on its active constraints (NNLS); any w
    whose proof leaves a gap > TOL gets its own LP. Every returned value is a proven upper bound.
    """

    def __init__(self, A, V):
        self.A, self.V = np.asarray(A, float), np.asarray(V, float)
        d = self.A.shape[1]
        self.G = np.vstack([self.A, -np.eye(d), np.eye(d)])
        self.h = np.concatenate([self.V, np.zeros(d), np.ones(d)])
        self.vertices = _polytope_vertices(self.G, self.h)

    def __call__(self, w) -> float:
        return self.with_duals(w)[0]

    def with_duals(self, w) -> tuple[float, np.ndarray, float]:
        """(U(w), lam, rho): multipliers lam >= 0 of the oracle constraints and the rest rho of the
        proof, so that U(w) <= lam . V' + rho for *any* right-hand side V' (the multipliers stay
        dual feasible whatever V' is: docs/theory.md section 13 bounds U at the true values with
        them). The bound returned is lam . V + rho."""
        w = np.asarray(w, float)
        n, d = len(self.A), len(w)
        if self.vertices is not None:
            v = self.vertices[np.argmax(self.vertices @ w)]
            active = self.h - self.G @ v <= 1e-9
            lam_active, _ = nnls(self.G[active].T, w)
            lam = np.zeros(len(self.G))
            lam[active] = lam_active
            bound = _dual_bound(w, self.G, self.h, lam)
            if bound - w @ v <= TOL:
                return bound, *self._split(w, self.G, self.h, lam, n)
        if n == 0:
            return float(w.sum()), np.zeros(0), float(w.sum())  # only the box 0 <= v <= 1
        G = np.vstack([self.A, np.eye(d)])  # degenerate polytope: one LP (milliseconds)
        h = np.concatenate([self.V, np.ones(d)])
        lam = np.clip(_lp_duals(w, self.A, self.V), 0.0, None)
        return _dual_bound(w, G, h, lam), *self._split(w, G, h, lam, n)

    @staticmethod
    def _split(w, G, h, lam, n):
        """(lam over the oracle rows, rho = the part of the dual bound that does not depend on V)."""
        lam = np.clip(lam, 0.0, None)
        r = w - G.T @ lam
        return lam[:n].copy(), float(lam[n:] @ h[n:] + np.clip(r, 0.0, None).sum())


def upper_bounds(weights, A, V):
    """U(w) for each row of weights (see UpperBound)."""
    bound = UpperBound(A, V)
    return np.array([bound(w) for w in np.atleast_2d(weights)])


def oracle_constraints(W, optimistic):
    """The constraints (A, V) of U: A = the oracle rows' weights, V_j = max_k w_j . optimistic_k
    (the best value known at w_j; optimistic = R + z se over the candidates)."""
    A = np.asarray(W, dtype=float)
    V = (A @ np.asarray(optimistic, dtype=float).T).max(axis=1) if len(A) else np.zeros(0)
    return A, V


# ----------------------------------------------------------------------------- certificate

@dataclass(frozen=True)
class Certificate:
    """(eps, delta)-coverage of the whole simplex by a portfolio, relative to the oracle.

    corner_weights, lower (L_S), upper (U) and slacks ((1 - eps) U - delta - L_S) are per
    corner weight. max_eps is the smallest eps certified at this delta, max_delta the smallest
    delta certified at this eps (both against U, i.e. assuming the oracle rows are optimal).
    """
    certified: bool
    corner_weights: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    slacks: np.ndarray
    worst_weight: np.ndarray
    worst_slack: float
    max_eps: float
    max_delta: float
    eps: float
    delta: float
    z: float
    members: np.ndarray
    n_oracle: int
    tolerance: float = TOL
    relative_to: str = RELATIVE_TO

    def to_dict(self):
        return {
            "certified": bool(self.certified),
            "worst_weight": self.worst_weight.tolist(),
            "worst_slack": float(self.worst_slack),
            "max_eps": float(self.max_eps),
            "max_delta": float(self.max_delta),
            "eps": self.eps, "delta": self.delta, "z": self.z,
            "members": [int(m) for m in self.members],
            "n_oracle": int(self.n_oracle),
            "n_corners": int(len(self.corner_weights)),
            "corner_weights": self.corner_weights.tolist(),
            "slacks": self.slacks.tolist(),
            "tolerance": self.tolerance,
            "relative_to": self.relative_to,
        }


def certify(train_weights, values, eps, delta, members=None, std_errors=None, z=0.0, oracle=None,
            reference=None):
    """Certificate of docs/theory.md section 4 for the portfolio `members` (row indices; all if None).

    oracle: boolean mask of rows trained for their weight (default all); only these give the
    upper bound's constraints, any row may be a member. With std_errors and z > 0, members count
    with R - z se and the oracle constraints use R + z se (docs/theory.md section 6).
    reference (n,): evidence that needs no training at each row's weight, w_j . R_BoN(w_j) (+ z
    se): the constraint becomes V_j = max(best value known at w_j, reference_j) (section 8), so a
    row that fell short of best-of-N raises U instead of silently lowering it.
    """
    W, R, SE, z, mask, members, eps, delta = check_problem(
        train_weights, values, eps, delta, members, std_errors, z, oracle)
    low = pessimistic(R, SE, z)  # members count with R - z se, the oracle constraints with R + z se
    A, V = oracle_constraints(W[mask], R + z * SE)
    if reference is not None:
        ref = check_values(np.reshape(reference, (-1, 1)), len(W), 1, "reference")[:, 0]
        V = np.maximum(V, ref[mask])
    corners = corner_weights(low[members])
    lower = (corners @ low[members].T).max(axis=1)
    upper = upper_bounds(corners, A, V)
    slacks = (1 - eps) * upper - delta - lower
    worst = int(np.argmax(slacks))
    return Certificate(
        certified=bool(slacks[worst] <= TOL), corner_weights=corners, lower=lower, upper=upper,
        slacks=slacks, worst_weight=corners[worst], worst_slack=float(slacks[worst]),
        max_eps=float(np.max(eps_at(lower, upper, delta))),
        max_delta=max(0.0, float(np.max((1 - eps) * upper - lower))),
        eps=eps, delta=delta, z=z, members=members, n_oracle=int(mask.sum()))
