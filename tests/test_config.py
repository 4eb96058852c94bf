"""params.yaml validation: bad values fail before any work with a message naming key and value."""

import subprocess
import sys
from pathlib import Path

import pytest

from palm_tasks.config import ConfigError, PalmConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_match_the_defaults_they_document():
    # params.yaml, the config defaults and the README table describe one default run
    cfg = load_config(ROOT / "params.yaml")
    assert cfg == PalmConfig()
    assert cfg.traits == ["safety", "humor", "brevity"]
    assert cfg.base_model == "smollm2" and cfg.search.mode == "lazy"


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
        ({"training": {"batch_size": 6, "num_generations": 4}}, "training", "multiple"),
        ({"training": {"stpes": 3}}, "training.stpes", "unknown key"),
        ({"learning_rate": 0.1}, "learning_rate", "unknown key"),
        ({"evaluation": {"n_prompts": 100}, "data": {"n_eval": 10}}, "evaluation.n_prompts", "exceeds"),
        ({"seed": "zero"}, "seed", "integer"),
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
