"""The one routing rule and the per-weight guarantee (docs/theory.md sections 4, 6, 7)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from palm_tasks.core.certificate import UpperBound, certify
from palm_tasks.core.metrics import usage_perplexity
from palm_tasks.core.routing import GuaranteeBound, eps_at, pessimistic, route, usage_shares
from palm_tasks.core.simplex import dirichlet_users, simplex_lattice


def pnorm_values(W, p=2.0):
    """Values of the optimal policies of the unit p-norm ball for weights W (exact oracle rows)."""
    q = p / (p - 1)
    V = np.asarray(W, float) ** (q - 1)
    return V / np.linalg.norm(V, ord=p, axis=1, keepdims=True)


def test_route_ties_go_to_the_first_member():
    values = np.array([[0.5, 0.5], [0.5, 0.5], [0.9, 0.0]])
    assert route([0.5, 0.5], values) == 0
    assert route(np.array([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]]), values).tolist() == [0, 2, 0]
    flipped = values[[1, 0, 2]]
    assert route([0.5, 0.5], flipped) == 0  # the first of the tied rows, whichever it is
    assert route([0.0, 1.0], [[0.2, 0.3], [0.9, 0.3]]) == 0  # equal value at w = e_2


def test_route_returns_an_int_for_one_vector_and_indices_for_rows():
    values = np.array([[1.0, 0.0], [0.0, 1.0]])
    one = route(np.array([0.3, 0.7]), values)
    assert type(one) is int and one == 1
    rows = route(np.array([[0.3, 0.7]]), values)
    assert isinstance(rows, np.ndarray) and rows.shape == (1,) and rows[0] == 1
    with pytest.raises(ValueError, match="route needs"):
        route([0.5, 0.5, 0.0], values)
    with pytest.raises(ValueError, match="route needs"):
        route([0.5, 0.5], np.zeros((0, 2)))


def test_z_changes_the_choice():
    """A member that is better on average but noisier loses once the noise margin counts."""
    values = np.array([[0.60, 0.60], [0.62, 0.62]])
    se = np.array([[0.0, 0.0], [0.05, 0.05]])
    w = np.array([0.5, 0.5])
    assert route(w, values, se, z=0.0) == 1
    assert route(w, values, se, z=2.0) == 0
    assert route(w, values) == route(w, values, se)  # z = 0 by default
    assert np.allclose(pessimistic(values, se, 2.0), values - 2.0 * se)
    assert np.array_equal(pessimistic(values), values) and pessimistic(values) is not values
    with pytest.raises(ValueError, match="z must be"):
        pessimistic(values, se, -1.0)
    with pytest.raises(ValueError, match="shape"):
        pessimistic(values, se[:1], 1.0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), d=st.integers(2, 5), m=st.integers(1, 8), z=st.sampled_from([0.0, 1.0, 2.0]))
def test_route_is_the_rule_the_router_registry_and_stages_used(seed, d, m, z):
    """Today's three rules, written out: argmax of (R - z se) @ w per user (Router), of
    lattice @ (R - z se).T (registry.simplex_shares), of users @ R.T (stages, z = 0)."""
    rng = np.random.default_rng(seed)
    R, SE = rng.uniform(0, 1, (m, d)), rng.uniform(0, 0.05, (m, d))
    users = np.vstack([rng.dirichlet(np.ones(d), 200), simplex_lattice(d, 4)])
    per_user = [int(np.argmax((R - z * SE) @ w)) for w in users]
    assert [route(w, R, SE, z) for w in users] == per_user
    assert route(users, R, SE, z).tolist() == per_user == np.argmax(users @ (R - z * SE).T, axis=1).tolist()
    assert route(users, R).tolist() == np.argmax(users @ R.T, axis=1).tolist()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), d=st.integers(2, 4), m=st.integers(1, 6), z=st.sampled_from([0.0, 2.0]))
def test_usage_shares_sum_to_one_and_match_perplexity(seed, d, m, z):
    rng = np.random.default_rng(seed)
    R, SE = rng.uniform(0, 1, (m, d)), rng.uniform(0, 0.05, (m, d))
    users = dirichlet_users(d, 500, seed % 1000)
    shares = usage_shares(users, R, SE, z)
    assert shares.shape == (m,) and shares.sum() == pytest.approx(1.0) and (shares >= 0).all()
    assert np.array_equal(shares * len(users), np.bincount(route(users, R, SE, z), minlength=m))
    members = np.arange(m)
    p = shares[shares > 0]
    assert usage_perplexity(R, members, users, SE, z) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))
    assert usage_perplexity(R, members, users) == usage_perplexity(R, members, users, SE, 0.0)


def test_usage_perplexity_routes_with_the_noise_margin():
    values = np.array([[0.60, 0.60], [0.62, 0.62]])
    se = np.array([[0.0, 0.0], [0.05, 0.05]])
    users = dirichlet_users(2, 100, 0, alpha=50.0)  # all near the centre
    assert usage_shares(users, values).tolist() == [0.0, 1.0]
    assert usage_shares(users, values, se, 2.0).tolist() == [1.0, 0.0]
    assert usage_perplexity(values, [0, 1], users, se, 2.0) == pytest.approx(1.0)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), d=st.integers(2, 4), n=st.integers(1, 8), z=st.sampled_from([0.0, 1.5]))
def test_guarantee_bound_is_an_upper_bound_and_today_router_bound(seed, d, n, z):
    rng = np.random.default_rng(seed)
    W = np.vstack([np.eye(d), rng.dirichlet(np.ones(d), n)])
    R = np.clip(pnorm_values(W) - rng.uniform(0, 0.1, (len(W), d)), 0, 1)  # imperfect oracle rows
    SE = rng.uniform(0, 0.02, R.shape)
    bound = GuaranteeBound(W, R, SE, z)
    router_today = UpperBound(W, (W @ (R + z * SE).T).max(axis=1))  # palm_tasks/router.py today
    for w in np.vstack([rng.dirichlet(np.ones(d), 30), np.eye(d)]):
        u = bound(w)
        assert isinstance(u, float) and u == router_today(w)
        assert u >= (R @ w).max() - 1e-9  # every oracle row's value (hence w . (R - z se) too)
    exact = GuaranteeBound(W, pnorm_values(W))  # optimal rows: U >= OPT = ||w||_2 everywhere
    for w in rng.dirichlet(np.ones(d), 30):
        assert exact(w) >= np.linalg.norm(w) - 1e-9


def test_guarantee_bound_is_the_certificate_upper_bound():
    """Same oracle rows and z: the router's U and the certificate's U agree at every corner."""
    rng = np.random.default_rng(3)
    W = np.vstack([np.eye(3), rng.dirichlet(np.ones(3), 6)])
    R, SE = pnorm_values(W), rng.uniform(0, 0.01, (9, 3))
    cert = certify(W, R, 0.05, 0.02, members=[0, 4, 7], std_errors=SE, z=1.0)
    bound = GuaranteeBound(W, R, SE, 1.0)
    assert np.array_equal([bound(c) for c in cert.corner_weights], cert.upper)
    worst = [eps_at(lo, up, 0.02) for lo, up in zip(cert.lower, cert.upper)]
    assert max(worst) == cert.max_eps


def test_eps_at():
    assert eps_at(0.9, 1.0, 0.02) == pytest.approx(0.08)
    assert eps_at(1.0, 1.0, 0.0) == 0.0 and eps_at(0.99, 0.9, 0.0) == 0.0  # never negative
    assert eps_at(0.5, 0.0, 0.01) == 0.0 and eps_at(0.5, -1.0, 0.01) == 0.0  # U <= 0: nothing to lose
    assert type(eps_at(0.9, 1.0, 0.02)) is float
    arr = eps_at(np.array([0.9, 1.0, 0.2]), np.array([1.0, 1.0, 0.0]), 0.02)
    assert np.allclose(arr, [0.08, 0.0, 0.0])
    value, upper, delta = 0.7, 0.8, 0.01  # the defining property: value >= (1 - eps) U - delta
    assert value == pytest.approx((1 - eps_at(value, upper, delta)) * upper - delta)
