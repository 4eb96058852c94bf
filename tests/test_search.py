"""The lazy search as ask/tell (docs/theory.md section 5): the caller owns the loop."""
import json

import numpy as np
import pytest

from palm_tasks.core.search import LazySearch, SearchResult, lazy_search
from support.fronts import PNormFront


def pnorm_oracle(p):
    """Exact oracle of the positive part of the unit p-norm ball, for any d (support.fronts)."""
    return lambda w: PNormFront(len(w), p)(w)


def with_se(oracle, se):
    return lambda w: (oracle(w), np.full(len(w), se))


def run_ask_tell(oracle, *args, **kwargs):
    """The loop a caller writes: ask, train (the oracle), tell; then the result."""
    search = LazySearch(*args, **kwargs)
    while (w := search.ask()) is not None:
        out = oracle(w)
        search.tell(w, *(out if isinstance(out, tuple) else (out,)))
    assert search.done
    return search, search.result()


def assert_same_result(a: SearchResult, b: SearchResult):
    """Bit-identical: arrays, certificates (every number), history, stop reason."""
    assert np.array_equal(a.train_weights, b.train_weights) and np.array_equal(a.values, b.values)
    assert (a.std_errors is None) == (b.std_errors is None)
    assert a.std_errors is None or np.array_equal(a.std_errors, b.std_errors)
    assert np.array_equal(a.members, b.members)
    assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())
    for cert_a, cert_b in ((a.certificate, b.certificate), (a.full_certificate, b.full_certificate)):
        for name in ("corner_weights", "lower", "upper", "slacks"):
            assert np.array_equal(getattr(cert_a, name), getattr(cert_b, name))


@pytest.mark.parametrize("p,d,eps,delta,kwargs", [
    (2.0, 2, 0.1, 0.03, {}),
    (2.0, 3, 0.1, 0.03, {}),
    (4.0, 3, 0.1, 0.03, dict(snap="none")),
    (1.5, 3, 0.05, 0.01, dict(prune_method="exact")),
    (2.0, 4, 0.2, 0.05, {}),
    (3.0, 3, 0.1, 0.0, {}),  # delta = 0: no grid to snap to, corners are trained
])
def test_ask_tell_is_bit_identical_to_lazy_search(p, d, eps, delta, kwargs):
    oracle = pnorm_oracle(p)
    steps = []
    expected = lazy_search(oracle, d, eps, delta, 200, on_step=steps.append, **kwargs)
    search, got = run_ask_tell(oracle, d, eps, delta, 200, **kwargs)
    assert_same_result(got, expected)
    assert steps == expected.history == search.history
    assert got.stopped == search.stopped == "certified" and got.certificate.certified
    assert got.trainings == search.trainings == len(got.train_weights)


def test_ask_tell_with_std_errors_is_bit_identical():
    oracle = with_se(pnorm_oracle(2.0), 0.002)
    expected = lazy_search(oracle, 3, 0.1, 0.03, 100, z=2.0)
    _, got = run_ask_tell(oracle, 3, 0.1, 0.03, 100, z=2.0)
    assert_same_result(got, expected)
    assert got.std_errors.shape == got.values.shape and got.certificate.z == 2.0


def test_pre_refactor_regression_pin():
    """Trainings, sources and members of coverage.lazy_search before the core split (d = 2)."""
    result = lazy_search(pnorm_oracle(2.0), 2, 0.1, 0.03, 300)
    assert result.trainings == 5 and result.members.tolist() == [3, 4]
    assert [s["source"] for s in result.history] == ["extreme"] * 2 + ["grid"] * 3


def test_ask_is_idempotent_until_told():
    search = LazySearch(3, 0.1, 0.03, 50)
    first = search.ask()
    first[:] = -1.0  # the caller may scribble on what it got
    again = search.ask()
    assert np.array_equal(again, [1.0, 0.0, 0.0]) and np.array_equal(search.ask(), again)
    assert search.trainings == 0 and search.history == [] and not search.done
    step = search.tell(again, pnorm_oracle(2.0)(again))
    assert step == {"step": 1, "weight": [1.0, 0.0, 0.0], "source": "extreme", "worst_slack_before": None}
    assert np.array_equal(search.ask(), [0.0, 1.0, 0.0])


def test_tell_rejects_what_was_not_asked():
    search = LazySearch(2, 0.1, 0.03, 50)
    with pytest.raises(ValueError, match="without a pending ask"):
        search.tell([1.0, 0.0], [1.0, 0.0])
    w = search.ask()
    with pytest.raises(ValueError, match="ask\\(\\) returned"):
        search.tell([0.0, 1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="ask\\(\\) returned"):
        search.tell([1.0, 0.0, 0.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="oracle values"):
        search.tell(w, [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="oracle values"):
        search.tell(w, [np.nan, 0.0])
    assert search.trainings == 0  # a rejected tell changes nothing: the same weight is still pending
    search.tell(w.tolist(), [1.0, 0.0])  # a JSON round trip of the weight is the same weight
    assert search.trainings == 1 and np.array_equal(search.ask(), [0.0, 1.0])


def test_std_errors_always_or_never():
    search = LazySearch(2, 0.1, 0.03, 50)
    search.tell(search.ask(), [1.0, 0.0], [0.01, 0.01])
    with pytest.raises(ValueError, match="always or never"):
        search.tell(search.ask(), [0.0, 1.0])
    plain = LazySearch(2, 0.1, 0.03, 50)
    plain.tell(plain.ask(), [1.0, 0.0])
    with pytest.raises(ValueError, match="always or never"):
        plain.tell(plain.ask(), [0.0, 1.0], [0.01, 0.01])
    seeded = LazySearch(2, 0.1, 0.03, 50, initial_weights=[[1.0, 0.0]], initial_values=[[1.0, 0.0]],
                        initial_std_errors=[[0.01, 0.01]])
    with pytest.raises(ValueError, match="always or never"):
        seeded.tell(seeded.ask(), [0.0, 1.0])
    with pytest.raises(ValueError, match="always or never"):
        lazy_search(lambda w: (w, np.zeros(2)) if w[0] == 1 else w, 2, 0.1, 0.03, 10)


def test_stops_certified_budget_stuck():
    sphere = pnorm_oracle(2.0)
    search, result = run_ask_tell(sphere, 3, 0.2, 0.05, 100)
    assert search.stopped == result.stopped == "certified" and result.certificate.certified
    assert search.ask() is None and search.result() is result
    with pytest.raises(ValueError, match="without a pending ask"):
        search.tell([1.0, 0.0, 0.0], [1.0, 0.0, 0.0])

    search = LazySearch(3, 0.02, 0.005, 2)
    for expected in ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0]):
        w = search.ask()
        assert np.array_equal(w, expected) and search.stopped == ""
        with pytest.raises(ValueError, match="not done"):
            search.result()
        search.tell(w, sphere(w))
    assert search.ask() is None and search.done and search.stopped == "budget"
    assert search.trainings == 2 and not search.result().full_certificate.certified

    # noise beyond the tolerance: once every positive-slack corner is trained, nothing helps
    two = np.eye(2)
    stuck, result = run_ask_tell(lambda w: (two[np.argmax(two @ w)], np.full(2, 0.05)),
                                 2, 0.05, 0.01, 50, z=2.0)
    assert stuck.stopped == result.stopped == "stuck" and stuck.trainings == 3 < 50
    assert not result.certificate.certified
    assert [s["source"] for s in result.history] == ["extreme", "extreme", "grid"]


def test_initial_rows_are_oracle_rows_not_trainings():
    sphere = pnorm_oracle(2.0)
    W0 = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    search, result = run_ask_tell(sphere, 3, 0.1, 0.03, 100, initial_weights=W0,
                                  initial_values=[sphere(w) for w in W0])
    assert np.array_equal(result.train_weights[:2], W0)
    assert result.trainings == len(result.train_weights) - 2 == len(result.history)
    assert [s["source"] for s in result.history[:2]] == ["extreme", "extreme"]  # e_2, e_3 only
    assert np.array_equal(result.history[0]["weight"], [0.0, 1.0, 0.0])
    assert result.certificate.certified
    expected = lazy_search(sphere, 3, 0.1, 0.03, 100, initial_weights=W0,
                           initial_values=[sphere(w) for w in W0])
    assert_same_result(result, expected)

    # no budget: the initial rows alone are certified or not, nothing is asked
    idle = LazySearch(3, 0.1, 0.03, 0, initial_weights=W0, initial_values=[sphere(w) for w in W0])
    assert idle.ask() is None and idle.stopped == "budget" and idle.result().trainings == 0
    with pytest.raises(ValueError, match="nothing to certify"):
        LazySearch(3, 0.1, 0.03, 0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(d=1), "d must be"), (dict(eps=0.0), "eps"), (dict(delta=-1.0), "delta"),
    (dict(max_trainings=-1), "max_trainings"), (dict(snap="nearest"), "snap"), (dict(z=-1.0), "z must be"),
    (dict(prune_method="ilp"), "prune_method"),
    (dict(initial_weights=[[0.7, 0.7]], initial_values=[[1.0, 1.0]]), "off the simplex"),
    (dict(initial_weights=[[1.0, 0.0]], initial_values=[[1.0, 1.0, 1.0]]), "initial_values"),
])
def test_search_rejects_bad_parameters(kwargs, match):
    args = dict(d=2, eps=0.1, delta=0.03, max_trainings=10)
    with pytest.raises(ValueError, match=match):
        LazySearch(**{**args, **kwargs})
