"""The price of precision (docs/theory.md section 14): the eps a run certifies at its delta and
confidence, against the portfolio size k and against the compute spent.

- by size: for k = 1, 2, ... the best k of the candidates, chosen greedily (each step adds the
  candidate that lowers the certified eps most), and the eps every paired decision of their
  certificate clears (core.paired, at coverage.alpha);
- by compute: after each training of the search, the eps the rows trained so far certify
  together (those that pass the quality gate as members, every one as an oracle row), with the
  answers measured and the seconds spent by then (what the align stage's search recorded); the
  rows count with their final measurements;
- the grid's a-priori size bound (section 2): for eps on a log scale, the PALM grid's bound on
  the portfolio size that eps needs at this delta, which no measurement can raise.

A user reads off the cheapest setting that meets their tolerance before spending it.
"""

from __future__ import annotations

import numpy as np

from palm_tasks.core.grid import grid_size_bound

MAX_SIZE = 8  # the size curve stops here (each point is a greedy step of certificates)
BOUND_EPS = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5)


def by_size(paired, W, tables, oracle, candidates, max_size: int = MAX_SIZE) -> list[dict]:
    """[{k, members, certified_eps, certified}] for the greedy best k candidates."""
    rows = list(np.flatnonzero(np.asarray(candidates, bool)))
    chosen: list[int] = []
    out = []
    for k in range(1, min(max_size, len(rows)) + 1):
        best = None
        for r in rows:
            if r in chosen:
                continue
            cert = paired.certificate(W, tables, oracle, members=chosen + [r])
            if best is None or cert.max_eps < best[1].max_eps - 1e-12:
                best = (r, cert)
        chosen.append(best[0])
        out.append({"k": k, "members": sorted(int(m) for m in chosen),
                    "certified_eps": round(float(best[1].max_eps), 6), "certified": bool(best[1].certified)})
    return out


def by_compute(paired, W, tables, cost: list[dict], candidates=None) -> list[dict]:
    """[{trainings, rows, answers, minutes, certified_eps}] after each training of the search
    (cost: its record, SearchRun.cost); the first `rows` trained policies as oracle rows, those
    of them among `candidates` (a mask; None: all) as members (all when none is)."""
    allowed = np.ones(len(W), bool) if candidates is None else np.asarray(candidates, bool)
    out = []
    for step in cost:
        n = int(step["rows"])
        if n == 0:
            continue
        members = np.flatnonzero(allowed[:n])
        cert = paired.certificate(W[:n], tables[:n], members=members if len(members) else None)
        out.append({"trainings": int(step["trainings"]), "rows": n, "answers": int(step["answers"]),
                    "minutes": round(float(step["seconds"]) / 60, 2),
                    "certified_eps": round(float(cert.max_eps), 6)})
    return out


def grid_bound(d: int, delta: float) -> list[dict]:
    """[{eps, k}]: the PALM grid's a-priori bound on the size an eps needs at this delta."""
    if delta <= 0:
        return []  # the grid is infinite at delta = 0
    return [{"eps": eps, "k": int(grid_size_bound(d, eps, delta))} for eps in BOUND_EPS]


def price_of_precision(paired, W, tables, oracle, candidates, cost: list[dict], d: int) -> dict:
    return {"alpha": paired.alpha, "delta": paired.delta, "eps": paired.eps,
            "by_size": by_size(paired, W, tables, oracle, candidates),
            "by_compute": by_compute(paired, np.asarray(W)[np.asarray(oracle, bool)],
                                     [t for t, o in zip(tables, oracle) if o], cost,
                                     np.asarray(candidates, bool)[np.asarray(oracle, bool)]),
            "grid_bound": grid_bound(d, paired.delta),
            "is": "the eps certified at this delta with confidence 1 - alpha: for the best k candidates (by_size), "
                  "for the rows trained after each training of the search (by_compute), and the grid's "
                  "a-priori size bound for each eps (grid_bound)"}
