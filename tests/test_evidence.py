"""The evidence (best-of-N, E(w), evidence gap), the evidence-aware certificate and repair, on
synthetic pools whose answers are known (docs/evidence.md)."""

import numpy as np
import pytest

from palm_tasks.core.certificate import certify
from palm_tasks.core.evidence import beaten_rows, best_of_n, evidence, evidence_gaps, scalar
from palm_tasks.core.search import LazySearch, lazy_search


def test_best_of_n_picks_each_prompts_best_answer_under_w():
    # 2 prompts x 3 answers x 2 traits
    S = np.array([[[1.0, 0.0], [0.0, 1.0], [0.4, 0.4]],
                  [[0.2, 0.2], [0.6, 0.0], [0.0, 0.9]]])
    W = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    mean, se, scalar_se = best_of_n(S, W)
    assert mean[0].tolist() == pytest.approx([0.8, 0.0])  # answers 0 and 1
    assert mean[1].tolist() == pytest.approx([0.0, 0.95])  # answers 1 and 2
    assert mean[2].tolist() == pytest.approx([0.5, 0.45])  # ties go to the first: 0, then 2
    assert se[0].tolist() == pytest.approx([np.std([1.0, 0.6], ddof=1) / np.sqrt(2),
                                            np.std([0.0, 0.0], ddof=1) / np.sqrt(2)])
    assert scalar_se[0] == pytest.approx(np.std([1.0, 0.6], ddof=1) / np.sqrt(2))


def test_best_of_n_among_allowed_answers_falls_back_to_all_where_none_is_allowed():
    S = np.array([[[1.0, 0.0], [0.0, 1.0], [0.4, 0.4]],
                  [[0.2, 0.2], [0.6, 0.0], [0.0, 0.9]]])
    W = np.array([[1.0, 0.0], [0.0, 1.0]])
    allowed = np.array([[False, True, True],  # prompt 0: its best answer at w = e1 is off topic
                        [False, False, False]])  # prompt 1: nothing on topic -> all three
    mean, _, _ = best_of_n(S, W, allowed)
    assert mean[0].tolist() == pytest.approx([(0.4 + 0.6) / 2, (0.4 + 0.0) / 2])  # answers 2 and 1 (all)
    assert mean[1].tolist() == pytest.approx([(0.0 + 0.0) / 2, (1.0 + 0.9) / 2])  # answers 1 and 2 (all)
    assert np.array_equal(best_of_n(S, W, np.ones((2, 3), bool))[0], best_of_n(S, W)[0])
    with pytest.raises(ValueError, match="allowed must have shape"):
        best_of_n(S, W, np.ones((2, 2), bool))


def test_best_of_n_refuses_bad_shapes():
    with pytest.raises(ValueError, match="prompts, N, d"):
        best_of_n(np.zeros((3, 2)), np.eye(2))
    with pytest.raises(ValueError, match="traits"):
        best_of_n(np.zeros((3, 2, 2)), np.eye(3))


def test_evidence_takes_the_larger_and_names_its_source():
    W = np.array([[1.0, 0.0], [0.0, 1.0]])
    R = np.array([[0.9, 0.1], [0.2, 0.3]])
    SE = np.full((2, 2), 0.01)
    ev = evidence(W, R, SE, bon_value=[0.5, 0.7], bon_se=[0.02, 0.03])
    assert ev.value.tolist() == pytest.approx([0.9, 0.7])
    assert ev.source.tolist() == [0, -1]  # policy 0 at e_1, best-of-N at e_2
    assert ev.se.tolist() == pytest.approx([0.01, 0.03])
    gaps = evidence_gaps([0.9, 0.35], ev.value)
    assert gaps.tolist() == pytest.approx([0.0, 0.5])


def test_beaten_rows_need_more_than_z_se_and_never_beat_themselves():
    W = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    R = np.array([[0.80, 0.1], [0.1, 0.50], [0.5, 0.5]])
    SE = np.full((3, 2), 0.01)
    ref = np.array([0.79, 0.60, 0.40])  # best-of-N: beats row 1 by 0.1, not rows 0 and 2
    ev = evidence(W, R, SE, ref, np.full(3, 0.01))
    b = beaten_rows(W, R, SE, ev, z=2.0)
    assert b.beaten.tolist() == [False, True, False]
    assert b.shortfall[1] == pytest.approx(0.1)
    assert b.by[1] == -1
    # a shortfall inside 2 se is not beaten
    ev = evidence(W, R, SE, np.array([0.79, 0.515, 0.4]), np.full(3, 0.01))
    assert not beaten_rows(W, R, SE, ev, z=2.0).beaten.any()


def test_certificate_with_evidence_refuses_what_best_of_n_contradicts():
    # Two specialists that are optimal by the oracle assumption, certified at eps = 0.1 ...
    W = np.eye(2)
    R = np.array([[0.5, 0.45], [0.45, 0.5]])
    plain = certify(W, R, 0.1, 0.0)
    assert plain.certified
    # ... but best-of-N reaches 0.9 at e_1: the oracle row was weak, U rises, not certified.
    with_ref = certify(W, R, 0.1, 0.0, reference=np.array([0.9, 0.5]))
    assert not with_ref.certified
    assert with_ref.upper.max() >= 0.9 - 1e-9
    # a reference below what is known changes nothing
    low = certify(W, R, 0.1, 0.0, reference=np.array([0.1, 0.1]))
    assert low.max_eps == pytest.approx(plain.max_eps)


def _front_oracle(shortfall_at_first_try):
    """An oracle on the quarter circle; the first training at each weight in
    `shortfall_at_first_try` falls short by that much (then it is exact)."""
    tries = {}

    def oracle(w):
        key = tuple(np.round(w, 9))
        tries[key] = tries.get(key, 0) + 1
        v = w / np.linalg.norm(w)
        if tries[key] == 1 and key in shortfall_at_first_try:
            v = v * (1 - shortfall_at_first_try[key])
        return v, np.full(len(w), 0.005)

    return oracle, tries


def reference_of_front(W):
    W = np.atleast_2d(W)
    return np.linalg.norm(W, axis=1) * 0.99, np.full(len(W), 0.005)  # best-of-N: 1% below the front


def test_repair_retrains_a_beaten_row_exactly_once_and_keeps_the_better():
    oracle, tries = _front_oracle({(1.0, 0.0): 0.3})
    result = lazy_search(oracle, 2, 0.05, 0.0, 20, reference=reference_of_front, max_repairs=1)
    repairs = [h for h in result.history if h["source"] == "repair"]
    assert len(repairs) == 1 and repairs[0]["row"] == 0 and repairs[0]["kept"] == "new"
    assert tries[(1.0, 0.0)] == 2
    assert result.values[0].tolist() == pytest.approx([1.0, 0.0])
    assert result.beaten == []


def test_repair_never_loops_on_a_row_that_stays_beaten():
    calls = []

    def hopeless(w):  # always 30% short at e_1
        calls.append(w.copy())
        v = w / np.linalg.norm(w)
        return (v * 0.7 if w[0] == 1.0 else v), np.full(2, 0.005)

    result = lazy_search(hopeless, 2, 0.05, 0.0, 30, reference=reference_of_front, max_repairs=2)
    at_e1 = [c for c in calls if c[0] == 1.0]
    assert len(at_e1) == 3  # the first training and exactly max_repairs repairs
    assert [b["row"] for b in result.beaten] == [0]
    assert result.beaten[0]["shortfall"] == pytest.approx(0.99 - 0.7, abs=1e-9)
    # the evidence at e_1 (best-of-N 0.99) stays in the upper bound there, certified or not;
    # it holds U above every trained row's value at e_1 (0.82 at most), so nothing certifies and
    # the search stops instead of training on
    cert = result.certificate
    (at_e1,) = np.flatnonzero(np.all(np.isclose(cert.corner_weights, [1.0, 0.0]), axis=1))
    assert cert.upper[at_e1] >= 0.99 - 1e-9
    assert not cert.certified and result.stopped == "stuck"


def test_repairs_count_against_the_budget_and_are_off_by_default():
    oracle, tries = _front_oracle({(1.0, 0.0): 0.3, (0.0, 1.0): 0.3})
    result = lazy_search(oracle, 2, 0.05, 0.0, 2, reference=reference_of_front, max_repairs=1)
    assert result.trainings == 2 and result.stopped == "budget"
    assert {b["row"] for b in result.beaten} == {0, 1}
    oracle, _ = _front_oracle({(1.0, 0.0): 0.3})
    plain = lazy_search(oracle, 2, 0.05, 0.0, 20, reference=reference_of_front)
    assert not any(h["source"] == "repair" for h in plain.history)


def test_pending_names_the_row_and_who_beat_it():
    search = LazySearch(2, 0.05, 0.0, 10, reference=reference_of_front, max_repairs=1)
    w = search.ask()
    search.tell(w, [0.5, 0.0], [0.005, 0.005])  # e_1 far below best-of-N (0.99)
    w = search.ask()
    search.tell(w, [0.0, 1.0], [0.005, 0.005])
    w = search.ask()
    assert search.pending == {"weight": pytest.approx(np.array([1.0, 0.0])), "source": "repair",
                              "row": 0, "by": -1}
    step = search.tell(w, [0.2, 0.0], [0.005, 0.005])  # worse: the old row is kept
    assert step["kept"] == "old"
    assert search.R[0].tolist() == [0.5, 0.0]


def test_scalar_is_row_by_row():
    assert scalar([[1, 0], [0.5, 0.5]], [[0.2, 0.9], [0.4, 0.6]]).tolist() == pytest.approx([0.2, 0.5])


def test_a_value_vectors_se_is_over_prompts_not_over_correlated_answers():
    from palm_tasks.schema import ValueVector

    # 3 prompts x 2 answers, 1 trait: the two answers to a prompt agree, so 6 answers carry only
    # 3 prompts' worth of information
    scores = np.array([[0.1], [0.1], [0.5], [0.5], [0.9], [0.9]])
    v = ValueVector.from_scores(scores, answers_per_prompt=2)
    assert v.mean[0] == pytest.approx(0.5) and v.n == 6
    assert v.se[0] == pytest.approx(np.std([0.1, 0.5, 0.9], ddof=1) / np.sqrt(3))
    assert v.se[0] > ValueVector.from_scores(scores).se[0]  # the iid formula would understate it
    with pytest.raises(ValueError, match="groups of 4"):
        ValueVector.from_scores(scores, answers_per_prompt=4)


def test_the_audit_reports_the_gap_and_the_eps_the_evidence_asks_for_at_delta():
    # d = 2, 64 prompts whose two base answers score (1, 0) and (0, 1): best-of-2 is max(w1, w2)
    # on every prompt; the one member scores (0.5, 0.5) on every prompt. At w = (1, 0): E = 1,
    # P = 0.5, gap 0.5, and at delta 0.02 the member needs eps = 1 - (0.5 + 0.02) / 1 = 0.48.
    from palm_tasks.audit import evidence_audit
    from palm_tasks.best_of_n import BestOfN, paired_evidence
    from palm_tasks.config import parse_config
    from palm_tasks.schema import Policy, SamplePool, ScoreTable

    P = 64
    cfg = parse_config({"traits": ["safety", "humor"], "coverage": {"eps": 0.05, "delta": 0.02},
                        "training": {"min_relevance": 0}, "data": {"n_eval": P},
                        "evaluation": {"n_prompts": P, "chunk_prompts": 32}})
    scores = np.tile([[1.0, 0.0], [0.0, 1.0]], (P, 1, 1))
    samples = SamplePool(split="eval", traits=("safety", "humor"), reward_versions=("a", "b"),
                         base_model_sha256="0" * 64, sampler={}, prompts=tuple(f"p{i}" for i in range(P)),
                         completions=(("x", "y"),) * P, scores=scores, relevance=np.ones((P, 2)))

    def policy(key, weights, value):
        table = ScoreTable(("safety", "humor"), "k", 1, np.tile(value, (P, 1)), {})
        return Policy(key, "trained", ("safety", "humor"), weights, table.value).with_scores(table)

    test = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    bon = BestOfN(samples, cfg.training.min_relevance)
    paired = paired_evidence(cfg, bon)
    audit = evidence_audit(cfg, test, [policy("member", (0.5, 0.5), [0.5, 0.5])], np.array([0]), bon, paired)
    assert audit["worst_gap"] == pytest.approx(0.5) and audit["worst_weight"] == {"safety": 1.0, "humor": 0.0}
    assert audit["evidence_eps"] == pytest.approx(0.48)
    assert audit["evidence_eps_against"].startswith("best-of-2")
    assert audit["contradicted"] and audit["share_beyond_eps"] == pytest.approx(2 / 3)
    assert audit["contradiction"]["lower"] > cfg.coverage.delta  # the paired decision's lower end clears delta
    # a member at best-of-2 everywhere but (0.5, 0.5): there E = 0.5 is the member itself
    both = [policy("s", (1.0, 0.0), [1.0, 0.0]), policy("h", (0.0, 1.0), [0.0, 1.0])]
    audit = evidence_audit(cfg, test, both, np.array([0, 1]), bon, paired)
    assert audit["worst_gap"] == pytest.approx(0.0) and audit["evidence_eps"] == pytest.approx(0.0)
    assert not audit["contradicted"]
