"""The one routing rule: which portfolio member serves a user (docs/theory.md sections 4, 6, 7).

A user with weights w is served by the member with the largest measured value w . R (the mean of
its per-prompt scores), ties to the first member. That is the member the certificate checks at
every corner of its region (section 13), so a user gets the member the certificate vouched for
at w. The router, the registered MLflow pyfunc, the `share` of users in portfolio.json, the
server and the usage perplexity of section 7 all route with `route` / `usage_shares`.

What is promised at w: value L(w) >= (1 - eps_w) OPT(w) - delta, with OPT(w) <= U(w)
(`GuaranteeBound`, the certificate's upper bound) and eps_w = eps_at(L(w), U(w), delta), never
above the certificate's max_eps. `eps_at` is the certificate's own formula (certificate.py), so
routing and certificate cannot drift apart.
"""
import numpy as np

from palm_tasks.core.certificate import UpperBound, check_values, eps_at, oracle_constraints

__all__ = ["normalize", "route", "usage_shares", "GuaranteeBound", "eps_at"]


def normalize(weights):
    """Weights (d,) or rows (n, d) divided by their sums: the point of the simplex a user means.
    Every caller normalizes through here, so the same input reaches `route` as the same floats
    (a tie between members is then broken the same way everywhere)."""
    w = np.asarray(weights, dtype=float)
    with np.errstate(over="ignore"):  # an overflowing sum is handled below
        total = w.sum(axis=-1, keepdims=True)
    # Finite weights whose sum overflows (1e308 each) would all become 0: such rows are divided
    # by their largest weight first. Other rows are divided by 1.0, which leaves them bit for bit.
    overflow = np.isinf(total) & np.isfinite(w).all(axis=-1, keepdims=True)
    if overflow.any():
        w = w / np.where(overflow, w.max(axis=-1, keepdims=True), 1.0)
        total = w.sum(axis=-1, keepdims=True)
    return w / total


def route(weights, values):
    """The serving member's index (into the rows of values): an int for one weight vector (d,),
    an int array for rows (n, d). The member with the largest w . R; ties to the first.

    Only the direction of w matters (argmax is scale invariant); weights are not checked to lie
    on the simplex here (the caller parses and validates what users send).
    """
    P = np.asarray(values, dtype=float)
    w = np.asarray(weights, dtype=float)
    if P.ndim != 2 or len(P) == 0 or w.ndim not in (1, 2) or w.shape[-1] != P.shape[1]:
        raise ValueError(f"route needs values (members, d) with members >= 1 and weights (d,) or "
                         f"(n, d); got values {P.shape}, weights {w.shape}")
    # Products and sums element by element, not a matrix product: BLAS picks other kernels (and
    # another rounding) for one row than for many, which would break exact ties differently.
    scores = (np.atleast_2d(w)[:, None, :] * P[None, :, :]).sum(axis=2)
    best = np.argmax(scores, axis=1)
    return int(best[0]) if w.ndim == 1 else best


def usage_shares(users, values):
    """Fraction of the users (rows of weights) that `route` sends to each member, in member order."""
    U = np.atleast_2d(np.asarray(users, dtype=float))
    if len(U) == 0:
        raise ValueError("usage_shares needs at least one user")
    choice = route(U, values)
    return np.bincount(choice, minlength=len(values)) / len(U)


class GuaranteeBound:
    """U(w) >= OPT(w) at any weight w (docs/theory.md section 4): the certificate's upper bound
    from oracle rows (policies trained for their weights W), with V_j = max_k w_j . R_k over the
    candidates k: the oracle rows themselves, and the soups when `candidate_values` names them,
    as the certificate does; and at least `reference` (per oracle row: the best-of-N value
    w_j . R_BoN(w_j), section 8). Built from the measured means: the bound a route reports at w;
    the certificate's own decisions hold it to the stated confidence (section 13). Vertices are
    found once; a call is an argmax and a small NNLS.
    """

    def __init__(self, oracle_weights, oracle_values, candidate_values=None, reference=None):
        W = np.atleast_2d(np.asarray(oracle_weights, dtype=float))
        R = check_values(np.atleast_2d(oracle_values), *W.shape, "oracle_values")
        if candidate_values is not None:
            R = np.vstack([R, np.atleast_2d(np.asarray(candidate_values, dtype=float))])
        A, V = oracle_constraints(W, R)
        if reference is not None:
            V = np.maximum(V, check_values(np.reshape(reference, (-1, 1)), len(W), 1, "reference")[:, 0])
        self.upper_bound = UpperBound(A, V)

    def __call__(self, w) -> float:
        return self.upper_bound(np.asarray(w, dtype=float))
