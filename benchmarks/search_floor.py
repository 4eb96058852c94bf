"""The lazy search against the floor (issue 15); writes benchmarks/results/search_floor.{json,md}.

Run from the repository root: python benchmarks/search_floor.py [--out-dir DIR] [--max-d D]

For synthetic fronts with an exact oracle (tests/support/fronts.py: spheres, p-norm balls with
skewed scales, finite sets; d = 2 to 5) it computes the floor k*, the exact minimum
(eps, delta)-cover over dense candidate and test weights (docs/theory.md section 11), and runs the
lazy search with W = 1, 4 and 8 workers (ask_batch, section 12). Per front and W it prints:
trainings, rounds, portfolio size, both over k*, certified or not, and the true worst slack of
the portfolio against the exact OPT over dense test weights (<= 0: truly covering). Then the
timings of certify, prune and one search (wall clock, best of 3). Counts do not depend on the
machine's load; timings do.
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # support.fronts
from palm_tasks.core.certificate import certify  # noqa: E402
from support.fronts import FiniteFront, PNormFront, minimum_cover, true_worst_slack  # noqa: E402
from palm_tasks.core.prune import prune  # noqa: E402
from palm_tasks.core.search import lazy_search  # noqa: E402
from palm_tasks.core.simplex import dirichlet_users, simplex_lattice  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "results"
# lattice resolutions (step 1/res) of candidate and test weights for the floor, per d
RES = {2: (400, 800), 3: (40, 60), 4: (12, 16), 5: (7, 10)}
FLOOR_TIME_LIMIT = {2: 60.0, 3: 60.0, 4: 90.0, 5: 90.0}  # seconds of milp; past it the floor is an interval
CONSOLIDATE = 2  # consolidation passes of the second table
WORKERS = (1, 4, 8)
BUDGET = 400
SIZE_TARGET, TRAIN_TARGET = 1.25, 2.0


def finite_front(d, n=40, seed=0):
    """n points of the positive unit sphere at radius 0.85-1 (a finite set of policies)."""
    rng = np.random.default_rng(seed)
    x = np.abs(rng.normal(size=(n, d)))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return FiniteFront(x * rng.uniform(0.85, 1.0, (n, 1)))


def fronts(max_d):
    """(name, front, eps, delta) of the benchmark."""
    out = []
    for d in range(2, max_d + 1):
        out.append((f"sphere d={d}", PNormFront(d, 2.0), 0.05, 0.02))
        if d <= 4:
            out.append((f"p=4 ball d={d}", PNormFront(d, 4.0), 0.05, 0.02))
            out.append((f"skewed p=3 d={d}", PNormFront(d, 3.0, np.linspace(1.0, 0.4, d)), 0.03, 0.01))
            out.append((f"finite 40 d={d}", finite_front(d), 0.05, 0.02))
    return out


def test_weights(d):
    return np.vstack([simplex_lattice(d, RES[d][1]), dirichlet_users(d, 20_000, seed=1)])


def run_front(name, front, eps, delta):
    t = time.perf_counter()
    floor = minimum_cover(front, eps, delta, *RES[front.d], time_limit=FLOOR_TIME_LIMIT[front.d])
    floor_s = time.perf_counter() - t
    tests = test_weights(front.d)
    low = int(np.ceil(floor.lp_bound - 1e-6))
    row = {"front": name, "d": front.d, "eps": eps, "delta": delta, "floor": floor.size,
           "floor_lp_bound": round(floor.lp_bound, 3), "floor_optimal": floor.optimal,
           "floor_at_least": floor.size if floor.optimal else low,
           "floor_candidates": floor.n_candidates, "floor_test_weights": floor.n_test,
           "floor_seconds": round(floor_s, 2), "runs": []}
    settings = [(w, 0) for w in WORKERS] + ([(1, CONSOLIDATE)] if front.d <= 4 else [])
    for workers, consolidate in settings:
        t = time.perf_counter()
        result = lazy_search(front, front.d, eps, delta, BUDGET, prune_method="exact", workers=workers,
                             consolidate=consolidate)
        seconds = time.perf_counter() - t
        size = len(result.members)
        row["runs"].append({
            "workers": workers, "consolidate": consolidate, "trainings": result.trainings, "rounds": result.rounds,
            "size": size, "size_over_floor": round(size / floor.size, 3),
            "trainings_over_floor": round(result.trainings / floor.size, 3),
            "size_over_floor_lower_bound": round(size / row["floor_at_least"], 3),
            "trainings_over_floor_lower_bound": round(result.trainings / row["floor_at_least"], 3),
            "certified": result.certificate.certified, "stopped": result.stopped,
            "true_worst_slack": round(true_worst_slack(front, result.values[result.members], eps, delta,
                                                       tests), 5),
            "search_seconds": round(seconds, 2)})
    return row


def best_of(n, fn):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def timings():
    front = PNormFront(3, 2.0)
    W = np.random.default_rng(0).dirichlet(np.ones(3), 200)
    R = front(W)
    return {"certify_200_d3_s": round(best_of(3, lambda: certify(W, R, 0.05, 0.02)), 4),
            "prune_exact_200_d3_s": round(best_of(3, lambda: prune(W, R, 0.05, 0.02, method="exact")), 4),
            "search_sphere_d3_s": round(best_of(3, lambda: lazy_search(front, 3, 0.05, 0.02, BUDGET)), 4)}


def floor_text(r):
    """k* when milp proved it, else the interval [ceil(LP bound), best cover found]."""
    return str(r["floor"]) if r["floor_optimal"] else f"{r['floor_at_least']}-{r['floor']}"


def ratio_text(x, r, key):
    return str(x[key]) if r["floor_optimal"] else f"{x[key]}-{x[key + '_lower_bound']}"


def table(rows, consolidate=0):
    lines = ["| front | eps, delta | floor k* | W | trainings | rounds | size | size/k* | "
             "trainings/k* | certified | true worst slack |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        for run in r["runs"]:
            if run["consolidate"] != consolidate:
                continue
            lines.append(f"| {r['front']} | {r['eps']}, {r['delta']} | {floor_text(r)} | "
                         f"{run['workers']} | {run['trainings']} | {run['rounds']} | {run['size']} | "
                         f"{ratio_text(run, r, 'size_over_floor')} | {ratio_text(run, r, 'trainings_over_floor')} | "
                         f"{run['certified']} | {run['true_worst_slack']} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help=f"where to write (default {OUT_DIR})")
    parser.add_argument("--max-d", type=int, default=5, help="largest d (2..5, default 5)")
    args = parser.parse_args(argv)
    if not 2 <= args.max_d <= 5:
        raise ValueError(f"--max-d must be in 2..5, got {args.max_d}")
    rows = []
    for name, front, eps, delta in fronts(args.max_d):
        rows.append(run_front(name, front, eps, delta))
        print(table(rows[-1:]).splitlines()[2], flush=True)
    misses = []
    for r in rows:
        one = r["runs"][0]
        if r["d"] <= 4 and (one["size_over_floor"] > SIZE_TARGET or one["trainings_over_floor"] > TRAIN_TARGET):
            misses.append(f"{r['front']}: size {one['size']}, trainings {one['trainings']}, floor "
                          f"{floor_text(r)}: size/k* {ratio_text(one, r, 'size_over_floor')}, "
                          f"trainings/k* {ratio_text(one, r, 'trainings_over_floor')}")
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__},
              "relative_to": "exact synthetic oracles; floor = exact set cover on lattices of "
                             "candidate and test weights (resolutions per d: " + json.dumps(RES) + ")",
              "budget": BUDGET, "targets": {"size_over_floor": SIZE_TARGET, "trainings_over_floor": TRAIN_TARGET},
              "fronts": rows, "misses_at_W1_d2_4": misses, "timings": timings()}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "search_floor.json").write_text(json.dumps(report, indent=2) + "\n")
    md = ["# The lazy search against the floor", "", "Written by `python benchmarks/search_floor.py`. "
          "Floor k*: exact minimum cover on lattices of candidate and test weights; where milp did not "
          "prove it in its time limit, the interval [ceil(LP bound), best cover found], and the ratios "
          "against both ends.", "", "## Lazy search, W = 1, 4, 8 workers", "",
          table(rows), "", f"## With consolidation ({CONSOLIDATE} passes), W = 1", "",
          table(rows, CONSOLIDATE), "",
          "Fronts missing size/k* <= 1.25 or trainings/k* <= 2.0 at W = 1, d = 2-4:", ""]
    md += [f"- {m}" for m in misses] or ["- none"]
    md += ["", "Timings (wall clock, best of 3; depend on load): " + json.dumps(report["timings"]), ""]
    (args.out_dir / "search_floor.md").write_text("\n".join(md))
    print(table(rows))
    print(table(rows, CONSOLIDATE))
    print("misses:", *misses, sep="\n  ")
    print("timings:", report["timings"])


if __name__ == "__main__":
    main()
