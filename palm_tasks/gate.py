"""The quality gate: who may be a member (docs/theory.md section 10).

A policy may be served when at most gate.max_degenerate_share of its evaluation answers are
degenerate and at most gate.max_garbled_share garbled (llm.validity), and its mean relevance
reaches gate.min_relevance_ratio of the base model's on the same prompts (the sample pool's). The coverage stage gates the pool before it
prunes; the lazy search gates each row as it is measured, so that the certificate it stops on is
one of servable members (search_loop.search_from_config).
"""
from __future__ import annotations

from palm_tasks.config import PalmConfig


def quality_gate(cfg: PalmConfig, pool, samples) -> dict:
    """Who may be served (the module docstring's rule), with each policy's figures and the
    reasons it fails."""
    g = cfg.gate
    base = dict(samples.quality) if samples is not None else {}
    floor = g.min_relevance_ratio * base["relevance"] if "relevance" in base else None
    out = {}
    for p in pool:
        q, reasons = p.quality, []
        if "degenerate_share" not in q:
            reasons.append("answer quality not measured (a policy stored before the gate)")
        else:
            if q["degenerate_share"] > g.max_degenerate_share:
                reasons.append(f"{q['degenerate_share']:.1%} degenerate answers > {g.max_degenerate_share:.1%}")
            if q.get("garbled_share", 0.0) > g.max_garbled_share:  # policies stored before it: not measured
                reasons.append(f"{q['garbled_share']:.1%} garbled answers > {g.max_garbled_share:.1%}")
            if floor is not None and q["relevance"] < floor:
                reasons.append(f"relevance {q['relevance']:.3f} < {g.min_relevance_ratio} x base "
                               f"{base['relevance']:.3f}")
        out[p.key] = {**{k: v for k, v in q.items() if isinstance(v, (int, float))},
                      "passed": not reasons, "reasons": reasons}
    return {"rule": {"max_degenerate_share": g.max_degenerate_share,
                     "min_relevance_ratio": g.min_relevance_ratio, "max_garbled_share": g.max_garbled_share},
            "base": base, "members": out}


def rule(cfg: PalmConfig, samples):
    """policy -> whether it passes the gate (quality_gate of it alone): what the search is told."""
    return lambda policy: quality_gate(cfg, [policy], samples)["members"][policy.key]["passed"]
