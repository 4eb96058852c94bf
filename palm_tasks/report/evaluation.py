"""The evaluation report: tables, the reading, plots (reports/evaluation.md and PNGs).

Everything here reads the evaluate stage's output dict (metrics/evaluate.json) and nothing else.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from palm_tasks.core import metrics, routing, simplex

LABELS = {"palm_lazy": "PALM (lazy + prune)", "palm_grid": "PALM (grid + prune)",
          "uniform": "uniform grid", "random": "random", "centroid": "single model (centroid)",
          "soups": "Rewarded Soups", "oracle": "oracle (whole reference pool)"}
# The paper's published figures (docs/theory.md section 1).
PAPER = ("portfolios of 3-7 models reach multiplicative and additive gaps around 0.01-0.02 "
         "(under 1.5% suboptimality) on three tasks (d = 2, 2, 3), beating uniform-grid and random "
         "portfolios of the same size")


def plot_rows(out: dict) -> list[dict]:
    """DVC plot data, one row per k: each method's worst and mean multiplicative gap (methods
    measured at every k only; the centroid is in the tables)."""
    full = [m for m in out["methods"] if m != "oracle" and all(str(k) in out["results"][m] for k in out["ks"])]
    return [{"k": k, **{m: round(out["results"][m][str(k)]["max_multiplicative_gap"], 6) for m in full},
             **{f"{m}_mean": round(out["results"][m][str(k)]["mean_multiplicative_gap"], 6) for m in full}}
            for k in out["ks"]]


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


def summary_table(out: dict, name: str = "max_multiplicative_gap") -> str:
    """The paper-style table: worst multiplicative gap (mean over seeds for random) per method and k;
    `name` another figure of the rows (pool_max_multiplicative_gap: against the pool only)."""
    lines = ["| method | " + " | ".join(f"k = {k}" for k in out["ks"]) + " |",
             "| --- | " + " | ".join("---" for _ in out["ks"]) + " |"]
    for method in out["methods"]:
        if method != "oracle":
            by_k = out["results"][method]
            lines.append(f"| {LABELS[method]} | " + " | ".join(
                _fmt(by_k[str(k)], name) if str(k) in by_k else "" for k in out["ks"]) + " |")
    return "\n".join(lines)


POPULATION_LABELS = {"dirichlet_1": "Dirichlet(1) users", "concentrated": "concentrated users (near the corners)",
                     "centred": "centred users", "mixture": "a mixture of the three"}


def population_table(out: dict, population: str) -> str:
    """One population of simulated users: each method's mean gap (± se) and worst gap per k."""
    lines = ["| method | " + " | ".join(f"k = {k}" for k in out["ks"]) + " |",
             "| --- | " + " | ".join("---" for _ in out["ks"]) + " |"]
    for method in out["methods"]:
        if method == "oracle":
            continue
        by_k, cells = out["results"][method], []
        for k in out["ks"]:
            row = by_k.get(str(k))
            if row is None or f"{population}_mean_gap" not in row:
                cells.append("")
                continue
            cells.append(f"{_fmt(row, f'{population}_mean_gap')} / {_fmt(row, f'{population}_worst_gap')}")
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def populations_section(out: dict) -> list[str]:
    pops = out.get("populations")
    if not pops:
        return []
    parts = ["## Simulated user populations", "",
             f"{pops['users_each']} users of each population, weights over the traits as in PersonalLLM: "
             f"{pops['are']} (concentrated alpha {pops['concentrated_alpha']:g}, centred alpha "
             f"{pops['centred_alpha']:g}). Each cell: mean multiplicative gap against the evidence ± its se "
             f"(users and evaluation noise) / the worst gap among them ± its se at that user's weight "
             f"(the values' evaluation noise; for random, the spread over seeds).", ""]
    for name in pops["names"]:
        parts += [f"### {POPULATION_LABELS.get(name, name)}", "", population_table(out, name), ""]
    return parts


def evidence_reading(out: dict) -> list[str]:
    """The trained policies the evidence (pool and best-of-N) beats at their own weight."""
    ec = out.get("evidence_check")
    if not ec:
        return []
    alpha = ec.get("split", {}).get("alpha")
    at = f" (a paired decision each, alpha {alpha:g} split over them)" if alpha else ""
    if not ec["beaten"]:
        return [f"Evidence check: none of the {ec['checked']} trained policies is shown to fall short of the "
                f"evidence at its own weight{at}."]
    w = ec["worst"]
    return [f"Evidence check: **{ec['beaten']} of the {ec['checked']} trained policies fall short of the evidence "
            f"at their own weight**{at}; {ec['beaten_by_best_of_n']} of them are beaten by best-of-N sampling from "
            f"the base. The worst, {w['key']} at ({', '.join(f'{x:.2f}' for x in w['weights'])}), by "
            f"{w['shortfall']:.3f} (at least {w['lower']:.3f} on {w['n']} prompts) against {w['by']}. The alignment "
            f"oracle fell short there; PALM's certificate counts the evidence, the baselines' portfolios are "
            f"judged against it."]


def certificate_reading(out: dict) -> list[str]:
    """PALM's (eps, delta) promise for its own portfolio, checked against the evidence at every
    test weight: the smallest eps that keeps P(w) >= (1 - eps) E(w) - delta everywhere."""
    a = out.get("certificate_audit")
    if not a:
        return []
    at = ", ".join(f"{x:.2f}" for x in a["evidence_eps_weight"].values())
    n = len(a["members"])
    head = (f"PALM's certificate against the evidence: its {n}-member portfolio, "
            f"{'certified' if a['certified'] else 'not certified'} by the lazy search at eps = {a['eps']:g}, "
            f"delta = {a['delta']:g}, keeps P(w) >= (1 - eps) E(w) - delta at all {a['test_weights']:,} test "
            f"weights for eps = {a['evidence_eps']:.4f} (the tightest at ({at}), against {a['evidence_eps_against']})")
    if not a["certified"]:
        verdict = ""  # no promise to hold or break
    elif a["evidence_eps"] <= a["eps"]:
        verdict = ": **the promise holds against the evidence**"
    elif a["contradicted"]:
        verdict = ": **the evidence contradicts the promise** (a paired decision that (1 - eps) E(w) - P(w) > delta)"
    else:
        verdict = (f": above eps = {a['eps']:g} on the means, but no paired decision says so at the audit's "
                   f"confidence (not a contradiction)")
    return [head + verdict + "."]


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
            palm, beaten, ahead = at_k["palm_lazy"], [], []
            for m in (m for m in rivals if m in at_k):
                se = float(np.hypot(_worst_se(res[m][str(k)]), _worst_se(res["palm_lazy"][str(k)])))
                if at_k[m] < palm - 1e-12:
                    beaten.append(LABELS[m] + (" (within 2 se)" if palm - at_k[m] < 2 * se else ""))
                elif at_k[m] - palm > 2 * se:
                    ahead.append(LABELS[m])
            size = res["palm_lazy"][str(k)]["size"]
            line += (f"; PALM lazy ({size} policies) {palm:.4f}"
                     + (f", beaten by {', '.join(beaten)}" if beaten else ", not beaten by a baseline")
                     + (f", ahead of {', '.join(ahead)} by more than 2 se" if ahead else
                        ", ahead of no baseline by more than 2 se"))
        lines.append(line + ".")
    return lines


def _worst_se(row: dict) -> float:
    """The se of a row's worst gap: at its weight, or over seeds for random (0 if not measured)."""
    return float(row.get("max_multiplicative_gap_se", row.get("max_multiplicative_gap_seed_se")) or 0.0)




def render_report(out: dict, pictures: list[str]) -> str:
    tw, pool = out["test_weights"], out["reference_pool"]
    parts = [
        f"# Evaluation: PALM against the baselines, task `{out['task']}`",
        "",
        f"Traits {', '.join(out['traits'])} (d = {out['d']}); eps = {out['eps']}, delta = {out['delta']}. "
        f"Gaps are against {tw['relative_to']}. Test weights: a simplex lattice of step {tw['lattice_step']} "
        f"({tw['lattice']} weights) and {tw['users']} Dirichlet(1) users (seed {tw['users_seed']}). "
        f"Reference pool: {pool['size']} policies ({pool['new_in_this_run']} trained or, for soups, "
        f"evaluated in this run; {pool['reused']} reused from the job cache). Standard errors (±) are for "
        f"mean gaps the users' sampling and the values' evaluation noise together, a bootstrap of the "
        f"users for usage perplexity, over {len(out['random_seeds'])} seeds for the random baseline, and "
        f"for a worst gap its se at the weight where it is reached (the delta method on the two values "
        f"there, over the evaluation prompts). The evaluation took "
        f"{out['seconds']:.0f} s.",
        "",
    ]
    for method, note in out["notes"].items():
        parts.append(f"- {LABELS[method]}: {note}.")
    for method, why in out["omitted"].items():
        parts.append(f"- {LABELS[method]}: left out: {why}.")
    parts += ["", "## Worst multiplicative gap by portfolio size", "", summary_table(out), ""]
    if any("pool_max_multiplicative_gap" in row for by_k in out["results"].values() for row in by_k.values()):
        parts += ["Against the reference pool only (what the comparison measured before the evidence; best-of-N "
                  "of the base left out):", "", summary_table(out, "pool_max_multiplicative_gap"), ""]
    for k in out["ks"]:
        parts += [f"## Portfolio size k = {k}", "", table(out, k), ""]
    parts += populations_section(out)
    parts += ["## Gap versus size", ""] + [f"![{p}]({p})" for p in pictures] + [""]
    parts += ["## Reading", ""] + reading(out) + [""] + evidence_reading(out) + [
        ""] + certificate_reading(out) + [
        "",
        f"The paper reports that {PAPER}. Those figures come from the paper's own models and rewards, "
        f"at a different model scale from this run's; ours are measured here, on this project's base "
        f"model, rewards and training budget, and are relative to this run's evidence (every policy "
        f"trained or mixed here and best-of-N sampling from the base): a weak pool makes every gap look "
        f"smaller than it would against a stronger oracle, and when the traits barely trade off (see the "
        f"rewards stage's correlations) all methods look alike.",
        "",
        "All the k tables are in `metrics/evaluate.details.json`.",
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


def simplex_plot(out: dict, R: np.ndarray, chosen: dict[str, list[int]], path: Path) -> Path:
    """d = 3: for the largest k, which policy serves each weight, darker = larger gap, per method
    (chosen: method -> rows of R in its portfolio of the largest size; random: the first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in ("palm_lazy", "palm_grid", "uniform", "random") if m in chosen]
    lattice = simplex.simplex_lattice(3, 30)
    x, y = lattice[:, 1] + lattice[:, 2] / 2, lattice[:, 2] * np.sqrt(3) / 2
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 4), squeeze=False)
    gaps = {m: metrics.gaps(R, idx, lattice).multiplicative for m, idx in chosen.items()}
    top = max(max(g.max() for g in gaps.values()), 1e-9)  # one shading scale for every panel
    for ax, method in zip(axes[0], shown):
        idx, gap = chosen[method], gaps[method]
        serve = routing.route(lattice, R[idx])
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
