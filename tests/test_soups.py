"""Rewarded-Soups candidates on the tiny model: exact adapter mixing, seeded evaluation, stored
and reused like members, offered to the coverage stage as non-oracle candidates."""

import json

import numpy as np
import pytest
import yaml

from conftest import make_project
from palm_tasks.params_yaml import load_config
from palm_tasks.llm import soups as S
from palm_tasks.schema import load_soups


def test_lambdas_are_the_mixed_lattice_points_most_mixed_first():
    lam = S.soup_lambdas(3, 4, 100)
    assert len(lam) == 15 - 3 and np.allclose(lam.sum(axis=1), 1) and (lam.max(axis=1) < 1).all()
    assert np.allclose(lam[:3], [[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]])
    assert len(S.soup_lambdas(3, 4, 2)) == 2 and len(S.soup_lambdas(2, 2, 6)) == 1


def _random_adapter(base_path, out_dir, rank, alpha, seed):
    """A LoRA adapter with random A and B (PEFT initializes B to zero unless told not to)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path),
                           LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear",
                                      init_lora_weights=False, task_type="CAUSAL_LM"))
    model.save_pretrained(out_dir)
    return out_dir


def test_a_soup_adapter_is_the_exact_interpolation_of_the_weight_deltas(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapters = [_random_adapter(tiny_model, tmp_path / f"a{i}", rank, alpha, seed=i)
                for i, (rank, alpha) in enumerate([(2, 4), (4, 4), (3, 9)])]
    lambdas = [0.5, 0.3, 0.2]
    S.mix_adapters(adapters, lambdas, tmp_path / "soup")
    deltas = [S.lora_delta(a) for a in adapters]
    soup = S.lora_delta(tmp_path / "soup")
    assert set(soup) == set(deltas[0]) and len(soup) > 0
    for name, delta in soup.items():
        expected = sum(lam * d[name] for lam, d in zip(lambdas, deltas))
        np.testing.assert_allclose(delta, expected, atol=1e-6)
    # PEFT reads the soup the same way: merged weights = base + sum_i lambda_i DeltaW_i
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model).named_parameters())
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                       tmp_path / "soup").merge_and_unload()
    name = next(n for n in soup if "q_proj" in n)
    module = name.split("base_model.model.", 1)[1]
    weight = dict(merged.named_parameters())[module]
    np.testing.assert_allclose(weight.detach().double().numpy(),
                               base[module].detach().double().numpy() + soup[name], atol=1e-5)
    assert json.loads((tmp_path / "soup" / "adapter_config.json").read_text())["r"] == 9


def test_mixing_refuses_adapters_of_different_shapes(tiny_model, tmp_path):
    a = _random_adapter(tiny_model, tmp_path / "a", 2, 4, seed=0)
    b = tmp_path / "b"
    b.mkdir()
    config = json.loads((a / "adapter_config.json").read_text())
    (b / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj"]}))
    (b / "adapter_model.safetensors").write_bytes((a / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="differ in target_modules"):
        S.mix_adapters([a, b], [0.5, 0.5], tmp_path / "soup")


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model):
    """A tiny project with the 2 specialists trained (d = 2: brevity, readability)."""
    from palm_tasks.stages import STAGES

    root = make_project(tmp_path_factory.mktemp("soups") / "project", tiny_model)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["traits"] = ["brevity", "readability"]
    params["search"].update({"mode": "coarse", "coarse_divisions": 1})  # the 2 extremes only
    params["soups"].update({"divisions": 4, "max_soups": 2})
    params["device"] = "cpu"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cfg = load_config(root / "params.yaml")
    for stage in ("rewards", "grid", "align"):
        STAGES[stage].run(cfg, root)
    return root, cfg


def test_soups_are_evaluated_stored_and_reused(project):
    from palm_tasks.jobs import load_policy
    from palm_tasks.stages import soups
    from palm_tasks.schema import load_pool

    root, cfg = project
    first = soups.run(cfg, root)
    made = load_soups(root)
    assert first["built"] == 2 and first["reused"] == 0 and made.note is None
    assert [list(p.lambdas) for p in made.policies] == [[0.5, 0.5], [0.75, 0.25]]
    by_weights = {tuple(np.round(p.weights, 6)): p.key for p in load_pool(root).policies}
    ingredients = [by_weights[(1.0, 0.0)], by_weights[(0.0, 1.0)]]  # e_1, e_2
    assert made.history["ingredients"] == ingredients
    for soup in made.policies:
        stored = load_policy(root / "models" / "soups" / soup.key)  # checksums verified
        assert stored == soup and soup.kind == "soup" and list(soup.ingredients) == ingredients
        assert np.allclose(soup.weights, soup.lambdas)  # sum_i lambda_i e_i
        assert np.all((soup.values >= 0) & (soup.values <= 1)) and np.all(soup.std_errors >= 0)
        assert soup.value.n == cfg.evaluation.n_prompts
        assert not list(soup.path.rglob("*.bin"))
    mtimes = {p: p.stat().st_mtime_ns for p in (root / "models" / "soups").rglob("*.safetensors")}
    again = soups.run(cfg, root)
    assert again["built"] == 0 and again["reused"] == 2
    assert load_soups(root).keys == made.keys
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_evaluation_is_seeded_so_the_same_soup_gives_the_same_value_vector(project, tmp_path):
    from palm_tasks.jobs import Job, run_job
    from palm_tasks.paths import Paths
    from palm_tasks.schema import load_pool

    root, cfg = project
    dirs = [Paths(root).relative(p.path) for p in load_pool(root).policies[:2]]
    one, two = (run_job(cfg, root, Job.soup(dirs, [0.3, 0.7], store=f"models/copy-{i}")) for i in (1, 2))
    assert one.key == two.key and one.path != two.path  # made twice, in two stores
    np.testing.assert_array_equal(one.values, two.values)
    np.testing.assert_array_equal(one.std_errors, two.std_errors)
    lines = lambda m: (m.path / "completions.jsonl").read_text()  # noqa: E731
    assert lines(one) == lines(two)


def test_coverage_offers_soups_as_non_oracle_candidates(project):
    from palm_tasks.stages import coverage, soups
    from palm_tasks.portfolio import load_portfolio

    root, cfg = project
    soups.run(cfg, root)
    metrics = coverage.run(cfg, root)
    portfolio = load_portfolio(root)
    candidates = load_soups(root).keys
    assert portfolio.soups["candidates"] == candidates and len(candidates) == 2
    assert portfolio.soups["candidate_share"] == pytest.approx(2 / 4)
    # soups are candidates, never oracle rows: the upper bound uses the trained members only
    assert portfolio.certificate.n_oracle == 2 and portfolio.oracle.keys == portfolio.pool
    assert portfolio.soup_rows.keys == tuple(candidates)
    kinds = [m.kind for m in portfolio.members]
    assert metrics["soups_in_portfolio"] == kinds.count("soup") == portfolio.soups["in_portfolio"]
    assert metrics["soup_candidates"] == 2 and metrics["pool_size"] == 2
    for m in portfolio.members:
        assert (root / m.path / "adapter" / "adapter_model.safetensors").is_file()


def test_soups_disabled_or_without_specialists(project, tmp_path):
    from dataclasses import replace

    from palm_tasks import schema
    from palm_tasks.config import parse_config
    from palm_tasks.paths import Paths
    from palm_tasks.stages import coverage, soups
    from palm_tasks.schema import load_pool

    root, cfg = project
    off = parse_config({**cfg.model_dump(), "soups": {"enabled": False}})
    assert off.soups.enabled is False and soups.run(off, root)["soups"] == 0
    assert "soups.enabled is false" in load_soups(root).note
    assert coverage.run(off, root)["soup_candidates"] == 0
    pool = load_pool(root)
    schema.write(Paths(root).pool, replace(pool, policies=pool.policies[1:]))  # no e_1 specialist
    try:
        assert soups.run(cfg, root)["soups"] == 0
        assert "specialist" in load_soups(root).note
    finally:
        schema.write(Paths(root).pool, pool)


def test_a_soup_in_a_portfolio_registers_with_its_recipe(project):
    """The register stage on a portfolio whose only member is a soup (the coverage stage builds
    it with that member chosen: whether a soup wins on the tiny model is chance)."""
    import mlflow

    from palm_tasks import schema
    from palm_tasks.paths import Paths
    from palm_tasks.registry import register_portfolio
    from palm_tasks.stages import coverage, soups
    from palm_tasks.schema import load_pool
    from palm_tasks.tracking import tracking_uri

    root, cfg = project
    soups.run(cfg, root)
    trained, made = load_pool(root).policies, load_soups(root).policies
    portfolio, *_ = coverage.build(cfg, Paths(root), trained, made, members=[len(trained)])
    schema.write(Paths(root).portfolio, portfolio)
    soup = made[0]
    result = register_portfolio(cfg, root)
    client = mlflow.MlflowClient(tracking_uri(cfg, root), registry_uri=tracking_uri(cfg, root))
    version = client.get_model_version(f"palm-{cfg.task}-member", result["member_versions"][soup.key])
    assert version.tags["kind"] == "soup" and version.tags["member_key"] == soup.key
    assert version.tags["ingredients"] == ",".join(soup.ingredients)
    assert [float(x) for x in version.tags["lambdas"].split(",")] == list(soup.lambdas)
