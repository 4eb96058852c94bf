"""The floor (docs/theory.md section 11, tests/support/fronts.py) and bad input to the search."""
from itertools import combinations

import numpy as np
import pytest

from support.fronts import (FiniteFront, PNormFront, covers_matrix, minimum_cover,
                                   true_worst_slack)
from palm_tasks.core.search import LazySearch, lazy_search
from palm_tasks.core.simplex import dirichlet_users, simplex_lattice


@pytest.mark.parametrize("front", [PNormFront(2, 2.0), PNormFront(2, 4.0), PNormFront(2, 3.0, [1.0, 0.5])])
def test_floor_is_a_cover_and_no_smaller_set_of_candidates_is(front):
    eps, delta, cres, tres = 0.05, 0.02, 24, 48
    floor = minimum_cover(front, eps, delta, cres, tres)
    tests = simplex_lattice(2, tres)
    assert floor.optimal and floor.lp_bound <= floor.size + 1e-6
    assert true_worst_slack(front, floor.values, eps, delta, tests) <= 1e-9
    assert np.allclose(front(floor.weights), floor.values)
    cand = front(simplex_lattice(2, cres))
    covers = covers_matrix(cand, tests, front.opt(tests), eps, delta)
    for subset in combinations(range(len(cand)), floor.size - 1):  # brute force: nothing smaller covers
        assert not covers[list(subset)].any(axis=0).all()


def test_floor_of_a_finite_front_counts_distinct_policies():
    points = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.6, 0.6, 0.6]])
    front = FiniteFront(points)
    floor = minimum_cover(front, 0.05, 0.02, 10, 20)
    assert floor.n_candidates == 4  # the lattice's 66 weights give 4 distinct policies
    assert floor.size == 4 and floor.optimal  # each extreme is needed at its own corner, the centre at the centroid
    assert true_worst_slack(front, floor.values, 0.05, 0.02, simplex_lattice(3, 20)) <= 1e-9


def test_a_certified_search_truly_covers_and_is_no_smaller_than_the_floor_minus_one():
    front = PNormFront(3, 4.0)
    result = lazy_search(front, 3, 0.05, 0.02, 100, prune_method="exact")
    floor = minimum_cover(front, 0.05, 0.02, 20, 30)
    dense = np.vstack([simplex_lattice(3, 60), dirichlet_users(3, 5000, seed=3)])
    assert result.certificate.certified
    assert true_worst_slack(front, result.values[result.members], 0.05, 0.02, dense) <= 1e-9
    assert len(result.members) >= floor.size - 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(p=1.0), "p must be"), (dict(scales=[1.0, 1.5]), "scales"), (dict(scales=[1.0]), "scales")])
def test_fronts_reject_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PNormFront(2, **{"p": 2.0, **kwargs})


@pytest.mark.parametrize("args,match", [((0, 10), "candidate_res"), ((10, 0), "test_res"), ((1, 40), "raise candidate_res")])
def test_minimum_cover_rejects_bad_resolutions(args, match):
    with pytest.raises(ValueError, match=match):
        minimum_cover(PNormFront(2, 2.0), 0.05, 0.02, *args)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_trainings=float("nan")), "max_trainings"), (dict(max_trainings=2.5), "max_trainings"),
    (dict(max_trainings=-3), "max_trainings"), (dict(max_trainings="5"), "max_trainings"),
    (dict(consolidate=-1), "consolidate"), (dict(max_repairs=-1), "max_repairs"),
    (dict(eps=float("nan")), "eps"), (dict(delta=float("nan")), "delta"),
    (dict(initial_weights=[[np.nan, 1.0]], initial_values=[[1.0, 0.0]]), "NaN"),
    (dict(initial_weights=[[-0.5, 1.5]], initial_values=[[1.0, 0.0]]), "negative"),
    (dict(initial_weights=[[1.0, 0.0]], initial_values=[[np.nan, 0.0]]), "initial_values"),
])
def test_search_rejects_bad_input_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LazySearch(**{**dict(d=2, eps=0.1, delta=0.03, max_trainings=10), **kwargs})


def test_tell_rejects_bad_weights_values_and_std_errors():
    search = LazySearch(2, 0.1, 0.03, 10)
    w = search.ask()
    with pytest.raises(ValueError, match="not one finite weight vector"):
        search.tell([np.nan, 1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="ask\\(\\) returned"):
        search.tell([0.7, 0.7], [1.0, 0.0])  # off the simplex: never a pending weight
    with pytest.raises(ValueError, match="oracle values"):
        search.tell(w, [np.inf, 0.0])
    with pytest.raises(ValueError, match="oracle std_errors"):
        search.tell(w, [1.0, 0.0], [np.nan, 0.0])
    with pytest.raises(ValueError, match="std_errors must be >= 0"):
        search.tell(w, [1.0, 0.0], [-0.01, 0.0])
    assert search.trainings == 0 and np.array_equal(search.ask(), w)


@pytest.mark.parametrize("workers", [1, 3])
def test_consolidation_trains_more_for_a_portfolio_no_larger_and_stays_sound(workers):
    front = PNormFront(3, 3.0, [1.0, 0.7, 0.4])
    plain = lazy_search(front, 3, 0.03, 0.01, 200, prune_method="exact", workers=workers)
    merged = lazy_search(front, 3, 0.03, 0.01, 200, prune_method="exact", workers=workers, consolidate=2)
    assert plain.certificate.certified and merged.certificate.certified
    assert any(s["source"] == "consolidate" for s in merged.history)
    assert merged.trainings > plain.trainings and len(merged.members) < len(plain.members)
    dense = np.vstack([simplex_lattice(3, 60), dirichlet_users(3, 5000, seed=4)])
    assert true_worst_slack(front, merged.values[merged.members], 0.03, 0.01, dense) <= 1e-9
