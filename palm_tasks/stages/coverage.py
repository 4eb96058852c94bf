"""Stage coverage: the quality gate, the certificate at confidence, pruning, the audit -> the portfolio.

Reads:  data/pool.json, data/soups.json (the policies with their per-prompt tables),
        data/samples/eval.json (best-of-N); the params in PARAMS
Writes: portfolio.json (portfolio.Portfolio), metrics/coverage.json, plots/ (gaps, the simplex map,
        gap vs portfolio size, member values, the price of precision)

`build` reads top to bottom as the stage's steps:

1. gate: who may be a member (docs/theory.md section 10);
2. certify and prune: the smallest set of candidates whose certificate holds with confidence
   1 - coverage.alpha, every decision paired on common prompts (sections 3, 4, 13), against the
   oracle rows and best-of-N of the base (section 8);
3. audit: the trained rows the evidence beats (section 9) and the portfolio against the
   evidence at every test weight (section 8);
4. measure: gaps on the test weights, each member's share of users (the one routing rule,
   core.routing), the price of precision (section 14);
5. write: the Portfolio, with every figure it was chosen by.

It measures nothing: the align stage measured each policy on the prompts its decisions needed,
and a decision still open here stays open (the portfolio is then not certified).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from palm_tasks import schema
from palm_tasks.audit import check_against_evidence, evidence_audit
from palm_tasks.best_of_n import BestOfN, paired_evidence
from palm_tasks.config import PalmConfig
from palm_tasks.core import metrics, routing, simplex
from palm_tasks.core.prune import prune_paired
from palm_tasks.dvc_metrics import write_metrics
from palm_tasks.gate import quality_gate
from palm_tasks.log import say, warn
from palm_tasks.paths import Paths
from palm_tasks.portfolio import Certificate, Member, PolicyTable, Portfolio
from palm_tasks.price import price_of_precision
from palm_tasks.schema import ArtifactError, load_pool, load_soups

PARAMS = ("coverage", "seed", "task", "traits", "gate", "training.min_relevance",  # min_relevance: best-of-N
          "evaluation.chunk_prompts", "evaluation.n_prompts")  # the planned looks of every decision
DEPS = ("data/pool.json", "data/soups.json", "data/samples")
OUTS = ("portfolio.json",)
METRICS = ("metrics/coverage.json",)
PLOTS = ("plots/gaps.json", "plots/simplex_map.json", "plots/gap_vs_size.json", "plots/member_values.json",
         "plots/price_vs_size.json", "plots/price_vs_compute.json", "plots/simplex_map.png",
         "plots/gap_vs_size.png", "plots/member_values.png", "plots/price_of_precision.png")
RUNS_JOBS = False
# metrics/coverage.json, what `dvc metrics show` tabulates; every other figure `run` returns is in
# portfolio.json (certificate, coverage, evidence, oracle_check, gate, price)
METRIC_KEYS = ("portfolio_size", "pool_size", "soups_in_portfolio", "certified", "alpha", "max_eps", "max_delta",
               "decisions", "open_at_cap", "worst_evidence_gap", "mean_evidence_gap", "evidence_eps",
               "evidence_contradicts", "oracle_rows_beaten", "gate_passed", "production", "answers_evaluated",
               "max_multiplicative_gap", "mean_multiplicative_gap", "usage_perplexity")
RELATIVE_TO = ("the alignment oracle checked against the evidence: at each training weight OPT is bounded "
               "by the best of the trained policy, every other candidate and best-of-N sampling from the "
               "base (upper confidence values), the members count with lower ones; paired decisions on "
               "common evaluation prompts")


def run(cfg: PalmConfig, root: Path, run_jobs=None) -> dict:
    from palm_tasks.report.plots import write_plots

    paths = Paths(root)
    pool = load_pool(root)
    portfolio, figures, gap_rows, test = build(cfg, paths, pool.policies, load_soups(root).policies,
                                               samples=schema.load_samples(root),
                                               cost=pool.history.get("cost", []),
                                               searched=pool.history.get("answers_evaluated"))
    schema.write(paths.portfolio, portfolio)
    write_metrics(root, METRICS[0], {k: figures[k] for k in METRIC_KEYS})  # the rest: portfolio.json
    schema.write(paths.plots / "gaps.json", gap_rows)
    write_plots(portfolio, test, cfg.seed, paths.plots)
    c, cert = cfg.coverage, portfolio.certificate
    say(f"coverage: portfolio of {figures['portfolio_size']} of {figures['pool_size']} trained + "
        f"{figures['soup_candidates']} soups: {cert.statement}")
    say(f"coverage: alpha {c.alpha:g} split over {figures['decisions']} decisions of the certificate "
        f"({cert.split.get('each', 0):.2g} each); every decision would clear eps = {cert.max_eps:.3f} at "
        f"delta {c.delta:g}; {figures['answers_evaluated']} answers measured")
    ev = portfolio.evidence
    say(f"coverage: worst evidence gap {ev['worst_gap']:.3f} ± {ev['worst_gap_se']:.3f} at w = "
        f"{ev['worst_weight']} against {ev['worst_against']}; at delta {c.delta:g} the evidence asks for "
        f"eps {ev['evidence_eps']:.3f}; {'it CONTRADICTS' if ev['contradicted'] else 'it does not contradict'} "
        f"the certificate (paired, alpha {c.alpha:g} over {ev['test_weights']} test weights)")
    for reason in portfolio.blockers():
        warn(f"coverage: not for production: {reason}")
    if figures["oracle_rows_beaten"]:
        warn(f"{figures['oracle_rows_beaten']} of {figures['pool_size']} trained policies are beaten at their own "
             "weight by the evidence: the alignment oracle assumption does not hold there (portfolio.json oracle_check)")
    return figures


def build(cfg: PalmConfig, paths: Paths, trained, soups, members=None, samples=None, cost=(), searched=None):
    """(portfolio, coverage figures, gap rows of the lattice, test weights) for a pool of trained
    policies and soups, each with its per-prompt table; `members` (row indices into trained +
    soups) skips the pruning; `samples`: the base's sample pool on the eval prompts (read from
    the project when not given); `cost`: the search's record of compute (the price of precision);
    `searched`: the answers the align stage measured, rows a repair replaced included (None: those
    of the trained pool's tables)."""
    c = cfg.coverage
    samples = schema.load_samples(paths.root) if samples is None else samples
    pool = list(trained) + list(soups)
    tables = _tables(pool)
    oracle = np.array([True] * len(trained) + [False] * len(soups))
    W, R, SE = (np.array([p.weights for p in pool]), np.array([p.value.mean for p in pool]),
                np.array([p.value.se for p in pool]))
    bon = BestOfN(samples, cfg.training.min_relevance)
    paired = paired_evidence(cfg, bon)

    # 1. gate: who may be a member; none passing: choose among all, never for production
    gate = quality_gate(cfg, pool, samples)
    candidates = np.array([gate["members"][p.key]["passed"] for p in pool])
    if not candidates.any():
        candidates = np.ones(len(pool), bool)

    # 2. certify and prune at confidence 1 - alpha
    if members is None:
        members = prune_paired(paired, W, tables, oracle, candidates)
    members = np.asarray(members, int)
    cert = paired.certificate(W, tables, oracle, members=members)
    pool_cert = paired.certificate(W, tables, oracle)
    gate = {**gate, "members": {pool[j].key: gate["members"][pool[j].key] for j in members},
            "excluded": [p.key for p, ok in zip(pool, candidates) if not ok]}
    gate["passed"] = all(g["passed"] for g in gate["members"].values())

    # 3. audit: the rows the evidence beats, the portfolio against the evidence at every test weight
    check = check_against_evidence(pool, bon, paired)
    lattice = simplex.simplex_lattice(cfg.d, c.test_lattice)
    users = simplex.dirichlet_users(cfg.d, c.test_users, cfg.seed)
    test = np.vstack([lattice, users])
    audit = evidence_audit(cfg, test, pool, members, bon, paired)
    ref, ref_se = bon(W)
    audit["reference_at_oracle"] = {"values": ref[oracle].round(6).tolist(),  # the router's bound
                                    "std_errors": ref_se[oracle].round(6).tolist()}

    # 4. measure: gaps on the test weights, the users each member serves, the price of precision
    gap, gap_users = metrics.gaps(R, members, test), metrics.gaps(R, members, users)
    share = routing.usage_shares(users, R[members])
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
        "usage_perplexity": float(metrics.usage_perplexity(R, members, users)),
    }
    price = price_of_precision(paired, W, tables, oracle, candidates, list(cost), cfg.d)
    per_prompt = pool[0].scores.answers_per_prompt if pool else 0
    soup_answers = sum(len(t) for t in tables[len(trained):]) * per_prompt
    answers = int((sum(len(t) for t in tables[:len(trained)]) * per_prompt if searched is None else searched)
                  + soup_answers)  # the run's cost: every answer measured

    # 5. write: the portfolio and the figures it was chosen by
    portfolio = Portfolio(
        id=portfolio_id([pool[j].key for j in members], c.eps, c.delta, c.alpha),
        task=cfg.task, traits=tuple(cfg.traits), eps=c.eps, delta=c.delta,
        members=tuple(Member(key=pool[j].key, kind=pool[j].kind, path=paths.relative(pool[j].path),
                             weights=pool[j].weights, value=pool[j].value, share=float(s),
                             ingredients=pool[j].ingredients, lambdas=pool[j].lambdas,
                             temperature=cfg.evaluation.temperature)
                      for j, s in zip(members, share)),
        certificate=Certificate.of(cert, RELATIVE_TO),
        oracle=PolicyTable(tuple(p.key for p in trained), *(tuple(map(tuple, a[oracle])) for a in (W, R, SE))),
        soup_rows=PolicyTable(tuple(p.key for p in soups), *(tuple(map(tuple, a[~oracle])) for a in (W, R, SE))),
        pool=tuple(p.key for p in trained),
        soups={"candidates": [p.key for p in soups], "in_portfolio": int((~oracle[members]).sum()),
               "candidate_share": len(soups) / len(pool)},
        pool_certificate={"certified": bool(pool_cert.certified), "max_eps": float(pool_cert.max_eps),
                          "max_delta": float(pool_cert.max_delta), "alpha": c.alpha},
        oracle_check=check, coverage=summary, evidence=audit, gate=gate, price=price,
        base_model_sha256=next((p.base_model_sha256 for p in trained if p.base_model_sha256), None),
    )
    figures = {
        "portfolio_size": len(members), "pool_size": len(trained), "soup_candidates": len(soups),
        "soups_in_portfolio": portfolio.soups["in_portfolio"],
        "soup_candidate_share": portfolio.soups["candidate_share"],
        "certified": bool(cert.certified), "alpha": c.alpha, "worst_slack": float(cert.worst_slack),
        "max_eps": float(cert.max_eps), "max_delta": float(cert.max_delta),
        "decisions": len(cert.decisions), "open_at_cap": len(cert.open_at_cap),
        "oracle_rows_beaten": check["beaten"],
        "best_of_n": audit["best_of_n"], "worst_evidence_gap": audit["worst_gap"],
        "mean_evidence_gap": audit["mean_gap"], "evidence_eps": audit["evidence_eps"],
        "evidence_contradicts": bool(audit["contradicted"]),
        "gate_passed": bool(gate["passed"]), "gate_excluded": len(gate["excluded"]),
        "answers_evaluated": answers, "max_value_se": float(SE.max(initial=0.0)),
        "production": not portfolio.blockers(),
        **{k: v for k, v in summary.items() if isinstance(v, (int, float))},
    }
    gap_rows = [{"w": dict(zip(cfg.traits, w.round(4).tolist())), "multiplicative_gap": float(m),
                 "additive_gap": float(a)} for w, m, a in zip(lattice, gap.multiplicative, gap.additive)]
    return portfolio, figures, gap_rows, test


def _tables(pool) -> list[np.ndarray]:
    """Each policy's per-prompt table; all measured under one evaluation key (comparable)."""
    missing = [p.key for p in pool if p.scores is None]
    if missing:
        raise ArtifactError(f"policies {', '.join(k[:10] for k in missing)} carry no per-prompt scores (a pool "
                            "written before paired evaluation): rerun `palm stage align` (finished jobs are reused)")
    keys = {p.scores.eval_key for p in pool}
    if len(keys) > 1:
        raise ArtifactError(f"the pool's policies were measured under {len(keys)} evaluation keys: rerun "
                            "`palm stage align` and `palm stage soups` so they share the current one")
    return [np.asarray(p.scores.scores, float) for p in pool]


def portfolio_id(member_keys, eps: float, delta: float, alpha: float) -> str:
    """The same members at the same tolerances and confidence are the same portfolio, whoever computes it."""
    key = json.dumps({"members": sorted(member_keys), "eps": eps, "delta": delta, "alpha": alpha}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]
