"""The router: weight validation, the per-weight guarantee against the certificate, the plots,
and `palm route` on a registered portfolio (real MLflow, SQLite in tmp)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from palm_tasks.core import certificate, simplex
from palm_tasks.serve.router import Router, WeightsError, parse_weights
from support.pools import EVALUATION, flat_sample_pool, policies_with_values

TRAITS = ["safety", "humor", "brevity"]


@pytest.mark.parametrize("weights, problem", [
    ("safety=0.5,humor=0.5,fun=0", "unknown trait(s) 'fun'"),
    ("safety=0.5,humor=0.5", "missing trait(s) brevity"),
    ("safety=0.5,humor=-0.1,brevity=0.6", "humor = -0.1 is negative"),
    ("safety=nan,humor=0.5,brevity=0.5", "safety = nan is not a finite number"),
    ("safety=inf,humor=0.5,brevity=0.5", "not a finite number"),
    ("safety=0,humor=0,brevity=0", "all weights are zero"),
    ("safety=lots,humor=0,brevity=0", "'lots' is not a number"),
    ("safety=0.5,safety=0.5,humor=0,brevity=0", "'safety' is given twice"),
    ("safety:0.5,humor=0,brevity=0", "is not TRAIT=VALUE"),
    ({"safety": 1, "humor": None, "brevity": 0}, "humor = None is not a number"),
    ({"safety": True, "humor": 0, "brevity": 0}, "is not a number"),
    ([0.5, 0.5, 0], "must be an object"),
])
def test_bad_weights_are_named(weights, problem):
    with pytest.raises(WeightsError) as err:
        parse_weights(weights, TRAITS)
    assert problem in str(err.value)


def test_weights_are_normalized_and_say_so():
    w, normalized = parse_weights("safety=0.5, humor=0.3, brevity=0.2", TRAITS)
    assert not normalized and np.allclose(w, [0.5, 0.3, 0.2])
    w, normalized = parse_weights({"brevity": 2, "safety": 1, "humor": 1}, TRAITS)
    assert normalized and np.allclose(w, [0.25, 0.25, 0.5])


def _portfolio(seed: int, n: int = 7, eps: float = 0.05, delta: float = 0.02, traits=TRAITS):
    """The portfolio the coverage stage builds (real prune + certify) from a synthetic pool."""
    from palm_tasks.config import parse_config
    from palm_tasks.paths import Paths
    from palm_tasks.stages.coverage import build

    d = len(traits)
    rng = np.random.default_rng(seed)
    W = np.vstack([np.eye(d), simplex.random_weights(d, n - d, seed)])
    R = np.clip(0.2 + 0.6 * W + 0.05 * rng.standard_normal(W.shape), 0, 1)
    root = Path(f"/nonexistent/project{seed}")
    cfg = parse_config({"traits": list(traits), "coverage": {"eps": eps, "delta": delta, "test_users": 100},
                        "evaluation": EVALUATION})
    portfolio, *_ = build(cfg, Paths(root), policies_with_values(root, W, R, list(traits)), [],
                          samples=flat_sample_pool(list(traits)))
    members = [int(k[1:]) for k in (m.key for m in portfolio.members)]
    return portfolio, certificate.certify(W, R, eps, delta, members=members)


@pytest.mark.parametrize("seed, eps", [(0, 0.05), (1, 0.3), (2, 0.1)])
def test_route_bound_agrees_with_the_certificate(seed, eps):
    portfolio, cert = _portfolio(seed, eps=eps)
    router = Router(portfolio)
    users = simplex.dirichlet_users(3, 300, seed)
    R = np.array([np.array(m.value.mean) for m in portfolio.members])
    o = portfolio.oracle
    W, RO = np.array(o.weights), np.array(o.values)
    upper = certificate.upper_bounds(users, W, (W @ RO.T).max(axis=1))
    for u, U in zip(users, upper):
        route = router.route(dict(zip(TRAITS, u)))
        best = int(np.argmax(R @ u))
        assert route.member_key == portfolio.members[best].key
        assert route.value == pytest.approx(R[best] @ u)
        assert route.opt_upper_bound == pytest.approx(U, abs=1e-9)
        # the per-weight tolerance never exceeds what the certificate states for every weight
        assert route.eps_at_w <= cert.max_eps + 1e-9
        assert route.value >= (1 - route.eps_at_w) * U - route.delta - 1e-9
        if cert.certified:
            assert route.value >= (1 - eps) * U - route.delta - 1e-9
    # at the certificate's worst corner the bound is tight
    worst = router.route(dict(zip(TRAITS, cert.worst_weight)))
    assert worst.eps_at_w == pytest.approx(cert.max_eps, abs=1e-6)


def test_a_portfolio_file_without_oracle_rows_bounds_from_its_members():
    from palm_tasks.portfolio import Portfolio

    portfolio, cert = _portfolio(3)
    # a file from before versioning: no oracle rows, and no evidence audit either
    unversioned = {k: v for k, v in portfolio.to_json().items() if k not in ("oracle", "schema_version", "evidence")}
    loose = Router(Portfolio.from_json(unversioned))
    tight = Router(portfolio)
    assert loose.portfolio.oracle.keys == tuple(m.key for m in portfolio.members)
    assert len(tight.portfolio.oracle.keys) == 7
    for u in simplex.dirichlet_users(3, 50, 3):
        a, b = loose.route(dict(zip(TRAITS, u))), tight.route(dict(zip(TRAITS, u)))
        assert a.member_key == b.member_key
        assert a.opt_upper_bound >= b.opt_upper_bound - 1e-9  # fewer constraints: looser


def test_plots_show_the_portfolio(tmp_path):
    from palm_tasks.report.plots import write_plots

    portfolio, cert = _portfolio(4, n=6)
    test = np.vstack([simplex.simplex_lattice(3, 10), simplex.dirichlet_users(3, 200, 0)])
    files = {p.name for p in write_plots(portfolio, test, 0, tmp_path)}
    assert files == {f"{n}.{e}" for n in ("simplex_map", "gap_vs_size", "member_values")
                     for e in ("json", "png")} | {"price_vs_size.json", "price_vs_compute.json", "price_of_precision.png"}
    for name in files:
        if name.endswith(".png"):
            assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    curve = json.loads((tmp_path / "gap_vs_size.json").read_text())
    assert [r["k"] for r in curve] == list(range(1, 7))
    assert curve[-1]["palm"] == 0.0  # the whole pool is its own reference
    assert all(a["palm"] >= b["palm"] - 1e-12 for a, b in zip(curve, curve[1:]))
    # the greedy PALM curve is never worse than a baseline of the same (or larger) size at k = 1
    assert curve[0]["palm"] <= min(curve[0]["uniform"], curve[0]["random"]) + 1e-12
    cells = json.loads((tmp_path / "simplex_map.json").read_text())
    assert len(cells) == len(simplex.simplex_lattice(3, 40))
    served = {c["member"] for c in cells}
    assert served <= {m.key[:10] for m in portfolio.members}
    assert max(c["eps_at_w"] for c in cells) <= cert.max_eps + 1e-6
    values = json.loads((tmp_path / "member_values.json").read_text())
    assert len(values) == 3 * len(portfolio.members)
    # the price of precision: the eps certified at confidence by the best k, beside the grid's bound
    price = json.loads((tmp_path / "price_vs_size.json").read_text())
    assert [r["k"] for r in price] == list(range(1, len(price) + 1)) and len(price) >= len(portfolio.members)
    assert price[-1]["certified_eps"] <= price[0]["certified_eps"]
    assert price == portfolio.price["by_size"]
    bound = portfolio.price["grid_bound"]
    assert [b["eps"] for b in bound] == sorted(b["eps"] for b in bound)
    assert all(a["k"] >= b["k"] for a, b in zip(bound, bound[1:]))  # a finer eps needs a larger grid


@pytest.mark.parametrize("traits", [("safety", "brevity"), ("safety", "humor", "brevity", "sentiment")])
def test_the_simplex_map_is_drawn_for_every_number_of_traits(tmp_path, traits):
    """dvc.yaml declares the map an output of every run: a segment at d = 2, a projection at d = 4."""
    from palm_tasks.report.plots import simplex_corners, write_plots

    portfolio, _ = _portfolio(0, n=6, traits=traits)
    d = len(traits)
    test = simplex.dirichlet_users(d, 100, 0)
    files = {p.name for p in write_plots(portfolio, test, 0, tmp_path)}
    assert {"simplex_map.json", "simplex_map.png"} <= files
    cells = json.loads((tmp_path / "simplex_map.json").read_text())
    assert 10 < len(cells) <= 1000 and {c["member"] for c in cells} <= {m.key[:10] for m in portfolio.members}
    for c in cells[:50]:  # each weight is drawn at the weighted mean of the corners
        assert [c["x"], c["y"]] == pytest.approx(np.array([c[t] for t in traits]) @ simplex_corners(d), abs=1e-3)


@pytest.fixture(scope="module")
def project(registered):
    return registered


def test_router_from_registry_gives_the_registered_member(project):
    from palm_tasks.registry import member_model_name, portfolio_model_name
    from palm_tasks.tracking import tracking_uri

    root, keys, cfg, result = project
    router = Router.from_registry("production", tracking_uri(cfg, root),
                                  portfolio_model_name(cfg), root=root)
    assert router.registered_version == result["portfolio_version"]
    route = router.route({"safety": 0, "humor": 1, "brevity": 0})
    assert route.member_key == keys[1]
    assert route.model_uri == f"models:/{member_model_name(cfg)}/{result['member_versions'][keys[1]]}"
    assert route.adapter_path == str(root / "models" / "members" / keys[1] / "adapter")
    assert router.base_model_path() == Path(cfg.base_model)
    with pytest.raises(LookupError, match="no portfolio registered as .*@nonesuch"):
        Router.from_registry("nonesuch", tracking_uri(cfg, root), portfolio_model_name(cfg))


def _palm(capsys, root, *args):
    """`palm ...` in this process (the real command line code, without a Python start-up)."""
    from flows.cli import main

    code = main([*args, "--root", str(root), "--params", str(root / "params.yaml")])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_palm_route_prints_member_and_guarantee(project, capsys):
    root, keys, cfg, result = project
    code, out, err = _palm(capsys, root, "route", "--weights", "safety=2,humor=1,brevity=1",
                           "--json")
    assert code == 0, err
    route = json.loads(out)
    assert route["member_key"] == keys[0] and route["normalized"] is True
    assert route["weights"] == {"safety": 0.5, "humor": 0.25, "brevity": 0.25}
    assert math.isfinite(route["opt_upper_bound"]) and route["value"] <= route["opt_upper_bound"]
    code, out, err = _palm(capsys, root, "route", "--weights", "safety=0.2,humor=0.3,brevity=0.5")
    assert code == 0, err
    assert f"member: {keys[2]}" in out and "normalized" not in out
    assert "guaranteed at these weights" in out and "certified" in out
    code, out, err = _palm(capsys, root, "route", "--weights", "safety=1,humor=1,brevity=0")
    assert out.startswith("note: the weights did not sum to 1 and were normalized")

    code, out, err = _palm(capsys, root, "route", "--weights", "safety=0.5,humor=0.5,charm=0")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        "palm: error: weights: unknown trait(s) 'charm'; the traits are safety, humor, brevity"]
    code, out, err = _palm(capsys, root, "route", "--weights", "safety=1,humor=0,brevity=0",
                           "--alias", "nonesuch")
    assert code == 1 and "no portfolio registered as palmreg-assistant-portfolio@nonesuch" in err
