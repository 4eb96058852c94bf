"""Stage 5, register: real MLflow (SQLite store in tmp_path), a tiny Llama and real LoRA adapters."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from palm_tasks.base_model import build_tiny_model, prepare_base_model  # noqa: E402
from palm_tasks.config import parse_config  # noqa: E402
from palm_tasks.registry import (  # noqa: E402
    RegistryUnavailableError,
    member_model_name,
    portfolio_model_name,
    register_portfolio,
)

TRAITS = ["safety", "humor", "brevity"]
MEMBER_WEIGHTS = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]]


def _write_member(root: Path, base: dict, weights: list[float], seed: int) -> str:
    """A member directory as the align stage writes it, with a real (random) LoRA adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    key = hashlib.sha256(json.dumps([weights, seed]).encode()).hexdigest()[:16]
    member_dir = root / "models" / "members" / key
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(root / "tiny")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, lora).save_pretrained(member_dir / "adapter")
    (member_dir / "adapter" / "training_args.bin").write_bytes(b"not to be shipped")
    values = [0.3 + 0.6 * w for w in weights]
    member = {"key": key, "traits": TRAITS, "weights": weights, "values": values,
              "std_errors": [0.02] * 3, "n_eval": 8, "base_model": base,
              "job": {"steps": 1, "seed": seed}, "mlflow_run_id": "0" * 32}
    (member_dir / "member.json").write_text(json.dumps(member))
    return key


def _write_portfolio(root: Path, keys: list[str], certified: bool, eps: float = 0.05) -> dict:
    members = [json.loads((root / "models" / "members" / k / "member.json").read_text())
               for k in keys]
    pid = hashlib.sha256(json.dumps([sorted(keys), eps, 0.02]).encode()).hexdigest()
    portfolio = {
        "id": pid, "task": "assistant", "traits": TRAITS, "eps": eps, "delta": 0.02, "z": 0.0,
        "members": [{"key": m["key"], "weights": dict(zip(TRAITS, m["weights"])),
                     "values": dict(zip(TRAITS, m["values"])),
                     "std_errors": dict(zip(TRAITS, m["std_errors"])), "share": 1 / len(keys)}
                    for m in members],
        "pool": keys,
        "certificate": {"certified": certified, "worst_weight": [1 / 3] * 3,
                        "worst_slack": -0.01 if certified else 0.05, "max_eps": eps,
                        "max_delta": 0.02, "relative_to": "the trained pool"},
        "coverage": {"test_weights": {"mean_eps": 0.01, "max_eps": 0.03}, "n_test": 231},
    }
    (root / "portfolio.json").write_text(json.dumps(portfolio))
    return portfolio


def build_registered_project(root: Path, prefix: str):
    """A project with a tiny base model, three members and a certified, registered portfolio
    (used by the router, serving and UI tests too). Returns (root, keys, cfg, result)."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    build_tiny_model(root / "tiny")
    base = prepare_base_model(str(root / "tiny"), root / "models" / "base")
    keys = [_write_member(root, base, w, seed) for seed, w in enumerate(MEMBER_WEIGHTS[:3])]
    _write_portfolio(root, keys, certified=True)
    cfg = parse_config({"mlflow": {"registered_model_prefix": prefix}})
    (root / "params.yaml").write_text(json.dumps(cfg.model_dump()))  # YAML reads JSON
    return root, keys, cfg, register_portfolio(cfg, root)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project root with a tiny base model, four trained members and a plot."""
    root = tmp_path_factory.mktemp("project")
    build_tiny_model(root / "tiny")
    base = prepare_base_model(str(root / "tiny"), root / "models" / "base")
    keys = [_write_member(root, base, w, seed) for seed, w in enumerate(MEMBER_WEIGHTS)]
    (root / "plots").mkdir()
    (root / "plots" / "coverage.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return root, keys


@pytest.fixture(scope="module")
def cfg():
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return parse_config({"mlflow": {"registered_model_prefix": "palmtest"}})


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

    root, keys = project
    first = _write_portfolio(root, keys[:3], certified=True)
    result = register_portfolio(cfg, root)
    assert result["alias"] == "production" and result["warning"] is None
    assert result["portfolio_id"] == first["id"]
    assert set(result["member_versions"]) == set(keys[:3])
    # 3 member runs + 3 logged adapters + 3 versions; 1 portfolio run + model + version
    assert result["created"] == 12

    client = MlflowClient()
    members, portfolios = member_model_name(cfg), portfolio_model_name(cfg)
    assert (members, portfolios) == ("palmtest-assistant-member", "palmtest-assistant-portfolio")
    entry = first["members"][2]
    version = client.get_model_version(members, result["member_versions"][entry["key"]])
    assert version.tags["member_key"] == entry["key"]
    assert version.tags["portfolio_id"] == first["id"]
    assert version.tags["w.brevity"] == "0.5000"
    assert float(version.tags["value.humor"]) == pytest.approx(entry["values"]["humor"], abs=1e-4)
    assert version.tags["se.safety"] == "0.0200"
    assert version.tags["certified"] == "true" and version.tags["in_production"] == "true"
    assert "Serves 33.3% of users" in version.description and "eps = 0.05" in version.description
    # share of the simplex: each weight of a lattice goes to one member, so the shares add to 1
    shares = [float(client.get_model_version(members, v).tags["share_simplex"])
              for v in result["member_versions"].values()]
    assert sum(shares) == pytest.approx(1, abs=1e-3) and min(shares) > 0
    assert f"{100 * float(version.tags['share_simplex']):.1f}% of the simplex" in version.description
    production = client.get_model_version_by_alias(portfolios, "production")
    assert str(production.version) == result["portfolio_version"]
    assert production.tags["portfolio_id"] == first["id"]
    assert production.tags["members"] == ",".join(keys[:3])
    run = client.get_run(client.get_model_version(members, version.version).run_id)
    assert run.info.run_name == f"member-{entry['key'][:10]}"  # training run not in the store
    portfolio_run = client.get_run(production.run_id)
    assert portfolio_run.info.run_name == f"portfolio-{first['id'][:10]}"
    assert portfolio_run.data.metrics["coverage.test_weights.max_eps"] == 0.03
    artifacts = {a.path for a in client.list_artifacts(production.run_id)}
    assert {"portfolio.json", "plots"} <= artifacts

    before = _counts(cfg)
    again = register_portfolio(cfg, root)
    assert again["created"] == 0 and _counts(cfg) == before
    assert again["member_versions"] == result["member_versions"]
    assert again["portfolio_version"] == result["portfolio_version"]

    # A new, uncertified portfolio sharing a member: registered, but production stays. Its new
    # member's training run is in the store, so its adapter is logged there.
    training_run = client.create_run(client.search_experiments()[0].experiment_id,
                                      run_name="align-job")
    member_json = root / "models" / "members" / keys[3] / "member.json"
    member_json.write_text(json.dumps(dict(json.loads(member_json.read_text()),
                                           mlflow_run_id=training_run.info.run_id)))
    second = _write_portfolio(root, [keys[0], keys[3]], certified=False)
    candidate = register_portfolio(cfg, root)
    assert candidate["alias"] == "candidate" and "NOT certified" in candidate["warning"]
    assert candidate["member_versions"][keys[0]] == result["member_versions"][keys[0]]
    assert candidate["created"] == 2 + 3  # new member (model, version) + portfolio (run, ...)
    assert str(client.get_model_version_by_alias(portfolios, "production").version) == \
        result["portfolio_version"]
    assert str(client.get_model_version_by_alias(portfolios, "candidate").version) == \
        candidate["portfolio_version"]
    shared = client.get_model_version(members, result["member_versions"][keys[0]])
    assert shared.tags["portfolio_id"] == second["id"]
    assert shared.tags["portfolios"] == f"{first['id']},{second['id']}"
    assert shared.tags["in_production"] == "true"  # still in the production portfolio
    new = client.get_model_version(members, candidate["member_versions"][keys[3]])
    assert new.tags["in_production"] == "false"
    assert new.run_id == training_run.info.run_id

    # The router model of the production portfolio picks the best member by w . values.
    import mlflow
    import pandas as pd

    router = mlflow.pyfunc.load_model(f"models:/{portfolios}@production")
    routed = router.predict(pd.DataFrame({"safety": [0.9, 0.0], "humor": [0.1, 1.0],
                                          "brevity": [0.0, 0.0]}))
    assert list(routed["member_key"]) == [keys[0], keys[1]]
    assert routed["model_uri"][0] == f"models:/{members}/{result['member_versions'][keys[0]]}"

    # A certified successor moves production; members that left it are marked so.
    _write_portfolio(root, [keys[1], keys[3]], certified=True)
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

    root, keys = project
    _write_portfolio(root, keys[:3], certified=True)
    result = register_portfolio(cfg, root)
    uri = f"models:/{member_model_name(cfg)}/{result['member_versions'][keys[1]]}"
    local = Path(mlflow.artifacts.download_artifacts(uri))
    shipped = {p.name for p in local.rglob("*") if p.is_file()}
    assert "adapter_model.safetensors" in shipped and "model.safetensors" not in shipped
    assert not [n for n in shipped if n.endswith((".bin", ".pkl", ".pt"))]

    from peft import PeftModel

    pipe = mlflow.transformers.load_model(uri)
    assert isinstance(pipe.model, PeftModel)
    out = pipe("Tell me a joke", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("Tell me a joke")
    assert MlflowClient().get_registered_model(member_model_name(cfg)).description


def test_missing_adapter_and_unreachable_store_explain_what_to_do(project, cfg, tmp_path,
                                                                  monkeypatch):
    root, keys = project
    _write_portfolio(root, keys[:3], certified=True)
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
