"""Lazy search: train only where the certificate fails (docs/theory.md section 5).

An ask/tell object in the manner of morl-baselines' LinearSupport (Optimistic Linear Support):
the caller owns the loop and the training, the search only proposes weights and records values.

    search = LazySearch(d, eps, delta, max_trainings)
    while (w := search.ask()) is not None:
        search.tell(w, *train_and_evaluate(w))       # values (d,) [, std_errors (d,)]
    result = search.result()                          # pruned, re-certified portfolio

ask() proposes the d extremes e_1..e_d first (single-objective optima, section 5 step 1), then
the corner weight with the largest certificate slack (step 3), snapped to its PALM grid point
(section 2) when snap == "grid" and that point is new, else the corner itself; never a weight
twice. It returns None once the certificate of everything told is certified (step 2), the
budget of max_trainings is spent, or no untrained corner has positive slack ("stuck": e.g. the
noise z * se alone breaks the bound, section 6). result() prunes (section 3) with the corner
weights as elements and re-certifies the pruned portfolio (step 4). One weight per ask(): the
batched proposals for parallel workers of section 12 are not implemented here.

Evidence and repair (sections 8 and 9). With `reference(W) -> (values (m,), se (m,))`, the
best-of-N value w . R_BoN(w) at each weight, the certificate's oracle constraints use
max(best value known at w_j, reference(w_j) + z se). After every tell, a row that the evidence
at its own weight (best-of-N or another told row) beats by more than z_significant se is
**beaten**; while it has repairs left (max_repairs per row) and the budget allows, ask()
proposes its weight again before anything else (source "repair"; `pending` says which row and
which row beat it, so the caller can warm-start from that policy). tell() then keeps the better
of the old and the new value at w_j in that row. A row is repaired at most max_repairs times,
so the search never loops; rows still beaten at the end are in result().beaten.
"""
from dataclasses import dataclass, field

import numpy as np

from palm_tasks.core.certificate import TOL, Certificate, certify, check_values, check_z
from palm_tasks.core.evidence import beaten_rows, evidence
from palm_tasks.core.grid import snap_to_grid
from palm_tasks.core.prune import prune
from palm_tasks.core.simplex import check_d, check_tolerances, check_weights

SAME_WEIGHT = 1e-12  # two training weights closer than this (max-norm) are the same weight


@dataclass(frozen=True)
class SearchResult:
    """What the lazy search trained, the pruned portfolio and its certificate.

    stopped: "certified", "budget" (max_trainings reached) or "stuck" (no untrained corner with
    positive slack: more training cannot help, e.g. the noise z * se alone breaks the bound).
    full_certificate is the certificate of every trained row when the search stopped.
    """
    train_weights: np.ndarray
    values: np.ndarray
    std_errors: np.ndarray | None
    members: np.ndarray
    certificate: Certificate
    full_certificate: Certificate
    trainings: int
    history: list = field(default_factory=list)
    stopped: str = ""
    beaten: list = field(default_factory=list)

    def to_dict(self):
        return {
            "train_weights": self.train_weights.tolist(),
            "values": self.values.tolist(),
            "std_errors": None if self.std_errors is None else self.std_errors.tolist(),
            "members": [int(m) for m in self.members],
            "certificate": self.certificate.to_dict(),
            "full_certificate": self.full_certificate.to_dict(),
            "trainings": int(self.trainings),
            "portfolio_size": int(len(self.members)),
            "history": self.history,
            "stopped": self.stopped,
            "beaten": self.beaten,
        }


def _already(w, trained):
    return any(np.abs(t - w).max() <= SAME_WEIGHT for t in trained)


class LazySearch:
    """The lazy search of docs/theory.md section 5 as ask/tell; deterministic.

    Initial rows (initial_weights, initial_values, initial_std_errors) count as oracle rows
    (trained for their weight) and not as trainings. Values are told with std errors always or
    never, as initial_std_errors was given or not. With z > 0 the certificate counts members
    with R - z se and the upper bound with R + z se (section 6).

    Attributes: done (ask() returned None), stopped ("certified" | "budget" | "stuck", "" while
    running), trainings (values told), history (one dict per training: step, weight, source
    "extreme" | "grid" | "corner" | "repair", worst_slack_before; a repair adds row, by and
    kept "new" | "old"), certificate (of every row, as of the last ask()), W, R, SE (the rows so
    far as lists, initial rows first), repairs (per row), pending (what ask() proposed).
    """

    def __init__(self, d, eps, delta, max_trainings, z=0.0, snap="grid", prune_method="greedy",
                 initial_weights=None, initial_values=None, initial_std_errors=None,
                 reference=None, max_repairs=0, z_significant=2.0):
        self.d = check_d(d)
        self.eps, self.delta = check_tolerances(eps, delta)
        self.z = check_z(z)
        if snap not in ("grid", "none"):
            raise ValueError(f"snap must be 'grid' or 'none', got {snap!r}")
        if int(max_trainings) < 0:
            raise ValueError(f"max_trainings must be >= 0, got {max_trainings}")
        if prune_method not in ("greedy", "exact"):
            raise ValueError(f"prune_method must be 'greedy' or 'exact', got {prune_method!r}")
        self.max_trainings, self.snap, self.prune_method = max_trainings, snap, prune_method
        self.W, self.R, self.SE = [], [], []
        if initial_weights is not None:
            self.W = list(check_weights(np.atleast_2d(initial_weights), self.d))
            self.R = list(check_values(np.atleast_2d(initial_values), len(self.W), self.d, "initial_values"))
            if initial_std_errors is not None:
                self.SE = list(check_values(np.atleast_2d(initial_std_errors), len(self.W), self.d,
                                            "initial_std_errors"))
        if not self.W and self.max_trainings <= 0:
            raise ValueError("nothing to certify: max_trainings is 0 and no initial weights were given")
        self.with_se = (initial_std_errors is not None) if self.W else None  # None: the first tell decides
        self.trainings, self.history, self.stopped = 0, [], ""
        self.certificate = None
        self.reference, self.z_significant = reference, check_z(z_significant)
        if int(max_repairs) < 0:
            raise ValueError(f"max_repairs must be >= 0, got {max_repairs}")
        self.max_repairs = int(max_repairs)
        self.repairs = [0] * len(self.W)
        self._asked = None  # (weight, source, worst slack before, row, by) proposed by ask() and not yet told
        self._result = None

    @property
    def done(self) -> bool:
        return self.stopped != ""

    def _arrays(self):
        return np.array(self.W), np.array(self.R), (np.array(self.SE) if self.with_se else None)

    def _reference(self, W):
        """(values, se) of the best-of-N reference at W, or None without one."""
        if self.reference is None:
            return None
        values, se = self.reference(np.atleast_2d(W))
        return np.asarray(values, float).reshape(len(W)), np.asarray(se, float).reshape(len(W))

    def beaten(self):
        """core.evidence.Beaten of every row (None without a reference or rows)."""
        if self.reference is None or not self.W:
            return None
        tw, tv, tse = self._arrays()
        tse = np.zeros_like(tv) if tse is None else tse
        ref, ref_se = self._reference(tw)
        ev = evidence(tw, tv, tse, ref, ref_se)
        return beaten_rows(tw, tv, tse, ev, self.z_significant)

    def _next(self):
        """(weight, source, worst slack before, row, by) to train next, or None after setting
        `stopped`."""
        for e in np.eye(self.d):
            if self.trainings < self.max_trainings and not _already(e, self.W):
                return e, "extreme", None, None, None
        b = self.beaten()
        if b is not None and self.trainings < self.max_trainings:
            for j in np.flatnonzero(b.beaten):
                if self.repairs[j] < self.max_repairs:
                    return np.array(self.W[j]), "repair", None, int(j), int(b.by[j])
        tw, tv, tse = self._arrays()
        ref = self._reference(tw)
        reference = None if ref is None else ref[0] + self.z * ref[1]
        cert = self.certificate = certify(tw, tv, self.eps, self.delta, std_errors=tse, z=self.z,
                                          reference=reference)
        if cert.certified:
            self.stopped = "certified"
            return None
        if self.trainings >= self.max_trainings:
            self.stopped = "budget"
            return None
        for c in np.argsort(-cert.slacks, kind="stable"):
            if cert.slacks[c] <= TOL:
                break
            corner = cert.corner_weights[c]
            options = [(corner, "corner")]
            if self.snap == "grid" and self.delta > 0:
                options.insert(0, (snap_to_grid(corner, self.d, self.eps, self.delta), "grid"))
            for w, source in options:
                if not _already(w, self.W):
                    return w.copy(), source, float(cert.slacks[c]), None, None
        self.stopped = "stuck"
        return None

    @property
    def pending(self) -> dict | None:
        """What ask() proposed and tell() has not received: weight, source, and for a repair the
        row to repair and `by`, the row whose policy beat it (-1: best-of-N)."""
        if self._asked is None:
            return None
        w, source, _, row, by = self._asked
        return {"weight": w.copy(), "source": source, "row": row, "by": by}

    def ask(self) -> np.ndarray | None:
        """The next weight to train (the same one until it is told), or None when done.

        After the extremes, each new proposal certifies every row told so far (LPs: milliseconds
        to a second); the proposal is cached, so asking again costs nothing.
        """
        if self._asked is None and not self.done:
            self._asked = self._next()
        return None if self._asked is None else self._asked[0].copy()

    def tell(self, weights, values, std_errors=None) -> dict:
        """Record the measured value vector (and std errors) of the policy trained for the weight
        ask() returned; returns the history step (step, weight, source, worst_slack_before)."""
        if self._asked is None:
            raise ValueError("tell() without a pending ask(): call ask() and tell its weight")
        w, source, slack, row, by = self._asked
        given = np.asarray(weights, dtype=float)
        if given.shape != w.shape or not (np.abs(given - w) <= SAME_WEIGHT).all():
            raise ValueError(f"tell() got weights {given.tolist()}, but ask() returned {w.tolist()}")
        has_se = std_errors is not None
        if self.with_se is not None and has_se != self.with_se:
            raise ValueError("oracle must return std errors always or never (and match initial_std_errors)")
        values_row = check_values(np.atleast_2d(values), 1, self.d, "oracle values")[0]
        se = check_values(np.atleast_2d(std_errors), 1, self.d, "oracle std_errors")[0] if has_se else None
        self.with_se = has_se
        self.trainings += 1
        self._asked = None
        step = {"step": self.trainings, "weight": w.tolist(), "source": source,
                "worst_slack_before": slack}
        if source == "repair":  # keep the better of the two at w_j (section 9)
            self.repairs[row] += 1
            better = float(w @ values_row) > float(w @ self.R[row])
            if better:
                self.R[row] = values_row
                if has_se:
                    self.SE[row] = se
            step.update(row=row, by=by, kept="new" if better else "old")
        else:
            self.W.append(w)
            self.R.append(values_row)
            if has_se:
                self.SE.append(se)
            self.repairs.append(0)
        self.history.append(step)
        return step

    def result(self) -> SearchResult:
        """Prune the trained rows (docs/theory.md section 3) and re-certify the portfolio; only
        once done (ask() returned None)."""
        if not self.done:
            raise ValueError("the search is not done: call ask() (and tell()) until ask() returns None")
        if self._result is None:
            tw, tv, tse = self._arrays()
            ref = self._reference(tw)
            reference = None if ref is None else ref[0] + self.z * ref[1]
            members = prune(tw, tv, self.eps, self.delta, method=self.prune_method, std_errors=tse, z=self.z,
                            reference=reference)
            final = certify(tw, tv, self.eps, self.delta, members=members, std_errors=tse, z=self.z,
                            reference=reference)
            b = self.beaten()
            beaten = [] if b is None else [
                {"row": int(j), "weight": tw[j].tolist(), "shortfall": float(b.shortfall[j]),
                 "se": float(b.se[j]), "by": int(b.by[j]), "repairs": self.repairs[j]}
                for j in np.flatnonzero(b.beaten)]
            self._result = SearchResult(
                train_weights=tw, values=tv, std_errors=tse, members=members, certificate=final,
                full_certificate=self.certificate, trainings=self.trainings,
                history=list(self.history), stopped=self.stopped, beaten=beaten)
        return self._result


def lazy_search(oracle, d, eps, delta, max_trainings, z=0.0, snap="grid", prune_method="greedy",
                initial_weights=None, initial_values=None, initial_std_errors=None, on_step=None,
                reference=None, max_repairs=0, z_significant=2.0):
    """Run LazySearch to the end with oracle(w) -> values (d,) or (values, std_errors) as the
    training (a repair calls it again at the same w); on_step(step) after each training.
    Returns result()."""
    search = LazySearch(d, eps, delta, max_trainings, z=z, snap=snap, prune_method=prune_method,
                        initial_weights=initial_weights, initial_values=initial_values,
                        initial_std_errors=initial_std_errors, reference=reference,
                        max_repairs=max_repairs, z_significant=z_significant)
    while (w := search.ask()) is not None:
        out = oracle(w.copy())
        values, se = out if isinstance(out, tuple) else (out, None)
        step = search.tell(w, values, se)
        if on_step is not None:
            on_step(step)
    return search.result()
