"""The evaluate stage: PALM against the baselines at equal portfolio sizes (theory.md section 7).

For k = 1..compare.k_max each method proposes a portfolio of (at most) k policies:

- palm_lazy: the lazy search (search.max_trainings), then the best k of its pool;
- palm_grid: policies trained on the PALM grid, at most compare.grid_budget of them (a
  farthest-point spread of the grid, extremes first, when the grid is larger: "capped"), then
  the best k of them;
- uniform: the k evenly spread weights of grid.uniform_weights;
- random: k Dirichlet(1) weights, for compare.random_seeds seeds (mean ± standard error);
- centroid: one policy trained at (1/d, ..., 1/d), k = 1 only;
- soups: Rewarded Soups, the d specialists (trained) interpolated in weight space
  (palm_tasks/soups.py) with the k mixing weights of grid.uniform_weights: d trainings, k
  evaluations (a vertex is the specialist itself);
- oracle: the best policy of the reference pool for each test weight (an upper reference).

"Best k of a pool" is PALM's pruning with a size limit: greedy forward selection of the pool
policy that most lowers the worst multiplicative gap (then the mean) on the PALM grid points,
gaps measured against the pool's own best, so it uses nothing the method did not train.

Every policy is an alignment job run through `run_jobs` (the job cache: a weight vector shared
by two methods is trained once). Finished members of the align stage are reused; what this stage
trains or mixes goes to its own cache, models/evaluation/{members,soups}, so that it never
changes another stage's output. The reference pool is every policy of every method; gaps are
1 - P(w)/OPT_est(w) and OPT_est(w) - P(w) with OPT_est the best of the pool (coverage.gaps), on a
simplex lattice plus Dirichlet(1) users (coverage.test_lattice, coverage.test_users, seed).
Writes metrics/evaluate.json, plots/evaluate_gaps.json, reports/evaluation.md with PNG plots,
and logs them to MLflow.
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Callable, Sequence
from itertools import combinations
from pathlib import Path

import numpy as np

from palm_tasks import coverage as cov
from palm_tasks import grid as gridlib
from palm_tasks.config import PalmConfig
from palm_tasks.layout import Layout

MAX_SELECTION_WEIGHTS = 100_000  # larger PALM grids (d >= 4) select on a simplex lattice instead
SELECTION_LATTICE = 15  # not the test lattice's default step 1/20: selection must not see the test
EVALUATION_DIR = Path("models") / "evaluation"  # this stage's own job cache (members/, soups/)
RANDOM_SEED_OFFSET = 1  # random portfolios use seed + 1 + s: never the test users' draws (seed)
LABELS = {"palm_lazy": "PALM (lazy + prune)", "palm_grid": "PALM (grid + prune)",
          "uniform": "uniform grid", "random": "random", "centroid": "single model (centroid)",
          "soups": "Rewarded Soups", "oracle": "oracle (reference pool)"}
# The paper's published figures, as ../shared/docs/theory.md section 1 states them.
PAPER = ("portfolios of 3-7 models reach multiplicative and additive gaps around 0.01-0.02 "
         "(under 1.5% suboptimality) on three tasks (d = 2, 2, 3), beating uniform-grid and random "
         "portfolios of the same size")


# ----------------------------------------------------------------------------- pure metrics


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over the texts (lowercased whitespace tokens); 0 if none."""
    grams = [tuple(tokens[i:i + n]) for t in texts for tokens in [t.lower().split()]
             for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def embedding_dispersion(embeddings: np.ndarray) -> float:
    """Mean pairwise cosine distance between members' responses to the same prompt.

    embeddings: (members, prompts, dim), unit norm. Averaged over member pairs and prompts;
    one member -> 0.
    """
    E = np.asarray(embeddings, dtype=float)
    if E.ndim != 3:
        raise ValueError(f"embeddings must have shape (members, prompts, dim), got {E.shape}")
    pairs = list(combinations(range(len(E)), 2))
    if not pairs:
        return 0.0
    # clipped at 0: identical responses give 1 - cos = -1e-8 in floating point
    return float(np.mean([np.clip(1.0 - np.sum(E[a] * E[b], axis=1), 0.0, 2.0) for a, b in pairs]))


def best_subset(values: np.ndarray, k: int, selection_weights: np.ndarray) -> list[int]:
    """Greedy best k rows of `values` (fewer if there are fewer): each step adds the row that
    most lowers (worst, mean) multiplicative gap on the selection weights against the best of
    all rows; ties go to the lower index."""
    R = np.asarray(values, float)
    chosen: list[int] = []
    while len(chosen) < min(k, len(R)):
        scored = []
        for j in range(len(R)):
            if j not in chosen:
                g = cov.gaps(R, chosen + [j], selection_weights)
                scored.append((round(g.max_multiplicative, 12), round(g.mean_multiplicative, 12), j))
        chosen.append(min(scored)[2])
    return sorted(chosen)


def gap_summary(ref_values: np.ndarray, members: Sequence[int], lattice: np.ndarray,
                users: np.ndarray) -> dict:
    """Gaps of ref_values[members] against the best of ref_values: max over lattice and users,
    mean over the users with its standard error (the users are a sample)."""
    g_all = cov.gaps(ref_values, members, np.vstack([lattice, users]))
    g_users = cov.gaps(ref_values, members, users)
    n = len(users)
    se = lambda x: float(np.std(x, ddof=1) / np.sqrt(n)) if n > 1 else 0.0  # noqa: E731
    return {"max_multiplicative_gap": g_all.max_multiplicative,
            "max_additive_gap": g_all.max_additive,
            "mean_multiplicative_gap": g_users.mean_multiplicative,
            "mean_multiplicative_gap_se": se(g_users.multiplicative),
            "mean_additive_gap": g_users.mean_additive,
            "mean_additive_gap_se": se(g_users.additive)}


def perplexity_with_se(values: np.ndarray, members: Sequence[int], users: np.ndarray,
                       bootstrap: int, seed: int) -> tuple[float, float]:
    """Usage perplexity over the users and its bootstrap standard error (0 if bootstrap < 2)."""
    members = np.asarray(members, int)
    p = cov.usage_perplexity(values, members, users)
    if bootstrap < 2:
        return p, 0.0
    rng = np.random.default_rng(seed)
    draws = [cov.usage_perplexity(values, members, users[rng.integers(0, len(users), len(users))])
             for _ in range(bootstrap)]
    return p, float(np.std(draws, ddof=1))


def spread_subset(points: np.ndarray, k: int) -> np.ndarray:
    """k rows of points spread by farthest-point sampling, starting from the extremes present."""
    points = np.asarray(points, float)
    if len(points) <= k:
        return points
    d = points.shape[1]
    chosen = [i for e in np.eye(d) for i in np.flatnonzero(np.all(np.isclose(points, e), axis=1))[:1]][:k]
    if not chosen:
        chosen = [0]
    dist = np.min(np.linalg.norm(points[:, None] - points[chosen][None], axis=2), axis=1)
    while len(chosen) < k:
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(points - points[nxt], axis=1))
    return points[chosen]


def mean_se(xs: Sequence[float]) -> tuple[float, float]:
    xs = np.asarray(xs, float)
    return float(xs.mean()), float(xs.std(ddof=1) / np.sqrt(len(xs))) if len(xs) > 1 else 0.0


# ----------------------------------------------------------------------------- the stage


RunJobs = Callable[[list[list[float]]], list]


def _selection_weights(cfg: PalmConfig) -> np.ndarray:
    d, c = cfg.d, cfg.coverage
    if gridlib.grid_size_bound(d, c.eps, c.delta) <= MAX_SELECTION_WEIGHTS:
        return gridlib.palm_grid(d, c.eps, c.delta)
    return gridlib.simplex_lattice(d, SELECTION_LATTICE)


def _key(w) -> tuple:
    return tuple(np.round(np.asarray(w, float), 9))


def evaluate_stage(cfg: PalmConfig, root: Path, run_jobs: RunJobs | None = None) -> dict:
    """Train what every method needs (job cache), compare them, write metrics, plots, report."""
    from palm_tasks.stages import _write_json, run_job, say

    root, lay, cmp_, d = Path(root), Layout(Path(root)), cfg.compare, cfg.d
    if run_jobs is None:
        run_jobs = lambda ws: [run_job(cfg, root, w, members_dir(root)) for w in ws]  # noqa: E731
    started = time.time()
    c = cfg.coverage
    folders = (lay.members, lay.soups, members_dir(root), soups_dir(root))
    finished_before = {p.name for folder in folders if folder.is_dir() for p in folder.iterdir()}
    methods = list(dict.fromkeys(cmp_.methods))
    omitted = {}
    if "soups" in methods and importlib.util.find_spec("palm_tasks.soups") is None:
        methods.remove("soups")
        omitted["soups"] = "palm_tasks/soups.py is not available"

    members: dict[tuple, object] = {}  # weight -> Member, every policy trained by any method

    def train(weights: list) -> list:
        todo = [list(map(float, w)) for w in weights if _key(w) not in members]
        todo = list({_key(w): w for w in todo}.values())
        for w, m in zip(todo, run_jobs(todo) if todo else []):
            members[_key(w)] = m
        return [members[_key(w)] for w in weights]

    pools: dict[str, list] = {}  # method -> its trained policies (palm methods)
    notes: dict[str, str] = {}
    if "palm_lazy" in methods:
        say(f"evaluate: PALM lazy search (budget {cfg.search.max_trainings})")
        lazy_members = []

        def oracle(w):
            (m,) = train([np.asarray(w, float).tolist()])
            lazy_members.append(m)
            return m.values, m.std_errors

        result = cov.lazy_search(oracle, d, c.eps, c.delta, cfg.search.max_trainings, z=c.z)
        pools["palm_lazy"] = lazy_members
        notes["palm_lazy"] = (f"lazy search stopped: {result.stopped} after {result.trainings} trainings; "
                              f"its pruned portfolio has {len(result.members)} member(s) and is "
                              f"{'' if result.certificate.certified else 'not '}certified at eps = {c.eps}, "
                              f"delta = {c.delta}")
    grid_info = None
    if "palm_grid" in methods:
        points = gridlib.palm_grid(d, c.eps, c.delta)
        chosen = spread_subset(points, cmp_.grid_budget)
        grid_info = {"grid_size": int(len(points)), "trained": int(len(chosen)),
                     "capped": bool(len(points) > cmp_.grid_budget)}
        say(f"evaluate: PALM grid, {len(chosen)} of {len(points)} grid points")
        pools["palm_grid"] = train(chosen.tolist())
        notes["palm_grid"] = (f"capped: {len(chosen)} of the {len(points)} PALM grid points trained "
                              f"(compare.grid_budget), spread by farthest-point sampling"
                              if grid_info["capped"] else f"the whole PALM grid ({len(points)} points)")

    ks = list(range(1, cmp_.k_max + 1))
    seeds = [cfg.seed + RANDOM_SEED_OFFSET + s for s in range(cmp_.random_seeds)]
    # method -> k -> [(portfolio as a list of Members, trainings spent)], one entry per seed
    portfolios: dict[str, dict[int, list[tuple[list, int]]]] = {}
    if "uniform" in methods:
        say("evaluate: uniform-grid baseline")
        portfolios["uniform"] = {k: [(train(gridlib.uniform_weights(d, k).tolist()), k)] for k in ks}
    if "random" in methods:
        say(f"evaluate: random baseline, {len(seeds)} seeds")
        portfolios["random"] = {k: [(train(gridlib.random_weights(d, k, s).tolist()), k) for s in seeds]
                                for k in ks}
    if "centroid" in methods:
        portfolios["centroid"] = {1: [(train([[1.0 / d] * d]), 1)]}
    soups: dict[str, object] = {}
    if "soups" in methods:
        say("evaluate: Rewarded Soups of the specialists")
        soup = _soup_maker(cfg, root, train(np.eye(d).tolist()), soups)
        portfolios["soups"] = {k: [([soup(lam) for lam in gridlib.uniform_weights(d, k)], d)] for k in ks}
        notes["soups"] = (f"{len(soups)} soups evaluated (no training): the {d} specialists mixed with the "
                          f"uniform-grid weights as coefficients; trainings counts the specialists")

    # every policy of every method, distinct, in order: trained ones, then soups
    ref = list({m.key: m for m in [*members.values(), *soups.values()]}.values())
    ref_keys = [m.key for m in ref]
    R = np.array([m.values for m in ref])
    index = {m.key: i for i, m in enumerate(ref)}
    trained_keys = {m.key for m in members.values()}  # soups are candidates, not oracle rows
    trained_rows = np.array([m.key in trained_keys for m in ref])
    check = cov.oracle_check([m.weights for m in ref], R, [m.std_errors for m in ref], trained_rows)
    selection = _selection_weights(cfg)
    for method in ("palm_lazy", "palm_grid"):
        if method in pools:
            pool = list({m.key: m for m in pools[method]}.values())
            PR = np.array([m.values for m in pool])
            portfolios[method] = {k: [([pool[j] for j in best_subset(PR, k, selection)], len(pool))] for k in ks}

    lattice = gridlib.simplex_lattice(d, c.test_lattice)
    users = gridlib.dirichlet_users(d, c.test_users, cfg.seed)
    texts = {m.key: _completions(m.path) for m in ref}
    embeddings = _embed_members(texts)

    def measure(portfolio: list, trainings: int) -> dict:
        idx = sorted({index[m.key] for m in portfolio})
        row = {"size": len(idx), "trainings": trainings, "members": [ref_keys[i] for i in idx],
               **gap_summary(R, idx, lattice, users)}
        row["usage_perplexity"], row["usage_perplexity_se"] = perplexity_with_se(
            R, idx, users, cmp_.bootstrap, cfg.seed)
        row["distinct_n"] = distinct_n([t for i in idx for t in texts[ref_keys[i]]], cmp_.distinct_n)
        row["embedding_dispersion"] = embedding_dispersion(_aligned(embeddings, [ref_keys[i] for i in idx]))
        return row

    results: dict[str, dict[str, dict]] = {}
    for method, by_k in portfolios.items():
        results[method] = {}
        for k, runs in by_k.items():
            rows = [measure(p, t) for p, t in runs]
            if len(rows) == 1:
                results[method][str(k)] = rows[0]
            else:  # several seeds: mean ± se of every figure, the se of the mean gap across seeds
                row = {}
                for name in rows[0]:
                    if name == "members":
                        row["members"] = [r["members"] for r in rows]  # one list per seed
                        continue
                    if name.endswith("_se"):
                        continue
                    row[name], row[f"{name}_seed_se"] = mean_se([r[name] for r in rows])
                row["seeds"] = len(rows)
                results[method][str(k)] = row
    results["oracle"] = {"all": {"size": len(ref), "trainings": len(ref), "members": ref_keys,
                                 **gap_summary(R, list(range(len(ref))), lattice, users)}}

    trained_now = sum(m.key not in finished_before for m in ref)
    out = {
        "task": cfg.task, "traits": cfg.traits, "d": d, "eps": c.eps, "delta": c.delta,
        "ks": ks, "methods": [m for m in LABELS if m in results], "omitted": omitted, "notes": notes,
        "palm_grid": grid_info, "random_seeds": seeds,
        "reference_pool": {"size": len(ref), "keys": ref_keys, "new_in_this_run": trained_now,
                           "reused": len(ref) - trained_now},
        "test_weights": {"lattice": int(len(lattice)), "users": int(len(users)),
                         "lattice_step": f"1/{c.test_lattice}", "users_seed": cfg.seed,
                         "relative_to": "the best of the reference pool (every policy of every method) "
                                        "per test weight; max over lattice and users, means over users"},
        "selection_weights": int(len(selection)),
        "oracle_check": check.to_dict(),
        "results": results,
        "seconds": round(time.time() - started, 1),
    }
    _write_json(lay.metrics / "evaluate.json", out)
    _write_json(lay.plots / "evaluate_gaps.json", plot_rows(out))
    report_dir = root / "reports"
    report_dir.mkdir(parents=True, exist_ok=True)
    pictures = [gap_plot(out, report_dir / "evaluate_gap_vs_size.png")]
    if d == 3 and "palm_lazy" in portfolios:
        pictures.append(simplex_plot(out, R, portfolios, index, report_dir / "evaluate_simplex.png"))
    report = report_dir / "evaluation.md"
    report.write_text(render_report(out, [p.name for p in pictures]), encoding="utf-8")
    _log_mlflow(cfg, root, out, [report, *pictures])
    say(f"evaluate: {len(ref)} policies in the reference pool ({trained_now} trained now), "
        f"report in {report} ({out['seconds']:.0f}s)")
    return out


def plot_rows(out: dict) -> list[dict]:
    """DVC plot data, one row per k: each method's worst and mean multiplicative gap (methods
    measured at every k only; the centroid is in the tables)."""
    full = [m for m in out["methods"] if m != "oracle" and all(str(k) in out["results"][m] for k in out["ks"])]
    return [{"k": k, **{m: round(out["results"][m][str(k)]["max_multiplicative_gap"], 6) for m in full},
             **{f"{m}_mean": round(out["results"][m][str(k)]["mean_multiplicative_gap"], 6) for m in full}}
            for k in out["ks"]]


def members_dir(root: Path) -> Path:
    return Path(root) / EVALUATION_DIR / "members"


def soups_dir(root: Path) -> Path:
    return Path(root) / EVALUATION_DIR / "soups"


def _soup_maker(cfg: PalmConfig, root: Path, specialists: list, made: dict) -> Callable:
    """lambda -> the soup of the specialists with those coefficients (reused when finished)."""
    from palm_tasks.base_model import resolve_base_model
    from palm_tasks.prompts import read_prompts
    from palm_tasks.soups import build_soup, find_soup, soup_key
    from palm_tasks.stages import JobFactory

    lay = Layout(root)
    context = {}

    def soup(lam):
        lam = np.asarray(lam, float)
        if lam.max() > 1 - 1e-9:
            return specialists[int(np.argmax(lam))]
        key = soup_key([m.key for m in specialists], lam, cfg)
        if key not in made:
            found = find_soup(lay.soups, key) or find_soup(soups_dir(root), key)
            if found is None and not context:
                context.update(base=resolve_base_model(lay.base), rewards=JobFactory(cfg, root).rewards,
                               prompts=read_prompts(lay.prompts / "eval.jsonl"))
            made[key] = found or build_soup(cfg, context["base"], specialists, lam, context["rewards"],
                                            context["prompts"], soups_dir(root))
        return made[key]

    return soup


def _completions(member_path: Path) -> list[str]:
    path = Path(member_path) / "completions.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["completion"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _embed_members(texts: dict[str, list[str]]) -> dict[str, np.ndarray]:
    from palm_tasks.rewards import embed

    return {k: np.array(embed(t)) for k, t in texts.items()}


def _aligned(embeddings: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    n = min((len(embeddings[k]) for k in keys), default=0)
    if n == 0:
        return np.zeros((len(keys), 0, 1))
    return np.stack([embeddings[k][:n] for k in keys])


# ----------------------------------------------------------------------------- report


def _fmt(row: dict, name: str) -> str:
    if name not in row:
        return "-"
    se = row.get(f"{name}_se", row.get(f"{name}_seed_se"))
    return f"{row[name]:.4f}" + (f" ± {se:.4f}" if se else "")


def table(out: dict, k: int) -> str:
    """Markdown table of every method at size k (and the oracle)."""
    cols = [("max_multiplicative_gap", "max mult. gap"), ("mean_multiplicative_gap", "mean mult. gap"),
            ("max_additive_gap", "max add. gap"), ("mean_additive_gap", "mean add. gap"),
            ("usage_perplexity", "usage perplexity"), ("distinct_n", "distinct-n"),
            ("embedding_dispersion", "emb. dispersion")]
    lines = ["| method | size | trainings | " + " | ".join(h for _, h in cols) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in cols) + " |"]
    for method in out["methods"]:
        row = out["results"][method].get("all" if method == "oracle" else str(k))
        if row is None:
            continue
        size, trainings = f"{row['size']:g}", f"{row['trainings']:g}"
        lines.append(f"| {LABELS[method]} | {size} | {trainings} | "
                     + " | ".join(_fmt(row, n) for n, _ in cols) + " |")
    return "\n".join(lines)


def summary_table(out: dict) -> str:
    """The paper-style table: worst multiplicative gap (mean over seeds for random) per method and k."""
    lines = ["| method | " + " | ".join(f"k = {k}" for k in out["ks"]) + " |",
             "| --- | " + " | ".join("---" for _ in out["ks"]) + " |"]
    for method in out["methods"]:
        if method != "oracle":
            by_k = out["results"][method]
            lines.append(f"| {LABELS[method]} | " + " | ".join(
                _fmt(by_k[str(k)], "max_multiplicative_gap") if str(k) in by_k else "" for k in out["ks"]) + " |")
    return "\n".join(lines)


def reading(out: dict) -> list[str]:
    """Who wins at which k, from the numbers."""
    res, lines = out["results"], []
    rivals = [m for m in out["methods"] if m not in ("oracle", "palm_lazy", "palm_grid")]
    for k in out["ks"]:
        at_k = {m: res[m][str(k)]["max_multiplicative_gap"] for m in out["methods"]
                if m != "oracle" and str(k) in res[m]}
        if not at_k:
            continue
        best = min(at_k.values())
        winners = [LABELS[m] for m, v in at_k.items() if v <= best + 1e-12]
        line = f"- k = {k}: lowest worst-case multiplicative gap {best:.4f} by {', '.join(winners)}"
        if "palm_lazy" in at_k:
            beaten = []
            for m in rivals:
                if m in at_k and at_k[m] < at_k["palm_lazy"] - 1e-12:
                    se = res[m][str(k)].get("max_multiplicative_gap_seed_se")  # random: over seeds
                    close = se and at_k["palm_lazy"] - at_k[m] < se
                    beaten.append(LABELS[m] + (" (by less than its se over seeds)" if close else ""))
            size = res["palm_lazy"][str(k)]["size"]
            line += (f"; PALM lazy ({size} policies) {at_k['palm_lazy']:.4f}"
                     + (f", beaten by {', '.join(beaten)}" if beaten else ", not beaten by a baseline"))
        lines.append(line + ".")
    return lines


def oracle_reading(out: dict) -> list[str]:
    """What the pool says about the alignment oracle assumption behind PALM's certificate."""
    oc = out.get("oracle_check")
    if not oc:
        return []
    if not oc["beaten"]:
        return [f"Alignment-oracle check: none of the {oc['checked']} trained policies is beaten at its "
                f"own training weight by another policy of the pool, as the certificate assumes."]
    worst = oc["worst"]
    fmt = lambda w: "(" + ", ".join(f"{x:.2f}" for x in w) + ")"  # noqa: E731
    significant = oc["beaten_beyond_2_se"]
    return [f"Alignment-oracle check: {oc['beaten']} of the {oc['checked']} trained policies are beaten "
            f"at their own training weight by another policy of the pool ({significant} by more than two "
            f"standard errors); the largest shortfall is {worst['shortfall']:.4f} ({worst['z']:.1f} se), "
            f"the policy trained at {fmt(worst['weights'])} against the one at "
            f"{fmt(worst['beaten_by_weights'])} (mean shortfall "
            f"{oc['mean_shortfall']:.4f}). "
            + ("Every shortfall beyond two standard errors contradicts the assumption PALM's certificate "
               "and lazy search rest on (each trained policy optimal at its weight): the certificate holds "
               "relative to that assumption only, and a search that stops early (trusting it) is exposed "
               "to every better policy the other methods happened to train."
               if significant else
               "None is beyond two standard errors: the shortfalls are within evaluation noise of the "
               "assumption PALM's certificate rests on (each trained policy optimal at its weight).")]


def render_report(out: dict, pictures: list[str]) -> str:
    tw, pool = out["test_weights"], out["reference_pool"]
    parts = [
        f"# Evaluation: PALM against the baselines, task `{out['task']}`",
        "",
        f"Traits {', '.join(out['traits'])} (d = {out['d']}); eps = {out['eps']}, delta = {out['delta']}. "
        f"Gaps are relative to {tw['relative_to']}: a simplex lattice of step {tw['lattice_step']} "
        f"({tw['lattice']} weights) and {tw['users']} Dirichlet(1) users (seed {tw['users_seed']}). "
        f"Reference pool: {pool['size']} policies ({pool['new_in_this_run']} trained or, for soups, "
        f"evaluated in this run; {pool['reused']} reused from the job cache). Standard errors (±) are over the users for mean "
        f"gaps, a bootstrap of the users for usage perplexity, and over {len(out['random_seeds'])} seeds "
        f"for the random baseline. The evaluation took {out['seconds']:.0f} s.",
        "",
    ]
    for method, note in out["notes"].items():
        parts.append(f"- {LABELS[method]}: {note}.")
    for method, why in out["omitted"].items():
        parts.append(f"- {LABELS[method]}: left out: {why}.")
    parts += ["", "## Worst multiplicative gap by portfolio size", "", summary_table(out), ""]
    for k in out["ks"]:
        parts += [f"## Portfolio size k = {k}", "", table(out, k), ""]
    parts += ["## Gap versus size", ""] + [f"![{p}]({p})" for p in pictures] + [""]
    parts += ["## Reading", ""] + reading(out) + [""] + oracle_reading(out) + [
        "",
        f"The paper reports that {PAPER}. Those figures come from the paper's own models and rewards, "
        f"at a different model scale from this run's; ours are measured here, on this project's base "
        f"model, rewards and training budget, and are relative to this run's reference pool: a weak or "
        f"small pool makes every gap look smaller than it would against a stronger oracle, and when "
        f"the traits barely trade off (see the rewards stage's correlations) all methods look alike.",
        "",
        "All the k tables are in `metrics/evaluate.json`.",
    ]
    return "\n".join(parts) + "\n"


def gap_plot(out: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, name, title in ((axes[0], "max_multiplicative_gap", "worst multiplicative gap"),
                            (axes[1], "mean_multiplicative_gap", "mean multiplicative gap (users)")):
        for i, method in enumerate(m for m in out["methods"] if m != "oracle"):
            by_k = out["results"][method]
            ks = sorted(int(k) for k in by_k)
            y = np.array([by_k[str(k)][name] for k in ks])
            err = np.array([by_k[str(k)].get(f"{name}_seed_se", by_k[str(k)].get(f"{name}_se", 0.0)) for k in ks])
            ax.errorbar(ks, y, yerr=err, fmt="o-" if len(ks) > 1 else "D", color=f"C{i}",
                        capsize=3, label=LABELS[method])
        ax.axhline(0.0, color="grey", lw=0.8, label=LABELS["oracle"])
        ax.set_xlabel("portfolio size k")
        ax.set_ylabel(title)
        ax.set_xticks(out["ks"])
        ax.set_title(f"{title}, task {out['task']}", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def simplex_plot(out: dict, R: np.ndarray, portfolios: dict, index: dict, path: Path) -> Path:
    """d = 3: for the largest k, which policy serves each weight, darker = larger gap, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = max(out["ks"])
    shown = [m for m in ("palm_lazy", "palm_grid", "uniform", "random") if m in portfolios and k in portfolios[m]]
    lattice = gridlib.simplex_lattice(3, 30)
    x, y = lattice[:, 1] + lattice[:, 2] / 2, lattice[:, 2] * np.sqrt(3) / 2
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 4), squeeze=False)
    chosen = {m: sorted({index[p.key] for p in portfolios[m][k][0][0]}) for m in shown}  # random: first seed
    gaps = {m: cov.gaps(R, idx, lattice).multiplicative for m, idx in chosen.items()}
    top = max(max(g.max() for g in gaps.values()), 1e-9)  # one shading scale for every panel
    for ax, method in zip(axes[0], shown):
        idx, gap = chosen[method], gaps[method]
        serve = np.argmax(lattice @ R[idx].T, axis=1)
        colours = [tuple(ch * (1 - 0.75 * g / top) for ch in matplotlib.colors.to_rgb(f"C{s % 10}"))
                   for s, g in zip(serve, gap)]
        ax.scatter(x, y, c=colours, s=14, marker="h")
        for (cx, cy), t in zip([(0, 0), (1, 0), (0.5, np.sqrt(3) / 2)], out["traits"]):
            ax.annotate(t, (cx, cy), ha="center", va="top" if cy == 0 else "bottom", fontsize=8)
        name = LABELS[method] + (" (first seed)" if method == "random" else "")
        ax.set_title(f"{name}, k = {len(idx)}\nmax gap {gap.max():.3f} (darker = larger, scale {top:.3f})",
                     fontsize=8)
        ax.set_axis_off()
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _log_mlflow(cfg: PalmConfig, root: Path, out: dict, files: list[Path]) -> None:
    import mlflow

    from palm_tasks.tracking import lineage_tags, setup_mlflow

    setup_mlflow(cfg, root)
    with mlflow.start_run(run_name=f"evaluate-{cfg.task}",
                          tags={"palm.stage": "evaluate", **lineage_tags(root)}):
        mlflow.log_params({"task": cfg.task, "traits": ",".join(cfg.traits),
                           **{f"compare.{k}": v for k, v in cfg.compare.model_dump().items()}})
        metrics = {f"{m}.k{k}.{n}": v for m, by_k in out["results"].items() for k, r in by_k.items()
                   for n, v in r.items() if isinstance(v, (int, float)) and np.isfinite(v)}
        mlflow.log_metrics({**metrics, "reference_pool_size": out["reference_pool"]["size"],
                            "seconds": out["seconds"]})
        mlflow.log_dict(out, "evaluate.json")
        for f in files:
            mlflow.log_artifact(str(f), "report")
