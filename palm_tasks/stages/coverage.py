"""Stage coverage: certificate over the simplex, set-cover pruning, gaps -> the portfolio.

Reads:  data/pool.json, data/soups.json; the params in PARAMS
Writes: portfolio.json (schema.Portfolio), metrics/coverage.json, plots/ (gaps, the simplex map,
        gap vs portfolio size, member values)

Certificate and pruning follow docs/theory.md sections 3, 4 and 6; `oracle_check` tests the
alignment-oracle assumption the certificate rests on (section 9). Users are routed by the one
routing rule (core.routing).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from palm_tasks import schema
from palm_tasks.config import PalmConfig
from palm_tasks.core import metrics, routing, simplex
from palm_tasks.core.certificate import certify
from palm_tasks.core.prune import prune
from palm_tasks.log import say, warn
from palm_tasks.paths import Paths
from palm_tasks.schema import Certificate, Member, PolicyTable, Portfolio, load_pool, load_soups

PARAMS = ("coverage", "seed", "task", "traits")
DEPS = ("data/pool.json", "data/soups.json")
OUTS = ("portfolio.json",)
METRICS = ("metrics/coverage.json",)
PLOTS = ("plots/gaps.json", "plots/simplex_map.json", "plots/gap_vs_size.json", "plots/member_values.json",
         "plots/simplex_map.png", "plots/gap_vs_size.png", "plots/member_values.png")
RUNS_JOBS = False
RELATIVE_TO = ("the alignment oracle: each trained member's value vector is taken as optimal for its "
               "training weight; values are means over the eval prompts")


def run(cfg: PalmConfig, root: Path, run_jobs=None) -> dict:
    from palm_tasks.report.plots import write_plots

    paths = Paths(root)
    portfolio, figures, gap_rows, test = build(cfg, paths, load_pool(root).policies, load_soups(root).policies)
    schema.write(paths.portfolio, portfolio)
    schema.write(paths.metrics / "coverage.json", figures)
    schema.write(paths.plots / "gaps.json", gap_rows)
    write_plots(portfolio, test, cfg.seed, paths.plots)
    c = cfg.coverage
    say(f"coverage: portfolio of {figures['portfolio_size']} of {figures['pool_size']} trained + "
        f"{figures['soup_candidates']} soups ({figures['soups_in_portfolio']} soups in it), "
        f"{'CERTIFIED' if figures['certified'] else 'NOT certified'} at eps={c.eps}, delta={c.delta} "
        f"(max eps {figures['max_eps']:.4f}, max delta {figures['max_delta']:.4f}, relative to the oracle)")
    if figures["oracle_rows_beaten"]:
        warn(f"{figures['oracle_rows_beaten']} of {figures['pool_size']} trained policies are beaten at their "
             f"own weight by another candidate (worst by {figures['oracle_max_shortfall']:.4f}): the "
             "alignment oracle assumption behind the certificate does not hold there (portfolio.json oracle_check)")
    return figures


def build(cfg: PalmConfig, paths: Paths, trained, soups, members=None):
    """(portfolio, coverage figures, gap rows of the lattice, test weights) for a pool of trained
    policies and soups; `members` (row indices into trained + soups) skips the pruning."""
    c = cfg.coverage
    pool = list(trained) + list(soups)
    oracle = np.array([True] * len(trained) + [False] * len(soups))
    W = np.array([p.weights for p in pool])
    R = np.array([p.value.mean for p in pool])
    SE = np.array([p.value.se for p in pool])
    if members is None:
        members = prune(W, R, c.eps, c.delta, std_errors=SE, z=c.z, oracle=oracle)
    members = np.asarray(members, int)
    cert = certify(W, R, c.eps, c.delta, members=members, std_errors=SE, z=c.z, oracle=oracle)
    pool_cert = certify(W, R, c.eps, c.delta, std_errors=SE, z=c.z, oracle=oracle)
    # The same members with noise taken into account: values - z se, oracle bounds + z se.
    noisy = certify(W, R, c.eps, c.delta, members=members, std_errors=SE, z=c.z_conservative,
                                oracle=oracle)
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
        oracle_check=check.to_dict(), coverage=summary,
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
        **{k: v for k, v in summary.items() if isinstance(v, (int, float))},
    }
    gap_rows = [{"w": dict(zip(cfg.traits, w.round(4).tolist())), "multiplicative_gap": float(m),
                 "additive_gap": float(a)} for w, m, a in zip(lattice, gap.multiplicative, gap.additive)]
    return portfolio, figures, gap_rows, test


def portfolio_id(member_keys, eps: float, delta: float, z: float) -> str:
    """The same members at the same tolerances are the same portfolio, whoever computes it."""
    key = json.dumps({"members": sorted(member_keys), "eps": eps, "delta": delta, "z": z}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]
