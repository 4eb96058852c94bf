"""Pictures of a portfolio, as PNGs and as the JSON data DVC plots (dvc.yaml) draw from.

- simplex_map: every weight of a fine simplex lattice, coloured by the member that serves it and
  shaded by eps_w, the tolerance the certificate guarantees there (the router); drawn on the
  segment (d = 2), the triangle (d = 3), or the polygon whose corners are the traits (d > 3,
  each weight at the weighted mean of the corners, so a map of a projection);
- gap_vs_size: the worst and mean multiplicative gap on the test weights against portfolio size
  k, for PALM (greedy best k of the trained pool) and the uniform and random baselines. Only
  trained policies have measured values, so a baseline of size k is the set of pool policies
  trained nearest (L1) to its k weights (simplex.uniform_weights / random_weights); fewer than k
  distinct ones when several weights share a nearest policy. Gaps are relative to the best of
  the whole pool (metrics.gaps), so at k = pool size every curve reaches 0;
- member_values: each member's value vector with standard errors;
- price_of_precision: the eps certified at confidence against portfolio size (beside the grid's
  a-priori size bound) and against the compute the search spent (docs/theory.md section 14);
- distribution_figure: the base model's reward distributions and trait correlations.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from palm_tasks.core import metrics, routing, simplex
from palm_tasks.portfolio import Portfolio

SIMPLEX_MAP_DIVISIONS = 40  # lattice step 1/40: 861 weights
MAX_SIZE = 20  # the gap curve stops here (a grid-mode pool can have hundreds of policies)


def _figure(**kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(**kwargs)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def write_plots(portfolio: Portfolio, test_weights: np.ndarray, seed: int, out_dir: Path) -> list[Path]:
    """All plots of a portfolio; returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = (member_values(portfolio, out_dir) + gap_vs_size(portfolio, test_weights, seed, out_dir)
               + price_of_precision(portfolio, out_dir))
    return written + simplex_map(portfolio, out_dir)  # every d: dvc.yaml declares the map an output


def simplex_corners(d: int) -> np.ndarray:
    """Where each trait's corner is drawn: a segment (d = 2), a triangle (d = 3), else a regular
    polygon; a weight w is drawn at w @ corners."""
    if d == 2:
        return np.array([[0.0, 0.0], [1.0, 0.0]])
    if d == 3:
        return np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])
    angles = np.pi / 2 + 2 * np.pi * np.arange(d) / d
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def simplex_map(portfolio: Portfolio, out_dir: Path) -> list[Path]:
    """Which member serves each weight (colour) and eps_w there (darker = larger)."""
    from matplotlib.colors import to_rgb

    traits, d = portfolio.traits, len(portfolio.traits)
    # a lattice of at most 1,000 points whatever d (the map routes and bounds each one; d = 3: 861)
    divisions = next(n for n in range(SIMPLEX_MAP_DIVISIONS, 0, -1) if math.comb(n + d - 1, d - 1) <= 1000 or n == 1)
    lattice = simplex.simplex_lattice(d, divisions)
    corners = simplex_corners(d)
    xy = lattice @ corners
    _, R, _ = portfolio.member_arrays
    served = routing.route(lattice, R)  # the one routing rule, as every route
    value = np.einsum("md,md->m", lattice, R[served])
    bound = portfolio.guarantee_bound()
    upper = np.maximum([bound(w) for w in lattice], value)  # U >= OPT >= any policy's value
    eps_w = routing.eps_at(value, upper, portfolio.delta)
    rows = [{**{t: round(float(x), 4) for t, x in zip(traits, w)},
             "x": round(float(p[0]), 4), "y": round(float(p[1]), 4),
             "member": portfolio.members[i].key[:10], "eps_at_w": round(float(e), 6)}
            for w, p, i, e in zip(lattice, xy, served, eps_w)]
    data = _write_json(out_dir / "simplex_map.json", rows)

    top = max(float(eps_w.max()), portfolio.eps, 1e-9)
    palette = [to_rgb(f"C{i % 10}") for i in range(len(portfolio.members))]
    colours = [tuple(c * (1 - 0.75 * e / top) for c in palette[i]) for i, e in zip(served, eps_w)]
    fig, ax = _figure(figsize=(6.4, 5.6 if d > 2 else 2.6))
    ax.scatter([r["x"] for r in rows], [r["y"] for r in rows], c=colours, s=28, marker="h")
    for (x, y), t in zip(corners, traits):
        ax.annotate(f"{t} = 1", (x, y), xytext=(0, -14 if y <= 0 else 8), textcoords="offset points",
                    ha="right" if x < 0.5 and d <= 3 else ("left" if x > 0.5 and d <= 3 else "center"))
    for i, m in enumerate(portfolio.members):
        x, y = np.asarray(m.weights) @ corners
        ax.scatter([x], [y], marker="*", s=220, color=palette[i], edgecolor="black",
                   label=f"{m.key[:10]} ({100 * m.share:.0f}% of users)")
    projection = " (a projection of the simplex)" if d > 3 else ""
    ax.set_title(f"Who serves each weight{projection}; darker = larger eps_w (max {eps_w.max():.3f}, "
                 f"certificate eps {portfolio.eps}, delta {portfolio.delta})", fontsize=9)
    ax.legend(loc="upper right", fontsize=7, title="member (star: trained for)", title_fontsize=7)
    ax.set_axis_off()
    ax.set_aspect("equal")
    return [data, _save(fig, out_dir / "simplex_map.png")]


def _nearest(W: np.ndarray, targets: np.ndarray) -> list[int]:
    return sorted({int(np.argmin(np.abs(W - t).sum(axis=1))) for t in targets})


def gap_vs_size(portfolio: Portfolio, test_weights: np.ndarray, seed: int, out_dir: Path) -> list[Path]:
    """Worst/mean multiplicative gap vs k for PALM (greedy), uniform and random baselines."""
    W, R = np.array(portfolio.oracle.weights), np.array(portfolio.oracle.values)
    n, d = R.shape
    order = metrics.greedy_order(R, min(n, MAX_SIZE), test_weights)
    rows = []
    for k in range(1, len(order) + 1):
        sets = {"palm": sorted(order[:k]),
                "uniform": _nearest(W, simplex.uniform_weights(d, k)),
                "random": _nearest(W, simplex.random_weights(d, k, seed))}
        row = {"k": k}
        for method, s in sets.items():
            g = metrics.gaps(R, s, test_weights)
            row[method] = round(g.max_multiplicative, 6)
            row[f"{method}_mean"] = round(g.mean_multiplicative, 6)
            row[f"{method}_members"] = len(s)
        rows.append(row)
    data = _write_json(out_dir / "gap_vs_size.json", rows)

    fig, ax = _figure(figsize=(6.4, 4.2))
    ks = [r["k"] for r in rows]
    for i, (method, style) in enumerate((("palm", "o-"), ("uniform", "s--"), ("random", "^:"))):
        label = "PALM (greedy from pool)" if method == "palm" else method
        ax.plot(ks, [r[method] for r in rows], style, color=f"C{i}", label=f"{label}, worst")
        ax.plot(ks, [r[f"{method}_mean"] for r in rows], style, color=f"C{i}", alpha=0.35,
                label=f"{label}, mean")
    size = len(portfolio.members)
    ax.axvline(size, color="grey", lw=0.8, label=f"pruned portfolio ({size} members)")
    ax.set_xlabel("portfolio size k (policies from the trained pool)")
    ax.set_ylabel("multiplicative gap on test weights")
    ax.set_xticks(ks)
    ax.set_title(f"Gap vs size ({n} trained; baselines use the pool policy nearest each weight)",
                 fontsize=9)
    ax.legend(fontsize=7)
    return [data, _save(fig, out_dir / "gap_vs_size.png")]


def member_values(portfolio: Portfolio, out_dir: Path) -> list[Path]:
    """Each member's value vector (mean over eval prompts) with its standard errors."""
    traits, members = portfolio.traits, portfolio.members
    rows = [{"member": m.key[:10], "trait": t, "value": v, "se": se}
            for m in members for t, v, se in zip(traits, m.value.mean, m.value.se)]
    data = _write_json(out_dir / "member_values.json", rows)
    fig, ax = _figure(figsize=(1.6 + 1.4 * len(members) * len(traits) / 3, 4))
    width = 0.8 / len(traits)
    x = np.arange(len(members))
    for i, t in enumerate(traits):
        ax.bar(x + i * width, [m.value.mean[i] for m in members], width,
               yerr=[m.value.se[i] for m in members], capsize=3, label=t)
    ax.set_xticks(x + width * (len(traits) - 1) / 2,
                  [m.key[:10] + "\nw=" + ",".join(f"{w:.2f}" for w in m.weights) for m in members],
                  fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("value (mean ± se over eval prompts)")
    ax.set_title("Value vectors of the portfolio's members", fontsize=9)
    ax.legend(fontsize=7)
    return [data, _save(fig, out_dir / "member_values.png")]


def price_of_precision(portfolio: Portfolio, out_dir: Path) -> list[Path]:
    """The eps certified with confidence 1 - alpha (at the portfolio's delta) against portfolio
    size k, beside the grid's a-priori size bound, and against the compute the search spent
    (docs/theory.md section 14; the figures are portfolio.json `price`)."""
    price = portfolio.price
    size = _write_json(out_dir / "price_vs_size.json", price.get("by_size", []))
    compute = _write_json(out_dir / "price_vs_compute.json", price.get("by_compute", []))
    fig, (left, right) = _figure(nrows=1, ncols=2, figsize=(10, 4))
    rows = price.get("by_size", [])
    if rows:
        left.plot([r["k"] for r in rows], [r["certified_eps"] for r in rows], "o-", label="PALM, measured")
    bound = price.get("grid_bound", [])
    if bound:
        left.plot([b["k"] for b in bound], [b["eps"] for b in bound], "s--", color="grey",
                  label="PALM grid, a-priori size bound")
        left.set_xscale("log")
    left.axhline(portfolio.eps, color="C3", lw=0.8, label=f"eps asked ({portfolio.eps:g})")
    left.axvline(len(portfolio.members), color="C2", lw=0.8, label=f"portfolio ({len(portfolio.members)} members)")
    left.set_xlabel("portfolio size k")
    left.set_ylabel(f"eps certified (delta {portfolio.delta:g}, confidence {1 - portfolio.certificate.alpha:g})")
    left.set_title("Price of precision: size", fontsize=9)
    left.legend(fontsize=7)
    steps = price.get("by_compute", [])
    if steps:
        right.plot([r["trainings"] for r in steps], [r["certified_eps"] for r in steps], "o-", color="C1")
        for r in steps:
            right.annotate(f"{r['minutes']:.0f} min, {r['answers']} ans.", (r["trainings"], r["certified_eps"]),
                           fontsize=6, xytext=(3, 3), textcoords="offset points")
    right.axhline(portfolio.eps, color="C3", lw=0.8)
    right.set_xlabel("trainings (the search's, in order; labels: minutes and answers measured by then)")
    right.set_ylabel("eps certified by the rows trained so far")
    right.set_title("Price of precision: compute", fontsize=9)
    return [size, compute, _save(fig, out_dir / "price_of_precision.png")]


def distribution_figure(traits, scores: np.ndarray, corr: np.ndarray):
    """Histograms of each trait's reward on the base model's samples, and the trait correlations."""
    fig, axes = _figure(nrows=1, ncols=len(traits) + 1, figsize=(3.2 * (len(traits) + 1), 3))
    for ax, t, s in zip(axes, traits, scores.T):
        ax.hist(s, bins=20, range=(0, 1), color="tab:blue")
        ax.set_title(f"{t} (base model)")
    im = axes[-1].imshow(corr, vmin=-1, vmax=1, cmap="coolwarm")
    axes[-1].set_xticks(range(len(traits)), traits, rotation=45)
    axes[-1].set_yticks(range(len(traits)), traits)
    axes[-1].set_title("trait correlation")
    fig.colorbar(im, ax=axes[-1])
    fig.tight_layout()
    return fig
