"""params.yaml validation: bad values fail before any work with a message naming key and value."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from palm_tasks.config import ConfigError, EvaluationConfig, PalmConfig, RewardModelConfig, Section, TrainingConfig, parse_config
from palm_tasks.params_yaml import check_params, generate_params, load_config

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = [f.annotation for f in PalmConfig.model_fields.values()
            if isinstance(f.annotation, type) and issubclass(f.annotation, Section)]


def test_project_params_are_the_generated_text():
    # one source of defaults: params.yaml is generated from palm_tasks/config.py, byte for byte
    assert (ROOT / "params.yaml").read_text(encoding="utf-8") == generate_params()
    assert check_params(ROOT / "params.yaml") is None


def test_the_generated_text_loads_to_the_defaults():
    assert yaml.safe_load(generate_params()) == PalmConfig().model_dump()
    cfg = load_config(ROOT / "params.yaml")
    assert cfg == PalmConfig()
    assert cfg.traits == ["safety", "humor", "brevity"]
    assert cfg.base_model == "smollm2" and cfg.search.mode == "lazy"


def test_each_key_carries_its_help_and_the_models_example():
    lines = generate_params().splitlines()
    assert "  eps: 0.1                           # multiplicative tolerance, in (0, 1)" in lines
    assert any(line.startswith("traits: [safety, humor, brevity] ") for line in lines)
    assert any(line.startswith("  methods: [palm_lazy, palm_grid, ") for line in lines)
    assert any(line.startswith("  split_seed: null ") for line in lines)
    assert any(line.startswith("  models: {} ") for line in lines)
    assert "  #   helpful: {path: /models/rm, label: 0, normalize: sigmoid, batch_size: 16}" in lines
    assert any(line.startswith("compare:") and "# palm evaluate" in line for line in lines)


@pytest.mark.parametrize("model", [PalmConfig, *SECTIONS, RewardModelConfig], ids=lambda m: m.__name__)
def test_every_field_has_a_one_line_description(model):
    assert (model.__doc__ or "").strip()
    fields = {name: f for name, f in model.model_fields.items()
              if not (isinstance(f.annotation, type) and issubclass(f.annotation, Section))}
    undocumented = [name for name, f in fields.items() if not (f.description or "").strip()]
    multiline = [name for name, f in fields.items() if "\n" in (f.description or "")]
    assert fields and undocumented == [] and multiline == []


def test_check_names_the_first_differing_line(tmp_path):
    lines = generate_params().splitlines(keepends=True)
    i = next(i for i, line in enumerate(lines) if line.startswith("  eps:"))
    edited = tmp_path / "params.yaml"
    edited.write_text("".join(lines[:i] + [lines[i].replace("0.1 ", "0.2 ")] + lines[i + 1:]))
    problem = check_params(edited)
    assert problem.startswith(f"{edited}:{i + 1}: ") and "eps: 0.2" in problem and "\n" not in problem
    edited.write_text("".join(lines[:-1]))
    assert f":{len(lines)}: " in check_params(edited) and "end of file" in check_params(edited)


def test_check_command_exit_status(tmp_path):
    cmd = [sys.executable, "-m", "palm_tasks.params_yaml", "--check"]
    ok = subprocess.run([*cmd, str(ROOT / "params.yaml")], capture_output=True, text=True, cwd=ROOT,
                        timeout=120)
    assert ok.returncode == 0 and ok.stderr == ""
    stale = tmp_path / "params.yaml"
    stale.write_text(generate_params().replace("  k_max: 7 ", "  k_max: 5 "))
    bad = subprocess.run([*cmd, str(stale)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "k_max: 5" in bad.stderr
    printed = subprocess.run([sys.executable, "-m", "palm_tasks.params_yaml"], capture_output=True, text=True,
                             cwd=ROOT, timeout=120)
    assert printed.returncode == 0 and printed.stdout == generate_params()


def test_job_key_sections_keep_their_fields():
    # the training dump is hashed into job keys, the evaluation's answers_key into the chunks'
    # evaluation key: finished jobs and measured chunks must keep their keys
    assert TrainingConfig().model_dump() == {
        "method": "rsft", "rounds": 3, "stop_alpha": 0.05, "samples_per_prompt": 8, "epochs": 2, "min_relevance": 0.3,
        "steps": 32, "learning_rate": None, "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "max_completion_length": 24, "num_generations": 4, "batch_size": None, "temperature": 1.0, "beta": 0.0}
    assert EvaluationConfig().answers_key() == {
        "chunk_prompts": 32, "samples_per_prompt": 2, "max_new_tokens": 24, "temperature": 0.7, "batch_size": 128}


def test_training_learning_rate_defaults_by_method():
    assert parse_config({}).training.lr == 2e-3 and parse_config({}).training.batch == 8
    assert parse_config({"training": {"method": "grpo"}}).training.lr == 1e-3
    assert parse_config({"training": {"method": "grpo", "learning_rate": 0.01}}).training.lr == 0.01


@pytest.mark.parametrize("section, key, value", [
    ("training", "method", "ppo"), ("evidence", "best_of", 1), ("evidence", "best_of", 100000),
    ("gate", "max_degenerate_share", 1.5), ("gate", "min_relevance_ratio", -0.1), ("gate", "max_garbled_share", 1.5),
    ("search", "max_repairs", -1), ("training", "rounds", 0), ("training", "stop_alpha", 1.0),
    ("training", "stop_alpha", -0.1), ("search", "warm_start", "sometimes")])
def test_nonsense_for_the_new_settings_is_refused_naming_the_key(section, key, value):
    with pytest.raises(ConfigError) as err:
        parse_config({section: {key: value}})
    assert f"{section}.{key}" in str(err.value)


def test_a_precision_that_is_not_auto_fp32_or_bf16_is_refused_naming_the_key():
    with pytest.raises(ConfigError) as err:
        parse_config({"precision": "fp16"})
    assert "precision" in str(err.value) and "fp16" in str(err.value)


def test_selection_lattice_must_differ_from_the_test_lattice():
    with pytest.raises(ConfigError) as err:
        parse_config({"compare": {"selection_lattice": 20}})
    assert "compare.selection_lattice" in str(err.value) and "coverage.test_lattice" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config({"coverage": {"test_lattice": 15}})
    assert "compare.selection_lattice" in str(err.value) and "coverage.test_lattice" in str(err.value)
    assert parse_config({"coverage": {"test_lattice": 15}, "compare": {"selection_lattice": 12}})


def test_new_fields_defaults():
    cfg = PalmConfig()
    assert (cfg.coverage.alpha, cfg.coverage.share_lattice) == (0.05, 30)
    assert (cfg.evaluation.chunk_prompts, cfg.evaluation.min_prompts, cfg.evaluation.first_prompts) == (32, 64, 64)
    assert (cfg.compare.selection_lattice, cfg.compare.random_seed_offset) == (15, 1)
    assert cfg.rewards.humor_test_fraction == 0.25


@pytest.mark.parametrize(
    "params, key, fragment",
    [
        ({"coverage": {"eps": 1.5}}, "coverage.eps", "less than 1"),
        ({"coverage": {"eps": 0}}, "coverage.eps", "greater than 0"),
        ({"coverage": {"delta": -0.1}}, "coverage.delta", "greater than or equal to 0"),
        ({"search": {"mode": "exhaustive"}}, "search.mode", "'lazy'"),
        ({"traits": ["safety", "wit"]}, "traits", "allowed"),
        ({"traits": ["safety"]}, "traits", "at least 2"),
        ({"device": "tpu"}, "device", "'cuda'"),
        ({"training": {"method": "grpo", "batch_size": 6, "num_generations": 4}}, "training", "multiple"),
        ({"training": {"stpes": 3}}, "training.stpes", "unknown key"),
        ({"learning_rate": 0.1}, "learning_rate", "unknown key"),
        ({"evaluation": {"n_prompts": 100}, "data": {"n_eval": 10}}, "evaluation.n_prompts", "exceeds"),
        ({"seed": "zero"}, "seed", "integer"),
        ({"coverage": {"alpha": 0}}, "coverage.alpha", "greater than 0"),
        ({"coverage": {"alpha": 1}}, "coverage.alpha", "less than 1"),
        ({"coverage": {"alpha": -0.5}}, "coverage.alpha", "greater than 0"),
        ({"evaluation": {"chunk_prompts": 0}}, "evaluation.chunk_prompts", "greater than or equal to 1"),
        ({"evaluation": {"n_prompts": 16, "chunk_prompts": 32}}, "evaluation.chunk_prompts", "at least one chunk"),
        ({"coverage": {"share_lattice": 0}}, "coverage.share_lattice", "greater than or equal to 1"),
        ({"compare": {"selection_lattice": 0}}, "compare.selection_lattice", "greater than or equal to 1"),
        ({"compare": {"random_seed_offset": 0}}, "compare.random_seed_offset", "greater than or equal to 1"),
        ({"rewards": {"humor_test_fraction": 0}}, "rewards.humor_test_fraction", "greater than 0"),
        ({"rewards": {"humor_test_fraction": 1}}, "rewards.humor_test_fraction", "less than 1"),
    ],
)
def test_bad_values_name_the_key_the_value_and_what_is_allowed(params, key, fragment):
    with pytest.raises(ConfigError) as err:
        parse_config(params)
    message = str(err.value)
    assert key in message and fragment in message


def test_not_a_mapping_and_not_yaml(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_config([1, 2])
    bad = tmp_path / "params.yaml"
    bad.write_text("coverage: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")


def test_cli_rejects_bad_params_with_one_line_and_exit_2(tmp_path):
    (tmp_path / "params.yaml").write_text("coverage:\n  eps: 2\n")
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--root", str(tmp_path),
         "--params", str(tmp_path / "params.yaml")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2
    assert "coverage.eps = 2" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "models").exists()  # nothing started


def test_every_command_has_help():
    for args in (["--help"], ["run", "--help"], ["stage", "--help"], ["status", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True,
                              text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 0 and "usage: palm" in proc.stdout
