"""Rewarded-Soups candidates on the tiny model: exact adapter mixing, seeded evaluation, stored
and reused like members, offered to the coverage stage as non-oracle candidates."""

import json

import numpy as np
import pytest
import yaml

from conftest import make_project
from palm_tasks import soups as S
from palm_tasks.config import load_config


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
    from palm_tasks import stages

    root = make_project(tmp_path_factory.mktemp("soups") / "project", tiny_model)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["traits"] = ["brevity", "readability"]
    params["search"].update({"mode": "coarse", "coarse_divisions": 1})  # the 2 extremes only
    params["soups"].update({"divisions": 4, "max_soups": 2})
    params["device"] = "cpu"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cfg = load_config(root / "params.yaml")
    # the rewards stage's inputs for align, without its base-model scoring and MLflow run
    from palm_tasks.base_model import prepare_base_model
    from palm_tasks.prompts import prepare_prompts
    from palm_tasks.layout import Layout

    lay = Layout(root)
    prepare_base_model(cfg.base_model, lay.base)
    prepare_prompts(cfg.task, lay.prompts, cfg.data.n_train, cfg.data.n_eval, cfg.seed)
    for stage in ("grid", "align"):
        stages.STAGE_FUNCTIONS[stage](cfg, root)
    return root, cfg


def test_soups_are_evaluated_stored_and_reused(project):
    from palm_tasks import stages
    from palm_tasks.align import load_member

    root, cfg = project
    first = stages.soups_stage(cfg, root)
    assert first["built"] == 2 and first["reused"] == 0 and first["skipped"] is None
    assert [list(x) for x in first["lambdas"]] == [[0.5, 0.5], [0.75, 0.25]]
    align = json.loads((root / "metrics" / "align.json").read_text())
    by_weights = dict(zip(map(tuple, np.array(align["weights"]).round(6)), align["pool"]))
    assert first["ingredients"] == [by_weights[(1.0, 0.0)], by_weights[(0.0, 1.0)]]  # e_1, e_2
    for key, lambdas in zip(first["soups"], first["lambdas"]):
        soup = load_member(root / "models" / "soups" / key)  # checksums verified
        assert soup.info["kind"] == "soup" and soup.info["ingredients"] == first["ingredients"]
        assert np.allclose(soup.weights, lambdas)  # sum_i lambda_i e_i
        assert np.all((soup.values >= 0) & (soup.values <= 1)) and np.all(soup.std_errors >= 0)
        assert soup.info["n_eval"] == cfg.evaluation.n_prompts
        assert not list(soup.path.rglob("*.bin"))
    mtimes = {p: p.stat().st_mtime_ns for p in (root / "models" / "soups").rglob("*.safetensors")}
    again = stages.soups_stage(cfg, root)
    assert again["built"] == 0 and again["reused"] == 2 and again["soups"] == first["soups"]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_evaluation_is_seeded_so_the_same_soup_gives_the_same_value_vector(project, tmp_path):
    from palm_tasks import stages
    from palm_tasks.align import load_member
    from palm_tasks.base_model import resolve_base_model
    from palm_tasks.prompts import read_prompts

    root, cfg = project
    pool = stages.load_pool(root)
    jobs = stages.JobFactory(cfg, root)
    args = (cfg, resolve_base_model(root / "models" / "base"), pool[:2], [0.5, 0.5], jobs.rewards,
            read_prompts(root / "data" / "prompts" / "eval.jsonl"))
    one, two = S.build_soup(*args, tmp_path / "one"), S.build_soup(*args, tmp_path / "two")
    assert one.key == two.key
    np.testing.assert_array_equal(one.values, two.values)
    np.testing.assert_array_equal(one.std_errors, two.std_errors)
    lines = lambda m: (m.path / "completions.jsonl").read_text()  # noqa: E731
    assert lines(one) == lines(two)
    stored = json.loads((root / "metrics" / "soups.json").read_text())
    if one.key in stored["soups"]:  # the stage's copy, evaluated in another call, agrees too
        np.testing.assert_array_equal(load_member(root / "models" / "soups" / one.key).values, one.values)


def test_coverage_offers_soups_as_non_oracle_candidates(project):
    from palm_tasks import stages

    root, cfg = project
    stages.soups_stage(cfg, root)
    metrics = stages.coverage_stage(cfg, root)
    portfolio = json.loads((root / "portfolio.json").read_text())
    soups = json.loads((root / "metrics" / "soups.json").read_text())["soups"]
    assert portfolio["soups"]["candidates"] == soups and len(soups) == 2
    assert portfolio["soups"]["candidate_share"] == pytest.approx(2 / 4)
    # soups are candidates, never oracle rows: the upper bound uses the trained members only
    assert portfolio["certificate"]["n_oracle"] == 2 and portfolio["oracle"]["keys"] == portfolio["pool"]
    kinds = [m["kind"] for m in portfolio["members"]]
    assert metrics["soups_in_portfolio"] == kinds.count("soup") == portfolio["soups"]["in_portfolio"]
    assert metrics["soup_candidates"] == 2 and metrics["pool_size"] == 2
    for m in portfolio["members"]:
        assert (root / m["path"] / "adapter" / "adapter_model.safetensors").is_file()


def test_soups_disabled_or_without_specialists(project):
    from palm_tasks import stages
    from palm_tasks.config import parse_config

    root, cfg = project
    off = parse_config({**cfg.model_dump(), "soups": {"enabled": False}})
    assert stages.soups_stage(off, root)["soups"] == []
    assert stages.coverage_stage(off, root)["soup_candidates"] == 0
    pool = stages.load_pool(root)
    made = S.make_soups(cfg, None, pool[1:], [], [], root / "models" / "soups")
    assert made["soups"] == [] and "specialist" in made["skipped"]


def test_a_soup_in_a_portfolio_registers_with_its_recipe(project):
    """Registry on a portfolio.json whose only member is a soup (the coverage stage's entry
    format; whether a soup wins on the tiny model is chance, so the portfolio is rewritten)."""
    import mlflow

    from palm_tasks import stages
    from palm_tasks.layout import Layout
    from palm_tasks.registry import register_portfolio
    from palm_tasks.tracking import tracking_uri

    root, cfg = project
    stages.soups_stage(cfg, root)
    stages.coverage_stage(cfg, root)
    portfolio = json.loads((root / "portfolio.json").read_text())
    soup = stages.load_soups(root)[0]
    entry = {"key": soup.key, "weights": dict(zip(cfg.traits, soup.weights.tolist())),
             "values": dict(zip(cfg.traits, soup.values.tolist())),
             "std_errors": dict(zip(cfg.traits, soup.std_errors.tolist())), "share": 1.0,
             **stages._candidate_info(soup, Layout(root))}
    portfolio["members"] = [entry]
    (root / "portfolio.json").write_text(json.dumps(portfolio))
    result = register_portfolio(cfg, root)
    client = mlflow.MlflowClient(tracking_uri(cfg, root), registry_uri=tracking_uri(cfg, root))
    version = client.get_model_version(f"palm-{cfg.task}-member", result["member_versions"][soup.key])
    assert version.tags["kind"] == "soup" and version.tags["member_key"] == soup.key
    assert version.tags["ingredients"] == ",".join(soup.info["ingredients"])
    assert [float(x) for x in version.tags["lambdas"].split(",")] == soup.info["lambdas"]
