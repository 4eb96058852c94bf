"""The search on noisy and imperfect oracles (docs/search.md): sound, repairs instead of looping,
terminates. Soundness is checked against the exact OPT of the front, over dense test weights."""
import numpy as np
import pytest

from support.fronts import PNormFront, true_worst_slack
from palm_tasks.core.search import LazySearch, lazy_search
from palm_tasks.core.simplex import dirichlet_users, simplex_lattice

FRONTS = [PNormFront(2, 2.0), PNormFront(3, 2.0), PNormFront(3, 3.0, [1.0, 0.7, 0.4])]


def dense(d):
    return np.vstack([simplex_lattice(d, {2: 400, 3: 60}[d]), dirichlet_users(d, 5000, seed=7)])


def noisy(front, se, z, seed):
    """Measured = true + Gaussian noise of sd se, cut at z se (the noise the certificate's z
    allows), clipped to [0, 1]; told with its se. Returns the oracle and the true values told."""
    rng = np.random.default_rng(seed)

    def oracle(w):
        true = front(w)
        noise = np.clip(rng.normal(0.0, se, len(w)), -z * se, z * se)
        return np.clip(true + noise, 0.0, 1.0), np.full(len(w), se)
    return oracle


@pytest.mark.parametrize("front", FRONTS, ids=lambda f: f"d{f.d}p{f.p:g}")
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("workers", [1, 4])
def test_noise_within_z_se_never_gives_a_false_certificate(front, seed, workers):
    se, z = 0.002, 2.0
    result = lazy_search(noisy(front, se, z, seed), front.d, 0.1, 0.03, 150, z=z, workers=workers)
    assert result.certificate.certified and result.stopped == "certified"
    true_members = front(result.train_weights[result.members])  # the policies are optimal, only measured with noise
    assert true_worst_slack(front, true_members, 0.1, 0.03, dense(front.d)) <= 1e-9


def test_untruncated_noise_stays_within_the_noise_margin():
    """Gaussian noise not cut at z se: the certificate may be wrong by the noise beyond z se only,
    and the search still ends (certified, budget or stuck), never beyond its budget."""
    front, se, z = PNormFront(3, 2.0), 0.004, 2.0
    for seed in range(4):
        rng = np.random.default_rng(seed)
        draws = []

        def oracle(w):
            noise = rng.normal(0.0, se, len(w))
            draws.append(np.abs(noise).max())
            return np.clip(front(w) + noise, 0.0, 1.0), np.full(len(w), se)
        result = lazy_search(oracle, 3, 0.1, 0.03, 60, z=z, workers=2)
        assert result.stopped in ("certified", "budget", "stuck") and result.trainings <= 60
        beyond = max(0.0, max(draws) - z * se)  # the largest excess of the noise over z se
        slack = true_worst_slack(front, front(result.train_weights[result.members]), 0.1, 0.03, dense(3))
        assert result.certificate.certified
        assert slack <= 2 * beyond + 1e-9


def imperfect(front, p_short, max_short, seed):
    """An oracle that, with probability p_short, returns a policy short of optimal by a random
    fraction up to max_short (measured exactly: se 0.001)."""
    rng = np.random.default_rng(seed)

    def oracle(w):
        v = front(w)
        if rng.uniform() < p_short:
            v = v * (1.0 - rng.uniform(0.05, max_short))
        return v, np.full(len(w), 0.001)
    return oracle


def reference_below(front, gap):
    """Best-of-N evidence: OPT(w) - gap at every weight (se 0.001)."""
    def reference(W):
        W = np.atleast_2d(W)
        return front.opt(W) - gap, np.full(len(W), 0.001)
    return reference


@pytest.mark.parametrize("front", FRONTS[1:], ids=lambda f: f"p{f.p:g}")
@pytest.mark.parametrize("workers", [1, 4])
def test_imperfect_oracle_is_repaired_and_the_certificate_is_sound_up_to_the_evidence(front, workers):
    """Rows short of optimal are repaired (at most max_repairs times each); with evidence that is
    gap below OPT, a certificate is wrong by at most (1 - eps) gap against the exact OPT."""
    gap, eps, delta = 0.01, 0.1, 0.03
    repaired = 0
    for seed in range(3):
        search = LazySearch(front.d, eps, delta, 120, reference=reference_below(front, gap),
                            max_repairs=2, z_significant=2.0)
        oracle = imperfect(front, 0.3, 0.3, seed)
        told = {}
        while batch := search.ask_batch(workers):
            for w in batch:
                values, se = oracle(w)
                step = search.tell(w, values, se)
                if step["source"] != "repair" or step["kept"] == "new":
                    told[tuple(np.round(w, 12))] = values
        result = search.result()
        assert result.stopped in ("certified", "budget", "stuck") and result.trainings <= 120
        assert max(search.repairs) <= 2
        repaired += sum(s["source"] == "repair" for s in result.history)
        members = result.values[result.members]  # the measured values are the policies' true values here
        assert result.certificate.certified
        assert true_worst_slack(front, members, eps, delta, dense(front.d)) <= (1 - eps) * gap + 1e-9
    assert repaired > 0


def test_a_hopeless_oracle_ends_without_looping():
    """Every training is 40% short and best-of-N knows it: rows are repaired max_repairs times,
    then the search stops (stuck or budget), uncertified, without training forever."""
    front = PNormFront(3, 2.0)
    calls = []

    def oracle(w):
        calls.append(w)
        return 0.6 * front(w), np.full(3, 0.001)
    result = lazy_search(oracle, 3, 0.05, 0.02, 500, reference=reference_below(front, 0.0),
                         max_repairs=1, workers=4)
    assert len(calls) == result.trainings < 500 and result.stopped in ("stuck", "certified")
    assert not result.certificate.certified
    assert len(result.beaten) > 0 and all(b["repairs"] == 1 for b in result.beaten)


def test_the_row_furthest_short_of_the_evidence_is_repaired_first():
    """With budget for one repair and rows that serve only their own corner, it goes to the row
    with the largest shortfall (here the second extreme, 40 % short), not to the first row."""
    front = PNormFront(3, 2.0)
    short = {0: 0.9, 1: 0.6, 2: 0.8}  # value kept of the optimum, per extreme

    def oracle(w):
        return short[int(np.argmax(w))] * front(w), np.full(3, 0.001)
    search = LazySearch(3, 0.05, 0.02, 4, reference=reference_below(front, 0.0), max_repairs=1)
    for _ in range(3):
        w = search.ask()
        search.tell(w, *oracle(w))
    w = search.ask()
    assert search.pending["source"] == "repair" and search.pending["row"] == 1
    assert np.allclose(w, np.eye(3)[1])
    # and the order of a batch of repairs is the same: 40 %, 20 %, 10 % short
    search = LazySearch(3, 0.05, 0.02, 12, reference=reference_below(front, 0.0), max_repairs=1)
    for w in search.ask_batch(3):
        search.tell(w, *oracle(w))
    search.ask_batch(3)
    assert [p["row"] for p in search.pending_all] == [1, 2, 0]


def test_the_row_that_limits_the_worst_gap_is_repaired_before_one_further_short():
    """d = 2, every policy keeps most of both traits (as on `safety`). The safety row is 15 %
    short at its own weight, the relevance row 10 %; but near w = safety the relevance row serves
    within 6 %, so the worst gap (10 %, at w = relevance) falls only if the relevance row is
    repaired. The search repairs it first, although it is neither the row furthest short nor the
    first row told."""
    lo, span = np.array([0.55, 0.93]), np.array([0.22, 0.06])

    def reference(W):  # OPT of the front lo + span * (a quarter circle)
        W = np.atleast_2d(W)
        return W @ lo + np.linalg.norm(W * span, axis=1), np.full(len(W), 0.001)
    search = LazySearch(2, 0.05, 0.02, 3, reference=reference, max_repairs=1)
    assert len(search.ask_batch(2)) == 2
    search.tell(np.array([0.0, 1.0]), np.array([0.55, 0.99 * 0.85]), np.full(2, 0.001))  # row 0: safety
    search.tell(np.array([1.0, 0.0]), np.array([0.77 * 0.9, 0.93]), np.full(2, 0.001))  # row 1: relevance
    b = search.beaten()
    assert list(b.beaten) == [True, True] and b.shortfall[0] / 0.99 > b.shortfall[1] / 0.77
    w = search.ask()
    assert search.pending["source"] == "repair" and search.pending["row"] == 1
    assert np.allclose(w, [1.0, 0.0])
