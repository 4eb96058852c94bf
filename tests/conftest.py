"""Shared test set-up: offline, a private Prefect home, and a tiny real causal LM."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

# Before anything imports prefect or transformers: no hub, and a Prefect home of our own.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="palm-prefect-"))
os.environ.pop("MLFLOW_TRACKING_URI", None)

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["palm_tasks", "flows", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore"]

# The tiny-model pipeline settings: every stage runs for real, in seconds.
TINY_OVERRIDES = {
    "search": {"mode": "lazy", "max_trainings": 6},
    "data": {"n_train": 16, "n_eval": 8},
    "training": {"steps": 2, "max_completion_length": 8},
    "evaluation": {"n_prompts": 8, "max_new_tokens": 8},
    "rewards": {"base_samples": 8},
    "coverage": {"test_users": 200, "test_lattice": 10},
    "soups": {"enabled": True},  # the tests exercise the soups stage; the default run leaves it off
    "compare": {"k_max": 1, "random_seeds": 1, "grid_budget": 1, "bootstrap": 10},  # dvc repro: 2 new tiny jobs
}


def tiny_params(base_model: Path) -> dict:
    """The project's params.yaml with the tiny-model overrides (every key dvc.yaml names stays)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base_model"] = str(base_model)
    for section, values in TINY_OVERRIDES.items():
        params[section].update(values)
    return params


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from palm_tasks.base_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def make_project(dest: Path, tiny_model: Path) -> Path:
    """A temporary copy of the project whose params.yaml points at the tiny model."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, target)
    (dest / "params.yaml").write_text(yaml.safe_dump(tiny_params(tiny_model), sort_keys=False))
    return dest


@pytest.fixture(scope="session")
def prepared_project(tmp_path_factory, tiny_model) -> Path:
    """A tiny project whose rewards and grid stages have run; copy it (copy_project) to use it."""
    from palm_tasks import stages
    from palm_tasks.config import load_config

    root = make_project(tmp_path_factory.mktemp("prepared") / "project", tiny_model)
    cfg = load_config(root / "params.yaml")
    stages.rewards_stage(cfg, root)
    stages.grid_stage(cfg, root)
    return root


def copy_project(prepared: Path, dest: Path, **sections) -> Path:
    """A copy of a prepared project with params.yaml sections updated (e.g. runner={...})."""
    shutil.copytree(prepared, dest)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


@pytest.fixture(scope="session")
def registered(tmp_path_factory):
    """A tiny project with three members and a certified portfolio registered in MLflow
    (router, serving and UI tests): (root, member keys, cfg, register_portfolio's result)."""
    from test_registry import build_registered_project

    return build_registered_project(tmp_path_factory.mktemp("registered"), "palmreg")
