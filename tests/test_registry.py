"""The register stage: real MLflow (SQLite store in tmp_path), policies trained by the real align
stage on a tiny Llama, portfolios built by the real coverage stage."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from palm_tasks import schema  # noqa: E402
from palm_tasks.config import parse_config  # noqa: E402
from palm_tasks.paths import Paths  # noqa: E402
from palm_tasks.registry import (  # noqa: E402
    RegistryUnavailableError,
    base_model_name,
    load_member,
    member_model_name,
    portfolio_model_name,
    register_portfolio,
    registered_base_dir,
)
from palm_tasks.stages.coverage import build  # noqa: E402


@pytest.fixture(scope="module")
def project(tmp_path_factory, prepared_project):
    """A project whose real align stage trained four policies (the three specialists and one
    more uniform weight), with values set by the test (conftest.specialist_values)."""
    from conftest import trained_project

    root, _, policies = trained_project(prepared_project, tmp_path_factory.mktemp("project") / "p", 4)
    return root, policies


@pytest.fixture(scope="module")
def cfg():
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    # tiny-model answers are gibberish: the gate is the tiny settings' (conftest.TINY_OVERRIDES)
    return parse_config({"mlflow": {"registered_model_prefix": "palmtest"},
                         "gate": {"max_degenerate_share": 1.0, "min_relevance_ratio": 0.0}})


def _write_portfolio(root: Path, policies, members: list[int], cfg, delta: float):
    """The portfolio the coverage stage builds with these members, at this delta (0.6 certifies
    the three specialists, 1 certifies anything, 0 certifies none of these)."""
    at = parse_config({**cfg.model_dump(), "coverage": {**cfg.coverage.model_dump(), "delta": delta}})
    portfolio, *_ = build(at, Paths(root), policies, [], members=members)
    schema.write(Paths(root).portfolio, portfolio)
    return portfolio


def _counts(cfg):
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    return {
        "runs": len(client.search_runs(experiment_ids)),
        "versions": len(client.search_model_versions()),
        "logged_models": len(mlflow.search_logged_models(experiment_ids=experiment_ids,
                                                         output_format="list")),
    }


def test_register_is_idempotent_and_moves_production_only_when_certified(project, cfg):
    from mlflow import MlflowClient

    root, policies = project
    keys = [p.key for p in policies]
    first = _write_portfolio(root, policies, [0, 1, 2], cfg, delta=0.6)
    assert first.certificate.certified
    result = register_portfolio(cfg, root)
    assert result["alias"] == "production" and result["warning"] is None
    assert result["portfolio_id"] == first.id
    assert set(result["member_versions"]) == set(keys[:3])
    # the base (run, logged model, version); 3 logged adapters (into the members' training runs)
    # + 3 versions; 1 portfolio run + model + version
    assert result["created"] == 3 + 6 + 3

    client = MlflowClient()
    members, portfolios = member_model_name(cfg), portfolio_model_name(cfg)
    assert (members, portfolios) == ("palmtest-assistant-member", "palmtest-assistant-portfolio")
    entry = first.members[2]  # the brevity specialist
    version = client.get_model_version(members, result["member_versions"][entry.key])
    assert version.tags["member_key"] == entry.key
    assert version.tags["portfolio_id"] == first.id
    assert version.tags["w.brevity"] == "1.0000"
    assert float(version.tags["value.humor"]) == pytest.approx(entry.value.mean[1], abs=1e-4)
    assert version.tags["se.safety"] == f"{entry.value.se[0]:.4f}"  # constant tables: se 0
    assert version.tags["certified"] == "true" and version.tags["in_production"] == "true"
    assert f"Serves {100 * entry.share:.1f}% of users" in version.description
    assert (f"(eps, delta) = ({cfg.coverage.eps:g}, 0.6) covering with confidence 1 - alpha = "
            f"{1 - cfg.coverage.alpha:g}, relative to the oracle and the evidence") in version.description
    # share of the simplex: each weight of a lattice goes to one member, so the shares add to 1
    shares = [float(client.get_model_version(members, v).tags["share_simplex"])
              for v in result["member_versions"].values()]
    assert sum(shares) == pytest.approx(1, abs=1e-3) and min(shares) > 0
    assert f"{100 * float(version.tags['share_simplex']):.1f}% of the simplex" in version.description
    production = client.get_model_version_by_alias(portfolios, "production")
    assert str(production.version) == result["portfolio_version"]
    assert production.tags["portfolio_id"] == first.id
    assert production.tags["members"] == ",".join(m.key for m in first.members)
    run = client.get_run(client.get_model_version(members, version.version).run_id)
    assert run.info.run_name == f"align-{entry.key[:10]}"  # logged into the member's training run
    portfolio_run = client.get_run(production.run_id)
    assert portfolio_run.info.run_name == f"portfolio-{first.id[:10]}"
    assert portfolio_run.data.metrics["coverage.max_multiplicative_gap"] == pytest.approx(
        first.coverage["max_multiplicative_gap"])
    artifacts = {a.path for a in client.list_artifacts(production.run_id)}
    assert {"portfolio.json", "plots"} <= artifacts

    before = _counts(cfg)
    again = register_portfolio(cfg, root)
    assert again["created"] == 0 and _counts(cfg) == before
    assert again["member_versions"] == result["member_versions"]
    assert again["portfolio_version"] == result["portfolio_version"]

    # A new, uncertified portfolio sharing a member: registered, but production stays. Its new
    # member's training run is in the store, so its adapter is logged there.
    training_run = policies[3].training["mlflow_run_id"]
    second = _write_portfolio(root, policies, [0, 3], cfg, delta=0.0)
    assert not second.certificate.certified
    candidate = register_portfolio(cfg, root)
    assert candidate["alias"] == "candidate" and "not certified at eps" in candidate["warning"]
    assert candidate["member_versions"][keys[0]] == result["member_versions"][keys[0]]
    assert candidate["created"] == 2 + 3  # new member (model, version) + portfolio (run, ...)
    assert str(client.get_model_version_by_alias(portfolios, "production").version) == \
        result["portfolio_version"]
    assert str(client.get_model_version_by_alias(portfolios, "candidate").version) == \
        candidate["portfolio_version"]
    shared = client.get_model_version(members, result["member_versions"][keys[0]])
    assert shared.tags["portfolio_id"] == second.id
    assert shared.tags["portfolios"] == f"{first.id},{second.id}"
    assert shared.tags["in_production"] == "true"  # still in the production portfolio
    new = client.get_model_version(members, candidate["member_versions"][keys[3]])
    assert new.tags["in_production"] == "false"
    assert new.run_id == training_run

    # The router model of the production portfolio routes by the one rule (best w . values here).
    import mlflow
    import pandas as pd

    router = mlflow.pyfunc.load_model(f"models:/{portfolios}@production")
    routed = router.predict(pd.DataFrame({"safety": [0.9, 0.0], "humor": [0.1, 1.0],
                                          "brevity": [0.0, 0.0]}))
    assert list(routed["member_key"]) == [keys[0], keys[1]]
    assert routed["model_uri"][0] == f"models:/{members}/{result['member_versions'][keys[0]]}"

    # A certified successor moves production; members that left it are marked so.
    assert _write_portfolio(root, policies, [1, 3], cfg, delta=1.0).certificate.certified
    third = register_portfolio(cfg, root)
    assert third["alias"] == "production" and third["created"] == 3
    assert str(client.get_model_version_by_alias(portfolios, "production").version) == \
        third["portfolio_version"]
    in_production = {v.tags["member_key"]: v.tags["in_production"]
                     for v in client.search_model_versions(f"name = '{members}'")}
    assert in_production == {keys[0]: "false", keys[1]: "true", keys[2]: "false",
                             keys[3]: "true"}


def test_registered_member_loads_offline_and_generates(project, cfg):
    import mlflow
    from mlflow import MlflowClient

    root, policies = project
    keys = [p.key for p in policies]
    _write_portfolio(root, policies, [0, 1, 2], cfg, delta=0.6)
    result = register_portfolio(cfg, root)
    uri = f"models:/{member_model_name(cfg)}/{result['member_versions'][keys[1]]}"
    local = Path(mlflow.artifacts.download_artifacts(uri))
    shipped = {p.name for p in local.rglob("*") if p.is_file()}
    assert "adapter_model.safetensors" in shipped and "model.safetensors" not in shipped
    assert not [n for n in shipped if n.endswith((".bin", ".pkl", ".pt"))]

    from peft import PeftModel

    # the base is a registered version of its own, named by the member's tag; its weights are
    # in the store (a copy of the project needs no path outside it)
    client = MlflowClient()
    base_uri = client.get_model_version(member_model_name(cfg), result["member_versions"][keys[1]]).tags[
        "base_model_uri"]
    assert base_uri == f"models:/{base_model_name(cfg)}/{result['base_version']}"
    base_files = {p.name for p in registered_base_dir(base_uri).rglob("*") if p.is_file()}
    assert {"model.safetensors", "tokenizer.json"} <= base_files
    for pipe in (load_member(uri), mlflow.transformers.load_model(uri)):
        assert isinstance(pipe.model, PeftModel)
        out = pipe("Tell me a joke", max_new_tokens=4, do_sample=False)
        assert out[0]["generated_text"].startswith("Tell me a joke")
    assert client.get_registered_model(member_model_name(cfg)).description
    # one base version for every portfolio on this base: registering again adds none
    assert register_portfolio(cfg, root)["base_version"] == result["base_version"]
    assert len(client.search_model_versions(f"name = '{base_model_name(cfg)}'")) == 1


def test_missing_adapter_and_unreachable_store_explain_what_to_do(project, cfg, tmp_path,
                                                                  monkeypatch):
    root, policies = project
    keys = [p.key for p in policies]
    _write_portfolio(root, policies, [0, 1, 2], cfg, delta=0.6)
    adapter = root / "models" / "members" / keys[2] / "adapter" / "adapter_model.safetensors"
    hidden = adapter.with_suffix(".hidden")
    adapter.rename(hidden)
    try:
        with pytest.raises(FileNotFoundError, match=keys[2]):
            register_portfolio(cfg, root)
    finally:
        hidden.rename(adapter)

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri sets it
    bad = parse_config({"mlflow": {"tracking_uri": f"sqlite:///{blocker}/mlflow.db"}})
    with pytest.raises(RegistryUnavailableError, match="palm stage register"):
        register_portfolio(bad, root)
    down = parse_config({"mlflow": {"tracking_uri": "http://127.0.0.1:9"}})  # nothing listens
    with pytest.raises(RegistryUnavailableError, match="safe on disk"):
        register_portfolio(down, root)


def test_pyfunc_router_and_shares_route_alike(project):
    """One routing rule: the registered pyfunc, the Router and the users' shares in portfolio.json
    all serve w with the member of the best w . R (the routing rule the certificate checks)."""
    import mlflow
    import numpy as np
    import pandas as pd

    from palm_tasks.core import simplex
    from palm_tasks.serve.router import Router

    root, policies = project
    cfg = parse_config({"mlflow": {"registered_model_prefix": "palmz"}, "coverage": {"delta": 1.0},
                        "gate": {"max_degenerate_share": 1.0, "min_relevance_ratio": 0.0}})
    portfolio = _write_portfolio(root, policies[:4], [0, 1, 2, 3], cfg, delta=1.0)
    register_portfolio(cfg, root)
    lattice = simplex.simplex_lattice(3, 10)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{portfolio_model_name(cfg)}@production")
    by_pyfunc = list(pyfunc.predict(pd.DataFrame(lattice, columns=list(portfolio.traits)))["member_key"])
    router = Router.from_portfolio(Paths(root).portfolio)
    by_router = [router.route(dict(zip(portfolio.traits, w))).member_key for w in lattice]
    _, R, _ = portfolio.member_arrays
    scores = np.sort(lattice @ R.T, axis=1)
    clear = scores[:, -1] - scores[:, -2] > 1e-9  # where one member is best (ties: either)
    by_values = [portfolio.members[i].key for i in np.argmax(lattice @ R.T, axis=1)]
    assert by_pyfunc == by_router
    assert [k for k, c in zip(by_router, clear) if c] == [k for k, c in zip(by_values, clear) if c]
    assert len(set(by_router)) >= 3  # the specialists each serve their corner: the comparison is not trivial
    users = simplex.dirichlet_users(3, cfg.coverage.test_users, cfg.seed)
    routed = [router.route(dict(zip(portfolio.traits, u))).member_key for u in users]
    assert [m.share for m in portfolio.members] == pytest.approx(
        [routed.count(m.key) / len(users) for m in portfolio.members], abs=1e-6)
