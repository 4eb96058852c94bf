"""How wide the decisions' intervals are, and how often they miss (docs/confidence.md).

Compares, on statistics of the kind PALM decides on, the interval the project uses (Student's t
at planned looks, alpha spent over 11 looks: palm_tasks/core/confidence.py) with two confidence
sequences for bounded values valid for any distribution (Waudby-Smith and Ramdas 2023): the
predictable plug-in empirical-Bernstein sequence (PrPl-EB, their Theorem 2) and the hedged-capital
betting sequence (their Theorem 3), both written out here from the paper. For each: the mean
half-width at 384 prompts, and the share of runs whose interval missed the mean at some look.

Run from the repository root: python benchmarks/confidence_width.py [--runs N]
Writes benchmarks/results/confidence_width.json (about a minute on 2 cores).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from palm_tasks.core.confidence import Looks, mean_interval  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "confidence_width.json"
CAP, CHUNK, FIRST = 384, 32, 64
GRID = 1000  # candidate means of the betting sequence


def prpl_eb(x, alpha):
    """PrPl-EB bounds after all of x (n,) in [0, 1] (Waudby-Smith and Ramdas 2023, Theorem 2)."""
    n = len(x)
    t = np.arange(1, n + 1)
    mu = (0.5 + np.cumsum(x)) / (t + 1)
    var = (0.25 + np.cumsum((x - mu) ** 2)) / (t + 1)
    mu_before, var_before = np.r_[0.5, mu[:-1]], np.r_[0.25, var[:-1]]
    bet = np.minimum(np.sqrt(2 * np.log(2 / alpha) / (var_before * t * np.log1p(t))), 0.5)
    psi = (-np.log1p(-bet) - bet) / 4
    centre = (bet * x).sum() / bet.sum()
    half = (np.log(2 / alpha) + (4 * (x - mu_before) ** 2 * psi).sum()) / bet.sum()
    return max(centre - half, 0.0), min(centre + half, 1.0)


def hedged_capital(x, alpha, cap=0.75):
    """Hedged-capital betting bounds after all of x (n,) in [0, 1] (their Theorem 3)."""
    n = len(x)
    t = np.arange(1, n + 1)
    mu = (0.5 + np.cumsum(x)) / (t + 1)
    var_before = np.r_[0.25, ((0.25 + np.cumsum((x - mu) ** 2)) / (t + 1))[:-1]]
    bet = np.sqrt(2 * np.log(2 / alpha) / (var_before * t * np.log1p(t)))
    m = (np.arange(GRID) + 0.5) / GRID
    up = np.minimum(bet[None], cap / m[:, None])
    down = np.minimum(bet[None], cap / (1 - m[:, None]))
    d = x[None] - m[:, None]
    wealth = np.maximum(np.log1p(up * d).sum(1), np.log1p(-down * d).sum(1)) + np.log(0.5)
    inside = m[wealth < np.log(1 / alpha)]
    return (inside.min() - 0.5 / GRID, inside.max() + 0.5 / GRID) if len(inside) else (np.nan, np.nan)


STATISTICS = {
    # a paired difference of two policies on common prompts: mean 0.01, sd 0.08, in [-1, 1]
    "paired difference (sd 0.08)": (lambda rng, s: np.clip(rng.normal(0.01, 0.08, s), -1, 1), -1.0, 1.0),
    # a policy's per-prompt mean of 2 answers of a 0/1 reward right 30% of the time
    "0/1 reward at 0.3, 2 answers": (lambda rng, s: (rng.random(s + (2,)) < 0.3).mean(-1), 0.0, 1.0),
    # a 0/1 reward that is rarely right: the t interval's weak spot
    "0/1 reward at 0.05, 1 answer": (lambda rng, s: (rng.random(s) < 0.05).astype(float), 0.0, 1.0),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=400)
    parser.add_argument("--alpha", type=float, default=0.05)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    looks = Looks(CHUNK, CAP, FIRST)
    started, rows = time.time(), []
    for name, (draw, lo, hi) in STATISTICS.items():
        truth = float(draw(np.random.default_rng(1), (2_000_000,)).mean())
        x = draw(rng, (args.runs, CAP))
        scaled = (x - lo) / (hi - lo)
        miss = {"t at planned looks": np.zeros(args.runs, bool), "PrPl-EB": np.zeros(args.runs, bool),
                "hedged capital": np.zeros(args.runs, bool)}
        width = {k: [] for k in miss}
        for n in looks.sizes:
            _, lower, upper, _ = mean_interval(x[:, :n], args.alpha, looks, lo, hi)
            miss["t at planned looks"] |= (lower > truth) | (upper < truth)
            if n == CAP:
                width["t at planned looks"] = list((upper - lower) / 2)
            for method, fn in (("PrPl-EB", prpl_eb), ("hedged capital", hedged_capital)):
                bounds = np.array([fn(row[:n], args.alpha) for row in scaled]) * (hi - lo) + lo
                miss[method] |= (bounds[:, 0] > truth) | (bounds[:, 1] < truth)
                if n == CAP:
                    width[method] = list((bounds[:, 1] - bounds[:, 0]) / 2)
        for method in miss:
            rows.append({"statistic": name, "method": method, "halfwidth_at_cap": round(float(np.mean(width[method])), 5),
                         "missed_at_some_look": round(float(miss[method].mean()), 4)})
            print(f"{name:32s} {method:20s} half-width at {CAP}: {rows[-1]['halfwidth_at_cap']:.4f}   "
                  f"missed at some of {looks.count} looks: {rows[-1]['missed_at_some_look']:.3f}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"commit": commit, "date": datetime.date.today().isoformat(), "alpha": args.alpha,
                               "runs": args.runs, "looks": looks.sizes, "load_average": os.getloadavg(),
                               "seconds": round(time.time() - started, 1), "rows": rows}, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
