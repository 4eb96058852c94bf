"""Certificate, pruning, lazy search and metrics (theory.md sections 3-7) on problems with exact OPT."""
from itertools import combinations

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st
from scipy.optimize import linprog

from palm_tasks.core.certificate import TOL, certify
from palm_tasks.core.metrics import gaps, usage_perplexity
from palm_tasks.core.prune import prune, set_cover
from palm_tasks.core.search import lazy_search
from palm_tasks.core.simplex import simplex_lattice

FAST = settings(max_examples=40, deadline=None)


class Problem:
    """A synthetic policy class with exact OPT: a finite set of value vectors, or the positive
    part of a p-norm ball (p = 2: the sphere), whose optimum for w is v_i ~ w_i^(q-1)."""

    def __init__(self, kind, d, rng, n_class=None):
        self.kind, self.d = kind, d
        if kind == "finite":
            n_class = n_class or int(rng.integers(1, 25))
            self.policies = rng.uniform(0, 1, (n_class, d)) ** rng.uniform(0.3, 3)
        else:
            self.p = 2.0 if kind == "sphere" else float(rng.uniform(1.4, 5.0))
            self.q = self.p / (self.p - 1)

    def opt(self, w):
        if self.kind == "finite":
            return (w @ self.policies.T).max(axis=-1)
        return np.linalg.norm(w, ord=self.q, axis=-1)

    def best(self, w):
        if self.kind == "finite":
            return self.policies[np.argmax(w @ self.policies.T, axis=-1)]
        v = np.asarray(w, dtype=float) ** (self.q - 1)
        return v / np.linalg.norm(v, ord=self.p, axis=-1, keepdims=True)


def probe_weights(d, rng, n=1500):
    """Random weights (spread, near edges, near the centre) plus a lattice: where we look for
    violations of the bound against the exact OPT."""
    return np.vstack([rng.dirichlet(np.full(d, a), n // 3) for a in (0.15, 1.0, 6.0)]
                     + [simplex_lattice(d, {2: 50, 3: 12, 4: 6, 5: 4}[d]), np.eye(d)])


def true_gap(problem, values, members, eps, delta, w):
    """(1 - eps) OPT(w) - delta - max_{j in members} w . R_j: positive means a violation."""
    return (1 - eps) * problem.opt(w) - delta - (w @ values[members].T).max(axis=1)


def exact_upper(w, train_weights, values):
    """U(w) of theory.md section 4 by a plain LP (the reference for the corner enumeration)."""
    V = (train_weights @ values.T).max(axis=1)
    return -linprog(-w, A_ub=train_weights, b_ub=V, bounds=(0, 1), method="highs").fun


problems = st.tuples(st.sampled_from(["finite", "sphere", "pnorm"]), st.integers(2, 5),
                     st.integers(0, 2**31))


@FAST
@given(problem=problems, n_train=st.integers(1, 14), eps=st.floats(0.01, 0.5),
       delta=st.floats(0.0, 0.2), extremes=st.booleans())
def test_certify_is_sound_against_exact_opt(problem, n_train, eps, delta, extremes):
    """The worst corner slack bounds the true gap everywhere (U >= OPT), so certified => no
    violation on any probe weight; members are a random subset."""
    kind, d, seed = problem
    rng = np.random.default_rng(seed)
    P = Problem(kind, d, rng)
    W = rng.dirichlet(np.full(d, 0.5), n_train)
    if extremes:
        W = np.vstack([np.eye(d), W])
    R = P.best(W)
    members = np.flatnonzero(rng.random(len(W)) < 0.7)
    members = members if len(members) else np.array([0])
    cert = certify(W, R, eps, delta, members=members)
    probes = probe_weights(d, rng)
    gap = true_gap(P, R, members, eps, delta, probes)
    assert gap.max() <= cert.worst_slack + 1e-9
    # certified => no violation: at the drawn tolerances whichever the verdict (uncertified, the
    # bound above), and on every draw at a delta where the certificate must hold (max_delta)
    assert gap.max() <= (0.0 if cert.certified else cert.worst_slack) + 1e-9
    loose = cert.max_delta + 1e-7
    assert certify(W, R, eps, loose, members=members).certified
    assert true_gap(P, R, members, eps, loose, probes).max() <= 1e-9


@settings(max_examples=12, deadline=None)
@given(problem=problems, n_train=st.integers(2, 12), eps=st.floats(0.01, 0.3), delta=st.floats(0.0, 0.1))
def test_corners_attain_the_max_slack(problem, n_train, eps, delta):
    """Max principle: at any weight, the slack with the exact LP value of U is <= the worst
    corner slack (a missing corner would break this)."""
    kind, d, seed = problem
    rng = np.random.default_rng(seed)
    P = Problem(kind, d, rng)
    W = np.vstack([np.eye(d), rng.dirichlet(np.ones(d), n_train)])
    R = P.best(W)
    members = np.arange(1, len(W))  # leave e_1 out so L is not trivially tight there
    cert = certify(W, R, eps, delta, members=members)
    for w in rng.dirichlet(np.full(d, 0.7), 25):
        slack = (1 - eps) * exact_upper(w, W, R) - delta - (R[members] @ w).max()
        assert slack <= cert.worst_slack + 1e-7
    # the corner values themselves are the LP values (within the dual tolerance)
    for c, u in list(zip(cert.corner_weights, cert.upper))[:10]:
        assert u == pytest.approx(exact_upper(c, W, R), abs=1e-7)


def test_must_not_certify_two_specialists_and_a_strong_middle():
    """Class {(1, 0), (0, 1), (.9, .9)}: training only the extremes leaves w = (.5, .5) at
    0.5 while OPT = 0.9, so no certificate may be given; training the middle fixes it at eps = 0.1
    (at eps = 0.05 the optimistic bound at w = (.9, .1), 0.98, still leaves a gap)."""
    W, R = np.eye(2), np.eye(2)
    cert = certify(W, R, 0.05, 0.02)
    assert not cert.certified and cert.worst_slack > 0.3
    assert np.allclose(cert.worst_weight, [0.5, 0.5])
    W2, R2 = np.vstack([W, [[0.5, 0.5]]]), np.vstack([R, [[0.9, 0.9]]])
    assert certify(W2, R2, 0.1, 0.02).certified and not certify(W2, R2, 0.05, 0.02).certified


def test_must_not_certify_when_a_gap_exists_3d():
    P = Problem("sphere", 3, None)
    W = np.vstack([np.eye(3), [[1 / 3, 1 / 3, 1 / 3]]])
    cert = certify(W, P.best(W), 0.01, 0.0)
    w = np.array([0.5, 0.5, 0.0])  # between two trained points: the sphere bulges out
    assert true_gap(P, P.best(W), np.arange(4), 0.01, 0.0, w[None])[0] > 0
    assert not cert.certified


@FAST
@given(problem=problems, n_train=st.integers(2, 10), eps=st.floats(0.02, 0.4), delta=st.floats(0.0, 0.1))
@example(problem=("finite", 2, 35), n_train=2, eps=0.05, delta=0.0)  # max_eps 0.998: no eps in range
@example(problem=("finite", 2, 1), n_train=2, eps=0.05, delta=0.0)  # max_eps = max_delta = 0: exact cover
def test_max_eps_and_max_delta_are_tight(problem, n_train, eps, delta):
    kind, d, seed = problem
    rng = np.random.default_rng(seed)
    P = Problem(kind, d, rng)
    W = np.vstack([np.eye(d), rng.dirichlet(np.ones(d), n_train)])
    R = P.best(W)
    members = np.arange(d, len(W))
    cert = certify(W, R, eps, delta, members=members)
    assert certify(W, R, eps, cert.max_delta + 1e-7, members=members).certified
    # each claim is checked where it is meaningful (a tolerance in range, a gap to shrink), and
    # the other case asserts what holds there
    if cert.max_delta > 1e-3:  # a gap to shrink: 1 % less delta leaves a corner uncovered
        assert not certify(W, R, eps, cert.max_delta * 0.99, members=members).certified
    else:  # (almost) none: certified at delta 1e-3, and no violation there
        assert certify(W, R, eps, 1e-3 + 1e-7, members=members).certified
        assert true_gap(P, R, members, eps, 1e-3 + 1e-7, probe_weights(d, rng)).max() <= 1e-9
    if cert.max_eps < 0.99:  # eps in range: certified from max_eps on
        assert certify(W, R, cert.max_eps + 1e-7, delta, members=members).certified
    else:  # no eps in range certifies: not at 0.98 either
        assert not certify(W, R, 0.98, delta, members=members).certified
    if cert.max_eps > 1e-3:  # below max_eps, not certified
        assert not certify(W, R, cert.max_eps * 0.99, delta, members=members).certified
    else:  # (almost) exact cover: certified at eps 1e-3
        assert certify(W, R, 1e-3 + 1e-7, delta, members=members).certified


def test_degenerate_inputs():
    # duplicates change nothing
    W = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.3, 0.3, 0.4]])
    R = np.array([[0.9, 0.1, 0.2], [0.1, 0.8, 0.1], [0.2, 0.1, 0.9], [0.6, 0.6, 0.6]])
    a = certify(W, R, 0.1, 0.05)
    b = certify(np.vstack([W, W]), np.vstack([R, R]), 0.1, 0.05)
    assert a.worst_slack == pytest.approx(b.worst_slack, abs=1e-9) and a.certified == b.certified
    # a policy that dominates all: certified alone, and pruning keeps only it
    Rd = np.vstack([R, [[1.0, 1.0, 1.0]]])
    Wd = np.vstack([W, [[0.2, 0.5, 0.3]]])
    assert certify(Wd, Rd, 0.01, 0.0, members=[4]).certified
    assert prune(Wd, Rd, 0.01, 0.0).tolist() == [4]
    # zero rewards: OPT = 0 everywhere, nothing to lose
    Z = np.zeros((3, 3))
    assert certify(np.eye(3), Z, 0.05, 0.0).certified
    assert certify(np.eye(3), Z, 0.05, 0.0, members=[1]).certified
    # d = 2 edge weights: the specialists of a finite class
    W2 = np.array([[1.0, 0.0], [0.0, 1.0]])
    R2 = np.array([[1.0, 0.0], [0.0, 1.0]])
    c = certify(W2, R2, 0.5, 0.0)
    assert c.certified  # U = 1 (box), L = max(w) >= 1/2 = (1 - eps) U
    assert not certify(W2, R2, 0.5, 0.0, members=[0]).certified  # w = e_2 gets 0 out of 1
    # one member and one training weight
    assert certify([[0.5, 0.5]], [[0.5, 0.5]], 0.5, 0.0).max_eps == pytest.approx(0.5)


def test_soups_enter_l_but_not_u():
    """A non-oracle row may be a member but must not tighten or loosen U."""
    W = np.eye(2)
    R = np.eye(2)
    soup_w, soup_r = np.array([[0.5, 0.5]]), np.array([[0.7, 0.7]])
    Wa, Ra = np.vstack([W, soup_w]), np.vstack([R, soup_r])
    mask = np.array([True, True, False])
    with_soup = certify(Wa, Ra, 0.2, 0.05, oracle=mask)
    without = certify(W, R, 0.2, 0.05)
    as_oracle = certify(Wa, Ra, 0.2, 0.05)
    # U at w = (.5, .5): 1 from the box when the soup is not an oracle point, .7 if it were
    mid = np.flatnonzero(np.isclose(with_soup.corner_weights[:, 0], 0.5))
    assert with_soup.upper[mid] == pytest.approx(1.0) and not with_soup.certified
    assert as_oracle.certified and not without.certified
    assert with_soup.worst_slack < without.worst_slack  # but it helps L


@FAST
@given(problem=problems, n_train=st.integers(1, 8), z=st.floats(0.5, 3.0))
def test_noise_makes_the_certificate_conservative(problem, n_train, z):
    kind, d, seed = problem
    rng = np.random.default_rng(seed)
    P = Problem(kind, d, rng)
    W = np.vstack([np.eye(d), rng.dirichlet(np.ones(d), n_train)])
    R = P.best(W)
    se = rng.uniform(0, 0.02, R.shape)
    plain = certify(W, R, 0.1, 0.02)
    noisy = certify(W, R, 0.1, 0.02, std_errors=se, z=z)
    assert noisy.max_delta >= plain.max_delta - 1e-12
    assert not (noisy.certified and not plain.certified)
    zero = certify(W, R, 0.1, 0.02, std_errors=np.zeros_like(se), z=z)
    assert zero.worst_slack == pytest.approx(plain.worst_slack, abs=1e-12)


@FAST
@given(problem=problems, n_train=st.integers(2, 25), eps=st.floats(0.02, 0.3),
       delta=st.floats(0.0, 0.1), method=st.sampled_from(["greedy", "exact"]))
def test_prune_keeps_the_certificate(problem, n_train, eps, delta, method):
    kind, d, seed = problem
    rng = np.random.default_rng(seed)
    P = Problem(kind, d, rng)
    W = np.vstack([np.eye(d), rng.dirichlet(np.ones(d), n_train)])
    R = P.best(W)
    full = certify(W, R, eps, delta)
    kept = prune(W, R, eps, delta, method=method)
    assert len(kept) <= len(W) and len(np.unique(kept)) == len(kept)
    cert = certify(W, R, eps, delta, members=kept)
    # full set certified => pruned set certified; and a subset never covers more than the set,
    # so the verdicts agree either way
    assert cert.certified == full.certified
    probes = probe_weights(d, rng, 600)
    gap = true_gap(P, R, kept, eps, delta, probes)
    assert gap.max() <= (0.0 if full.certified else cert.worst_slack) + 1e-9
    # and on every draw where the full set must be certified (at its max_delta): pruned, still
    loose = full.max_delta + 1e-7
    assert certify(W, R, eps, loose).certified
    kept_loose = prune(W, R, eps, loose, method=method)
    assert certify(W, R, eps, loose, members=kept_loose).certified
    assert true_gap(P, R, kept_loose, eps, loose, probes).max() <= 1e-9
    # it keeps covering every corner of the full set that the full set covers
    covered = full.slacks <= TOL
    lower = (full.corner_weights[covered] @ R[kept].T).max(axis=1)
    assert (lower >= (1 - eps) * full.upper[covered] - delta - TOL).all()
    assert np.array_equal(kept, prune(W, R, eps, delta, method=method))  # deterministic


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["sphere", "pnorm", "finite"]), d=st.integers(2, 4),
       eps=st.floats(0.05, 0.3), delta=st.floats(0.01, 0.1), seed=st.integers(0, 2**31),
       snap=st.sampled_from(["grid", "none"]))
def test_lazy_search_certifies_without_retraining(kind, d, eps, delta, seed, snap):
    P = Problem(kind, d, np.random.default_rng(seed))

    def run():
        calls = []
        result = lazy_search(lambda w: (calls.append(w.copy()), P.best(w))[1], d, eps, delta,
                             max_trainings=300, snap=snap)
        return result, np.array(calls)

    result, calls = run()
    assert result.trainings == len(calls) == len(result.train_weights)
    assert len(np.unique(np.round(calls, 12), axis=0)) == len(calls)  # never the same weight twice
    assert result.stopped == "certified" and result.certificate.certified
    assert set(result.members) <= set(range(len(calls)))
    probes = probe_weights(d, np.random.default_rng(0), 900)
    gap = true_gap(P, result.values, result.members, eps, delta, probes)
    assert gap.max() <= 1e-9
    again, calls2 = run()
    assert np.array_equal(calls, calls2) and np.array_equal(result.members, again.members)


def test_lazy_search_d5_sphere():
    P = Problem("sphere", 5, None)
    result = lazy_search(P.best, 5, 0.2, 0.05, max_trainings=200)
    assert result.certificate.certified and result.trainings < 200


def test_lazy_search_budget_and_resume():
    P = Problem("sphere", 3, None)
    steps = []
    short = lazy_search(P.best, 3, 0.02, 0.005, max_trainings=5, on_step=steps.append)
    assert short.trainings == 5 == len(steps) and short.stopped == "budget"
    assert not short.certificate.certified
    assert [s["source"] for s in steps[:3]] == ["extreme"] * 3
    calls = []
    resumed = lazy_search(lambda w: (calls.append(w), P.best(w))[1], 3, 0.02, 0.005, max_trainings=300,
                          initial_weights=short.train_weights, initial_values=short.values)
    assert resumed.certificate.certified
    trained = np.vstack([short.train_weights, calls])
    assert len(np.unique(np.round(trained, 12), axis=0)) == len(trained)  # nothing retrained
    assert resumed.trainings == len(calls) and len(resumed.train_weights) == 5 + len(calls)


def test_lazy_search_with_std_errors():
    P = Problem("sphere", 3, None)
    result = lazy_search(lambda w: (P.best(w), np.full(3, 0.002)), 3, 0.1, 0.03, max_trainings=100, z=2.0)
    assert result.std_errors.shape == result.values.shape
    assert result.certificate.certified and result.certificate.z == 2.0
    d = result.to_dict()
    assert d["certificate"]["certified"] and d["trainings"] == result.trainings
    # noise larger than the tolerance: training more cannot help, and the search says so
    stuck = lazy_search(lambda w: (P.best(w), np.full(3, 0.05)), 3, 0.05, 0.01, max_trainings=60, z=2.0)
    assert not stuck.certificate.certified and stuck.stopped in ("stuck", "budget")


def test_gaps_and_usage():
    values = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.6]])
    w = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    g = gaps(values, [0, 1], w)
    assert np.allclose(g.additive, [0, 0.1, 0]) and np.allclose(g.multiplicative, [0, 0.1 / 0.6, 0])
    assert g.max_additive == pytest.approx(0.1) and g.to_dict()["n_test_weights"] == 3
    zero = gaps(np.zeros((2, 2)), [0], w)
    assert (zero.multiplicative == 0).all() and (zero.additive == 0).all()
    rng = np.random.default_rng(0)
    V, T = rng.uniform(0, 1, (20, 3)), rng.dirichlet(np.ones(3), 5000)
    g = gaps(V, [3, 7, 11], T)
    S = T @ V.T
    assert np.allclose(g.additive, S.max(1) - S[:, [3, 7, 11]].max(1))
    assert usage_perplexity(values, [0, 1], w[[0, 2]]) == pytest.approx(2.0)
    assert usage_perplexity(values, [0, 1, 2], w) == pytest.approx(3.0)
    assert usage_perplexity(values, [2], w) == pytest.approx(1.0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 7), m=st.integers(1, 12),
       method=st.sampled_from(["greedy", "exact"]))
def test_set_cover_is_a_cover_and_exact_is_minimum(seed, n, m, method):
    covers = np.random.default_rng(seed).random((n, m)) < 0.35
    chosen = set_cover(covers, method)
    coverable = covers.any(axis=0)
    assert (covers[chosen].any(axis=0) >= coverable).all()
    smallest = next(k for k in range(n + 1) for s in combinations(range(n), k)
                    if (covers[list(s)].any(axis=0) >= coverable).all())
    assert len(chosen) >= smallest
    assert method == "greedy" or len(chosen) == smallest  # exact is a minimum cover


@pytest.mark.parametrize("kwargs,match", [
    (dict(values=np.ones((2, 3))), "values must have shape"),
    (dict(values=np.array([[np.nan, 0.0], [0.0, 1.0]])), "NaN"),
    (dict(values=np.array([[1.5, 0.0], [0.0, 1.0]])), r"\[0, 1\]"),
    (dict(eps=0.0), "eps"), (dict(eps=1.0), "eps"), (dict(delta=-0.1), "delta"),
    (dict(train_weights=np.array([[0.7, 0.7], [0.0, 1.0]])), "off the simplex"),
    (dict(members=[]), "members"), (dict(members=[2]), "members"),
    (dict(oracle=np.array([1, 0])), "oracle"), (dict(std_errors=-np.ones((2, 2))), "std_errors"),
])
def test_certify_rejects_bad_input(kwargs, match):
    args = dict(train_weights=np.eye(2), values=np.eye(2), eps=0.1, delta=0.01)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        certify(**args)


def test_gaps_and_search_reject_bad_input():
    with pytest.raises(ValueError, match="off the simplex"):
        gaps(np.eye(2), [0], [[0.5, 0.6]])
    with pytest.raises(ValueError, match="d must be"):
        lazy_search(lambda w: w, 1, 0.1, 0.1, 10)
    with pytest.raises(ValueError, match="oracle values"):
        lazy_search(lambda w: np.ones(4), 3, 0.1, 0.1, 10)


