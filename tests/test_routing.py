"""The one routing rule and the per-weight guarantee (docs/theory.md sections 4, 7, 13)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from palm_tasks.core.certificate import UpperBound, certify
from palm_tasks.core.metrics import usage_perplexity
from palm_tasks.core.routing import GuaranteeBound, eps_at, route, usage_shares
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


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), d=st.integers(2, 5), m=st.integers(1, 8))
def test_route_is_the_best_measured_value_per_user(seed, d, m):
    """The rule written out: argmax of R @ w per user, the same for one user and for rows."""
    rng = np.random.default_rng(seed)
    R = rng.uniform(0, 1, (m, d))
    users = np.vstack([rng.dirichlet(np.ones(d), 200), simplex_lattice(d, 4)])
    per_user = [int(np.argmax(R @ w)) for w in users]
    assert [route(w, R) for w in users] == per_user
    assert route(users, R).tolist() == per_user == np.argmax(users @ R.T, axis=1).tolist()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), d=st.integers(2, 4), m=st.integers(1, 6))
def test_usage_shares_sum_to_one_and_match_perplexity(seed, d, m):
    rng = np.random.default_rng(seed)
    R = rng.uniform(0, 1, (m, d))
    users = dirichlet_users(d, 500, seed % 1000)
    shares = usage_shares(users, R)
    assert shares.shape == (m,) and shares.sum() == pytest.approx(1.0) and (shares >= 0).all()
    assert np.array_equal(shares * len(users), np.bincount(route(users, R), minlength=m))
    members = np.arange(m)
    p = shares[shares > 0]
    assert usage_perplexity(R, members, users) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))


def test_usage_perplexity_counts_the_members_users_reach():
    values = np.array([[0.60, 0.60], [0.62, 0.62]])
    users = dirichlet_users(2, 100, 0, alpha=50.0)  # all near the centre: all to the better member
    assert usage_shares(users, values).tolist() == [0.0, 1.0]
    assert usage_perplexity(values, [0, 1], users) == pytest.approx(1.0)
    corners = np.eye(2)
    assert usage_perplexity(np.eye(2), [0, 1], corners) == pytest.approx(2.0)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), d=st.integers(2, 4), n=st.integers(1, 8))
def test_guarantee_bound_is_an_upper_bound(seed, d, n):
    rng = np.random.default_rng(seed)
    W = np.vstack([np.eye(d), rng.dirichlet(np.ones(d), n)])
    R = np.clip(pnorm_values(W) - rng.uniform(0, 0.1, (len(W), d)), 0, 1)  # imperfect oracle rows
    bound = GuaranteeBound(W, R)
    written_out = UpperBound(W, (W @ R.T).max(axis=1))  # V_j: the best oracle row at w_j
    for w in np.vstack([rng.dirichlet(np.ones(d), 30), np.eye(d)]):
        u = bound(w)
        assert isinstance(u, float) and u == written_out(w)
        assert u >= (R @ w).max() - 1e-9  # every oracle row's value
    exact = GuaranteeBound(W, pnorm_values(W))  # optimal rows: U >= OPT = ||w||_2 everywhere
    for w in rng.dirichlet(np.ones(d), 30):
        assert exact(w) >= np.linalg.norm(w) - 1e-9
    # best-of-N above every row at its weight raises V_j, never lowers it
    reference = (W * R).sum(axis=1) + 0.05
    raised = GuaranteeBound(W, R, reference=reference)
    for w in rng.dirichlet(np.ones(d), 10):
        assert raised(w) >= bound(w) - 1e-12


def test_guarantee_bound_is_the_certificate_upper_bound():
    """Same oracle rows: the router's U and the certificate's U (on the means) agree at every corner."""
    rng = np.random.default_rng(3)
    W = np.vstack([np.eye(3), rng.dirichlet(np.ones(3), 6)])
    R = pnorm_values(W)
    cert = certify(W, R, 0.05, 0.02, members=[0, 4, 7])
    bound = GuaranteeBound(W, R)
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
