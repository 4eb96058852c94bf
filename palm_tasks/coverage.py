"""Coverage of the whole simplex: certificate, set-cover pruning, lazy search, gaps (theory.md 3-7).

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

Numerics: every U we use is an upper bound proven by an explicit dual certificate (so LP or
Qhull round-off can only make the certificate more conservative), and a corner counts as covered
when its slack is <= TOL = 1e-9 (a reward unit is 1, so this is far below any evaluation noise).
"""
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import LinearConstraint, linprog, milp, nnls
from scipy.spatial import HalfspaceIntersection, QhullError

from palm_tasks.grid import check_d, check_tolerances, check_weights, snap_to_grid

TOL = 1e-9  # slack at or below this counts as covered; also the dual-gap tolerance of U
SAME_WEIGHT = 1e-12  # two training weights closer than this (max-norm) are the same weight
RELATIVE_TO = ("the alignment oracle (each oracle policy optimal for its training weight), "
               "the measured value estimates, and the evaluation prompt set")


# ----------------------------------------------------------------------------- input checks

def _check_values(values, n, d, name="values"):
    values = np.asarray(values, dtype=float)
    if values.shape != (n, d):
        raise ValueError(f"{name} must have shape {(n, d)} (one row per training weight), got {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contain NaN or inf")
    return values


def _problem(train_weights, values, eps, delta, members, std_errors, z, oracle):
    """Validated arrays: (W, R, SE, z, oracle mask, members, eps, delta)."""
    eps, delta = check_tolerances(eps, delta)
    W = check_weights(train_weights)
    if W.ndim != 2:
        raise ValueError(f"train_weights must have shape (n, d), got {W.shape}")
    n, d = W.shape
    R = _check_values(values, n, d)
    if (R < -TOL).any() or (R > 1 + TOL).any():
        raise ValueError(f"values must be normalized rewards in [0, 1], got range [{R.min()}, {R.max()}]")
    SE = np.zeros((n, d)) if std_errors is None else _check_values(std_errors, n, d, "std_errors")
    if (SE < 0).any():
        raise ValueError("std_errors must be >= 0")
    z = float(z)
    if not (np.isfinite(z) and z >= 0):
        raise ValueError(f"z must be a finite number >= 0, got {z}")
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
    from itertools import combinations
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


def _lp_bound(w, A, V):
    """U(w) by one HiGHS linear program, returned as its (proven) dual bound."""
    if len(A) == 0:
        return float(w.sum())  # only the box 0 <= v <= 1
    res = linprog(-w, A_ub=A, b_ub=V, bounds=(0, 1), method="highs")
    if res.status != 0:
        raise RuntimeError(f"upper-bound LP failed at w={w.tolist()}: {res.message}")
    d = len(w)
    G = np.vstack([A, np.eye(d)])
    lam = -np.concatenate([res.ineqlin.marginals, res.upper.marginals])
    return _dual_bound(w, G, np.concatenate([V, np.ones(d)]), lam)


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
        if self.vertices is not None:
            v = self.vertices[np.argmax(self.vertices @ w)]
            active = self.h - self.G @ v <= 1e-9
            lam, _ = nnls(self.G[active].T, w)
            bound = _dual_bound(w, self.G[active], self.h[active], lam)
            if bound - w @ v <= TOL:
                return bound
        return _lp_bound(w, self.A, self.V)  # degenerate polytope: one LP (milliseconds)


def upper_bounds(weights, A, V):
    """U(w) for each row of weights (see UpperBound)."""
    bound = UpperBound(A, V)
    return np.array([bound(w) for w in np.atleast_2d(weights)])


def _polytope_vertices(G, h):
    """Vertices of {G v <= h}, or None when it has no interior (then LPs are used instead)."""
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


def _bounds_inputs(W, R, SE, z, mask):
    """Pessimistic member values (R - z se) and the optimistic oracle constraints (w_j, V_j)."""
    optimistic = R + z * SE
    A = W[mask]
    V = (A @ optimistic.T).max(axis=1) if len(A) else np.zeros(0)  # best value known at w_j
    return R - z * SE, A, V


def _slack_summary(corners, lower, upper, eps, delta):
    slacks = (1 - eps) * upper - delta - lower
    worst = int(np.argmax(slacks))
    pos = upper > 0
    max_eps = max(0.0, float(np.max(1 - (lower[pos] + delta) / upper[pos]))) if pos.any() else 0.0
    max_delta = max(0.0, float(np.max((1 - eps) * upper - lower)))
    return slacks, worst, max_eps, max_delta


def certify(train_weights, values, eps, delta, members=None, std_errors=None, z=0.0, oracle=None):
    """Certificate of theory.md section 4 for the portfolio `members` (row indices; all if None).

    oracle: boolean mask of rows trained for their weight (default all); only these give the
    upper bound's constraints, any row may be a member. With std_errors and z > 0, members count
    with R - z se and the oracle constraints use R + z se (theory.md section 6).
    """
    W, R, SE, z, mask, members, eps, delta = _problem(
        train_weights, values, eps, delta, members, std_errors, z, oracle)
    pessimistic, A, V = _bounds_inputs(W, R, SE, z, mask)
    corners = corner_weights(pessimistic[members])
    lower = (corners @ pessimistic[members].T).max(axis=1)
    upper = upper_bounds(corners, A, V)
    slacks, worst, max_eps, max_delta = _slack_summary(corners, lower, upper, eps, delta)
    return Certificate(
        certified=bool(slacks[worst] <= TOL), corner_weights=corners, lower=lower, upper=upper,
        slacks=slacks, worst_weight=corners[worst], worst_slack=float(slacks[worst]),
        max_eps=max_eps, max_delta=max_delta, eps=eps, delta=delta, z=z, members=members,
        n_oracle=int(mask.sum()))


# ----------------------------------------------------------------------------- pruning

def set_cover(covers, method="greedy"):
    """Indices (sorted) of a small set of rows of the bool matrix covers (rows cover columns).

    Columns no row covers are ignored. greedy: most new columns first, ties to the lowest index,
    then drop members made redundant (last picked first). exact: minimum cardinality by
    scipy.optimize.milp (ties to lower indices), falling back to greedy if it cannot finish.
    """
    covers = np.asarray(covers, dtype=bool)
    if method not in ("greedy", "exact"):
        raise ValueError(f"method must be 'greedy' or 'exact', got {method!r}")
    covers = covers[:, covers.any(axis=0)]
    n, m = covers.shape
    if m == 0:
        return np.zeros(0, dtype=int)
    if method == "exact" and n * m <= 500_000:
        cost = 1.0 + np.arange(n) / (n * n + 1.0)  # tie-break < 1 in total: cardinality first
        res = milp(cost, constraints=LinearConstraint(covers.T.astype(float), lb=1),
                   integrality=np.ones(n), bounds=(0, 1),
                   options={"mip_rel_gap": 0.0, "time_limit": 20.0})
        if res.status == 0:
            return np.flatnonzero(res.x > 0.5)
    chosen, uncovered = [], np.ones(m, bool)
    while uncovered.any():
        gain = (covers & uncovered).sum(axis=1)
        best = int(np.argmax(gain))
        chosen.append(best)
        uncovered &= ~covers[best]
    for j in reversed(list(chosen)):
        rest = [k for k in chosen if k != j]
        if rest and covers[rest].any(axis=0).all():
            chosen = rest
    return np.array(sorted(chosen), dtype=int)


def prune(train_weights, values, eps, delta, method="greedy", std_errors=None, z=0.0, oracle=None,
          max_rounds=100):
    """Smallest certified subset found (row indices), by set cover over corner weights.

    Elements start as the corner weights of the full set; after each cover the chosen subset is
    re-certified and its failing corners become elements too, until it certifies. If the full
    set is certified, the result is certified. If not, the result covers every element the full
    set covers, and it fails only at weights where the full set fails too.
    """
    W, R, SE, z, mask, _, eps, delta = _problem(
        train_weights, values, eps, delta, None, std_errors, z, oracle)
    pessimistic, A, V = _bounds_inputs(W, R, SE, z, mask)
    full = certify(W, R, eps, delta, std_errors=SE, z=z, oracle=mask)
    elements, upper = full.corner_weights, full.upper
    for _ in range(max_rounds):
        covers = (pessimistic @ elements.T) >= (1 - eps) * upper - delta - TOL
        chosen = set_cover(covers, method)
        if len(chosen) == 0:  # nothing covers anything: keep the single best row at the centroid
            chosen = np.array([int(np.argmax(pessimistic.sum(axis=1)))])
        cert = certify(W, R, eps, delta, members=chosen, std_errors=SE, z=z, oracle=mask)
        failing = cert.slacks > TOL
        new_el, new_up = cert.corner_weights[failing], cert.upper[failing]
        coverable = ((pessimistic @ new_el.T) >= (1 - eps) * new_up - delta - TOL).any(axis=0)
        if not coverable.any():
            return chosen
        elements = np.vstack([elements, new_el[coverable]])
        upper = np.concatenate([upper, new_up[coverable]])
    return np.arange(len(W))


# ----------------------------------------------------------------------------- lazy search

@dataclass(frozen=True)
class SearchResult:
    """What lazy_search trained, the pruned portfolio and its certificate.

    stopped: "certified", "budget" (max_trainings reached) or "stuck" (no untrained corner with
    positive slack: more training cannot help, e.g. the noise z * se alone breaks the bound).
    """
    train_weights: np.ndarray
    values: np.ndarray
    std_errors: np.ndarray | None
    members: np.ndarray
    certificate: Certificate
    full_certificate: Certificate
    trainings: int
    history: list = field(default_factory=list)
    stopped: str = ""

    def to_dict(self):
        return {
            "train_weights": self.train_weights.tolist(),
            "values": self.values.tolist(),
            "std_errors": None if self.std_errors is None else self.std_errors.tolist(),
            "members": [int(m) for m in self.members],
            "certificate": self.certificate.to_dict(),
            "full_certificate": self.full_certificate.to_dict(),
            "trainings": int(self.trainings),
            "portfolio_size": int(len(self.members)),
            "history": self.history,
            "stopped": self.stopped,
        }


def _already(w, trained):
    return any(np.abs(t - w).max() <= SAME_WEIGHT for t in trained)


def lazy_search(oracle, d, eps, delta, max_trainings, z=0.0, snap="grid", prune_method="greedy",
                initial_weights=None, initial_values=None, initial_std_errors=None, on_step=None):
    """Train only where the certificate fails (theory.md section 5); deterministic.

    oracle(w) -> values (d,) or (values, std_errors). Trains the extremes not already among
    initial_weights, then the worst corner weight (snapped to its PALM grid point if
    snap == "grid" and that point is new, else the corner itself; never a weight twice) until
    certified or max_trainings new trainings; then prunes and re-certifies the portfolio.
    Initial rows count as oracle rows (trained for their weight).
    """
    d = check_d(d)
    eps, delta = check_tolerances(eps, delta)
    if snap not in ("grid", "none"):
        raise ValueError(f"snap must be 'grid' or 'none', got {snap!r}")
    if int(max_trainings) < 0:
        raise ValueError(f"max_trainings must be >= 0, got {max_trainings}")
    W, R, SE = [], [], []
    if initial_weights is not None:
        W = list(check_weights(np.atleast_2d(initial_weights), d))
        R = list(_check_values(np.atleast_2d(initial_values), len(W), d, "initial_values"))
        if initial_std_errors is not None:
            SE = list(_check_values(np.atleast_2d(initial_std_errors), len(W), d, "initial_std_errors"))
    history, trainings = [], 0
    with_se = initial_std_errors is not None if W else None

    def train(w, slack, source):
        nonlocal trainings, with_se
        out = oracle(w.copy())
        has_se = isinstance(out, tuple)
        if with_se is None:
            with_se = has_se
        if has_se != with_se:
            raise ValueError("oracle must return std errors always or never (and match initial_std_errors)")
        values, se = out if has_se else (out, None)
        W.append(w)
        R.append(_check_values(np.atleast_2d(values), 1, d, "oracle values")[0])
        if has_se:
            SE.append(_check_values(np.atleast_2d(se), 1, d, "oracle std_errors")[0])
        trainings += 1
        step = {"step": trainings, "weight": w.tolist(), "source": source,
                "worst_slack_before": None if slack is None else float(slack)}
        history.append(step)
        if on_step is not None:
            on_step(step)

    for e in np.eye(d):
        if trainings < max_trainings and not _already(e, W):
            train(e, None, "extreme")
    if not W:
        raise ValueError("nothing to certify: max_trainings is 0 and no initial weights were given")

    def arrays():
        return np.array(W), np.array(R), (np.array(SE) if with_se else None)

    while True:
        tw, tv, tse = arrays()
        cert = certify(tw, tv, eps, delta, std_errors=tse, z=z)
        if cert.certified:
            stopped = "certified"
            break
        if trainings >= max_trainings:
            stopped = "budget"
            break
        target = None
        for c in np.argsort(-cert.slacks, kind="stable"):
            if cert.slacks[c] <= TOL:
                break
            corner = cert.corner_weights[c]
            options = [(snap_to_grid(corner, d, eps, delta), "grid"), (corner, "corner")] \
                if snap == "grid" and delta > 0 else [(corner, "corner")]
            target = next(((w, s, cert.slacks[c]) for w, s in options if not _already(w, W)), None)
            if target is not None:
                break
        if target is None:
            stopped = "stuck"
            break
        train(target[0], target[2], target[1])

    tw, tv, tse = arrays()
    members = prune(tw, tv, eps, delta, method=prune_method, std_errors=tse, z=z)
    final = certify(tw, tv, eps, delta, members=members, std_errors=tse, z=z)
    return SearchResult(train_weights=tw, values=tv, std_errors=tse, members=members,
                        certificate=final, full_certificate=cert, trainings=trainings,
                        history=history, stopped=stopped)


# ----------------------------------------------------------------------------- oracle check

Z_SIGNIFICANT = 2.0  # a shortfall beyond this many standard errors is not evaluation noise


@dataclass(frozen=True)
class OracleCheck:
    """How far the pool contradicts the alignment oracle assumption behind the certificate.

    The certificate's U(w) trusts every oracle row j to be optimal at its own weight w_j. Any row k
    of the pool with w_j . R_k > w_j . R_j proves that row j was not, by shortfall_j = the
    difference (0 where nothing beats it). A large shortfall means U can sit below OPT, so the
    certificate promises more than the policies deliver; `z` says how many standard errors of the
    difference (rewards independent across traits and rows, an approximation) the shortfall is.
    """
    rows: np.ndarray  # (n_oracle,) pool row index of each checked row
    weights: np.ndarray  # (n_oracle, d) their training weights
    shortfall: np.ndarray  # (n_oracle,) best value at w_j in the pool minus row j's own
    z: np.ndarray  # (n_oracle,) shortfall / se of the difference (inf when the se is 0)
    beaten_by: np.ndarray  # (n_oracle,) pool row index of the best row at w_j (itself if unbeaten)
    beaten_by_weights: np.ndarray  # (n_oracle, d) that row's weights

    @property
    def n_beaten(self) -> int:
        return int((self.shortfall > TOL).sum())

    def to_dict(self) -> dict:
        beaten = self.shortfall > TOL
        out = {"checked": int(len(self.shortfall)), "beaten": self.n_beaten,
               "beaten_beyond_2_se": int((beaten & (self.z >= Z_SIGNIFICANT)).sum()),
               "max_shortfall": float(self.shortfall.max(initial=0.0)),
               "mean_shortfall": float(self.shortfall.mean()) if beaten.size else 0.0,
               "assumption": "each oracle row is optimal at its own training weight"}
        if beaten.any():
            i = int(np.argmax(self.shortfall))
            out["worst"] = {"row": int(self.rows[i]), "weights": self.weights[i].round(6).tolist(),
                            "shortfall": float(self.shortfall[i]), "z": float(min(self.z[i], 1e9)),
                            "beaten_by_row": int(self.beaten_by[i]),
                            "beaten_by_weights": self.beaten_by_weights[i].round(6).tolist()}
        return out


def oracle_check(train_weights, values, std_errors=None, oracle=None) -> OracleCheck:
    """Check each oracle row j against every row of the pool at its own weight w_j (any row,
    soups included, may beat it; only oracle rows are checked, as only they bound OPT)."""
    # _problem validates weights, values, std_errors and the mask; the tolerances are not used here
    W, R, SE, _, mask, _, _, _ = _problem(train_weights, values, 0.5, 0.0, None, std_errors, 0.0, oracle)
    rows = np.flatnonzero(mask)
    at_own = W[rows] @ R.T  # (n_oracle, n): every row's value at each oracle row's weight
    best = at_own.argmax(axis=1)
    own = at_own[np.arange(len(rows)), rows]
    shortfall = np.maximum(at_own[np.arange(len(rows)), best] - own, 0.0)
    beaten_by = np.where(shortfall > TOL, best, rows)
    se = np.sqrt(((W[rows] ** 2) * (SE[rows] ** 2 + SE[beaten_by] ** 2)).sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(shortfall > TOL, np.where(se > 0, shortfall / se, np.inf), 0.0)
    return OracleCheck(rows=rows, weights=W[rows], shortfall=shortfall, z=z, beaten_by=beaten_by,
                       beaten_by_weights=W[beaten_by])


# ----------------------------------------------------------------------------- metrics

@dataclass(frozen=True)
class Gaps:
    """Per test weight: multiplicative 1 - P/OPT_est and additive OPT_est - P (theory.md 7).

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


def gaps(values, members, test_weights):
    """Gaps of the portfolio values[members] against the best of all values, per test weight."""
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
    with np.errstate(divide="ignore", invalid="ignore"):
        mult = np.where(opt > 0, 1.0 - P / opt, 0.0)
    return Gaps(multiplicative=mult, additive=opt - P)


def usage_perplexity(values, members, users):
    """exp(entropy) of which member each user is routed to (its best member; ties to the first)."""
    values = np.asarray(values, dtype=float)
    U = check_weights(np.atleast_2d(users), values.shape[1])
    members = np.asarray(members, dtype=int)
    choice = np.argmax(U @ values[members].T, axis=1)
    p = np.bincount(choice, minlength=len(members)) / len(U)
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))
