"""Consolidation: where one new policy could replace several members (docs/search.md).

Once every row is certified, U is close to OPT. Each weight c of a lattice gets a predicted
value: halfway between the best told row at c and the value attaining U(c). An exact set cover
(milp) over the told rows and these predictions, with the test lattice and the certificate's
corners as elements ((1 - eps) U - delta to reach), says which new weights would give a smaller
portfolio; they are proposed only if that cover is smaller than the exact prune of the told
rows. Predictions only steer: the lazy search (core/search.py, consolidate=k) prunes and
certifies on told values.
"""
import numpy as np
from scipy.optimize import LinearConstraint, linprog, milp

from palm_tasks.core.certificate import TOL, UpperBound, oracle_constraints
from palm_tasks.core.prune import prune
from palm_tasks.core.simplex import simplex_lattice

SAME_WEIGHT = 1e-12  # as core.search: two weights closer than this (max-norm) are the same


def optimistic(w, tw, tv, tse, reference, z):
    """A value vector attaining U(w): argmax w . v over {w_j . v <= V_j, 0 <= v <= 1}."""
    se = np.zeros_like(tv) if tse is None else tse
    A, V = oracle_constraints(tw, tv + z * se)
    if reference is not None:
        V = np.maximum(V, reference)
    res = linprog(-np.asarray(w, float), A_ub=A, b_ub=V, bounds=(0, 1), method="highs")
    return np.clip(res.x, 0.0, 1.0) if res.status == 0 else tv[np.argmax(tv @ w)].copy()


def consolidation_plan(cert, tw, tv, tse, reference, eps, delta, z, trained):
    """New weights (a list) where one policy could replace several members, or [] (module
    docstring); `trained`: the weights already trained, never proposed again."""
    d = tw.shape[1]
    se = np.zeros_like(tv) if tse is None else tse
    low = tv - z * se
    members = prune(tw, tv, eps, delta, method="exact", std_errors=tse, z=z, reference=reference)
    res_c, res_t = {2: (100, 200), 3: (20, 30), 4: (9, 12)}.get(d, (6, 8))
    cand = simplex_lattice(d, res_c)
    cand = np.array([c for c in cand if not any(np.abs(t - c).max() <= SAME_WEIGHT for t in trained)])
    cand = cand.reshape(-1, d)
    if len(cand) == 0:
        return []
    A, V = oracle_constraints(tw, tv + z * se)
    if reference is not None:
        V = np.maximum(V, reference)
    bound = UpperBound(A, V)
    pred = np.array([0.5 * (low[np.argmax(low @ c)] + optimistic(c, tw, tv, tse, reference, z)) for c in cand])
    elements = np.vstack([simplex_lattice(d, res_t), cert.corner_weights])
    need = (1 - eps) * np.array([bound(e) for e in elements]) - delta - TOL
    rows = np.vstack([low, pred])
    covers = rows @ elements.T >= need[None, :]
    keep = covers.any(axis=0)
    cost = np.concatenate([np.full(len(low), 1.0), np.full(len(pred), 1.0 + 1e-3)])
    sol = milp(cost, constraints=LinearConstraint(covers[:, keep].T.astype(float), lb=1),
               integrality=np.ones(len(rows)), bounds=(0, 1), options={"time_limit": 10.0})
    if sol.status != 0:
        return []
    chosen = np.flatnonzero(sol.x > 0.5)
    if len(chosen) >= len(members):
        return []
    return [cand[i - len(low)].copy() for i in chosen if i >= len(low)]
