"""Lazy search: train only where the certificate fails (docs/theory.md section 5).

One idea in one file (about 580 lines): the search's state (the rows told, the proposals
pending, the repairs spent) and the rules that read and change it. The rules that need no state
live beside it: which beaten row first (repair.py), where one policy could replace several
(consolidate.py), the paired decisions (paired.py).

An ask/tell object in the manner of morl-baselines' LinearSupport (Optimistic Linear Support):
the caller owns the loop and the training, the search only proposes weights and records values.

    search = LazySearch(d, eps, delta, max_trainings)
    while (w := search.ask()) is not None:
        search.tell(w, *train_and_evaluate(w))       # values (d,) [, std_errors (d,)]
    result = search.result()                          # pruned, re-certified portfolio

    while batch := search.ask_batch(workers):          # or: up to `workers` weights a round
        for w, out in zip(batch, train_all_at_once(batch)):
            search.tell(w, *out)

ask() proposes the d extremes e_1..e_d first (single-objective optima, section 5 step 1), then
the corner weight with the largest certificate slack (step 3), snapped to its PALM grid point
(section 2) when snap == "grid" and that point is new, else the corner itself; never a weight
twice. It returns None once the certificate of everything told is certified (step 2), the
budget of max_trainings is spent, or no untrained corner has positive slack ("stuck": e.g. the
noise z * se alone breaks the bound, section 6). result() prunes (section 3) with the corner
weights as elements and re-certifies the pruned portfolio (step 4).

How this rule compares with the floor of section 11 is measured in docs/search.md.
Consolidation (consolidate=k, off by default; core/consolidate.py) trades trainings for size:
once certified, it names new weights where one policy could replace several members; they are
trained (source "consolidate"), the search certifies again, and result() prunes.

Parallel proposals (section 12). ask_batch(n) proposes up to n weights at once for n workers,
each further one chosen after pretending the ones proposed returned nothing better than the best
told row there ("constant liar", docs/search.md); pretended rows only steer proposals. tell()
accepts the pending weights in any order; with n = 1 this is the one-at-a-time search.

Evidence and repair (sections 8 and 9). With `reference(W) -> (values (m,), se (m,))`, the
best-of-N value w . R_BoN(w) at each weight, the certificate's oracle constraints use
max(best value known at w_j, reference(w_j) + z se). After every tell, a row that the evidence
at its own weight (best-of-N or another told row) beats by more than z_significant se is
**beaten**; while the certificate does not hold (or always, with repair_beaten: members as
good as the evidence, not only covering), it has repairs left (max_repairs per row) and
the budget allows, ask() proposes its weight again before anything else, the row whose repair
would lower the worst gap against the evidence most first (core/repair.py; source "repair";
`pending` says which row and which row beat it, so the caller can warm-start from that policy). tell() then keeps the better
of the old and the new value at w_j in that row. A row is repaired at most max_repairs times,
so the search never loops; rows still beaten at the end are in result().beaten. When more than
half of the rows (at least d + 1) are beaten with no repair left, the oracle fails more often
than it works and the search stops as "stuck" rather than spend its budget on new beaten rows.
A row told as not servable (it fails the quality gate, palm_tasks/gate.py) bounds OPT but is no
member. It is not trained again at its weight: on the default params the brevity corner failed
the gate in four trainings of four (6.5-14.8 % degenerate answers, seeds 0 and 1) while mixed
weights near it passed; a corner left uncovered at its weight gets a weight toward its member
instead (_worst_corner, source "toward").

Paired evidence (section 13). With `paired` (core.paired.PairedEvidence) rows are told as
per-prompt tables (tell(w, scores=table), update(row, table) when measured further): the
certificate, the beaten rows and the pruning are paired decisions at confidence 1 - alpha, and
evaluation_needed() says which rows the open decisions need measured on more prompts before
the next proposal (the caller measures them, as it trains).
"""
from dataclasses import dataclass, field

import numpy as np

from palm_tasks.core.certificate import (TOL, Certificate, certify, check_values, check_z)
from palm_tasks.core.evidence import Beaten, beaten_rows, evidence
from palm_tasks.core.paired import check_table, table_se
from palm_tasks.core.grid import snap_to_grid
from palm_tasks.core.consolidate import consolidation_plan
from palm_tasks.core.prune import prune, prune_paired
from palm_tasks.core.repair import repair_order
from palm_tasks.core.simplex import check_d, check_tolerances, check_weights

SAME_WEIGHT = 1e-12  # two training weights closer than this (max-norm) are the same weight




@dataclass(frozen=True)
class SearchResult:
    """What the lazy search trained, the pruned portfolio and its certificate.

    stopped: "certified", "budget" (max_trainings reached) or "stuck" (no untrained corner with
    positive slack: more training cannot help, e.g. the noise z * se alone breaks the bound; or
    more than half of the rows are beaten by the evidence with no repair left: the oracle fails).
    rounds: ask()/ask_batch() calls that proposed new weights with nothing pending (with one
    worker, the trainings; with W workers, the wall time in trainings, section 12).
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
    rounds: int = 0

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
            "rounds": int(self.rounds),
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
    running), trainings (values told), rounds (see SearchResult), history (one dict per
    training: step, weight, source "extreme" | "grid" | "corner" | "toward" | "repair" | "consolidate",
    worst_slack_before; a repair adds row, by and kept "new" | "old"), certificate (of every
    row, as of the last proposal made with nothing pending), W, R, SE (the rows so far as lists,
    initial rows first), repairs (per row), servable (per row: whether it passes the quality gate,
    as told; only servable rows are members of the certificate, while every row bounds OPT),
    pending (the first proposal not yet told), pending_all (all of them).

    Bad input raises a ValueError naming the argument: weights off the simplex or not finite,
    NaN values, a budget that is not an integer >= 0, ask_batch(n) with n < 1.
    """

    def __init__(self, d, eps, delta, max_trainings, z=0.0, snap="grid", prune_method="greedy",
                 initial_weights=None, initial_values=None, initial_std_errors=None,
                 reference=None, max_repairs=0, z_significant=2.0, consolidate=0, paired=None,
                 initial_tables=None, initial_servable=None, repair_beaten=False):
        self.d = check_d(d)
        self.eps, self.delta = check_tolerances(eps, delta)
        self.z = check_z(z)
        if snap not in ("grid", "none"):
            raise ValueError(f"snap must be 'grid' or 'none', got {snap!r}")
        if (isinstance(max_trainings, bool) or not isinstance(max_trainings, (int, np.integer, float))
                or not np.isfinite(max_trainings) or max_trainings != int(max_trainings) or max_trainings < 0):
            raise ValueError(f"max_trainings must be an integer >= 0, got {max_trainings!r}")
        max_trainings = int(max_trainings)
        if isinstance(consolidate, bool) or not isinstance(consolidate, (int, np.integer)) or consolidate < 0:
            raise ValueError(f"consolidate must be an integer >= 0 (consolidation passes), got {consolidate!r}")
        self.consolidate = int(consolidate)
        self._planned = []  # consolidation weights still to propose
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
        # paired (core.paired.PairedEvidence): values are per-prompt tables, told with tell(scores=...);
        # the certificate, beaten rows and pruning are paired decisions at confidence (section 13)
        self.paired, self.tables = paired, []
        if paired is not None:
            if self.W and (initial_tables is None or len(initial_tables) != len(self.W)):
                raise ValueError("with paired evidence, initial rows need initial_tables (one per row)")
            self.tables = [np.asarray(t, float) for t in (initial_tables or [])]
            self.R = [t.mean(axis=0) for t in self.tables]
            self.SE = [table_se(t) for t in self.tables]
            if self.W:
                self.with_se = True
        if not self.W and self.max_trainings <= 0:
            raise ValueError("nothing to certify: max_trainings is 0 and no initial weights were given")
        self.with_se = (initial_std_errors is not None) if self.W else None  # None: the first tell decides
        self.trainings, self.history, self.stopped = 0, [], ""
        self.certificate = None
        self.reference, self.z_significant = reference, check_z(z_significant)
        if int(max_repairs) < 0:
            raise ValueError(f"max_repairs must be >= 0, got {max_repairs}")
        self.max_repairs = int(max_repairs)
        self.repair_beaten = bool(repair_beaten)  # repair beaten rows once certified too
        self.repairs = [0] * len(self.W)
        self.servable = [True] * len(self.W) if initial_servable is None else [bool(x) for x in initial_servable]
        if len(self.servable) != len(self.W):
            raise ValueError(f"initial_servable needs one entry per initial row ({len(self.W)})")
        self._asked = []  # (weight, source, worst slack before, row, by) proposed and not yet told
        self.rounds = 0
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
        """core.evidence.Beaten of every row (None without a reference or rows). With paired
        evidence: a row is beaten when its paired decision holds (core.paired), se is the
        half-width of the difference's interval."""
        if self.paired is not None and self.W:
            decisions = self.paired.beaten(np.array(self.W), self.tables)
            by = np.array([dec.rows[1] if len(dec.rows) > 1 else -1 for dec in decisions])
            return Beaten(shortfall=np.array([max(dec.estimate, 0.0) for dec in decisions]),
                          se=np.array([(dec.upper - dec.lower) / 2 for dec in decisions]),
                          beaten=np.array([dec.status == "holds" for dec in decisions]), by=by,
                          z=float("nan"))
        if self.reference is None or not self.W:
            return None
        tw, tv, tse = self._arrays()
        tse = np.zeros_like(tv) if tse is None else tse
        ref, ref_se = self._reference(tw)
        ev = evidence(tw, tv, tse, ref, ref_se)
        return beaten_rows(tw, tv, tse, ev, self.z_significant)

    def _next(self):
        """(weight, source, worst slack before, row, by) to train next, or None after setting
        `stopped` (nothing pending: the one-at-a-time rule of section 5)."""
        todo = self._propose(1)
        return todo[0] if todo else None

    def _repair_order(self, b):
        """Beaten rows in the order they are repaired (core/repair.py)."""
        tw, tv, _ = self._arrays()
        return repair_order(b, tw, tv, self._reference)

    def _budget_left(self):
        return self.max_trainings - self.trainings - len(self._asked)

    def _propose(self, n):
        """Up to n new proposals (weight, source, worst slack before, row, by), none of them
        pending or trained. With nothing pending and nothing to propose, sets `stopped`."""
        pending_w = [a[0] for a in self._asked]
        pending_rows = {a[3] for a in self._asked if a[1] == "repair"}
        known = self.W + pending_w
        out = []
        for e in np.eye(self.d):
            if len(out) < n and self._budget_left() - len(out) > 0 and not _already(e, known):
                out.append((e, "extreme", None, None, None))
                known = known + [e]
        if out or any(a[1] == "extreme" for a in self._asked):
            return out  # a round of extremes: the certificate needs them all first
        b = self.beaten()
        tw, tv, tse = self._arrays()
        ref = self._reference(tw)
        reference = None if ref is None else ref[0] + self.z * ref[1]
        cert = self._certify(tw, tv, tse, reference)
        # a certified portfolio needs no repair, unless every row is to reach the evidence
        if b is not None and (not cert.certified or self.repair_beaten):
            for j in self._repair_order(b):
                if (len(out) < n and self._budget_left() - len(out) > 0 and j not in pending_rows
                        and self.repairs[j] < self.max_repairs):
                    out.append((np.array(self.W[j]), "repair", None, int(j), int(b.by[j])))
        if len(out) >= n:
            return out
        if cert.certified and not self._asked and not out and not self._planned and self.consolidate > 0:
            self.consolidate -= 1
            self._planned = consolidation_plan(cert, tw, tv, tse, reference, self.eps, self.delta, self.z, self.W)
        while self._planned and len(out) < n and self._budget_left() - len(out) > 0:
            w = self._planned.pop(0)
            if not _already(w, known):
                out.append((w, "consolidate", None, None, None))
                known = known + [w]
        if out and out[-1][1] == "consolidate":
            return out
        if not self._asked and not out:
            self.certificate = cert
            if cert.certified:
                self.stopped = "certified"
                return []
            if self._budget_left() <= 0:
                self.stopped = "budget"
                return []
        if cert.certified:
            return out
        if b is not None and self._oracle_failing(b):
            if not self._asked and not out:
                self.stopped = "stuck"
            return out
        # pretended rows (section 12): the proposals so far, at the best told value there
        fake_w, fake_v = [], []
        pending_corner = [a[0] for a in self._asked if a[1] != "repair"]
        for w in pending_corner:
            fake_w.append(w)
            fake_v.append(self._pretended(w, tv))
        while len(out) < n and self._budget_left() - len(out) > 0:
            if fake_w:
                cert = self._pretend_certify(tw, tv, tse, reference, fake_w, fake_v)
                if cert.certified:
                    break
            pick = self._worst_corner(cert, known)
            if pick is None:
                break
            w, source, slack = pick
            out.append((w, source, slack, None, None))
            known = known + [w]
            fake_w.append(w)
            fake_v.append(self._pretended(w, tv))
        if not out and not self._asked:
            self.stopped = "stuck"
        return out

    def _members(self):
        """The rows a certificate may choose members from: the servable ones (all when none is;
        the coverage stage then chooses among all too, never for production)."""
        ok = np.flatnonzero(self.servable)
        return ok if len(ok) else None

    def _certify(self, tw, tv, tse, reference):
        """The certificate of every servable row told: paired at confidence, or on the values (z se)."""
        if self.paired is not None:
            return self.paired.certificate(tw, self.tables, members=self._members())
        return certify(tw, tv, self.eps, self.delta, std_errors=tse, z=self.z, reference=reference)

    def update(self, row, scores, servable=None) -> None:
        """A row measured on more prompts (paired evidence): its per-prompt table grows, and
        whether it passes the quality gate on them (None: as before)."""
        if self.paired is None:
            raise ValueError("update() takes per-prompt scores: the search has no paired evidence")
        table = check_table(scores, self.d)
        self.tables[row] = table
        self.R[row], self.SE[row] = table.mean(axis=0), table_se(table)
        if servable is not None:
            self.servable[row] = bool(servable)

    def evaluation_needed(self) -> dict[int, int]:
        """{row: prompts} to measure before the next proposal (paired evidence; section 13), each
        to the next planned look beyond what it has:
        - when a cover decision fails only through its anchors' margins (Decision.narrowed_by),
          the rows that make them: a row measured on few prompts loosens the bound near its
          weight, and a training there would buy what more prompts buy for far less;
        - else, when no cover decision fails, the rows of each open one (its own, and those
          that narrow its margins) below the cap.
        Empty without paired evidence, when a cover decision fails on its own (a training is
        needed), or when every open decision is at the cap. A row beaten with a repair left is
        repaired first (prompts on it now would be wasted: the repair replaces it) only when the
        certificate is not expected to hold, i.e. some cover decision fails or its estimate is
        beyond its threshold; when every decision not yet holding is open with its estimate
        inside, prompts come first: a certificate that holds needs no repair, and a repair
        (minutes) costs what dozens of chunks (seconds each) cost."""
        if self.paired is None or not self.W or self._asked:
            return {}
        cert = self.paired.certificate(np.array(self.W), self.tables, members=self._members())
        covers = [dec for dec in cert.decisions if dec.kind == "cover"]
        expected = all(dec.status == "holds" or (dec.open and dec.estimate <= dec.threshold) for dec in covers)
        if not cert.certified and self._budget_left() > 0 and not expected:
            b = self.beaten()
            if any(b.beaten[j] and self.repairs[j] < self.max_repairs for j in range(len(self.W))):
                return {}
        looks = self.paired.looks
        need: dict[int, int] = {}

        def ask(row, target):
            if len(self.tables[row]) < target:
                need[row] = max(need.get(row, 0), target)

        failing = [dec for dec in covers if dec.status == "fails"]
        for dec in failing or [dec for dec in covers if dec.open]:
            for r in dec.narrowed_by:
                ask(r, looks.next_after(len(self.tables[r])))
            if not failing and dec.n < self.paired.cap:
                for r in dec.rows:
                    ask(r, looks.next_after(dec.n))
        return need

    def _worst_corner(self, cert, known):
        """(weight, source, slack) at the corner of largest positive slack whose weight (its grid
        point, else itself) is new, or None. A corner whose weight was trained already by a row
        that fails the quality gate gets a weight between it and the member the certificate
        routes it to, halfway first (source "toward"): a policy there trades some of the
        corner's trait for the member's, and may be servable where the corner's own is not."""
        for c in np.argsort(-cert.slacks, kind="stable"):
            if cert.slacks[c] <= TOL:
                break
            corner = cert.corner_weights[c]
            options = [(corner, "corner")]
            if self.snap == "grid" and self.delta > 0:
                options.insert(0, (snap_to_grid(corner, self.d, self.eps, self.delta), "grid"))
            members = np.asarray(cert.members, int)
            gated_here = any(not ok and any(_already(w, [o[0]]) for o in options)
                             for w, ok in zip(self.W, self.servable))
            if len(members) and gated_here:
                routed = np.asarray(self.W[members[int(np.argmax(np.array(self.R)[members] @ corner))]], float)
                options += [((1 - t) * corner + t * routed, "toward") for t in (0.5, 0.25, 0.75)]
            for w, source in options:
                if not _already(w, known):
                    return w.copy(), source, float(cert.slacks[c])
        return None

    def _oracle_failing(self, b):
        """More than half of the rows (at least d + 1 told) are beaten by the evidence with no
        repair left: the oracle fails more often than it works, and new corners would only add
        beaten rows. The search stops ("stuck") instead of spending its budget (section 9)."""
        spent = np.array([r >= self.max_repairs for r in self.repairs])
        return len(self.W) > self.d and (b.beaten & spent).sum() * 2 > len(self.W)

    @staticmethod
    def _pretended(w, tv):
        """The value a proposal is pretended to return while the rest of its batch is chosen:
        the best told row at w. As an oracle row it says OPT(w) is no more than what is known,
        so U drops to L at w and around it, and the next proposal goes to another uncertified
        region. (Pretending the value attaining U(w), or halfway, crowded batches less well:
        docs/search.md.)"""
        return tv[np.argmax(tv @ w)].copy()

    def _pretend_certify(self, tw, tv, tse, reference, fake_w, fake_v):
        """The certificate as if the pretended rows were told (their se 0, no reference)."""
        W = np.vstack([tw, fake_w])
        R = np.vstack([tv, fake_v])
        se = None if tse is None else np.vstack([tse, np.zeros((len(fake_w), self.d))])
        ref = None if reference is None else np.concatenate([reference, np.zeros(len(fake_w))])
        return certify(W, R, self.eps, self.delta, std_errors=se, z=self.z, reference=ref)

    @property
    def pending(self) -> dict | None:
        """The first proposal that tell() has not received: weight, source, and for a repair the
        row to repair and `by`, the row whose policy beat it (-1: best-of-N). None if none."""
        todo = self.pending_all
        return todo[0] if todo else None

    @property
    def pending_all(self) -> list[dict]:
        """Every proposal not yet told, in the order proposed (see `pending`)."""
        return [{"weight": w.copy(), "source": source, "row": row, "by": by}
                for w, source, _, row, by in self._asked]

    def ask(self) -> np.ndarray | None:
        """The next weight to train (the same one until it is told), or None when done.

        After the extremes, each new proposal certifies every row told so far (LPs: milliseconds
        to a second); the proposal is cached, so asking again costs nothing. With proposals of
        ask_batch() pending, returns the first of them.
        """
        if not self._asked and not self.done:
            nxt = self._next()
            if nxt is not None:
                self._asked.append(nxt)
                self.rounds += 1
        return self._asked[0][0].copy() if self._asked else None

    def ask_batch(self, n) -> list[np.ndarray]:
        """Up to n weights to train at once (docs/theory.md section 12): the pending ones first,
        then new proposals; [] when done. n = 1 gives [ask()]. Proposals never exceed the budget
        (max_trainings minus trainings minus pending). A round is counted when the batch is
        asked with nothing pending."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n (the number of workers) must be an integer >= 1, got {n!r}")
        if self.done:
            return []
        fresh = not self._asked
        if len(self._asked) < n:
            self._asked.extend(self._propose(int(n) - len(self._asked)))
        if fresh and self._asked:
            self.rounds += 1
        return [a[0].copy() for a in self._asked[:n]]

    def tell(self, weights, values=None, std_errors=None, scores=None, servable=True) -> dict:
        """Record the measured value vector (and std errors) of the policy trained for a pending
        weight (from ask() or ask_batch(), any order); returns the history step (step, weight,
        source, worst_slack_before). With paired evidence, `scores` is the policy's per-prompt
        table (prompts, d) and values and std errors are its mean and se. servable: whether the
        policy passes the quality gate (a row that does not bounds OPT but is no member)."""
        if self.paired is not None:
            if scores is None:
                raise ValueError("with paired evidence, tell() needs the policy's per-prompt scores")
            table = check_table(scores, self.d)
            values, std_errors = table.mean(axis=0), table_se(table)
        elif scores is not None:
            raise ValueError("per-prompt scores are told only to a search with paired evidence")
        if not self._asked:
            raise ValueError("tell() without a pending ask(): call ask() and tell its weight")
        given = np.asarray(weights, dtype=float)
        if given.ndim != 1 or not np.isfinite(given).all():
            raise ValueError(f"tell() got weights {given.tolist()}: not one finite weight vector")
        match = [i for i, a in enumerate(self._asked)
                 if given.shape == a[0].shape and (np.abs(given - a[0]) <= SAME_WEIGHT).all()]
        if not match:
            raise ValueError(f"tell() got weights {given.tolist()}, but ask() returned "
                             f"{[a[0].tolist() for a in self._asked]}")
        w, source, slack, row, by = self._asked[match[0]]
        has_se = std_errors is not None
        if self.with_se is not None and has_se != self.with_se:
            raise ValueError("oracle must return std errors always or never (and match initial_std_errors)")
        values_row = check_values(np.atleast_2d(values), 1, self.d, "oracle values")[0]
        se = check_values(np.atleast_2d(std_errors), 1, self.d, "oracle std_errors")[0] if has_se else None
        if has_se and (se < 0).any():
            raise ValueError(f"oracle std_errors must be >= 0, got {se.tolist()}")
        self.with_se = has_se
        self.trainings += 1
        del self._asked[match[0]]
        step = {"step": self.trainings, "weight": w.tolist(), "source": source,
                "worst_slack_before": slack}
        if source == "repair":  # keep the better of the two at w_j (section 9)
            self.repairs[row] += 1
            # the better of the two at w_j, a servable one before one that is not
            better = (bool(servable), float(w @ values_row)) > (self.servable[row], float(w @ self.R[row]))
            if better:
                self.servable[row] = bool(servable)
                self.R[row] = values_row
                if has_se:
                    self.SE[row] = se
                if self.paired is not None:
                    self.tables[row] = table
            step.update(row=row, by=by, kept="new" if better else "old")
        else:
            self.W.append(w)
            self.R.append(values_row)
            if has_se:
                self.SE.append(se)
            if self.paired is not None:
                self.tables.append(table)
            self.repairs.append(0)
            self.servable.append(bool(servable))
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
            if self.paired is not None:
                candidates = None if self._members() is None else np.array(self.servable)
                members = prune_paired(self.paired, tw, self.tables, candidates=candidates, method=self.prune_method)
                final = self.paired.certificate(tw, self.tables, members=members)
            else:
                members = prune(tw, tv, self.eps, self.delta, method=self.prune_method, std_errors=tse,
                                z=self.z, reference=reference)
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
                history=list(self.history), stopped=self.stopped, beaten=beaten, rounds=self.rounds)
        return self._result


def lazy_search(oracle, d, eps, delta, max_trainings, z=0.0, snap="grid", prune_method="greedy",
                initial_weights=None, initial_values=None, initial_std_errors=None, on_step=None,
                reference=None, max_repairs=0, z_significant=2.0, workers=1, consolidate=0):
    """Run LazySearch to the end with oracle(w) -> values (d,) or (values, std_errors) as the
    training (a repair calls it again at the same w); on_step(step) after each training.
    workers: weights asked per round (ask_batch, docs/theory.md section 12), trained in order.
    Returns result()."""
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    search = LazySearch(d, eps, delta, max_trainings, z=z, snap=snap, prune_method=prune_method,
                        initial_weights=initial_weights, initial_values=initial_values,
                        initial_std_errors=initial_std_errors, reference=reference,
                        max_repairs=max_repairs, z_significant=z_significant, consolidate=consolidate)
    while batch := search.ask_batch(workers):
        for w in batch:
            out = oracle(w.copy())
            values, se = out if isinstance(out, tuple) else (out, None)
            step = search.tell(w, values, se)
            if on_step is not None:
                on_step(step)
    return search.result()
