"""Paired decisions with a stated confidence: the certificate, beaten rows and the evidence audit
taken on per-prompt differences (docs/theory.md section 13).

Every policy and best-of-N are measured on the same prompts, in one shuffled order: a policy's
*table* holds its per-prompt mean rewards (n_k, d) on the first n_k prompts, best-of-N's comes
from the base's sample pool (every prompt). A decision compares quantities on common prompts
through their per-prompt difference, whose variance is far below either one's (some prompts are
easy for every policy), and reads it with `confidence.mean_interval` at the planned looks.

The certificate (section 4) at a corner weight c with member m (the member the routing rule
gives c) is a decision on the slack (1 - eps) U(c) - delta - c . R_m. U(c) is an LP over the
oracle rows' constraints w_j . v <= V_j; its dual multipliers lam (from the LP at the estimated
V) stay dual feasible for any right-hand side, so for the *true* values

    U(c) <= sum_j lam_j V_j + rho,     V_j = max over sources s at w_j of E[s],

with rho the part of the proof that does not involve V. The sources at w_j are every candidate
policy and best-of-N at w_j; the one with the largest estimate is w_j's *anchor* a_j, and
V_j <= E[a_j] + e_j with e_j = max_s (E[s - a_j])^+, bounded above by the *anchor decisions*
(each source against the anchor, paired). Then the slack is at most

    E[T] + (1 - eps)(sum_j lam_j e_j + rho) - delta,   T(x) = (1 - eps) sum_j lam_j a_j(x) - c . r_m(x),

a mean of one per-prompt statistic: the *cover decision* (c, m) holds when the upper end of its
interval clears the threshold, fails when the lower end does, and is open otherwise. Where L_S
is linear (one member's region) the slack is convex, so its maximum is at the region's corners:
each member is checked at every corner of its region (at a corner shared by several regions,
each of them). The certificate holds at confidence 1 - alpha when every cover decision holds,
alpha being split over the cover and anchor decisions (a union bound, printed with the result).

Best-of-N's per-prompt answers come from core.evidence.chosen_answers; the point-estimate
certificate (core.certificate.certify) gives the corners. Pure numpy/scipy.
"""
from dataclasses import dataclass, field, replace

import numpy as np

from palm_tasks.core.certificate import TOL, UpperBound, corner_weights
from palm_tasks.core.confidence import Looks, Split, mean_interval
from palm_tasks.core.evidence import chosen_answers
from palm_tasks.core.simplex import check_tolerances

ADJACENT = 1e-9  # members within this of the best value at a corner share it (their regions meet)


def check_table(scores, d):
    """A per-prompt table: finite rewards in [0, 1], shape (prompts >= 1, d)."""
    table = np.asarray(scores, dtype=float)
    if table.ndim != 2 or table.shape[1] != d or len(table) < 1:
        raise ValueError(f"per-prompt scores must have shape (prompts, {d}), got {table.shape}")
    if not np.isfinite(table).all() or (table < 0).any() or (table > 1).any():
        raise ValueError("per-prompt scores must be finite rewards in [0, 1]")
    return table


def table_se(table):
    """The se of a table's mean over its prompts (0 for one prompt)."""
    return table.std(axis=0, ddof=1) / np.sqrt(len(table)) if len(table) > 1 else np.zeros(table.shape[1])


@dataclass(frozen=True)
class Decision:
    """One decision on a per-prompt statistic: its estimate and interval (read at `n` prompts,
    at error `alpha`) against `threshold`; `status` holds | fails | open; `rows` are the
    candidates whose further prompts would narrow it; `at_cap`: no planned look is left."""
    kind: str  # cover | anchor | beaten | audit
    name: str
    weight: tuple
    estimate: float
    lower: float
    upper: float
    threshold: float
    alpha: float
    n: int
    status: str
    rows: tuple = ()
    at_cap: bool = False
    narrowed_by: tuple = ()

    @property
    def open(self) -> bool:
        return self.status == "open"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "weight": [round(float(x), 6) for x in self.weight],
                "estimate": float(self.estimate), "lower": float(self.lower), "upper": float(self.upper),
                "threshold": float(self.threshold), "alpha": float(self.alpha), "n": int(self.n),
                "status": self.status, "rows": [int(r) for r in self.rows], "at_cap": bool(self.at_cap),
                "narrowed_by": [int(r) for r in self.narrowed_by]}


@dataclass(frozen=True)
class ConfidentCertificate:
    """(eps, delta)-coverage of the whole simplex by `members` with confidence 1 - alpha, relative
    to the alignment oracle and the evidence. certified: every cover decision holds. slacks: per
    corner, the upper end of the slack's interval (the largest over the members that meet there);
    max_eps: the smallest eps every cover decision would clear at this delta (the same paired
    intervals). decisions: the cover and anchor decisions, taken at split.each."""
    certified: bool
    eps: float
    delta: float
    alpha: float
    corner_weights: np.ndarray
    upper: np.ndarray
    slacks: np.ndarray
    slack_estimates: np.ndarray
    max_eps: float
    members: np.ndarray
    decisions: list = field(default_factory=list)
    split: Split | None = None
    n_oracle: int = 0
    z: float = 0.0  # the point-estimate certificate's z (not used: the confidence is alpha)

    @property
    def worst_slack(self) -> float:
        return float(self.slacks.max()) if len(self.slacks) else 0.0

    @property
    def worst_weight(self) -> np.ndarray:
        return self.corner_weights[int(np.argmax(self.slacks))] if len(self.slacks) else np.zeros(0)

    @property
    def max_delta(self) -> float:
        """The smallest delta every cover decision would clear at this eps (the slack is linear in delta)."""
        return max(0.0, self.delta + self.worst_slack)

    def named(self, status: str, kind: str = "cover") -> list[str]:
        return [d.name for d in self.decisions if d.kind == kind and d.status == status]

    @property
    def open_at_cap(self) -> list[str]:
        return [d.name for d in self.decisions if d.kind == "cover" and d.open and d.at_cap]

    def to_dict(self) -> dict:
        return {"certified": bool(self.certified), "eps": self.eps, "delta": self.delta, "alpha": self.alpha,
                "max_eps": float(self.max_eps), "max_delta": float(self.max_delta),
                "worst_slack": self.worst_slack, "worst_weight": self.worst_weight.tolist(),
                "members": [int(m) for m in self.members], "n_oracle": int(self.n_oracle),
                "corner_weights": self.corner_weights.tolist(), "slacks": self.slacks.tolist(),
                "split": None if self.split is None else self.split.to_dict(),
                "decisions": [d.to_dict() for d in self.decisions]}


def _fmt(w) -> str:
    return "(" + ", ".join(f"{x:.2f}" for x in w) + ")"


class PairedEvidence:
    """The decisions of section 13 for candidates given as per-prompt tables.

    bon_scores (P, N, d) and bon_allowed (P, N) or None: the base's sample pool (best-of-N picks
    among the allowed answers, core.evidence.chosen_answers); eps, delta: the tolerances; alpha:
    the error of each family of decisions; looks: the planned looks (confidence.Looks)."""

    def __init__(self, bon_scores, bon_allowed, eps, delta, alpha, looks: Looks):
        self.bon_scores = np.asarray(bon_scores, float)
        self.bon_allowed = None if bon_allowed is None else np.asarray(bon_allowed, bool)
        self.eps, self.delta = check_tolerances(eps, delta)
        if not 0.0 < float(alpha) < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.alpha, self.looks = float(alpha), looks
        self._bon: dict[bytes, np.ndarray] = {}

    # -------------------------------------------------------------------------- sources

    def bon(self, w) -> np.ndarray:
        """Best-of-N's answers at w, per prompt: (P, d) rewards of the answer it picks."""
        w = np.ascontiguousarray(np.asarray(w, float))
        key = w.tobytes()
        if key not in self._bon:
            self._bon[key] = chosen_answers(self.bon_scores, w[None, :], self.bon_allowed)[0]
        return self._bon[key]

    def bon_many(self, weights) -> np.ndarray:
        """(m, P) per-prompt scalar w . r of best-of-N's answer at each of many weights."""
        W = np.atleast_2d(np.asarray(weights, float))
        return np.einsum("mpd,md->mp", chosen_answers(self.bon_scores, W, self.bon_allowed), W)

    @staticmethod
    def means(tables) -> np.ndarray:
        return np.array([np.asarray(t, float).mean(axis=0) for t in tables])

    def _series(self, source, w, tables):
        """Per-prompt scalar w . r of a source: a row index k, or -1 for best-of-N at w."""
        return (self.bon(w) if source < 0 else np.asarray(tables[source], float)) @ np.asarray(w, float)

    @property
    def cap(self) -> int:
        """The most prompts any decision reads: the planned cap, or every prompt of the pool."""
        return min(self.looks.cap, len(self.bon_scores))

    def _read(self, x, alpha, lo, hi):
        return mean_interval(x, alpha, self.looks, lo, hi)

    def _sources(self, w, R, exclude=None):
        """(source, estimate) pairs at w: every row and best-of-N, best first (ties: rows first)."""
        values = R @ w
        out = [(k, float(v)) for k, v in enumerate(values) if k != exclude]
        out.append((-1, float(self.bon(w).mean(axis=0) @ w)))
        return sorted(out, key=lambda s: -s[1])

    # -------------------------------------------------------------------------- the certificate

    def certificate(self, W, tables, oracle=None, members=None) -> ConfidentCertificate:
        """The certificate of `members` (row indices; all if None) with confidence 1 - alpha.
        W (n, d): each row's weight (an oracle row's training weight); tables: n per-prompt
        tables; oracle: rows trained for their weight (default all; they give U's constraints)."""
        W = np.atleast_2d(np.asarray(W, float))
        n, d = W.shape
        R = self.means(tables)
        mask = np.ones(n, bool) if oracle is None else np.asarray(oracle, bool)
        members = np.arange(n) if members is None else np.unique(np.asarray(members, int))
        oracle_rows = np.flatnonzero(mask)
        anchors, V = [], []
        for j in oracle_rows:
            best = self._sources(W[j], R)[0]
            anchors.append(best[0])
            V.append(best[1])
        bound = UpperBound(W[oracle_rows], np.array(V))
        corners = corner_weights(R[members])
        proofs = [bound.with_duals(c) for c in corners]
        active = sorted({i for _, lam, _ in proofs for i in np.flatnonzero(lam > TOL)})
        anchor_decisions = {i: self._anchor_decisions(oracle_rows[i], anchors[i], W, R, tables) for i in active}
        n_cover = sum(len(self._adjacent(c, R, members)) for c in corners)
        split = Split("certificate (cover and anchor decisions)", self.alpha,
                      n_cover + sum(len(v) for v in anchor_decisions.values()))
        flat = self._decide_all([spec for i in active for spec in anchor_decisions[i]], split.each)
        decided, at = {}, 0
        for i in active:
            decided[i], at = flat[at:at + len(anchor_decisions[i])], at + len(anchor_decisions[i])
        excess = {i: max([0.0] + [dec.upper for dec in decs]) for i, decs in decided.items()}
        specs, where, proof_of = [], [], []
        for ci, (c, (u, lam, rho)) in enumerate(zip(corners, proofs)):
            for m in self._adjacent(c, R, members):
                specs.append(self._cover(c, m, lam, rho, oracle_rows, anchors, excess, W, tables))
                where.append(ci)
                proof_of.append((c, m, lam, rho))
        covers = self._decide_all([spec for spec, _ in specs], split.each)
        covers = [self._with_margins(dec, *proof, decided, oracle_rows, anchors, W, tables)
                  for dec, proof in zip(covers, proof_of)]
        slacks, estimates = np.full(len(corners), -np.inf), np.full(len(corners), -np.inf)
        eps_needed = []
        for ci, dec, (_, (level, r_bar)) in zip(where, covers, specs):
            slacks[ci] = max(slacks[ci], dec.upper - dec.threshold)
            estimates[ci] = max(estimates[ci], (1 - self.eps) * level - self.delta - r_bar)
            # the eps every look would clear with the same interval: (1 - e) level - r_bar + half <= delta
            half = dec.upper - dec.estimate
            eps_needed.append(1.0 - (self.delta + r_bar - half) / level if level > 0 else 0.0)
        decisions = covers + [dec for i in active for dec in decided[i]]
        return ConfidentCertificate(
            certified=all(dec.status == "holds" for dec in covers), eps=self.eps, delta=self.delta,
            alpha=self.alpha, corner_weights=corners,
            upper=np.array([u for u, _, _ in proofs]), slacks=slacks, slack_estimates=estimates,
            max_eps=float(max(0.0, max(eps_needed, default=0.0))), members=members, decisions=decisions,
            split=split, n_oracle=int(mask.sum()))

    @staticmethod
    def _adjacent(c, R, members) -> list[int]:
        values = R[members] @ c
        return [int(m) for m, v in zip(members, values) if v >= values.max() - ADJACENT]

    def _anchor_decisions(self, j, anchor, W, R, tables) -> list[tuple]:
        """Each other source at w_j against the anchor: (name, weight, statistic, rows, lo, hi)."""
        w = W[j]
        a = self._series(anchor, w, tables)
        out = []
        for source, _ in self._sources(w, R):
            if source == anchor:
                continue
            s = self._series(source, w, tables)
            k = min(len(a), len(s))
            rows = tuple(r for r in (source, anchor) if r >= 0)
            out.append(("anchor", f"V at row {j} {_fmt(w)}: {self._name(source)} over {self._name(anchor)}",
                        w, s[:k] - a[:k], rows, -1.0, 1.0, 0.0))
        return out

    @staticmethod
    def _name(source) -> str:
        return "best-of-N" if source < 0 else f"row {source}"

    def _decide_all(self, specs, alpha) -> list[Decision]:
        """Decisions of the specs (kind, name, weight, statistic, rows, lo, hi, threshold), read
        in batches of equal length and range (one interval computation per batch)."""
        out: list[Decision | None] = [None] * len(specs)
        groups: dict[tuple, list[int]] = {}
        for i, (_, _, _, x, _, lo, hi, _) in enumerate(specs):
            groups.setdefault((len(x), lo, hi), []).append(i)
        for (length, lo, hi), members in groups.items():
            X = np.array([specs[i][3] for i in members]).reshape(len(members), length)
            estimate, lower, upper, n = self._read(X, alpha, lo, hi)
            for j, i in enumerate(members):
                kind, name, w, x, rows, _, _, threshold = specs[i]
                status = "holds" if upper[j] <= threshold else "fails" if lower[j] > threshold else "open"
                out[i] = Decision(kind, name, tuple(np.asarray(w, float)), float(estimate[j]), float(lower[j]),
                                  float(upper[j]), float(threshold), float(alpha), int(n), status, rows,
                                  at_cap=n >= self.cap or length >= self.cap)
        return out

    def _cover(self, c, m, lam, rho, oracle_rows, anchors, excess, W, tables):
        """The cover decision (c, m) as a spec, with (the bound on U(c) at the estimates without
        the (1 - eps) factor, the member's mean value at c) for its slack and the eps it reaches."""
        eps, delta = self.eps, self.delta
        r_m = np.asarray(tables[m], float) @ c
        used = [i for i in np.flatnonzero(lam > TOL)]
        series = [self._series(anchors[i], W[oracle_rows[i]], tables) for i in used]
        k = min([len(r_m)] + [len(s) for s in series])
        a = sum((lam[i] * s[:k] for i, s in zip(used, series)), np.zeros(k))  # sum_j lam_j a_j(x)
        extra = sum(lam[i] * excess[i] for i in used) + rho
        box = float(np.sum(c))  # U(c) <= c . 1: rewards lie in [0, 1], whatever the oracle
        if k and float(a.mean()) + extra >= box:
            # the anchors' margins (wide on few prompts) make the proof looser than the box
            # itself: prove with the box alone (lam = 0), a decision on the member's value only
            used, series, k, a, extra = [], [], len(r_m), np.zeros(len(r_m)), box
        T = (1 - eps) * a - r_m[:k]
        threshold = delta - (1 - eps) * extra
        rows = tuple(sorted({int(m), *(int(anchors[i]) for i in used if anchors[i] >= 0)}))
        total = float(lam[used].sum()) if used else 0.0
        spec = ("cover", f"corner {_fmt(c)} by row {m}", c, T, rows, -1.0, max((1 - eps) * total, 0.0) + TOL,
                threshold)
        level = float(a.mean()) + extra if k else extra
        return spec, (level, float(r_m[:k].mean()) if k else 0.0)

    def _with_margins(self, dec, c, m, lam, rho, decided, oracle_rows, anchors, W, tables) -> Decision:
        """A cover decision with `narrowed_by`: the rows below the cap whose further prompts narrow
        the anchors' margins in its threshold (the shorter side of each anchor decision whose
        upper end is above 0). A row measured on few prompts makes a wide margin wherever it is
        a source, which loosens the bound near its weight: more prompts on it, not another
        training there, is what such a decision needs. Set on an open decision (which is then
        at the cap only when these rows are too) and on a failing one that would not fail with
        every margin at 0; a failing decision that fails without its margins keeps none."""
        if dec.status == "holds":
            return dec
        cap = self.cap
        used = [int(i) for i in np.flatnonzero(lam > TOL)]
        rows = set()
        for a in (a for i in used for a in decided[i] if a.upper > 0 and not a.at_cap):
            shortest = min(len(tables[r]) for r in a.rows)
            rows |= {r for r in a.rows if len(tables[r]) == shortest and shortest < cap}
        if not rows:
            return dec
        if dec.status == "open":
            return replace(dec, narrowed_by=tuple(sorted(rows)), at_cap=False)
        spec, _ = self._cover(c, m, lam, rho, oracle_rows, anchors, dict.fromkeys(used, 0.0), W, tables)
        if self._decide_all([spec], dec.alpha)[0].status == "fails":
            return dec
        return replace(dec, narrowed_by=tuple(sorted(rows)))

    def covers(self, W, tables, oracle, elements, candidates, alpha) -> np.ndarray:
        """(n, len(elements)) booleans: row m covers element c when its cover decision holds at
        `alpha` (set-cover pruning at confidence, section 3)."""
        W = np.atleast_2d(np.asarray(W, float))
        R = self.means(tables)
        mask = np.ones(len(W), bool) if oracle is None else np.asarray(oracle, bool)
        oracle_rows = np.flatnonzero(mask)
        anchors, V, excess = [], [], {}
        for j in oracle_rows:
            best = self._sources(W[j], R)[0]
            anchors.append(best[0])
            V.append(best[1])
        bound = UpperBound(W[oracle_rows], np.array(V))
        out = np.zeros((len(W), len(elements)), bool)
        for e, c in enumerate(np.atleast_2d(elements)):
            _, lam, rho = bound.with_duals(c)
            for i in np.flatnonzero(lam > TOL):
                if i not in excess:
                    decs = self._decide_all(self._anchor_decisions(oracle_rows[i], anchors[i], W, R, tables), alpha)
                    excess[i] = max([0.0] + [dec.upper for dec in decs])
            rows = np.flatnonzero(np.asarray(candidates, bool))
            specs = [self._cover(c, m, lam, rho, oracle_rows, anchors, excess, W, tables)[0] for m in rows]
            for m, dec in zip(rows, self._decide_all(specs, alpha)):
                out[m, e] = dec.status == "holds"
        return out

    # -------------------------------------------------------------------------- beaten rows, audit

    def beaten(self, W, tables, oracle=None) -> list[Decision]:
        """Per oracle row j: is it beaten at its own weight? The best other source (another
        candidate or best-of-N) against the row, paired: beaten when the lower end of the
        difference's interval is above 0 (holds); not shown beaten otherwise. alpha is split
        over the rows (family `beaten`). Decisions of non-oracle rows are not made (None)."""
        W = np.atleast_2d(np.asarray(W, float))
        R = self.means(tables)
        mask = np.ones(len(W), bool) if oracle is None else np.asarray(oracle, bool)
        split = Split("beaten rows", self.alpha, int(mask.sum()))
        out = []
        for j in range(len(W)):
            if not mask[j]:
                out.append(None)
                continue
            by = self._sources(W[j], R, exclude=j)[0][0]
            own = self._series(j, W[j], tables)
            other = self._series(by, W[j], tables)
            k = min(len(own), len(other))
            estimate, lower, upper, n = self._read(other[:k] - own[:k], split.each, -1.0, 1.0)
            status = "holds" if lower[0] > 0 else "open"
            out.append(Decision("beaten", f"row {j} {_fmt(W[j])} beaten by {self._name(by)}", tuple(W[j]),
                                float(estimate[0]), float(lower[0]), float(upper[0]), 0.0, split.each, int(n),
                                status, tuple(r for r in (j, by) if r >= 0), at_cap=n >= self.cap))
        return out

    def beaten_split(self, oracle_count: int) -> Split:
        return Split("beaten rows", self.alpha, oracle_count)

    def audit(self, test, W, tables, members) -> dict:
        """The portfolio against the evidence at every test weight (section 8), paired: at w the
        source of E(w) (the best candidate or best-of-N) against the member routed there, the
        promise P(w) >= (1 - eps) E(w) - delta contradicted where the lower end of the interval of
        (1 - eps) E - P is above delta. alpha is split over the test weights (family `audit`)."""
        T = np.atleast_2d(np.asarray(test, float))
        R = self.means(tables)
        members = np.asarray(members, int)
        bon = self.bon_many(T)  # (m, P)
        routed = members[(T @ R[members].T).argmax(axis=1)]
        values = T @ R.T  # (m, n)
        best_row = values.argmax(axis=1)
        from_bon = bon.mean(axis=1) > values[np.arange(len(T)), best_row]
        split = Split("evidence audit", self.alpha, len(T))
        worst, contradicted = None, []
        for i, w in enumerate(T):
            e = bon[i] if from_bon[i] else np.asarray(tables[best_row[i]], float) @ w
            p = np.asarray(tables[routed[i]], float) @ w
            k = min(len(e), len(p))
            estimate, lower, upper, n = self._read((1 - self.eps) * e[:k] - p[:k], split.each, -1.0, 1.0)
            margin = float(lower[0] - self.delta)
            if worst is None or margin > worst[0]:
                worst = (margin, i, float(estimate[0]), float(lower[0]), float(upper[0]), int(n))
            if margin > 0:
                contradicted.append(i)
        margin, i, estimate, lower, upper, n = worst
        return {"split": split.to_dict(), "contradicted": bool(contradicted), "contradicted_at": len(contradicted),
                "closest": {"weight": T[i].tolist(), "member": int(routed[i]),
                            "against": "best-of-N" if from_bon[i] else int(best_row[i]),
                            "estimate": estimate, "lower": lower, "upper": upper, "n": n,
                            "threshold": self.delta}}
