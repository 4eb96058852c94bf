"""Parallel proposals (docs/theory.md section 12, docs/search.md): ask_batch(n) for n workers."""
import numpy as np
import pytest

from support.fronts import PNormFront
from palm_tasks.core.search import SAME_WEIGHT, LazySearch, lazy_search

from test_search import assert_same_result, run_ask_tell


def run_batches(front, n, *args, order=1, **kwargs):
    """The loop of a caller with n workers: ask a batch, train all of it, tell each (in `order`)."""
    search = LazySearch(*args, **kwargs)
    sizes = []
    while batch := search.ask_batch(n):
        sizes.append(len(batch))
        for w in batch[::order]:
            search.tell(w, front(w))
    return search, search.result(), sizes


@pytest.mark.parametrize("front,d,eps,delta", [
    (PNormFront(2, 2.0), 2, 0.05, 0.02), (PNormFront(3, 3.0, [1.0, 0.7, 0.4]), 3, 0.05, 0.02)])
def test_one_worker_is_the_one_at_a_time_search(front, d, eps, delta):
    _, expected = run_ask_tell(front, d, eps, delta, 200)
    got = lazy_search(front, d, eps, delta, 200, workers=1)
    assert_same_result(got, expected)
    assert got.rounds == got.trainings == expected.rounds


@pytest.mark.parametrize("n", [2, 4, 8])
def test_batches_are_new_distinct_within_budget_and_certify(n):
    front = PNormFront(3, 2.0)
    search = LazySearch(3, 0.05, 0.02, 60)
    seen = []
    while batch := search.ask_batch(n):
        assert 1 <= len(batch) <= n
        for i, w in enumerate(batch):
            assert not any(np.abs(w - t).max() <= SAME_WEIGHT for t in search.W)  # never trained
            assert not any(np.abs(w - u).max() <= SAME_WEIGHT for u in batch[:i])  # distinct
        assert search.trainings + len(batch) <= 60
        seen += batch
        for w in reversed(batch):  # any order
            search.tell(w, front(w))
    result = search.result()
    assert result.stopped == "certified" and result.certificate.certified
    assert result.trainings == len(seen) and result.rounds < result.trainings
    # pretended values never reach the result: every row is exactly what was told
    assert np.array_equal(result.values, front(result.train_weights))


def test_rounds_and_trainings_against_one_worker():
    """The issue's target on the sphere and the p = 4 ball at d = 3: with 8 workers at most a
    third of the rounds of one worker, and at most 25% more trainings."""
    for front in (PNormFront(3, 2.0), PNormFront(3, 4.0)):
        one = lazy_search(front, 3, 0.05, 0.02, 200, workers=1)
        eight = lazy_search(front, 3, 0.05, 0.02, 200, workers=8)
        assert one.certificate.certified and eight.certificate.certified
        assert eight.rounds <= one.trainings / 3
        assert eight.trainings <= 1.25 * one.trainings


def test_a_batch_never_exceeds_the_budget_and_stops_on_it():
    front = PNormFront(3, 2.0)
    search, result, sizes = run_batches(front, 8, 3, 0.02, 0.005, 7)
    assert sizes[0] == 3 and all(k <= 8 for k in sizes) and sum(sizes) == result.trainings == 7 and result.stopped == "budget"


def test_ask_returns_the_first_pending_of_a_batch_and_tell_takes_any():
    front = PNormFront(3, 2.0)
    search = LazySearch(3, 0.1, 0.03, 50)
    batch = search.ask_batch(5)
    assert len(batch) == 3 and np.array_equal(np.array(batch), np.eye(3))  # a round of extremes
    assert np.array_equal(search.ask(), batch[0]) and len(search.pending_all) == 3
    search.tell(batch[2], front(batch[2]))
    assert [p["weight"].tolist() for p in search.pending_all] == [batch[0].tolist(), batch[1].tolist()]
    assert search.pending["source"] == "extreme" and search.rounds == 1
    again = search.ask_batch(5)  # pending ones first, no new round while some are pending
    assert len(again) == 2 and search.rounds == 1
    with pytest.raises(ValueError, match="ask\\(\\) returned"):
        search.tell([0.5, 0.5, 0.0], [0.7, 0.7, 0.0])


def test_a_batch_repairs_several_beaten_rows_at_once():
    tries = {}

    def short_at_extremes(w):  # each extreme's first training is 40% short of optimal
        key = tuple(np.round(w, 9))
        tries[key] = tries.get(key, 0) + 1
        v = w / np.linalg.norm(w)
        return (0.6 * v if w.max() == 1.0 and tries[key] == 1 else v), np.full(3, 0.002)

    def reference(W):
        W = np.atleast_2d(W)
        return np.linalg.norm(W, axis=1) * 0.99, np.full(len(W), 0.002)

    search = LazySearch(3, 0.1, 0.03, 40, reference=reference, max_repairs=1)
    for w in search.ask_batch(4):
        search.tell(w, *short_at_extremes(w))
    repairs = search.ask_batch(4)
    assert [p["source"] for p in search.pending_all][:3] == ["repair"] * 3
    assert sorted(p["row"] for p in search.pending_all[:3]) == [0, 1, 2]
    for w in repairs:
        search.tell(w, *short_at_extremes(w))
    assert search.repairs == [1, 1, 1] + [0] * (len(search.W) - 3)
    while batch := search.ask_batch(4):
        for w in batch:
            search.tell(w, *short_at_extremes(w))
    assert search.result().certificate.certified and search.result().beaten == []


@pytest.mark.parametrize("n", [0, -1, 1.5, True, None, "2"])
def test_ask_batch_rejects_a_bad_worker_count(n):
    with pytest.raises(ValueError, match="n \\(the number of workers\\)"):
        LazySearch(3, 0.1, 0.03, 10).ask_batch(n)


@pytest.mark.parametrize("workers", [0, -2, 2.0])
def test_lazy_search_rejects_a_bad_worker_count(workers):
    with pytest.raises(ValueError, match="workers"):
        lazy_search(PNormFront(2), 2, 0.1, 0.03, 10, workers=workers)
