"""Stage evaluate: PALM against the baselines at equal portfolio sizes (docs/theory.md section 7).

Reads:  portfolio.json, data/prompts, models/base, models/rewards, models/members, models/soups;
        the params in PARAMS
Writes: models/evaluation/{members,soups}/ (its own job stores: what align did not make),
        metrics/evaluate.json (numbers: each method's worst gap at each k, the reference pool),
        metrics/evaluate.details.json (every table, the members and notes), plots/evaluate_gaps.json,
        reports/evaluation.md with PNG plots;
        an MLflow run `evaluate-<task>`.

For k = 1..compare.k_max each method proposes a portfolio of (at most) k policies:

- palm_lazy: the align stage's lazy search (search.max_trainings, best-of-N in its bound, beaten
  rows repaired up to search.max_repairs times), then the best k of its rows;
- palm_grid: policies trained on the PALM grid, at most compare.grid_budget of them (a
  farthest-point spread of the grid, extremes first, when the grid is larger: "capped"), then
  the best k of them;
- uniform: the k evenly spread weights of simplex.uniform_weights;
- random: k Dirichlet(1) weights, for compare.random_seeds seeds (mean ± standard error); a
  seed draws k_max weights once and its portfolio of size k is the first k (nested);
- centroid: one policy trained at (1/d, ..., 1/d), k = 1 only;
- soups: Rewarded Soups, the d specialists (trained) interpolated in weight space with the k
  mixing weights of simplex.uniform_weights: d trainings, k evaluations (a vertex is the
  specialist itself);
- oracle: the whole reference pool, the best policy for each test weight (an upper reference;
  best-of-N of the base can still beat it).

"Best k of a pool" is PALM's pruning with a size limit (metrics.best_subset): greedy forward
selection on the PALM grid points (or a simplex lattice of step 1/compare.selection_lattice when
the grid is too large), gaps measured against the pool's own best, so it uses nothing the method
did not train. Every policy is a job run through `run_jobs`: a weight vector shared by two
methods is trained once, and finished jobs of the align stage are reused. The reference pool is
every policy of every method. Gaps are against the evidence (docs/theory.md section 8): at each
test weight the better of the reference pool's best and best-of-N sampling from the base (the
sample pool, data/samples), on a simplex lattice plus Dirichlet(1) users (coverage.test_lattice,
coverage.test_users, seed); the pool-only figure is kept beside it. Four simulated user
populations (core.simplex.user_populations: Dirichlet(1), concentrated near the corners, centred,
a mixture; coverage.test_users each) get their mean and worst gap. The evidence check lists the
trained policies that the evidence beats at their own weight (paired decisions at coverage.alpha).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from palm_tasks import gate, schema
from palm_tasks.audit import check_against_evidence, evidence_audit
from palm_tasks.best_of_n import BestOfN, paired_evidence
from palm_tasks.config import PalmConfig
from palm_tasks.core import grid as gridlib
from palm_tasks.core import metrics, simplex
from palm_tasks.dvc_metrics import write_metrics
from palm_tasks.jobs import Job, RunJobs, run_here
from palm_tasks.log import say
from palm_tasks.paths import Paths
from palm_tasks.report import evaluation as report
from palm_tasks.schema import Policy
from palm_tasks.search_loop import search_from_config, search_loop

PARAMS = ("task", "traits", "seed", "device", "precision", "data", "search", "training", "evaluation", "rewards",
          "coverage", "compare", "runner.workers")  # runner.workers: PALM's weights per round, as in align
DEPS = ("custom", "portfolio.json", "data/prompts", "data/samples", "models/base", "models/rewards", "models/members",
        "models/soups")
OUTS = ("models/evaluation", "reports", "metrics/evaluate.details.json")
METRICS = ("metrics/evaluate.json",)
PLOTS = ("plots/evaluate_gaps.json",)
RUNS_JOBS = True
MAX_SELECTION_WEIGHTS = 100_000  # larger PALM grids (d >= 4) select on a simplex lattice instead


def run(cfg: PalmConfig, root: Path, run_jobs: RunJobs | None = None) -> dict:
    """Train what every method needs (job cache), compare them, write metrics, plots, report."""
    run_jobs = run_jobs or run_here(cfg, root)
    paths, cmp_, c, d = Paths(Path(root)), cfg.compare, cfg.coverage, cfg.d
    started = time.time()
    stores = (paths.members, paths.soups, paths.evaluation_members, paths.evaluation_soups)
    finished_before = {p.name for s in stores if s.is_dir() for p in s.iterdir()}
    methods = list(dict.fromkeys(cmp_.methods))
    trained: dict[tuple, Policy] = {}  # weight -> policy, every policy trained by any method
    soups: dict[tuple, Policy] = {}  # mixing weights -> soup

    store = paths.relative(paths.evaluation_members)

    def to_cap(policies: list[Policy]) -> list[Policy]:
        """Every policy of the comparison is measured up to the cap: the gaps are judged at the
        precision of the whole evaluation set, whatever the search's decisions needed."""
        jobs = [Job.evaluate(paths.relative(p.path), cfg.evaluation.n_prompts, store=store) for p in policies]
        return run_jobs(jobs) if jobs else []

    def train(weights) -> list[Policy]:
        weights = [tuple(np.round(np.asarray(w, float), 9)) for w in weights]
        todo = list(dict.fromkeys(w for w in weights if w not in trained))
        jobs = [Job.train(w, store=store) for w in todo]
        trained.update(zip(todo, to_cap(run_jobs(jobs)) if jobs else []))
        return [trained[w] for w in weights]

    pools: dict[str, list[Policy]] = {}  # method -> its trained policies (palm methods)
    notes: dict[str, str] = {}
    samples = schema.load_samples(root)
    bon = BestOfN(samples, cfg.training.min_relevance)
    lazy_trainings = 0
    lazy_portfolio: tuple[list[Policy], bool] | None = None  # PALM's pruned portfolio, certified or not
    if "palm_lazy" in methods:
        # The align stage's search, as the product runs it: best-of-N in the certificate's bound,
        # beaten rows repaired (warm-started retraining), parallel proposals per runner.workers.
        say(f"evaluate: PALM lazy search (budget {cfg.search.max_trainings}, {cfg.search.max_repairs} "
            "repairs per row)")
        search = search_from_config(cfg, bon)
        rows = to_cap(search_loop(search, run_jobs, paths, workers=cfg.runner.workers, store=store,
                                  servable=gate.rule(cfg, samples), warm_start=cfg.search.warm_start).rows)
        for policy in rows:  # a repaired row holds its better policy: the other methods share that
            trained[tuple(np.round(np.asarray(policy.weights, float), 9))] = policy
        pools["palm_lazy"] = rows
        result = search.result()
        lazy_trainings = result.trainings
        lazy_portfolio = ([rows[m] for m in result.members], bool(result.certificate.certified))
        notes["palm_lazy"] = (f"lazy search stopped: {result.stopped} after {result.trainings} trainings "
                              f"({sum(search.repairs)} of them repairs, {len(result.beaten)} row(s) still beaten by the evidence); "
                              f"its pruned portfolio has {len(result.members)} member(s) and is "
                              f"{'' if result.certificate.certified else 'not '}certified at eps = {c.eps}, "
                              f"delta = {c.delta} against the evidence")
    grid_info = None
    omitted: dict[str, str] = {}
    if "palm_grid" in methods and c.delta == 0:
        methods.remove("palm_grid")
        omitted["palm_grid"] = "no PALM grid at coverage.delta = 0 (it would be infinite)"
        say(f"evaluate: palm_grid omitted: {omitted['palm_grid']}")
    if "palm_grid" in methods:
        points = gridlib.palm_grid(d, c.eps, c.delta)
        chosen = metrics.spread_subset(points, cmp_.grid_budget)
        grid_info = {"grid_size": int(len(points)), "trained": int(len(chosen)),
                     "capped": bool(len(points) > cmp_.grid_budget)}
        say(f"evaluate: PALM grid, {len(chosen)} of {len(points)} grid points")
        pools["palm_grid"] = train(chosen)
        notes["palm_grid"] = (f"capped: {len(chosen)} of the {len(points)} PALM grid points trained "
                              f"(compare.grid_budget), spread by farthest-point sampling"
                              if grid_info["capped"] else f"the whole PALM grid ({len(points)} points)")

    ks = list(range(1, cmp_.k_max + 1))
    seeds = [cfg.seed + cmp_.random_seed_offset + s for s in range(cmp_.random_seeds)]
    # method -> k -> [(portfolio, trainings spent)], one entry per seed
    portfolios: dict[str, dict[int, list[tuple[list[Policy], int]]]] = {}
    if "uniform" in methods:
        say("evaluate: uniform-grid baseline")
        portfolios["uniform"] = {k: [(train(simplex.uniform_weights(d, k)), k)] for k in ks}
    if "random" in methods:
        say(f"evaluate: random baseline, {len(seeds)} seeds")
        # Per seed, k_max Dirichlet(1) draws and the portfolio of size k is the first k of them:
        # each is still k independent draws, and a seed costs k_max trainings, not k_max (k_max + 1) / 2.
        draws = {s: simplex.random_weights(d, max(ks), s) for s in seeds}
        portfolios["random"] = {k: [(train(draws[s][:k]), k) for s in seeds] for k in ks}
    if "centroid" in methods:
        portfolios["centroid"] = {1: [(train([[1.0 / d] * d]), 1)]}
    if "soups" in methods:
        say("evaluate: Rewarded Soups of the specialists")
        specialists = train(np.eye(d))
        mixes = {k: simplex.uniform_weights(d, k) for k in ks}
        todo = list(dict.fromkeys(tuple(np.round(lam, 9)) for lams in mixes.values() for lam in lams
                                  if max(lam) < 1 - 1e-9))
        dirs = [paths.relative(p.path) for p in specialists]
        soup_store = paths.relative(paths.evaluation_soups)
        soups.update(zip(todo, run_jobs([Job.soup(dirs, lam, soup_store) for lam in todo]) if todo else []))

        def soup(lam) -> Policy:
            lam = tuple(np.round(lam, 9))
            return specialists[int(np.argmax(lam))] if max(lam) >= 1 - 1e-9 else soups[lam]

        portfolios["soups"] = {k: [([soup(lam) for lam in mixes[k]], d)] for k in ks}
        notes["soups"] = (f"{len(soups)} soups evaluated (no training): the {d} specialists mixed with the "
                          f"uniform-grid weights as coefficients; trainings counts the specialists")

    # every policy of every method, distinct, in order: trained ones, then soups
    ref = list({p.key: p for p in [*trained.values(), *soups.values()]}.values())
    ref_keys = [p.key for p in ref]
    R, SE = np.array([p.values for p in ref]), np.array([p.std_errors for p in ref])
    index = {p.key: i for i, p in enumerate(ref)}
    paired = paired_evidence(cfg, bon)
    selection = selection_weights(cfg)
    for method in ("palm_lazy", "palm_grid"):
        if method in pools:
            pool = list({p.key: p for p in pools[method]}.values())
            order = metrics.greedy_order(np.array([p.values for p in pool]), min(cmp_.k_max, len(pool)), selection)
            spent = lazy_trainings if method == "palm_lazy" else len(pool)  # repairs are trainings too
            portfolios[method] = {k: [([pool[j] for j in sorted(order[:k])], spent)] for k in ks}

    lattice = simplex.simplex_lattice(d, c.test_lattice)
    users = simplex.dirichlet_users(d, c.test_users, cfg.seed)
    populations = simplex.user_populations(d, c.test_users, cfg.seed, cmp_.concentrated_alpha, cmp_.centred_alpha)
    evidence_check = check_against_evidence(ref, bon, paired)
    texts = {p.key: _completions(p.path) for p in ref}
    embeddings = _embed(texts)

    def against_evidence(idx: list[int]) -> dict:
        """The gaps of ref[idx] against the evidence, and the worst and mean against the pool only."""
        pool_only = metrics.gap_summary(R, idx, lattice, users, std_errors=SE, noise_draws=0)  # no mean se kept
        return {**metrics.gap_summary(R, idx, lattice, users, reference=bon.value, populations=populations,
                                      std_errors=SE, reference_se=bon.se, noise_draws=cmp_.bootstrap,
                                      seed=cfg.seed),
                **{f"pool_{name}": pool_only[name] for name in
                   ("max_multiplicative_gap", "max_multiplicative_gap_se", "mean_multiplicative_gap")}}

    def measure(portfolio: list[Policy], trainings: int) -> dict:
        idx = sorted({index[p.key] for p in portfolio})
        row = {"size": len(idx), "trainings": trainings, "members": [ref_keys[i] for i in idx],
               **against_evidence(idx)}
        row["usage_perplexity"], row["usage_perplexity_se"] = metrics.perplexity_with_se(
            R, idx, users, cmp_.bootstrap, cfg.seed)
        row["distinct_n"] = metrics.distinct_n([t for i in idx for t in texts[ref_keys[i]]], cmp_.distinct_n)
        row["embedding_dispersion"] = metrics.embedding_dispersion(_aligned(embeddings, [ref_keys[i] for i in idx]))
        return row

    results = {method: {str(k): _over_seeds([measure(p, t) for p, t in runs]) for k, runs in by_k.items()}
               for method, by_k in portfolios.items()}
    # the whole pool: 0 against the pool by construction, the floor of every method against the evidence
    results["oracle"] = {"all": {"size": len(ref), "trainings": len(ref), "members": ref_keys,
                                 **against_evidence(list(range(len(ref))))}}

    certificate_audit = None
    if lazy_portfolio is not None:
        # PALM's promise, P(w) >= (1 - eps) E(w) - delta, checked where the search never looked:
        # every test weight, against every policy of every method and best-of-N (the coverage
        # stage's audit of the production portfolio, here on the comparison's pool)
        members, certified = lazy_portfolio
        idx = np.array(sorted({index[p.key] for p in members}))
        audit = evidence_audit(cfg, np.vstack([lattice, users]), ref, idx, bon, paired)
        certificate_audit = {"members": [ref_keys[i] for i in idx], "certified": certified, "eps": c.eps,
                             "delta": c.delta, **{name: audit[name] for name in (
                                 "test_weights", "evidence_eps", "evidence_eps_weight", "evidence_eps_against",
                                 "contradicted")}}

    made_now = sum(k not in finished_before for k in ref_keys)
    out = {
        "task": cfg.task, "traits": cfg.traits, "d": d, "eps": c.eps, "delta": c.delta,
        "ks": ks, "methods": [m for m in report.LABELS if m in results], "omitted": omitted, "notes": notes,
        "palm_grid": grid_info, "random_seeds": seeds,
        "reference_pool": {"size": len(ref), "keys": ref_keys, "new_in_this_run": made_now,
                           "reused": len(ref) - made_now},
        "test_weights": {"lattice": int(len(lattice)), "users": int(len(users)),
                         "lattice_step": f"1/{c.test_lattice}", "users_seed": cfg.seed,
                         "relative_to": f"the evidence: per test weight the better of the reference pool's "
                                        f"best (every policy of every method) and best-of-{samples.n} sampling "
                                        f"from the base{bon.on_topic}; max over lattice and users, means "
                                        f"over users (pool_*: against the reference pool only)",
                         "best_of_n": samples.n},
        "populations": {"names": list(populations), "users_each": c.test_users,
                        "concentrated_alpha": cmp_.concentrated_alpha, "centred_alpha": cmp_.centred_alpha,
                        "are": "dirichlet_1: Dirichlet(1); concentrated: Dirichlet(concentrated_alpha), near "
                               "the corners; centred: Dirichlet(centred_alpha), near the centre; mixture: each "
                               "user from one of the three with equal probability"},
        "selection_weights": int(len(selection)),
        "certificate_audit": certificate_audit,
        "evidence_check": evidence_check,
        "results": results,
        "seconds": round(time.time() - started, 1),
    }
    write_metrics(root, METRICS[0], figures(out), details=out)
    schema.write(paths.plots / "evaluate_gaps.json", report.plot_rows(out))
    paths.reports.mkdir(parents=True, exist_ok=True)
    pictures = [report.gap_plot(out, paths.reports / "evaluate_gap_vs_size.png")]
    if d == 3 and "palm_lazy" in portfolios:
        k = max(ks)
        largest = {m: sorted({index[p.key] for p in portfolios[m][k][0][0]})  # random: its first seed
                   for m in ("palm_lazy", "palm_grid", "uniform", "random") if k in portfolios.get(m, {})}
        pictures.append(report.simplex_plot(out, R, largest, paths.reports / "evaluate_simplex.png"))
    report_file = paths.reports / "evaluation.md"
    report_file.write_text(report.render_report(out, [p.name for p in pictures]), encoding="utf-8")
    from palm_tasks.tracking import log_evaluation_run

    log_evaluation_run(cfg, root, out, [report_file, *pictures])
    say(f"evaluate: {len(ref)} policies in the reference pool ({made_now} made now), "
        f"report in {report_file} ({out['seconds']:.0f}s)")
    return out


def figures(out: dict) -> dict:
    """The numbers of an evaluation for `dvc metrics show`: per method and k, the worst
    multiplicative gap on the test weights (every other figure is in the details file)."""
    return {"reference_pool": out["reference_pool"]["size"],
            "oracle_rows_beaten": out["evidence_check"].get("beaten"),
            "worst_gap": {m: {k: row.get("max_multiplicative_gap") for k, row in by_k.items()}
                          for m, by_k in out["results"].items()}}


def selection_weights(cfg: PalmConfig) -> np.ndarray:
    """Where "best k of a pool" is judged: the PALM grid, or a lattice when the grid is too large."""
    d, c = cfg.d, cfg.coverage
    if c.delta > 0 and gridlib.grid_size_bound(d, c.eps, c.delta) <= MAX_SELECTION_WEIGHTS:
        return gridlib.palm_grid(d, c.eps, c.delta)
    return simplex.simplex_lattice(d, cfg.compare.selection_lattice)


def _over_seeds(rows: list[dict]) -> dict:
    """One seed: its row. Several: mean ± se over seeds of every figure (members per seed)."""
    if len(rows) == 1:
        return rows[0]
    row = {}
    for name in rows[0]:
        if name == "members":
            row["members"] = [r["members"] for r in rows]
        elif not name.endswith("_se"):
            row[name], row[f"{name}_seed_se"] = metrics.mean_se([r[name] for r in rows])
    row["seeds"] = len(rows)
    return row


def _completions(policy_dir: Path) -> list[str]:
    path = Path(policy_dir) / "completions.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["completion"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _embed(texts: dict[str, list[str]]) -> dict[str, np.ndarray]:
    from palm_tasks.llm.embeddings import embed

    return {k: np.array(embed(t)) for k, t in texts.items()}


def _aligned(embeddings: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    n = min((len(embeddings[k]) for k in keys), default=0)
    if n == 0:
        return np.zeros((len(keys), 0, 1))
    return np.stack([embeddings[k][:n] for k in keys])
