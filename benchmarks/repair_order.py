"""Which beaten row should a search with a small budget repair first? Writes
benchmarks/results/repair_order.{json,md} and prints the table.

Run from the repository root: python benchmarks/repair_order.py [--seeds N]

The lazy search repairs rows the evidence beats at their own weight (docs/theory.md section 9).
When its budget cannot repair them all, the order decides which rows stay short. This compares
two orders on synthetic fronts with an imperfect oracle shaped like the measured rsft runs
(docs/results/safety.md, assistant.md): a first training falls short of OPT(w) by a fraction s
drawn per weight from U(0, 0.3); each repair multiplies what is left short by U(0.1, 0.9). Two
models of where the shortfall lies: "scaled" (every trait of the optimal point scaled down) and
"directional" (only along w; a corner row short in its own trait only). The measured repairs lie
between: on the default run a repair at w = safety raised safety and lowered brevity, one at
w = brevity raised brevity and humor (docs/results/default-run.md).
Best-of-N evidence is OPT(w) itself (se 0.005), as if sampling the base reached the front.

- "row order": the rows in the order they were trained (the search before this benchmark);
- "largest shortfall": the largest relative shortfall 1 - w_j . R_j / E(w_j) at the row's own
  weight first;
- "worst gap after repair" (the search's rule, LazySearch._repair_order): first the row whose
  repair would leave the pool's worst gap against the evidence lowest, predicted as the mean of
  the two models (the row scaled up, or lifted along its own weight only).

Per front and budget, over the same seeds (the same draws for every order): the pool's worst
multiplicative gap against OPT over dense test weights (mean ± se over seeds), the search's rule
minus each other order paired by seed, how often it is better, the same or worse, and how many
searches certified. Counts and gaps do not depend on the machine.
"""
import argparse
import json
import platform
import sys
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # support.fronts
from support.fronts import PNormFront  # noqa: E402
from palm_tasks.core.search import LazySearch, lazy_search  # noqa: E402
from palm_tasks.core.simplex import dirichlet_users, simplex_lattice  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "results"
EPS, DELTA, MAX_REPAIRS, SE = 0.05, 0.02, 2, 0.005
FIRST_SHORT = 0.3  # s of a first training ~ U(0, FIRST_SHORT)
REPAIR_KEEPS = (0.1, 0.9)  # a repair leaves this fraction of the shortfall, uniform
MODELS = ("scaled", "directional")  # how a training falls short (imperfect_oracle)


class OffsetFront:
    """lo + a p-norm front of the spans hi - lo: every policy keeps at least lo of each trait, as
    on the measured tasks, where the specialists differ by little (on `assistant` the three corners'
    round-1 policies all give safety 0.91-0.96, humor 0.30-0.33, brevity 0.65-0.72)."""

    def __init__(self, lo, hi, p=2.0):
        self.lo = np.asarray(lo, float)
        self.span = PNormFront(len(lo), p, np.asarray(hi, float) - self.lo)
        self.d = self.span.d

    def __call__(self, w):
        return self.lo + self.span(w)

    def opt(self, W):
        W = np.atleast_2d(W)
        return W @ self.lo + self.span.opt(W)


def fronts():
    """Offset fronts shaped like the measured tasks (the corners' best-of-8 as hi), and two
    curved fronts through the origin, where covering the middle costs the most."""
    return [("offset d=2 (safety-like)", OffsetFront([0.55, 0.93], [0.77, 0.99])),
            ("offset d=3 (assistant-like)", OffsetFront([0.90, 0.29, 0.60], [0.99, 0.43, 0.72])),
            ("sphere d=2", PNormFront(2, 2.0)), ("p=4 ball d=3, skewed", PNormFront(3, 4.0, [1.0, 0.7, 0.4]))]


def imperfect_oracle(front, seed, model):
    """oracle(w) -> (values, se): the k-th training at w falls short of OPT(w) by s_k(w) OPT(w).
    model "scaled": every trait of front(w) scaled by 1 - s_k; "directional": only along w
    (front(w) - s_k OPT(w) w / |w|^2: a corner row is short in its own trait only)."""
    tries = {}

    def oracle(w):
        key = tuple(np.round(w, 9))
        k = tries.get(key, 0)
        tries[key] = k + 1
        rng = np.random.default_rng([seed, zlib.crc32(repr(key).encode())])  # same draws for every order
        short = rng.uniform(0.0, FIRST_SHORT)
        for _ in range(k):
            short *= rng.uniform(*REPAIR_KEEPS)
        v = front(w)
        if model == "scaled":
            v = (1.0 - short) * v
        else:
            v = np.clip(v - short * float(w @ v) * w / float(w @ w), 0.0, None)
        return v, np.full(len(w), SE)
    return oracle


def row_order(self, b):
    """The rows in the order they were trained (the search before this benchmark)."""
    return np.flatnonzero(b.beaten)


def largest_shortfall(self, b):
    """The largest relative shortfall 1 - w_j . R_j / E(w_j) at the row's own weight first."""
    tw, tv, _ = self._arrays()
    own = np.einsum("nd,nd->n", tw, tv)
    rows = np.flatnonzero(b.beaten)
    return rows[np.argsort(-(b.shortfall / (own + b.shortfall))[rows], kind="stable")]


# the last is the search's own rule (LazySearch._repair_order)
ORDERS = {"row order": row_order, "largest shortfall": largest_shortfall,
          "worst gap after repair": LazySearch._repair_order}
NAMES = list(ORDERS)


def worst_gap(front, values, tests):
    best = (tests @ np.asarray(values).T).max(axis=1)
    return float((1.0 - best / front.opt(tests)).max())


def run(front, budget, seed, order, tests, model):
    def reference(W):
        W = np.atleast_2d(W)
        return front.opt(W), np.full(len(W), SE)
    saved = LazySearch._repair_order
    LazySearch._repair_order = ORDERS[order]
    try:
        result = lazy_search(imperfect_oracle(front, seed, model), front.d, EPS, DELTA, budget, reference=reference,
                             max_repairs=MAX_REPAIRS)
    finally:
        LazySearch._repair_order = saved
    return worst_gap(front, result.values, tests), bool(result.certificate.certified)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=100)
    p.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = p.parse_args(argv)
    rows = []
    for (name, front), model in [(f, m) for m in MODELS for f in fronts()]:
        d = front.d
        tests = np.vstack([simplex_lattice(d, {2: 400, 3: 60}[d]), dirichlet_users(d, 5000, seed=7)])
        for budget in (d + 1, d + 2, d + 3, 2 * d + 2):
            gaps = {o: [] for o in ORDERS}
            certified = {o: 0 for o in ORDERS}
            for seed in range(args.seeds):
                for order in ORDERS:
                    gap, cert = run(front, budget, seed, order, tests, model)
                    gaps[order].append(gap)
                    certified[order] += cert
            g = {o: np.array(v) for o, v in gaps.items()}
            n = args.seeds

            def mean_se(x):
                return [float(x.mean()), float(x.std(ddof=1) / np.sqrt(n))]

            def versus(other):  # the search's rule minus `other`, paired by seed
                diff = g[NAMES[-1]] - g[other]
                return {"difference": mean_se(diff), "better": int((diff < -1e-9).sum()),
                        "same": int((abs(diff) <= 1e-9).sum()), "worse": int((diff > 1e-9).sum())}
            rows.append({"front": name, "oracle": model, "d": d, "budget": budget,
                         "worst_gap": {o: mean_se(g[o]) for o in ORDERS},
                         "search_vs": {o: versus(o) for o in NAMES[:-1]}, "certified": certified})
    head = " | ".join(f"worst gap, {o}" for o in NAMES)
    vs = " | ".join(f"search - {o} (better / same / worse)" for o in NAMES[:-1])
    lines = [f"| oracle | front | budget | {head} | {vs} | certified ({' / '.join(NAMES)}) |",
             "| --- " * (4 + 2 * len(NAMES)) + "|"]
    for r in rows:
        cells = [f"{r['worst_gap'][o][0]:.4f} ± {r['worst_gap'][o][1]:.4f}" for o in NAMES]
        cells += [f"{v['difference'][0]:+.4f} ± {v['difference'][1]:.4f} ({v['better']} / {v['same']} / "
                  f"{v['worse']})" for v in r["search_vs"].values()]
        cells.append(" / ".join(str(r["certified"][o]) for o in NAMES))
        lines.append(f"| {r['oracle']} | {r['front']} | {r['budget']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    settings = {"seeds": args.seeds, "oracle_models": MODELS, "eps": EPS, "delta": DELTA, "max_repairs": MAX_REPAIRS, "se": SE,
                "first_short": FIRST_SHORT, "repair_keeps": REPAIR_KEEPS, "python": platform.python_version()}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "repair_order.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    (args.out_dir / "repair_order.md").write_text(
        f"# Repair order (benchmarks/repair_order.py)\n\nSettings: {json.dumps(settings)}\n\n{table}\n")


if __name__ == "__main__":
    main()
