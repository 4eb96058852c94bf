"""Evidence: what the certificate must survive (docs/theory.md sections 8 and 9).

The certificate is relative to the alignment oracle. The evidence tests the oracle with
measurements that need no training:

- the **best-of-N reference** BoN_N(w): sample N answers per evaluation prompt from the base
  model (the sample pool, scored once by every reward), return the one with the best w . r.
  Its value vector R_BoN(w) is an argmax over N per prompt, so millions of w cost nothing;
- the **evidence** E(w) = max(max_j w . R_j over every measured policy, w . R_BoN(w)), a lower
  bound on what is achievable at w;
- the **evidence gap** of a portfolio at w, 1 - P(w) / E(w) with P(w) the best member's value;
- a row trained for w_j is **beaten** when E(w_j) - w_j . R_j > z * se of that difference.

Pure numpy. The se of w . R from per-trait se's is bounded by sum_i w_i se_i (the traits of one
answer are correlated, and the sd of a sum is at most the sum of the sd's). Two compared
estimates come from different samples, so the se of a difference is the root of the summed
squares.
"""
from dataclasses import dataclass

import numpy as np

def _scalarize(weights, values):
    return np.atleast_2d(np.asarray(weights, float)) @ np.asarray(values, float).T


def _se_of_scalar(weights, std_errors):
    """Upper bound on the se of w . R_j for each (weight, row): sum_i w_i se_ji."""
    return np.atleast_2d(np.asarray(weights, float)) @ np.asarray(std_errors, float).T


def chosen_answers(scores, weights, allowed=None):
    """The scores (m, P, d) of the answer best-of-N picks for each prompt at each weight:
    k*(x, w) = argmax_k w . r(x, y_k) (ties: the first). scores: (P, N, d) rewards of N base
    answers to each of P prompts; weights: (m, d). A policy evaluated on the same prompts is
    compared with it prompt by prompt (docs/theory.md section 13).

    allowed: (P, N) booleans, the answers the reference may pick (the on-topic ones, as the
    members are trained to give); a prompt with no allowed answer picks among all N, so the
    reference never drops below what the members are held to.
    """
    S = np.asarray(scores, float)
    if S.ndim != 3 or S.shape[0] < 1 or S.shape[1] < 1:
        raise ValueError(f"scores must have shape (prompts, N, d), got {S.shape}")
    W = np.atleast_2d(np.asarray(weights, float))
    if W.shape[1] != S.shape[2]:
        raise ValueError(f"weights have {W.shape[1]} traits, scores {S.shape[2]}")
    P = S.shape[0]
    scalar = np.einsum("pnd,md->mpn", S, W)  # (m, P, N)
    if allowed is None:
        best = scalar.argmax(axis=2)  # (m, P): first maximum
    else:
        A = np.asarray(allowed, bool)
        if A.shape != S.shape[:2]:
            raise ValueError(f"allowed must have shape {S.shape[:2]}, got {A.shape}")
        A = A | ~A.any(axis=1, keepdims=True)  # a prompt with none allowed: all of its answers
        best = np.where(A[None], scalar, -np.inf).argmax(axis=2)
    return S[np.arange(P)[None, :], best]  # (m, P, d)


def best_of_n(scores, weights, allowed=None):
    """Value vectors of BoN_N at each weight: (mean (m, d), se (m, d), scalar se (m,)).

    R_BoN(w) = mean over prompts of r(x, y_k*) (`chosen_answers`); its se is the std over
    prompts / sqrt(P), and the scalar se is that of w . r(x, y_k*) over prompts (the traits of
    one answer are not independent).
    """
    W = np.atleast_2d(np.asarray(weights, float))
    chosen = chosen_answers(scores, W, allowed)
    P = chosen.shape[1]
    mean = chosen.mean(axis=1)
    ddof = 1 if P > 1 else 0
    se = chosen.std(axis=1, ddof=ddof) / np.sqrt(P)
    scalar_se = np.einsum("mpd,md->mp", chosen, W).std(axis=1, ddof=ddof) / np.sqrt(P)
    return mean, se, scalar_se


@dataclass(frozen=True)
class Evidence:
    """E(w) at m weights and where it comes from.

    value (m,): E(w); se (m,): its se; source (m,): index of the measured policy that reaches
    it, or -1 for the best-of-N reference; policy_value (m,) and bon_value (m,): both parts.
    """
    weights: np.ndarray
    value: np.ndarray
    se: np.ndarray
    source: np.ndarray
    policy_value: np.ndarray
    bon_value: np.ndarray


def evidence(weights, values, std_errors, bon_value, bon_se) -> Evidence:
    """E(w) = max(best measured policy at w, w . R_BoN(w)) at each weight (theory section 8).

    values/std_errors (n, d): every measured policy (may be empty); bon_value (m,) and
    bon_se (m,): w . R_BoN(w) and its se at the same weights (`best_of_n`, then `scalar`).
    Ties go to the measured policy.
    """
    W = np.atleast_2d(np.asarray(weights, float))
    bon = np.asarray(bon_value, float).reshape(len(W))
    bon_se = np.asarray(bon_se, float).reshape(len(W))
    R = np.asarray(values, float).reshape(-1, W.shape[1])
    if len(R):
        S = _scalarize(W, R)  # (m, n)
        best = S.argmax(axis=1)
        pol = S[np.arange(len(W)), best]
        pol_se = _se_of_scalar(W, np.asarray(std_errors, float).reshape(R.shape))[np.arange(len(W)), best]
    else:
        best, pol, pol_se = np.zeros(len(W), int), np.full(len(W), -np.inf), np.zeros(len(W))
    from_policy = pol >= bon
    return Evidence(weights=W, value=np.where(from_policy, pol, bon), se=np.where(from_policy, pol_se, bon_se),
                    source=np.where(from_policy, best, -1), policy_value=pol, bon_value=bon)


def scalar(weights, values):
    """w_m . R_m row by row: (m, d), (m, d) -> (m,)."""
    return np.einsum("md,md->m", np.atleast_2d(np.asarray(weights, float)), np.atleast_2d(np.asarray(values, float)))


def evidence_gaps(portfolio_values, evidence_values):
    """1 - P(w) / E(w), elementwise; 0 where E(w) <= 0 (nothing to fall short of)."""
    P, E = np.asarray(portfolio_values, float), np.asarray(evidence_values, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(E > 0, 1.0 - P / E, 0.0)


@dataclass(frozen=True)
class Beaten:
    """Rows whose own weight shows the oracle fell short (theory section 9).

    shortfall (n,): E(w_j) - w_j . R_j (>= 0); se (n,): its se; beaten (n,) bool: shortfall >
    z * se; by (n,): the index of the policy reaching E(w_j), -1 for best-of-N.
    """
    shortfall: np.ndarray
    se: np.ndarray
    beaten: np.ndarray
    by: np.ndarray
    z: float


def beaten_rows(train_weights, values, std_errors, ev: Evidence, z) -> Beaten:
    """Which trained rows the evidence at their own weight beats by more than z se.

    ev must be `evidence` at train_weights (row j's own value is among its candidates, so the
    shortfall is >= 0 and a row is never beaten by itself).
    """
    W = np.atleast_2d(np.asarray(train_weights, float))
    own = np.einsum("nd,nd->n", W, np.asarray(values, float))
    own_se = np.einsum("nd,nd->n", W, np.asarray(std_errors, float))
    shortfall = np.maximum(ev.value - own, 0.0)
    se = np.sqrt(own_se ** 2 + ev.se ** 2)
    is_self = ev.source == np.arange(len(W))
    beaten = (shortfall > z * se) & ~is_self & (shortfall > 0)
    return Beaten(shortfall=shortfall, se=se, beaten=beaten, by=ev.source.copy(), z=float(z))
