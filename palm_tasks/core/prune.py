"""Pruning a pool to a small certified portfolio by set cover (docs/theory.md section 3).

Policy j covers weight g when g . R_j >= (1 - eps) U(g) - delta (U bounds OPT, see
certificate.py). The elements to cover are the corner weights of the certificate (section 4),
so the pruned portfolio is re-certified over the whole simplex, not only on sampled weights.
"""
import numpy as np
from scipy.optimize import LinearConstraint, milp

from palm_tasks.core.certificate import TOL, certify, check_problem, pessimistic


def set_cover(covers, method="greedy", max_cells=500_000, time_limit=20.0):
    """Indices (sorted) of a small set of rows of the bool matrix covers (rows cover columns).

    Columns no row covers are ignored. greedy: most new columns first, ties to the lowest index,
    then drop members made redundant (last picked first). exact: minimum cardinality by
    scipy.optimize.milp (ties to lower indices), falling back to greedy if it cannot finish:
    when rows x columns exceeds max_cells (default 500 000) or the solver does not prove
    optimality within time_limit seconds (default 20).
    """
    covers = np.asarray(covers, dtype=bool)
    if method not in ("greedy", "exact"):
        raise ValueError(f"method must be 'greedy' or 'exact', got {method!r}")
    covers = covers[:, covers.any(axis=0)]
    n, m = covers.shape
    if m == 0:
        return np.zeros(0, dtype=int)
    if method == "exact" and n * m <= max_cells:
        cost = 1.0 + np.arange(n) / (n * n + 1.0)  # tie-break < 1 in total: cardinality first
        res = milp(cost, constraints=LinearConstraint(covers.T.astype(float), lb=1),
                   integrality=np.ones(n), bounds=(0, 1),
                   options={"mip_rel_gap": 0.0, "time_limit": float(time_limit)})
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
          max_rounds=100, candidates=None, reference=None):
    """Smallest certified subset found (row indices), by set cover over corner weights.

    candidates: boolean mask of the rows that may be members (default all; e.g. the rows that
    pass the quality gate, docs/theory.md section 10); every oracle row still bounds OPT.
    reference: as in certify (the best-of-N evidence at each row's weight, section 8).

    Elements start as the corner weights of the full set; after each cover the chosen subset is
    re-certified and its failing corners become elements too, until it certifies. If the full
    set is certified, the result is certified. If not, the result covers every element the full
    set covers, and it fails only at weights where the full set fails too.
    """
    W, R, SE, z, mask, _, eps, delta = check_problem(
        train_weights, values, eps, delta, None, std_errors, z, oracle)
    low = pessimistic(R, SE, z)
    allowed = np.ones(len(W), bool) if candidates is None else np.asarray(candidates, bool)
    if allowed.shape != (len(W),) or not allowed.any():
        raise ValueError(f"candidates must be a boolean mask of shape ({len(W)},) with a True")
    rows = np.flatnonzero(allowed)
    full = certify(W, R, eps, delta, members=rows, std_errors=SE, z=z, oracle=mask, reference=reference)
    elements, upper = full.corner_weights, full.upper
    for _ in range(max_rounds):
        covers = (low @ elements.T) >= (1 - eps) * upper - delta - TOL
        covers[~allowed] = False
        chosen = set_cover(covers, method)
        if len(chosen) == 0:  # nothing covers anything: keep the single best row at the centroid
            chosen = np.array([int(rows[np.argmax(low[rows].sum(axis=1))])])
        cert = certify(W, R, eps, delta, members=chosen, std_errors=SE, z=z, oracle=mask, reference=reference)
        failing = cert.slacks > TOL
        new_el, new_up = cert.corner_weights[failing], cert.upper[failing]
        coverable = ((low[rows] @ new_el.T) >= (1 - eps) * new_up - delta - TOL).any(axis=0)
        if not coverable.any():
            return chosen
        elements = np.vstack([elements, new_el[coverable]])
        upper = np.concatenate([upper, new_up[coverable]])
    return rows


def prune_paired(paired, train_weights, tables, oracle=None, candidates=None, method="greedy", max_rounds=100):
    """prune() at confidence (docs/theory.md section 13): row m covers corner c when the paired
    cover decision (c, m) holds (core.paired.PairedEvidence). Elements start as the corners of
    the full candidate set; the chosen subset's failing corners are added until it certifies at
    confidence, or nothing covers them (then the cover of what can be covered is returned, as
    prune() does)."""
    W = np.atleast_2d(np.asarray(train_weights, float))
    n = len(W)
    allowed = np.ones(n, bool) if candidates is None else np.asarray(candidates, bool)
    if allowed.shape != (n,) or not allowed.any():
        raise ValueError(f"candidates must be a boolean mask of shape ({n},) with a True")
    rows = np.flatnonzero(allowed)
    full = paired.certificate(W, tables, oracle, members=rows)
    alpha = full.split.each
    elements = full.corner_weights
    for _ in range(max_rounds):
        covers = paired.covers(W, tables, oracle, elements, allowed, alpha)
        chosen = set_cover(covers, method)
        if len(chosen) == 0:  # nothing covers anything confidently: the single best row at the centroid
            R = paired.means(tables)
            chosen = np.array([int(rows[np.argmax(R[rows].sum(axis=1))])])
        cert = paired.certificate(W, tables, oracle, members=chosen)
        if cert.certified:
            return chosen
        new = cert.corner_weights[cert.slacks > 0]
        new = new[[not (np.abs(elements - c).max(axis=1) <= 1e-12).any() for c in new]]  # not yet elements
        coverable = paired.covers(W, tables, oracle, new, allowed, alpha).any(axis=0) if len(new) else []
        if not np.any(coverable):  # the routed members fail where others would hold: keep every row
            return rows if full.certified else chosen
        elements = np.vstack([elements, new[coverable]])
    return rows
