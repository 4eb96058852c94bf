"""The evaluate stage: metric functions, the report, and the whole comparison through Prefect on
a tiny model."""

import json

import numpy as np
import pytest
import yaml

from conftest import make_project
from support.chunks import measured_values
from palm_tasks.core import metrics as E
from palm_tasks.core import simplex
from palm_tasks.core.evidence import best_of_n
from palm_tasks.schema import load_samples
from palm_tasks.report import evaluation as report


def test_distinct_n_counts_repeated_ngrams_once():
    assert E.distinct_n(["a b c", "a b c"], 2) == pytest.approx(2 / 4)
    assert E.distinct_n(["A b", "a B"], 1) == pytest.approx(2 / 4)  # case-insensitive
    assert E.distinct_n(["one", ""], 2) == 0.0  # no bigram at all
    assert E.distinct_n(["a b c d"], 2) == 1.0


def test_embedding_dispersion_is_mean_pairwise_cosine_distance():
    e1, e2 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    same = np.stack([[e1, e2], [e1, e2]])  # 2 members, 2 prompts, identical answers
    assert E.embedding_dispersion(same) == pytest.approx(0.0)
    orthogonal = np.stack([[e1, e1], [e2, e2]])
    assert E.embedding_dispersion(orthogonal) == pytest.approx(1.0)
    three = np.stack([[e1], [e2], [-e1]])  # pairs: 1, 2, 1
    assert E.embedding_dispersion(three) == pytest.approx(4 / 3)
    assert E.embedding_dispersion(same[:1]) == 0.0
    with pytest.raises(ValueError, match="members, prompts, dim"):
        E.embedding_dispersion(np.zeros((2, 3)))


def test_best_subset_and_gap_summary():
    R = np.array([[1.0, 0.0], [0.0, 1.0], [0.55, 0.55], [0.5, 0.5]])
    sel = simplex.simplex_lattice(2, 10)
    one = E.best_subset(R, 1, sel)
    assert one == [2]  # the balanced policy is the best single model
    assert E.best_subset(R, 3, sel) == [0, 1, 2]  # the dominated row is never needed
    assert E.best_subset(R, 9, sel) == [0, 1, 2, 3]  # at most the pool
    order = E.greedy_order(R, 9, sel)  # the best of each size is a prefix of one order
    assert all(sorted(order[:k]) == E.best_subset(R, k, sel) for k in range(1, 5))
    lattice, users = simplex.simplex_lattice(2, 10), simplex.dirichlet_users(2, 50, 0)
    s = E.gap_summary(R, [2], lattice, users)
    g = E.gaps(R, [2], np.vstack([lattice, users]))
    assert s["max_multiplicative_gap"] == pytest.approx(g.max_multiplicative) == pytest.approx(1 - 0.55)
    gu = E.gaps(R, [2], users)
    assert s["mean_additive_gap"] == pytest.approx(gu.mean_additive)
    assert s["mean_additive_gap_se"] == pytest.approx(gu.additive.std(ddof=1) / np.sqrt(50))
    assert E.gap_summary(R, [0, 1, 2], lattice, users)["max_additive_gap"] == 0.0


def test_worst_gap_se_at_the_worst_weight():
    R = np.array([[0.8, 0.2], [0.3, 0.9]])
    SE = np.array([[0.03, 0.01], [0.02, 0.04]])
    w = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    # member 0 alone: worst at w = (0, 1), 0.2 against row 1's 0.9
    se = E.worst_gap_se(R, SE, [0], w)
    assert se == pytest.approx(np.hypot(0.01 / 0.9, 0.2 * 0.04 / 0.9 ** 2))
    # best-of-N worth 0.95 ± 0.005 at every weight: the worst is still at (0, 1), now against 0.95
    ref, ref_se = np.full(3, 0.95), np.full(3, 0.005)
    se_ref = E.worst_gap_se(R, SE, [0], w, ref, ref_se)
    assert se_ref == pytest.approx(np.hypot(0.01 / 0.95, 0.2 * 0.005 / 0.95 ** 2))
    assert E.worst_gap_se(R, SE, [0, 1], w) == 0.0  # the pool is its own best: no gap, no noise
    with pytest.raises(ValueError, match="shaped like values"):
        E.worst_gap_se(R, SE[:1], [0], w)
    with pytest.raises(ValueError, match="go together"):
        E.worst_gap_se(R, SE, [0], w, ref)
    lattice, users = simplex.simplex_lattice(2, 10), simplex.dirichlet_users(2, 50, 0)
    s = E.gap_summary(R, [0], lattice, users, std_errors=SE)
    assert s["max_multiplicative_gap_se"] == pytest.approx(E.worst_gap_se(R, SE, [0], np.vstack([lattice, users])))
    s = E.gap_summary(R, [0], lattice, users, reference=lambda W: np.full(len(W), 0.95), std_errors=SE,
                      reference_se=lambda W: np.full(len(W), 0.005))
    assert s["max_multiplicative_gap_se"] == pytest.approx(se_ref)
    assert "max_multiplicative_gap_se" not in E.gap_summary(R, [0], lattice, users)  # no se's given
    with pytest.raises(ValueError, match="go together"):
        E.gap_summary(R, [0], lattice, users, reference=lambda W: np.full(len(W), 0.95), std_errors=SE)


def test_mean_gap_noise_se_is_the_values_noise_that_more_users_do_not_average_away():
    R = np.array([[0.5, 0.5], [0.2, 0.3]])
    quiet = np.zeros_like(R)
    few, many = simplex.dirichlet_users(2, 20, 0), simplex.dirichlet_users(2, 2000, 0)
    flat, flat_se = (lambda W: np.ones(len(W))), (lambda W: np.full(len(W), 0.1))
    # exact values, exact reference: no noise to carry
    assert E.mean_gap_noise_se(R, quiet, [0], many, flat(many), np.zeros(len(many))) == (0.0, 0.0)
    # member 0 is worth 0.5 everywhere against best-of-N 1 ± 0.1 shared by all weights:
    # the delta method gives 0.5 / 1^2 x 0.1 = 0.05 for the mean multiplicative gap, 0.1 for the additive
    for users in (few, many):
        mult, add = E.mean_gap_noise_se(R, quiet, [0], users, flat(users), flat_se(users), draws=2000)
        assert mult == pytest.approx(0.05, rel=0.1) and add == pytest.approx(0.1, rel=0.1)
    # against the pool: the member's own noise, the same for every user, moves the mean as much
    SE = np.array([[0.0, 0.0], [0.05, 0.05]])
    # 1 - P1(w)/0.5 with P1(w) = w . (0.2 + 0.05 z1, 0.3 + 0.05 z2): the mean over users moves by
    # 0.05 (z1 mean(w1) + z2 mean(w2)), mean(w) = (0.5, 0.5), so its sd is 0.05 x sqrt(0.5) / 0.5
    mult, _ = E.mean_gap_noise_se(R, SE, [1], many, draws=2000)
    assert mult == pytest.approx(0.05 * np.sqrt(0.5) / 0.5, rel=0.1)
    assert E.mean_gap_noise_se(R, SE, [1], many, seed=3) == E.mean_gap_noise_se(R, SE, [1], many, seed=3)
    assert E.mean_gap_noise_se(R, SE, [1], many, draws=1) == (0.0, 0.0)
    with pytest.raises(ValueError, match="shaped like values"):
        E.mean_gap_noise_se(R, SE[:1], [1], many)
    with pytest.raises(ValueError, match="go together"):
        E.mean_gap_noise_se(R, SE, [1], many, flat(many))
    # gap_summary's mean-gap se: the users' se alone without std_errors, both combined with them
    lattice = simplex.simplex_lattice(2, 10)
    users_only = E.gap_summary(R, [1], lattice, many)
    both = E.gap_summary(R, [1], lattice, many, std_errors=SE, noise_draws=2000)
    noise = E.mean_gap_noise_se(R, SE, [1], many, draws=2000)
    assert both["mean_multiplicative_gap_se"] == pytest.approx(np.hypot(users_only["mean_multiplicative_gap_se"],
                                                                         noise[0]))
    assert both["mean_multiplicative_gap_se"] > 5 * users_only["mean_multiplicative_gap_se"]  # 2000 users
    assert both["mean_additive_gap_se"] == pytest.approx(np.hypot(users_only["mean_additive_gap_se"], noise[1]))
    assert E.gap_summary(R, [1], lattice, many, std_errors=SE, noise_draws=0)["mean_multiplicative_gap_se"] \
        == users_only["mean_multiplicative_gap_se"]


def test_gaps_against_a_reference_value_per_test_weight():
    R = np.array([[1.0, 0.0], [0.0, 1.0]])
    w = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    g = E.gaps(R, [0], w, reference=[0.8, 0.8, 0.8])  # best-of-N worth 0.8 everywhere
    # w1: member 1.0 beats the reference; w2: 0.5 against max(0.5, 0.8); w3: 0 against max(1, 0.8)
    assert g.multiplicative == pytest.approx([0.0, 1 - 0.5 / 0.8, 1.0])
    assert g.additive == pytest.approx([0.0, 0.3, 1.0])
    assert E.gaps(R, [0, 1], w, reference=[0.0, 0.8, 0.0]).max_multiplicative == pytest.approx(1 - 0.5 / 0.8)
    with pytest.raises(ValueError, match="one finite value per test weight"):
        E.gaps(R, [0], w, reference=[0.8, 0.8])
    with pytest.raises(ValueError, match="one finite value per test weight"):
        E.gaps(R, [0], w, reference=[0.8, np.nan, 0.8])


def test_user_populations_are_where_their_names_say():
    pops = simplex.user_populations(3, 2000, 7, 0.1, 10.0)
    assert list(pops) == ["dirichlet_1", "concentrated", "centred", "mixture"]
    for name, users in pops.items():
        assert users.shape == (2000, 3) and (users >= 0).all(), name
        assert np.allclose(users.sum(axis=1), 1.0), name
    assert np.array_equal(pops["dirichlet_1"], simplex.dirichlet_users(3, 2000, 7))  # coverage's users
    top = {name: users.max(axis=1).mean() for name, users in pops.items()}
    # concentrated users put most weight on one trait, centred ones spread it, the mixture between
    assert top["concentrated"] > 0.85 and top["centred"] < 0.55
    assert top["centred"] < top["dirichlet_1"] < top["concentrated"]
    assert top["centred"] < top["mixture"] < top["concentrated"]
    again = simplex.user_populations(3, 2000, 7, 0.1, 10.0)
    assert all(np.array_equal(pops[n], again[n]) for n in pops)
    other = simplex.user_populations(3, 2000, 8, 0.1, 10.0)
    assert not np.array_equal(pops["mixture"], other["mixture"])
    # a population's draws do not depend on another's alpha
    assert np.array_equal(simplex.user_populations(3, 50, 7, 0.2, 10.0)["centred"],
                          simplex.user_populations(3, 50, 7, 0.1, 10.0)["centred"])


def test_gap_summary_per_population_against_a_reference():
    R = np.array([[1.0, 0.0], [0.0, 1.0]])
    lattice = simplex.simplex_lattice(2, 10)
    pops = {"left": np.array([[0.9, 0.1], [1.0, 0.0]]), "right": np.array([[0.1, 0.9], [0.2, 0.8]])}
    s = E.gap_summary(R, [0], lattice, pops["left"], populations=pops)
    assert s["left_worst_gap"] == pytest.approx(0.0) and s["left_mean_gap"] == pytest.approx(0.0)
    assert s["right_worst_gap"] == pytest.approx(1 - 0.1 / 0.9)
    assert s["right_mean_gap"] == pytest.approx(np.mean([1 - 0.1 / 0.9, 1 - 0.2 / 0.8]))
    assert s["right_mean_gap_se"] > 0
    flat = E.gap_summary(R, [0], lattice, pops["left"], reference=lambda w: np.full(len(w), 0.95),
                         populations=pops)
    # against a best-of-N worth 0.95 everywhere the left users (value 0.9, 1.0) fall short too
    assert flat["left_worst_gap"] == pytest.approx(1 - 0.9 / 0.95)
    assert flat["max_multiplicative_gap"] >= s["max_multiplicative_gap"]
    assert "left_worst_gap_se" not in flat  # no std_errors given: no se claimed
    SE = np.array([[0.02, 0.01], [0.01, 0.03]])
    noisy = E.gap_summary(R, [0], lattice, pops["left"], populations=pops, std_errors=SE)
    # each population's worst gap carries the se at its own worst user, not the lattice's worst weight
    for name, users in pops.items():
        assert noisy[f"{name}_worst_gap_se"] == pytest.approx(E.worst_gap_se(R, SE, [0], users)), name
    assert noisy["left_worst_gap_se"] == 0.0  # member 0 is the best for every left user
    assert noisy["right_worst_gap_se"] > 0
    assert noisy["right_worst_gap_se"] != pytest.approx(noisy["max_multiplicative_gap_se"])


def test_spread_subset_starts_at_extremes_and_perplexity_se():
    points = simplex.simplex_lattice(3, 4)
    chosen = E.spread_subset(points, 4)
    assert len(chosen) == 4 and np.allclose(chosen[:3], np.eye(3))
    assert len(E.spread_subset(points, 100)) == len(points)
    R = np.array([[1.0, 0.0], [0.0, 1.0]])
    users = simplex.dirichlet_users(2, 400, 0)
    p, se = E.perplexity_with_se(R, [0, 1], users, 50, 0)
    assert p == pytest.approx(E.usage_perplexity(R, [0, 1], users)) and 1.9 < p <= 2.0
    assert 0 < se < 0.05
    assert E.perplexity_with_se(R, [0], users, 50, 0) == (1.0, 0.0)


def test_tables_reading_and_simplex_plot(tmp_path):
    row = lambda gap, size: {"size": size, "trainings": size, "max_multiplicative_gap": gap,  # noqa: E731
                             "mean_multiplicative_gap": gap / 2, "mean_multiplicative_gap_se": 0.01,
                             "max_additive_gap": gap, "mean_additive_gap": gap / 3,
                             "usage_perplexity": 1.5, "distinct_n": 0.5, "embedding_dispersion": 0.2}
    out = {"task": "assistant", "traits": ["a", "b", "c"], "d": 3, "eps": 0.05, "delta": 0.02, "ks": [1, 2],
           "methods": ["palm_lazy", "uniform", "oracle"], "omitted": {"soups": "not here"},
           "notes": {"palm_lazy": "x"}, "random_seeds": [1],
           "results": {"palm_lazy": {"1": row(0.3, 1), "2": row(0.1, 2)},
                       "uniform": {"1": row(0.2, 1), "2": row(0.15, 2)},
                       "oracle": {"all": row(0.0, 4)}},
           "reference_pool": {"size": 4, "new_in_this_run": 4, "reused": 0},
           "test_weights": {"relative_to": "the pool", "lattice_step": "1/10", "lattice": 66, "users": 10,
                            "users_seed": 0}, "seconds": 3.0}
    lines = report.reading(out)
    assert "k = 1" in lines[0] and "uniform grid" in lines[0] and "beaten by uniform grid" in lines[0]
    assert "k = 2" in lines[1] and "not beaten" in lines[1]
    assert lines[1].endswith("ahead of uniform grid by more than 2 se.")  # no se measured: any lead counts
    noisy = {m: {k: {**r, "max_multiplicative_gap_se": 0.04} for k, r in by_k.items()}
             for m, by_k in out["results"].items()}
    lines = report.reading({**out, "results": noisy})  # 0.1 and 0.05 apart; 2 se = 2 x 0.057
    assert "beaten by uniform grid (within 2 se)" in lines[0]
    assert lines[1].endswith("not beaten by a baseline, ahead of no baseline by more than 2 se.")
    seeds = {"1": {**row(0.25, 1), "max_multiplicative_gap_seed_se": 0.1},
             "2": {**row(0.05, 2), "max_multiplicative_gap_seed_se": 0.01}}
    lines = report.reading({**out, "methods": ["palm_lazy", "random"], "results": {**out["results"], "random": seeds}})
    assert "beaten by random (within 2 se)" in lines[0]  # 0.05 apart, its se over seeds 0.1
    assert "beaten by random, ahead of no baseline" in lines[1]  # 0.05 apart, se 0.01
    md = report.render_report(out, ["g.png"])
    assert "Alignment-oracle check" not in md  # no check in out: nothing said
    assert "Evidence check" not in md and "Simulated user populations" not in md
    pop = {"dirichlet_1_mean_gap": 0.02, "dirichlet_1_mean_gap_se": 0.003, "dirichlet_1_worst_gap": 0.09}
    with_pops = {**out, "populations": {"names": ["dirichlet_1"], "users_each": 10, "concentrated_alpha": 0.1,
                                        "centred_alpha": 10.0, "are": "dirichlet_1: Dirichlet(1)"},
                 "results": {**out["results"], "uniform": {"1": {**row(0.2, 1), **pop}, "2": row(0.15, 2)}}}
    md_pops = report.render_report(with_pops, ["g.png"])
    assert "### Dirichlet(1) users" in md_pops and "| uniform grid | 0.0200 ± 0.0030 / 0.0900 |  |" in md_pops
    pop_se = {**with_pops, "results": {**out["results"], "uniform": {
        "1": {**row(0.2, 1), **pop, "dirichlet_1_worst_gap_se": 0.011}, "2": row(0.15, 2)}}}
    assert "| uniform grid | 0.0200 ± 0.0030 / 0.0900 ± 0.0110 |  |" in report.render_report(pop_se, ["g.png"])
    assert "Against the reference pool only" not in md  # no pool-only figures in these rows
    pool_only = {**out, "results": {**out["results"], "uniform": {
        "1": {**row(0.2, 1), "pool_max_multiplicative_gap": 0.125}, "2": row(0.15, 2)}}}
    md_pool = report.render_report(pool_only, ["g.png"])
    assert "Against the reference pool only" in md_pool and "| uniform grid | 0.1250 | - |" in md_pool
    audit = {"members": ["a", "b"], "certified": True, "eps": 0.05, "delta": 0.02, "test_weights": 1021,
             "evidence_eps": 0.031, "evidence_eps_weight": {"a": 0.31, "b": 0.69},
             "evidence_eps_against": "best-of-8 of the base", "contradicted": False}
    line = report.certificate_reading({**out, "certificate_audit": audit})[0]
    assert "its 2-member portfolio, certified by the lazy search at eps = 0.05, delta = 0.02" in line
    assert "all 1,021 test weights for eps = 0.0310 (the tightest at (0.31, 0.69), against best-of-8" in line
    assert line.endswith("**the promise holds against the evidence**.")
    broken = report.certificate_reading({**out, "certificate_audit": {**audit, "evidence_eps": 0.09,
                                                                       "contradicted": True}})[0]
    assert broken.endswith("**the evidence contradicts the promise** (a paired decision that (1 - eps) E(w) - P(w) > delta).")
    noisy = report.certificate_reading({**out, "certificate_audit": {**audit, "evidence_eps": 0.06}})[0]
    assert noisy.endswith("above eps = 0.05 on the means, but no paired decision says so at the audit's confidence "
                          "(not a contradiction).")
    loose = report.certificate_reading({**out, "certificate_audit": {**audit, "certified": False,
                                                                      "evidence_eps": 0.09, "contradicted": True}})[0]
    assert "not certified by the lazy search" in loose and "promise" not in loose
    assert report.certificate_reading(out) == []  # no lazy search ran: nothing said
    ec = {"checked": 5, "beaten": 2, "beaten_by_best_of_n": 1, "split": {"alpha": 0.01},
          "worst": {"key": "k1", "weights": [0.0, 1.0, 0.0], "shortfall": 0.05, "lower": 0.012, "n": 192,
                    "by": "best-of-8 of the base"}}
    text = " ".join(report.evidence_reading({**out, "evidence_check": ec}))
    assert "**2 of the 5 trained policies fall short of the evidence at their own weight** (a paired decision" in text
    assert "1 of them are beaten by best-of-N" in text and "alpha 0.01 split over them" in text
    assert "k1 at (0.00, 1.00, 0.00), by 0.050 (at least 0.012 on 192 prompts) against best-of-8 of the base" in text
    assert "none of the 5" in " ".join(report.evidence_reading({**out, "evidence_check": {**ec, "beaten": 0}}))
    assert "| PALM (lazy + prune) | 1 | 1 | 0.3000 |" in md and "0.1500 ± 0.0100" in md
    assert "0.01-0.02" in md and "Rewarded Soups: left out: not here" in md
    assert report.plot_rows(out) == [{"k": 1, "palm_lazy": 0.3, "uniform": 0.2, "palm_lazy_mean": 0.15,
                                 "uniform_mean": 0.1},
                                {"k": 2, "palm_lazy": 0.1, "uniform": 0.15, "palm_lazy_mean": 0.05,
                                 "uniform_mean": 0.075}]
    path = report.simplex_plot({**out, "ks": [2]}, np.eye(3), {"palm_lazy": [0, 1], "uniform": [1, 2]},
                               tmp_path / "s.png")
    assert path.is_file() and path.stat().st_size > 1000
    assert report.gap_plot(out, tmp_path / "g.png").stat().st_size > 1000


@pytest.mark.slow
def test_evaluate_stage_through_prefect(tmp_path, tiny_model, prefect_harness):
    import mlflow

    from flows.stages import STAGE_FLOWS
    from palm_tasks.params_yaml import load_config
    from palm_tasks.jobs import load_policy
    from palm_tasks.tracking import tracking_uri

    root = make_project(tmp_path / "project", tiny_model)
    params = yaml.safe_load((root / "params.yaml").read_text())
    # d = 3 without the humor classifier to train; safety varies even on a tiny model's babble
    params.update({"task": "gsm", "traits": ["correctness", "brevity", "safety"]})
    params["search"]["max_trainings"] = 3
    params["training"]["learning_rate"] = 0.05  # so that 2 steps move the tiny policies apart
    params["compare"] = {"k_max": 2, "random_seeds": 2, "grid_budget": 2, "bootstrap": 20,
                         "methods": ["palm_lazy", "palm_grid", "uniform", "random", "centroid", "soups"]}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    p = str(root / "params.yaml")
    STAGE_FLOWS["rewards"](p, str(root))
    out = STAGE_FLOWS["evaluate"](p, str(root))

    assert out["traits"] == ["correctness", "brevity", "safety"]
    for method in ("palm_lazy", "palm_grid", "uniform", "random"):
        assert set(out["results"][method]) == {"1", "2"}, method
    assert set(out["results"]["centroid"]) == {"1"}
    # Rewarded Soups: k = 1 is the evenly mixed soup (evaluated, not trained), k = 2 two specialists
    soup_key = out["results"]["soups"]["1"]["members"][0]
    assert (root / "models" / "evaluation" / "soups" / soup_key / "member.json").is_file()
    assert soup_key in out["reference_pool"]["keys"]
    assert out["results"]["soups"]["2"]["members"] == out["results"]["uniform"]["2"]["members"]
    assert out["results"]["soups"]["1"]["trainings"] == 3
    assert out["results"]["random"]["2"]["seeds"] == 2

    # the reference pool is every trained policy, each trained once (the job cache)
    keys = out["reference_pool"]["keys"]
    # ... in the evaluate stage's own cache (no align stage ran here)
    dirs = sorted(d.name for d in (root / "models" / "evaluation" / "members").iterdir())
    assert sorted(k for k in keys if k != soup_key) == dirs and not (root / "models" / "members").exists()
    members = {k: load_policy(root / "models" / "evaluation" / ("soups" if k == soup_key else "members") / k)
               for k in keys}
    weights = {tuple(np.round(m.weights, 9)) for k, m in members.items() if k != soup_key}
    assert len(weights) == len(dirs)  # no weight trained twice
    # the uniform k = 2 portfolio (two specialists) comes from the lazy search's first jobs
    assert set(out["results"]["uniform"]["2"]["members"]) <= set(keys[:3])
    assert out["results"]["centroid"]["1"]["members"] == out["results"]["uniform"]["1"]["members"]

    # gaps against the evidence (the reference pool and best-of-N of the base's sample pool), and
    # against the pool alone, on the lattice and the users
    cfg = load_config(p)
    R = np.array([measured_values(members[k].path) for k in keys])  # measured to the cap
    users = simplex.dirichlet_users(3, cfg.coverage.test_users, cfg.seed)
    test = np.vstack([simplex.simplex_lattice(3, cfg.coverage.test_lattice), users])
    samples = load_samples(root)
    bon = best_of_n(samples.scores, test, samples.on_topic(cfg.training.min_relevance))[0]
    bon_at_test = np.einsum("md,md->m", test, bon)
    assert out["test_weights"]["best_of_n"] == samples.n and "best-of-" in out["test_weights"]["relative_to"]
    assert max(out["results"][m]["1"]["max_multiplicative_gap"] for m in ("uniform", "random", "centroid")) > 0
    for method, k in (("palm_lazy", "1"), ("palm_lazy", "2"), ("uniform", "2")):
        row = out["results"][method][k]
        idx = [keys.index(key) for key in row["members"]]
        assert row["pool_max_multiplicative_gap"] == pytest.approx(E.gaps(R, idx, test).max_multiplicative)
        against_evidence = E.gaps(R, idx, test, reference=bon_at_test).max_multiplicative
        assert row["max_multiplicative_gap"] == pytest.approx(against_evidence)
        assert row["max_multiplicative_gap"] >= row["pool_max_multiplicative_gap"] - 1e-12
        # the Dirichlet(1) population is the users above; the others are their own draws
        assert row["dirichlet_1_worst_gap"] <= row["max_multiplicative_gap"] + 1e-12
        for name in ("dirichlet_1", "concentrated", "centred", "mixture"):
            assert 0 <= row[f"{name}_mean_gap"] <= row[f"{name}_worst_gap"] + 1e-12
        assert 0 <= row["distinct_n"] <= 1 and row["embedding_dispersion"] >= 0
    # PALM's own (eps, delta) promise checked at every test weight against the whole evidence:
    # the smallest eps with P >= (1 - eps) E - delta, E the better of every policy and best-of-N
    audit = out["certificate_audit"]
    idx = [keys.index(key) for key in audit["members"]]
    assert audit["test_weights"] == len(test) and audit["eps"] == cfg.coverage.eps
    P, E_ = (test @ R[idx].T).max(axis=1), np.maximum(bon_at_test, (test @ R.T).max(axis=1))
    need = np.where(E_ > 0, 1 - (P + cfg.coverage.delta) / np.where(E_ > 0, E_, 1.0), 0.0)  # E = 0: no gap
    assert audit["evidence_eps"] == pytest.approx(max(0.0, need.max()))
    assert isinstance(audit["certified"], bool) and isinstance(audit["contradicted"], bool)
    ec = out["evidence_check"]
    assert ec["checked"] == len(dirs) and 0 <= ec["beaten_by_best_of_n"] <= ec["beaten"] <= ec["checked"]
    assert ("worst" in ec) == (ec["beaten"] > 0)
    # the correctness reward scored every eval completion of a trained member (TRL trained on it too)
    scored = [json.loads(line) for line in (members[keys[0]].path / "completions.jsonl").read_text().splitlines()]
    assert scored and all(r["rewards"]["correctness"] in (0.0, 1.0) for r in scored)
    whole = out["results"]["oracle"]["all"]  # the whole pool: no gap to itself, best-of-N may still beat it
    assert whole["pool_max_multiplicative_gap"] == 0.0 and whole["max_multiplicative_gap"] >= 0.0

    # files: DVC metrics (numbers only) and plots, the whole record, the report with its pictures, an MLflow run
    details = json.loads((root / "metrics" / "evaluate.details.json").read_text())
    assert details["results"]["palm_lazy"]["1"] == out["results"]["palm_lazy"]["1"]
    metrics = json.loads((root / "metrics" / "evaluate.json").read_text())
    assert metrics["worst_gap"]["palm_lazy"]["1"] == out["results"]["palm_lazy"]["1"]["max_multiplicative_gap"]
    rows = json.loads((root / "plots" / "evaluate_gaps.json").read_text())
    assert [r["k"] for r in rows] == [1, 2] and "palm_lazy" in rows[0]
    report = (root / "reports" / "evaluation.md").read_text()
    assert "| PALM (lazy + prune) |" in report and "evaluate_gap_vs_size.png" in report
    assert (root / "reports" / "evaluate_gap_vs_size.png").stat().st_size > 1000
    assert (root / "reports" / "evaluate_simplex.png").stat().st_size > 1000  # d = 3
    mlflow.set_tracking_uri(tracking_uri(cfg, root))
    runs = mlflow.search_runs(experiment_names=[cfg.mlflow.experiment],
                              filter_string="tags.`palm.stage` = 'evaluate'")
    assert len(runs) == 1 and runs.iloc[0]["metrics.oracle.kall.pool_max_multiplicative_gap"] == 0.0
    assert "## Simulated user populations" in report and "concentrated users" in report
    assert "Evidence check:" in report
    assert f"PALM's certificate against the evidence: its {len(idx)}-member portfolio" in report
