"""What the evidence says of a portfolio and of the trained rows (docs/theory.md sections 8, 9).

- `evidence_audit`: the portfolio against the evidence at every test weight, E(w) the larger of
  every measured policy and best-of-N of the base: its worst gap, the eps it asks for at delta,
  and whether it contradicts the certificate. The coverage stage audits the production
  portfolio with it, the evaluate stage PALM's portfolio in each comparison.
- `check_against_evidence`: the trained policies the evidence beats at their own weight.
"""

from __future__ import annotations

import numpy as np

from palm_tasks.best_of_n import BestOfN
from palm_tasks.config import PalmConfig
from palm_tasks.core.evidence import beaten_rows, evidence, evidence_gaps
from palm_tasks.schema import Policy


def evidence_audit(cfg: PalmConfig, test, R, SE, members, bon: BestOfN | None, keys) -> dict:
    """The portfolio against the evidence at every test weight (docs/theory.md section 8):
    E(w) = max(every measured policy, best-of-N of the base), gap 1 - P(w) / E(w)."""
    if bon is None:
        return {}
    ev = evidence(test, R, SE, *bon(test))
    portfolio_values = (test @ R[members].T).max(axis=1)
    gaps = evidence_gaps(portfolio_values, ev.value)
    # se of the gap: the evidence's and the member's se, relative to E
    best_member = members[(test @ R[members].T).argmax(axis=1)]
    p_se = np.einsum("md,md->m", test, SE[best_member])
    with np.errstate(divide="ignore", invalid="ignore"):
        gap_se = np.where(ev.value > 0, np.sqrt(ev.se ** 2 + p_se ** 2) / ev.value, 0.0)

    def against(i):
        return bon.name if ev.source[i] < 0 else f"policy {keys[ev.source[i]]}"

    def where(i):
        return dict(zip(cfg.traits, np.round(test[i], 4).tolist()))

    i = int(np.argmax(gaps))
    c = cfg.coverage
    # The gap above is the delta = 0 figure (the paper's). The certificate's max eps is reached at
    # delta, so the evidence's counterpart is the smallest eps with P >= (1 - eps) E - delta,
    # which is the gap of P + delta.
    eps_needed = np.maximum(evidence_gaps(portfolio_values + c.delta, ev.value), 0.0)
    k = int(np.argmax(eps_needed))
    # The certificate promises P >= (1 - eps) OPT - delta; E <= OPT, so P below (1 - eps) E - delta
    # by more than the se of the difference contradicts it.
    shortfall = (1 - c.eps) * ev.value - c.delta - portfolio_values
    shortfall_se = np.sqrt(((1 - c.eps) * ev.se) ** 2 + p_se ** 2)
    j = int(np.argmax(shortfall - shortfall_se))
    contradicted = bool(shortfall[j] > shortfall_se[j])
    out = {"best_of_n": bon.n, "min_relevance": bon.min_relevance, "test_weights": int(len(test)),
           "worst_gap": float(gaps[i]), "worst_gap_se": float(gap_se[i]), "worst_weight": where(i),
           "worst_against": against(i), "worst_evidence": float(ev.value[i]),
           "worst_portfolio_value": float(portfolio_values[i]), "mean_gap": float(gaps.mean()),
           "share_beyond_eps": float((gaps > c.eps).mean()),
           "share_bon_is_evidence": float((ev.source < 0).mean()),
           "evidence_eps": float(eps_needed[k]), "evidence_eps_weight": where(k),
           "evidence_eps_against": against(k),
           "contradicted": contradicted,
           "is": "1 - P(w) / E(w) with P the best member's mean value and E(w) the larger of every "
                 f"measured policy and best-of-{bon.n} sampling from the base{bon.on_topic} (same eval "
                 "prompts, same sampler); contradicted = somewhere P(w) < (1 - eps) E(w) - delta by more than "
                 "the se of the difference; evidence_eps = the smallest eps with P(w) >= (1 - eps) E(w) - delta "
                 "at every test weight, to compare with the certificate's max eps"}
    if contradicted:
        out["contradiction"] = {"weight": where(j), "portfolio_value": float(portfolio_values[j]),
                                "evidence": float(ev.value[j]), "against": against(j),
                                "shortfall": float(shortfall[j]), "se": float(shortfall_se[j])}
    return out


def check_against_evidence(ref: list[Policy], bon: BestOfN, z: float) -> dict:
    """The trained policies the evidence beats at their own weight (docs/theory.md section 9):
    E(w_j) - w_j . R_j beyond z se, E the better of every policy of the reference pool and
    best-of-N of the base."""
    trained = [p for p in ref if p.kind == "trained"]
    # candidates: the trained rows first, in order, so candidate j is row j (never beaten by itself)
    candidates = trained + [p for p in ref if p.kind != "trained"]
    out = {"checked": len(trained), "beaten": 0, "beaten_by_best_of_n": 0, "z": z,
           "is": f"trained policies whose own-weight value falls short of the evidence (every policy of the "
                 f"reference pool and best-of-{bon.n} of the base{bon.on_topic}) by more than z se"}
    if not trained:
        return out
    W = np.array([p.weights for p in trained])
    bon_value, bon_se = bon(W)
    ev = evidence(W, np.array([p.values for p in candidates]), np.array([p.std_errors for p in candidates]),
                  bon_value, bon_se)
    check = beaten_rows(W, np.array([p.values for p in trained]), np.array([p.std_errors for p in trained]), ev, z)
    out["beaten"] = int(check.beaten.sum())
    out["beaten_by_best_of_n"] = int((check.beaten & (check.by < 0)).sum())
    if check.beaten.any():
        j = int(np.argmax(np.where(check.beaten, check.shortfall, -np.inf)))
        by = int(check.by[j])
        out["worst"] = {"key": trained[j].key, "weights": list(trained[j].weights),
                        "shortfall": float(check.shortfall[j]), "se": float(check.se[j]),
                        "by": bon.name if by < 0 else f"policy {candidates[by].key}"}
    return out
