"""The align stage's loop with parallel proposals (docs/search.md): each round asks up to
runner.workers weights, runs their jobs in one run_jobs call and tells each."""
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import copy_project

from support.fronts import PNormFront
from palm_tasks.core.search import LazySearch, lazy_search
from palm_tasks.paths import Paths
from palm_tasks.search_loop import search_loop
from palm_tasks.stages import align


def fake_runner(root, front, short_first=()):
    """run_jobs stand-in: each job's policy is the front's optimum at its weight (a first training
    at a weight in short_first is 40% short); records the batches."""
    batches, tries = [], {}

    def run_jobs(jobs):
        batches.append(jobs)
        out = []
        for job in jobs:
            w = np.array(job.weights)
            key = tuple(np.round(w, 9))
            tries[key] = tries.get(key, 0) + 1
            v = front(w) * (0.6 if key in short_first and tries[key] == 1 else 1.0)
            path = root / "models" / "members" / f"p{sum(len(b) for b in batches)}-{len(out)}"
            out.append(SimpleNamespace(values=v, std_errors=np.full(len(w), 0.002), key=path.name, path=path,
                                       scores=None))
        return out
    return run_jobs, batches


def test_search_loop_runs_each_round_as_one_batch_of_up_to_workers_jobs(tmp_path):
    front = PNormFront(3, 2.0)
    run_jobs, batches = fake_runner(tmp_path, front)
    search = LazySearch(3, 0.05, 0.02, 60)
    rows = search_loop(search, run_jobs, Paths(tmp_path), workers=4).rows
    result = search.result()
    assert result.certificate.certified
    assert len(batches) == search.rounds < search.trainings == sum(len(b) for b in batches)
    assert max(len(b) for b in batches) == 4 and all(1 <= len(b) <= 4 for b in batches)
    assert len(rows) == len(result.train_weights)  # one policy per row, in the search's order
    assert all(np.allclose(r.values, v) for r, v in zip(rows, result.values))
    expected = lazy_search(front, 3, 0.05, 0.02, 60, workers=4)  # the core's own batch loop
    assert np.array_equal(result.train_weights, expected.train_weights) and result.rounds == expected.rounds


def test_search_loop_with_one_worker_asks_one_job_at_a_time(tmp_path):
    run_jobs, batches = fake_runner(tmp_path, PNormFront(2, 2.0))
    search = LazySearch(2, 0.05, 0.02, 30)
    search_loop(search, run_jobs, Paths(tmp_path))
    assert [len(b) for b in batches] == [1] * search.trainings and search.rounds == search.trainings


def test_a_new_weight_starts_from_the_servable_row_best_there(tmp_path):
    # search.warm_start: after the first extreme, each new weight's job starts from the adapter of the
    # servable row whose value at that weight is the best told; a row that fails the gate is
    # never a start; warm_start False: every job a fresh adapter
    front = PNormFront(2, 2.0)
    real, batches = fake_runner(tmp_path, front)
    made = []  # every policy, in the order the jobs returned them

    def run_jobs(jobs):
        made.append(real(jobs))
        return made[-1]
    gated = "p2-0"  # the second extreme's policy fails the quality gate
    search = LazySearch(2, 0.02, 0.01, 6)
    search_loop(search, run_jobs, Paths(tmp_path), servable=lambda p: p.key != gated, warm_start=True)
    # the first extreme starts fresh (nothing told), every later weight, the second extreme
    # included, from the best servable row told before it
    assert batches[0][0].policy is None and len(batches) > 2
    for b in range(1, len(batches)):
        (job,) = batches[b]
        w = np.array(job.weights)
        told = [p for out in made[:b] for p in out if p.key != gated]
        best = max(told, key=lambda p: float(p.values @ w))
        assert job.policy == f"models/members/{best.key}" and job.attempt == 0
    real, batches = fake_runner(tmp_path, front)
    search_loop(LazySearch(2, 0.02, 0.01, 6), real, Paths(tmp_path), warm_start=False)
    assert len(batches) > 2 and all(j.policy is None for b in batches for j in b)


def test_search_loop_batches_repairs_warm_started_from_their_row(tmp_path):
    front = PNormFront(3, 2.0)
    short = {tuple(np.round(e, 9)) for e in np.eye(3)}
    run_jobs, batches = fake_runner(tmp_path, front, short_first=short)

    def reference(W):
        W = np.atleast_2d(W)
        return front.opt(W) * 0.99, np.full(len(W), 0.002)
    search = LazySearch(3, 0.1, 0.03, 40, reference=reference, max_repairs=1)
    rows = search_loop(search, run_jobs, Paths(tmp_path), workers=3).rows
    assert [j.policy for j in batches[0]] == [None] * 3  # the extremes
    repairs = batches[1]
    assert len(repairs) == 3 and all(j.attempt == 1 for j in repairs)
    assert [j.policy for j in repairs] == [f"models/members/p3-{i}" for i in range(3)]  # their own rows
    assert search.repairs[:3] == [1, 1, 1] and search.result().beaten == []
    assert all(np.allclose(rows[i].values, front(np.eye(3)[i])) for i in range(3))  # the better one kept


class Stop(Exception):
    """Ends the stage once search_loop was called."""


@pytest.mark.slow
def test_the_align_stage_asks_runner_workers_weights_per_round(prepared_project, tmp_path, monkeypatch):
    from palm_tasks.params_yaml import load_config

    root = copy_project(prepared_project, tmp_path / "project", runner={"workers": 2},
                        search={"mode": "lazy", "max_trainings": 6})
    seen = {}

    def loop(search, run_jobs, paths, initial=(), workers=1, servable=None, warm_start=False):
        seen["workers"], seen["warm_start"] = workers, warm_start
        seen["first"] = search.ask_batch(workers)
        raise Stop

    monkeypatch.setattr(align, "search_loop", loop)
    with pytest.raises(Stop):
        align.run(load_config(root / "params.yaml"), root, run_jobs=lambda jobs: [])
    assert seen["workers"] == 2 and np.array_equal(np.array(seen["first"]), np.eye(3)[:2])
    assert seen["warm_start"] is True  # search.warm_start, on by default
