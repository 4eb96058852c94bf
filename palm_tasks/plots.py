"""Pictures of a portfolio, as PNGs and as the JSON data DVC plots (dvc.yaml) draw from.

- simplex_map (d = 3 only): every weight of a fine simplex lattice, coloured by the member that
  serves it and shaded by eps_w, the tolerance the certificate guarantees there (router.py);
- gap_vs_size: the worst and mean multiplicative gap on the test weights against portfolio size
  k, for PALM (greedy best k of the trained pool) and the uniform and random baselines. Only
  trained policies have measured values, so a baseline of size k is the set of pool policies
  trained nearest (L1) to its k weights (gridlib.uniform_weights / random_weights); fewer than k
  distinct ones when several weights share a nearest policy. Gaps are relative to the best of
  the whole pool (coverage.gaps), so at k = pool size every curve reaches 0;
- member_values: each member's value vector with standard errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from palm_tasks import coverage as cov
from palm_tasks import grid as gridlib

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


def write_plots(portfolio: dict, test_weights: np.ndarray, seed: int, out_dir: Path) -> list[Path]:
    """All plots of a portfolio.json that carries its pool ("oracle"); returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = member_values(portfolio, out_dir) + gap_vs_size(portfolio, test_weights, seed, out_dir)
    if len(portfolio["traits"]) == 3:
        written += simplex_map(portfolio, out_dir)
    return written


def simplex_map(portfolio: dict, out_dir: Path) -> list[Path]:
    """Which member serves each weight (colour) and eps_w there (darker = larger)."""
    from matplotlib.colors import to_rgb

    from palm_tasks.router import Router

    traits = portfolio["traits"]
    router = Router(portfolio)
    keys = [m["key"] for m in portfolio["members"]]
    lattice = gridlib.simplex_lattice(3, SIMPLEX_MAP_DIVISIONS)
    routes = [router.route(dict(zip(traits, w))) for w in lattice]
    rows = [{**{t: round(float(x), 4) for t, x in zip(traits, w)},
             "x": round(float(w[1] + w[2] / 2), 4), "y": round(float(w[2] * np.sqrt(3) / 2), 4),
             "member": r.member_key[:10], "eps_at_w": round(r.eps_at_w, 6)}
            for w, r in zip(lattice, routes)]
    data = _write_json(out_dir / "simplex_map.json", rows)

    eps_w = np.array([r.eps_at_w for r in routes])
    top = max(float(eps_w.max()), portfolio["eps"], 1e-9)
    palette = [to_rgb(f"C{i % 10}") for i in range(len(keys))]
    colours = [tuple(c * (1 - 0.75 * e / top) for c in palette[keys.index(r.member_key)])
               for r, e in zip(routes, eps_w)]
    fig, ax = _figure(figsize=(6.4, 5.6))
    ax.scatter([r["x"] for r in rows], [r["y"] for r in rows], c=colours, s=28, marker="h")
    corners = [(0, 0), (1, 0), (0.5, np.sqrt(3) / 2)]
    for (x, y), t, ha in zip(corners, traits, ("right", "left", "center")):
        ax.annotate(f"{t} = 1", (x, y), xytext=(0, -14 if y == 0 else 8),
                    textcoords="offset points", ha=ha)
    for i, m in enumerate(portfolio["members"]):
        w = [m["weights"][t] for t in traits]
        ax.scatter([w[1] + w[2] / 2], [w[2] * np.sqrt(3) / 2], marker="*", s=220,
                   color=palette[i], edgecolor="black",
                   label=f"{m['key'][:10]} ({100 * m['share']:.0f}% of users)")
    ax.set_title(f"Who serves each weight; darker = larger eps_w (max {eps_w.max():.3f}, "
                 f"certificate eps {portfolio['eps']}, delta {portfolio['delta']})", fontsize=9)
    ax.legend(loc="upper right", fontsize=7, title="member (star: trained for)", title_fontsize=7)
    ax.set_axis_off()
    ax.set_aspect("equal")
    return [data, _save(fig, out_dir / "simplex_map.png")]


def _greedy_curve(R: np.ndarray, test_weights: np.ndarray) -> list[list[int]]:
    """For k = 1..n the set of k pool rows that the greedy choice adds (smallest worst gap)."""
    chosen, curve = [], []
    for _ in range(min(len(R), MAX_SIZE)):
        rest = [j for j in range(len(R)) if j not in chosen]
        gaps = [(cov.gaps(R, chosen + [j], test_weights), j) for j in rest]
        chosen.append(min((g.max_multiplicative, g.mean_multiplicative, j) for g, j in gaps)[2])
        curve.append(sorted(chosen))
    return curve


def _nearest(W: np.ndarray, targets: np.ndarray) -> list[int]:
    return sorted({int(np.argmin(np.abs(W - t).sum(axis=1))) for t in targets})


def gap_vs_size(portfolio: dict, test_weights: np.ndarray, seed: int, out_dir: Path) -> list[Path]:
    """Worst/mean multiplicative gap vs k for PALM (greedy), uniform and random baselines."""
    oracle = portfolio["oracle"]
    W, R = np.array(oracle["weights"], float), np.array(oracle["values"], float)
    n, d = R.shape
    rows = []
    for k, members in enumerate(_greedy_curve(R, test_weights), start=1):
        sets = {"palm": members,
                "uniform": _nearest(W, gridlib.uniform_weights(d, k)),
                "random": _nearest(W, gridlib.random_weights(d, k, seed))}
        row = {"k": k}
        for method, s in sets.items():
            g = cov.gaps(R, s, test_weights)
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
    size = len(portfolio["members"])
    ax.axvline(size, color="grey", lw=0.8, label=f"pruned portfolio ({size} members)")
    ax.set_xlabel("portfolio size k (policies from the trained pool)")
    ax.set_ylabel("multiplicative gap on test weights")
    ax.set_xticks(ks)
    ax.set_title(f"Gap vs size ({n} trained; baselines use the pool policy nearest each weight)",
                 fontsize=9)
    ax.legend(fontsize=7)
    return [data, _save(fig, out_dir / "gap_vs_size.png")]


def member_values(portfolio: dict, out_dir: Path) -> list[Path]:
    """Each member's value vector (mean over eval prompts) with its standard errors."""
    traits, members = portfolio["traits"], portfolio["members"]
    rows = [{"member": m["key"][:10], "trait": t, "value": m["values"][t],
             "se": m["std_errors"][t]} for m in members for t in traits]
    data = _write_json(out_dir / "member_values.json", rows)
    fig, ax = _figure(figsize=(1.6 + 1.4 * len(members) * len(traits) / 3, 4))
    width = 0.8 / len(traits)
    x = np.arange(len(members))
    for i, t in enumerate(traits):
        ax.bar(x + i * width, [m["values"][t] for m in members], width,
               yerr=[m["std_errors"][t] for m in members], capsize=3, label=t)
    ax.set_xticks(x + width * (len(traits) - 1) / 2,
                  [m["key"][:10] + "\nw=" + ",".join(f"{m['weights'][t]:.2f}" for t in traits)
                   for m in members], fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("value (mean ± se over eval prompts)")
    ax.set_title("Value vectors of the portfolio's members", fontsize=9)
    ax.legend(fontsize=7)
    return [data, _save(fig, out_dir / "member_values.png")]
