"""The PALM grid (theory.md section 2): its guarantee, its size bound, the baseline weight sets."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from palm_tasks.core.grid import grid_levels, grid_size_bound, palm_grid, snap_to_grid
from palm_tasks.core.simplex import (check_weights, dirichlet_users, extreme_weights, random_weights, simplex_lattice,
                                     uniform_weights)

FAST = settings(max_examples=25, deadline=None)


def front(kind, d, rng):
    """(OPT(w), the optimal value vector for w) for a synthetic problem with exact OPT."""
    if kind == "finite":
        policies = rng.uniform(0, 1, (int(rng.integers(1, 30)), d))
        return (lambda w: (w @ policies.T).max(axis=-1),
                lambda w: policies[np.argmax(w @ policies.T, axis=-1)])
    p = {"sphere": 2.0, "pnorm": float(rng.uniform(1.3, 5.0))}[kind]
    q = p / (p - 1)  # max {w . v : ||v||_p <= 1, v >= 0} = ||w||_q, at v_i ~ w_i^(q-1)

    def best(w):
        v = w ** (q - 1)
        return v / np.linalg.norm(v, ord=p, axis=-1, keepdims=True)
    return lambda w: np.linalg.norm(w, ord=q, axis=-1), best


@FAST
@given(d=st.integers(2, 5), eps=st.floats(0.01, 0.6), delta=st.floats(0.001, 0.3),
       kind=st.sampled_from(["finite", "sphere", "pnorm"]), seed=st.integers(0, 2**31))
def test_grid_point_policy_is_eps_delta_good(d, eps, delta, kind, seed):
    """Training at g(w) is (eps, delta)-good for w: the claim of theory.md section 2."""
    rng = np.random.default_rng(seed)
    opt, best = front(kind, d, rng)
    w = np.vstack([rng.dirichlet(np.full(d, a), 300) for a in (0.2, 1.0, 5.0)])
    g = snap_to_grid(w, d, eps, delta)
    achieved = np.einsum("ij,ij->i", w, best(g))
    assert (achieved >= (1 - eps) * opt(w) - delta - 1e-12).all()


@FAST
@given(d=st.integers(2, 4), eps=st.floats(0.08, 0.6), delta=st.floats(0.02, 0.4), seed=st.integers(0, 2**31))
def test_grid_within_bound_and_contains_every_snap(d, eps, delta, seed):
    grid = palm_grid(d, eps, delta)
    assert len(grid) <= grid_size_bound(d, eps, delta)
    assert np.allclose(grid.sum(axis=1), 1) and (grid >= 0).all()
    assert len(np.unique(grid, axis=0)) == len(grid)
    assert (np.lexsort(grid.T[::-1]) == np.arange(len(grid))).all()
    rows = {tuple(r) for r in grid}
    rng = np.random.default_rng(seed)
    w = np.vstack([rng.dirichlet(np.full(d, 0.3), 500), simplex_lattice(d, 7)])
    assert all(tuple(g) in rows for g in snap_to_grid(w, d, eps, delta))  # bit-identical rows


@pytest.mark.parametrize("eps,delta", [(0.05, 0.02), (0.2, 0.1), (0.01, 0.001), (0.5, 0.5)])
def test_grid_d2_is_exactly_the_set_of_snaps(eps, delta):
    """d = 2: g(w) only changes at level boundaries, so snapping those and the midpoints between
    them visits every grid point; the grid must be exactly that set (no spurious points)."""
    levels, _ = grid_levels(2, eps, delta)
    cuts = np.unique(np.clip(np.concatenate([[0, 1], levels, 1 - levels]), 0, 1))
    a = np.concatenate([cuts, (cuts[1:] + cuts[:-1]) / 2])
    snaps = snap_to_grid(np.column_stack([a, 1 - a]), 2, eps, delta)
    assert {tuple(r) for r in snaps} == {tuple(r) for r in palm_grid(2, eps, delta)}


def test_grid_reference_sizes_and_speed():
    """The d = 3 grid costs a few passes over its own rows, not a loop over them or over the
    product of levels: at most 8 times the work of one numpy lexsort of those rows (measured:
    2.4 to 3.2 times; enumerating the product of levels instead, 10 to 15). Work is this
    thread's CPU time, which other processes on the machine do not add to (wall time does: a
    loaded machine preempts a 6 ms call more often than a 2 ms one), the least of 7 runs each."""
    import time

    grid = palm_grid(3, 0.05, 0.02)
    assert len(grid) == 22780 and grid_size_bound(3, 0.05, 0.02) == 3 * 91 ** 2
    rows = grid.T[::-1].copy()
    build, baseline = [], []
    for _ in range(7):
        t = time.thread_time()
        palm_grid(3, 0.05, 0.02)
        build.append(time.thread_time() - t)
        t = time.thread_time()
        np.lexsort(rows)
        baseline.append(time.thread_time() - t)
    assert min(build) < 8 * min(baseline), f"palm_grid {min(build):.4f} s CPU, lexsort of its rows {min(baseline):.4f} s"
    assert len(palm_grid(5, 0.3, 0.2)) <= grid_size_bound(5, 0.3, 0.2)


def test_grid_includes_extremes_and_centroid():
    grid = {tuple(r) for r in palm_grid(3, 0.1, 0.05)}
    assert all(tuple(e) in grid for e in np.eye(3))
    assert tuple(np.full(3, 1 / 3)) in {tuple(r) for r in snap_to_grid(np.full((1, 3), 1 / 3), 3, 0.1, 0.05)}


@pytest.mark.parametrize("bad,match", [
    ([0.5, 0.6], "sums to 1.1"), ([1.2, -0.2], "negative"), ([np.nan, 1.0], "NaN"),
    ([[[0.5, 0.5]]], "shape"), ([1.0], "d must be"),
])
def test_check_weights_names_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        check_weights(bad)


def test_check_weights_dimension_and_accepts_good():
    with pytest.raises(ValueError, match="3 coordinates"):
        check_weights([0.5, 0.5], d=3)
    assert check_weights([[0.2, 0.8], [1.0, 0.0]]).shape == (2, 2)


@pytest.mark.parametrize("d,eps,delta,match", [
    (3, 0.0, 0.1, "eps"), (3, 1.0, 0.1, "eps"), (3, np.nan, 0.1, "eps"), (3, 0.1, -0.01, "delta"),
    (1, 0.1, 0.1, "d must be"), (3, 0.1, 0.0, "delta must be > 0"),
])
def test_grid_rejects_bad_parameters(d, eps, delta, match):
    with pytest.raises(ValueError, match=match):
        palm_grid(d, eps, delta)
    with pytest.raises(ValueError, match=match):
        grid_size_bound(d, eps, delta)


@pytest.mark.parametrize("d,n", [(2, 1), (3, 4), (4, 3), (5, 2)])
def test_simplex_lattice(d, n):
    lat = simplex_lattice(d, n)
    assert len(lat) == math.comb(n + d - 1, d - 1)
    assert np.allclose(lat.sum(axis=1), 1) and np.allclose(lat * n, np.round(lat * n))
    assert len(np.unique(lat, axis=0)) == len(lat)


@pytest.mark.parametrize("d", [2, 3, 4, 5])
def test_uniform_weights(d):
    assert np.allclose(uniform_weights(d, 1), np.full((1, d), 1 / d))
    assert np.array_equal(uniform_weights(d, d), extreme_weights(d))
    for k in range(2, 12):
        w = uniform_weights(d, k)
        assert w.shape == (k, d) and np.allclose(w.sum(axis=1), 1)
        assert len(np.unique(w, axis=0)) == k
        assert np.array_equal(w, uniform_weights(d, k))
    assert np.allclose(uniform_weights(2, 3), [[1, 0], [0, 1], [0.5, 0.5]])


def test_random_weights_and_users():
    a, b = random_weights(3, 10, seed=1), random_weights(3, 10, seed=1)
    assert np.array_equal(a, b) and not np.array_equal(a, random_weights(3, 10, seed=2))
    assert np.allclose(a.sum(axis=1), 1) and (a >= 0).all()
    assert dirichlet_users(4, 1000, seed=0, alpha=50.0).std() < dirichlet_users(4, 1000, seed=0).std()
