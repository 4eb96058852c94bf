"""What the evidence says of a portfolio and of the trained rows (docs/theory.md sections 8, 9, 13).

- `evidence_audit`: the portfolio against the evidence at every test weight, E(w) the larger of
  every measured policy and best-of-N of the base: its worst gap, the eps it asks for at delta
  (point estimates), and whether it contradicts the certificate: somewhere the paired decision
  (1 - eps) E(w) - P(w) > delta holds at the audit's share of alpha (core.paired). The coverage
  stage audits the production portfolio with it, the evaluate stage PALM's portfolio in each
  comparison.
- `check_against_evidence`: the trained policies the evidence beats at their own weight, each a
  paired decision against the best other candidate or best-of-N.
"""

from __future__ import annotations

import numpy as np

from palm_tasks.best_of_n import BestOfN
from palm_tasks.config import PalmConfig
from palm_tasks.core.evidence import evidence, evidence_gaps
from palm_tasks.core.paired import PairedEvidence
from palm_tasks.schema import Policy


def evidence_audit(cfg: PalmConfig, test, policies: list[Policy], members, bon: BestOfN,
                   paired: PairedEvidence) -> dict:
    """The portfolio `members` (indices into policies) against the evidence at every test weight
    (module docstring)."""
    R = np.array([p.values for p in policies])
    SE = np.array([p.std_errors for p in policies])
    keys = [p.key for p in policies]
    members = np.asarray(members, int)
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
    # The certificate promises P >= (1 - eps) OPT - delta; E <= OPT, so a paired decision that
    # (1 - eps) E - P exceeds delta contradicts it.
    paired_audit = paired.audit(test, np.array([p.weights for p in policies]), [p.scores.scores for p in policies],
                                members)
    out = {"best_of_n": bon.n, "min_relevance": bon.min_relevance, "test_weights": int(len(test)),
           "worst_gap": float(gaps[i]), "worst_gap_se": float(gap_se[i]), "worst_weight": where(i),
           "worst_against": against(i), "worst_evidence": float(ev.value[i]),
           "worst_portfolio_value": float(portfolio_values[i]), "mean_gap": float(gaps.mean()),
           "share_beyond_eps": float((gaps > c.eps).mean()),
           "share_bon_is_evidence": float((ev.source < 0).mean()),
           "evidence_eps": float(eps_needed[k]), "evidence_eps_weight": where(k),
           "evidence_eps_against": against(k),
           "contradicted": paired_audit["contradicted"], "split": paired_audit["split"],
           "is": "1 - P(w) / E(w) with P the best member's mean value and E(w) the larger of every "
                 f"measured policy and best-of-{bon.n} sampling from the base{bon.on_topic} (same eval "
                 "prompts, same sampler); contradicted = somewhere the paired decision (1 - eps) E(w) - P(w) > "
                 "delta holds (alpha split over the test weights); evidence_eps = the smallest eps with "
                 "P(w) >= (1 - eps) E(w) - delta at every test weight, to compare with the certificate's max eps"}
    closest = paired_audit["closest"]
    j = int(np.argmin(np.abs(test - np.array(closest["weight"])).sum(axis=1)))
    detail = {"weight": where(j), "portfolio_value": float(portfolio_values[j]), "evidence": float(ev.value[j]),
              "against": against(j), "shortfall": float(closest["estimate"]),
              "lower": float(closest["lower"]), "upper": float(closest["upper"]), "n": int(closest["n"])}
    out["contradiction" if out["contradicted"] else "closest_to_contradiction"] = detail
    return out


def check_against_evidence(policies: list[Policy], bon: BestOfN, paired: PairedEvidence) -> dict:
    """The trained policies the evidence beats at their own weight (docs/theory.md section 9): the
    paired decision of the best other candidate (a policy, a soup) or best-of-N against each."""
    trained = [p for p in policies if p.kind == "trained"]
    # candidates: the trained rows first, in order, so candidate j is row j
    candidates = trained + [p for p in policies if p.kind != "trained"]
    split = paired.beaten_split(len(trained))
    out = {"checked": len(trained), "beaten": 0, "beaten_by_best_of_n": 0, "split": split.to_dict(),
           "is": f"trained policies whose own-weight value the evidence (every other policy and best-of-{bon.n} "
                 f"of the base{bon.on_topic}) beats, a paired decision each (alpha split over them)"}
    if not trained:
        return out
    oracle = np.array([p.kind == "trained" for p in candidates])
    decisions = paired.beaten(np.array([p.weights for p in candidates]), [p.scores.scores for p in candidates],
                              oracle)[:len(trained)]
    beaten = [(j, dec) for j, dec in enumerate(decisions) if dec.status == "holds"]
    out["beaten"] = len(beaten)
    out["beaten_by_best_of_n"] = sum(len(dec.rows) < 2 for _, dec in beaten)
    out["rows"] = [{"key": trained[j].key, "estimate": round(dec.estimate, 6), "lower": round(dec.lower, 6),
                    "upper": round(dec.upper, 6), "n": dec.n, "beaten": dec.status == "holds",
                    "by": bon.name if len(dec.rows) < 2 else f"policy {candidates[dec.rows[1]].key}"}
                   for j, dec in enumerate(decisions)]
    if beaten:
        j, dec = max(beaten, key=lambda x: x[1].estimate)
        out["worst"] = {"key": trained[j].key, "weights": list(trained[j].weights),
                        "shortfall": float(dec.estimate), "lower": float(dec.lower), "n": dec.n,
                        "by": bon.name if len(dec.rows) < 2 else f"policy {candidates[dec.rows[1]].key}"}
    return out
