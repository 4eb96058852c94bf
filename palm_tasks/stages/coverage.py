"""Stage coverage: quality gate, certificate over the simplex with the evidence, set-cover
pruning, the evidence audit, gaps -> the portfolio.

Reads:  data/pool.json, data/soups.json, data/samples/eval.json; the params in PARAMS
Writes: portfolio.json (schema.Portfolio), metrics/coverage.json, plots/ (gaps, the simplex map,
        gap vs portfolio size, member values)

Certificate and pruning follow docs/theory.md sections 3, 4 and 6, with the best-of-N
reference of the base's sample pool in the upper bound (section 8); `oracle_check` tests the
alignment-oracle assumption the certificate rests on (section 9). Only policies that pass the
quality gate (section 10) may be members. The evidence audit measures the chosen portfolio's
gap to the evidence (best-of-N and every measured policy) on the test weights. Users are routed
by the one routing rule (core.routing).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from palm_tasks import schema
from palm_tasks.audit import evidence_audit
from palm_tasks.best_of_n import BestOfN
from palm_tasks.config import PalmConfig
from palm_tasks.core import metrics, routing, simplex
from palm_tasks.core.certificate import certify
from palm_tasks.core.prune import prune
from palm_tasks.dvc_metrics import write_metrics
from palm_tasks.log import say, warn
from palm_tasks.paths import Paths
from palm_tasks.schema import Certificate, Member, PolicyTable, Portfolio, load_pool, load_soups

PARAMS = ("coverage", "seed", "task", "traits", "gate", "training.min_relevance")  # min_relevance: best-of-N
DEPS = ("data/pool.json", "data/soups.json", "data/samples")
OUTS = ("portfolio.json",)
METRICS = ("metrics/coverage.json",)
PLOTS = ("plots/gaps.json", "plots/simplex_map.json", "plots/gap_vs_size.json", "plots/member_values.json",
         "plots/simplex_map.png", "plots/gap_vs_size.png", "plots/member_values.png")
RUNS_JOBS = False
# metrics/coverage.json, what `dvc metrics show` tabulates; every other figure `run` returns is in
# portfolio.json (certificate, conservative_certificate, coverage, evidence, oracle_check, gate)
METRIC_KEYS = ("portfolio_size", "pool_size", "soups_in_portfolio", "certified", "max_eps", "max_delta",
               "conservative_certified", "worst_evidence_gap", "mean_evidence_gap", "evidence_eps",
               "evidence_contradicts",
               "oracle_rows_beaten", "gate_passed", "production", "max_multiplicative_gap",
               "mean_multiplicative_gap", "usage_perplexity")
RELATIVE_TO = ("the alignment oracle checked against the evidence: at each training weight OPT is "
               "bounded by the best of the trained policy, every other candidate and best-of-N "
               "sampling from the base; values are means over the eval prompts")


def run(cfg: PalmConfig, root: Path, run_jobs=None) -> dict:
    from palm_tasks.report.plots import write_plots

    paths = Paths(root)
    portfolio, figures, gap_rows, test = build(cfg, paths, load_pool(root).policies, load_soups(root).policies,
                                               samples=schema.load_samples(root))
    schema.write(paths.portfolio, portfolio)
    write_metrics(root, METRICS[0], {k: figures[k] for k in METRIC_KEYS})  # the rest: portfolio.json
    schema.write(paths.plots / "gaps.json", gap_rows)
    write_plots(portfolio, test, cfg.seed, paths.plots)
    c = cfg.coverage
    say(f"coverage: portfolio of {figures['portfolio_size']} of {figures['pool_size']} trained + "
        f"{figures['soup_candidates']} soups ({figures['soups_in_portfolio']} soups in it), "
        f"{'CERTIFIED' if figures['certified'] else 'NOT certified'} at eps={c.eps}, delta={c.delta} "
        f"(max eps {figures['max_eps']:.4f}, max delta {figures['max_delta']:.4f}, relative to the oracle "
        f"and best-of-{figures['best_of_n']})")
    ev = portfolio.evidence
    say(f"coverage: worst evidence gap {ev['worst_gap']:.4f} at w = {ev['worst_weight']} against "
        f"{ev['worst_against']} (mean {ev['mean_gap']:.4f}, {ev['test_weights']} test weights); at delta "
        f"{c.delta} the evidence asks for eps {ev['evidence_eps']:.4f} (the certificate reaches "
        f"{figures['max_eps']:.4f}); largest se of a value {figures['max_value_se']:.4f}")
    for reason in portfolio.blockers():
        warn(f"coverage: not for production: {reason}")
    if figures["oracle_rows_beaten"]:
        warn(f"{figures['oracle_rows_beaten']} of {figures['pool_size']} trained policies are beaten at their "
             f"own weight by another candidate (worst by {figures['oracle_max_shortfall']:.4f}): the "
             "alignment oracle assumption behind the certificate does not hold there (portfolio.json oracle_check)")
    return figures


def build(cfg: PalmConfig, paths: Paths, trained, soups, members=None, samples=None):
    """(portfolio, coverage figures, gap rows of the lattice, test weights) for a pool of trained
    policies and soups; `members` (row indices into trained + soups) skips the pruning; `samples`
    (the base's sample pool on the eval prompts) brings the evidence in."""
    c = cfg.coverage
    pool = list(trained) + list(soups)
    oracle = np.array([True] * len(trained) + [False] * len(soups))
    W = np.array([p.weights for p in pool])
    R = np.array([p.value.mean for p in pool])
    SE = np.array([p.value.se for p in pool])
    bon = None if samples is None else BestOfN(samples, cfg.training.min_relevance)
    ref, ref_se = (None, None) if bon is None else bon(W)

    def reference(z):
        return None if ref is None else ref + z * ref_se

    gate = quality_gate(cfg, pool, samples)
    candidates = np.array([gate["members"][p.key]["passed"] for p in pool])
    if not candidates.any():  # nothing may be served: choose among all, never for production
        candidates = np.ones(len(pool), bool)
    if members is None:
        members = prune(W, R, c.eps, c.delta, std_errors=SE, z=c.z, oracle=oracle, candidates=candidates,
                        reference=reference(c.z))
    members = np.asarray(members, int)
    gate = {**gate, "members": {pool[j].key: gate["members"][pool[j].key] for j in members},
            "excluded": [p.key for p, ok in zip(pool, candidates) if not ok]}
    gate["passed"] = all(g["passed"] for g in gate["members"].values())
    cert = certify(W, R, c.eps, c.delta, members=members, std_errors=SE, z=c.z, oracle=oracle,
                   reference=reference(c.z))
    pool_cert = certify(W, R, c.eps, c.delta, std_errors=SE, z=c.z, oracle=oracle, reference=reference(c.z))
    # The same members with noise taken into account: values - z se, oracle bounds + z se.
    noisy = certify(W, R, c.eps, c.delta, members=members, std_errors=SE, z=c.z_conservative,
                    oracle=oracle, reference=reference(c.z_conservative))
    check = metrics.oracle_check(W, R, SE, oracle, z_significant=c.z_significant)

    lattice = simplex.simplex_lattice(cfg.d, c.test_lattice)
    users = simplex.dirichlet_users(cfg.d, c.test_users, cfg.seed)
    test = np.vstack([lattice, users])
    gap, gap_users = metrics.gaps(R, members, test), metrics.gaps(R, members, users)
    share = routing.usage_shares(users, R[members], SE[members], c.z)
    summary = {
        "test_weights": int(len(test)),
        "test_weights_are": f"a simplex lattice of step 1/{c.test_lattice} ({len(lattice)}) plus "
                            f"{len(users)} Dirichlet(1) users; gaps relative to the best of the "
                            f"candidates ({len(trained)} trained, {len(soups)} soups)",
        "max_multiplicative_gap": gap.max_multiplicative,
        "mean_multiplicative_gap": gap.mean_multiplicative,
        "max_additive_gap": gap.max_additive,
        "mean_additive_gap": gap.mean_additive,
        "users_mean_multiplicative_gap": gap_users.mean_multiplicative,
        "usage_perplexity": float(metrics.usage_perplexity(R, members, users, std_errors=SE, z=c.z)),
    }
    audit = evidence_audit(cfg, test, R, SE, members, bon, [p.key for p in pool])
    if ref is not None:  # the router's bound uses it as the certificate does
        audit["reference_at_oracle"] = {"values": ref[oracle].round(6).tolist(),
                                        "std_errors": ref_se[oracle].round(6).tolist()}
    portfolio = Portfolio(
        id=portfolio_id([pool[j].key for j in members], c.eps, c.delta, c.z),
        task=cfg.task, traits=tuple(cfg.traits), eps=c.eps, delta=c.delta, z=c.z,
        members=tuple(Member(key=pool[j].key, kind=pool[j].kind, path=paths.relative(pool[j].path),
                             weights=pool[j].weights, value=pool[j].value, share=float(s),
                             ingredients=pool[j].ingredients, lambdas=pool[j].lambdas)
                      for j, s in zip(members, share)),
        certificate=Certificate.of(cert, RELATIVE_TO),
        oracle=PolicyTable(tuple(p.key for p in trained), *(tuple(map(tuple, a[oracle])) for a in (W, R, SE))),
        soup_rows=PolicyTable(tuple(p.key for p in soups), *(tuple(map(tuple, a[~oracle])) for a in (W, R, SE))),
        pool=tuple(p.key for p in trained),
        soups={"candidates": [p.key for p in soups], "in_portfolio": int((~oracle[members]).sum()),
               "candidate_share": len(soups) / len(pool)},
        pool_certificate={"certified": bool(pool_cert.certified), "max_eps": float(pool_cert.max_eps),
                          "max_delta": float(pool_cert.max_delta)},
        conservative_certificate={"z": c.z_conservative, "certified": bool(noisy.certified),
                                  "worst_slack": float(noisy.worst_slack), "max_eps": float(noisy.max_eps),
                                  "max_delta": float(noisy.max_delta)},
        oracle_check=check.to_dict(), coverage=summary, evidence=audit, gate=gate,
        base_model_sha256=next((p.base_model_sha256 for p in trained if p.base_model_sha256), None),
    )
    figures = {
        "portfolio_size": len(members), "pool_size": len(trained), "soup_candidates": len(soups),
        "soups_in_portfolio": portfolio.soups["in_portfolio"],
        "soup_candidate_share": portfolio.soups["candidate_share"],
        "certified": bool(cert.certified), "worst_slack": float(cert.worst_slack),
        "max_eps": float(cert.max_eps), "max_delta": float(cert.max_delta),
        "conservative_certified": bool(noisy.certified), "conservative_max_eps": float(noisy.max_eps),
        "conservative_max_delta": float(noisy.max_delta),
        "oracle_rows_beaten": check.n_beaten, "oracle_max_shortfall": float(check.shortfall.max(initial=0.0)),
        "best_of_n": audit.get("best_of_n", 0), "worst_evidence_gap": audit.get("worst_gap", 0.0),
        "mean_evidence_gap": audit.get("mean_gap", 0.0), "evidence_eps": audit.get("evidence_eps", 0.0),
        "evidence_contradicts": bool(audit.get("contradicted", False)),
        "gate_passed": bool(gate["passed"]), "gate_excluded": len(gate["excluded"]),
        "max_value_se": float(SE.max(initial=0.0)),
        "production": not portfolio.blockers(),
        **{k: v for k, v in summary.items() if isinstance(v, (int, float))},
    }
    gap_rows = [{"w": dict(zip(cfg.traits, w.round(4).tolist())), "multiplicative_gap": float(m),
                 "additive_gap": float(a)} for w, m, a in zip(lattice, gap.multiplicative, gap.additive)]
    return portfolio, figures, gap_rows, test


def quality_gate(cfg: PalmConfig, pool, samples) -> dict:
    """Who may be served (docs/theory.md section 10): a policy passes when at most
    gate.max_degenerate_share of its eval answers are degenerate and its mean relevance reaches
    gate.min_relevance_ratio of the base model's (measured on the same prompts, in the sample pool)."""
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
            if floor is not None and q["relevance"] < floor:
                reasons.append(f"relevance {q['relevance']:.3f} < {g.min_relevance_ratio} x base "
                               f"{base['relevance']:.3f}")
        out[p.key] = {**{k: v for k, v in q.items() if isinstance(v, (int, float))},
                      "passed": not reasons, "reasons": reasons}
    return {"rule": {"max_degenerate_share": g.max_degenerate_share,
                     "min_relevance_ratio": g.min_relevance_ratio},
            "base": base, "members": out}


def portfolio_id(member_keys, eps: float, delta: float, z: float) -> str:
    """The same members at the same tolerances are the same portfolio, whoever computes it."""
    key = json.dumps({"members": sorted(member_keys), "eps": eps, "delta": delta, "z": z}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]
