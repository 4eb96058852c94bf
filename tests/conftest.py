"""Shared test set-up: offline, a private Prefect home, and a tiny real causal LM."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

# Before anything imports prefect or transformers: no hub, and a Prefect home of our own.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
if "PREFECT_HOME" not in os.environ:  # each pytest process (xdist worker) its own, removed when it exits
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="palm-prefect-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ.pop("MLFLOW_TRACKING_URI", None)

# the hostile-input suite's figures, summed over the whole run (xdist workers too)
pytest_plugins = ["hostile_figures"]

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["palm_tasks", "flows", "custom", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore"]

# The tiny-model pipeline settings: every stage runs for real, in seconds.
TINY_OVERRIDES = {
    "search": {"mode": "lazy", "max_trainings": 6},
    "data": {"n_train": 16, "n_eval": 8},
    # min_relevance 0: the tiny model's gibberish is on topic for no prompt, so rsft would keep nothing
    "training": {"steps": 2, "max_completion_length": 16, "rounds": 1, "samples_per_prompt": 2, "epochs": 1,
                 "min_relevance": 0.0},
    # chunks of 4 prompts: a policy is measured on 4 at once, 8 at the cap (two planned looks)
    "evaluation": {"n_prompts": 8, "chunk_prompts": 4, "min_prompts": 4, "samples_per_prompt": 1,
                   "max_new_tokens": 16, "batch_size": 16},
    "evidence": {"best_of": 2, "chunk_prompts": 4},
    # a tiny model's answers are gibberish (16 tokens: about 1 in 4 has fewer than 3 words, a
    # degenerate answer that every reward scores 0); the gate would refuse every member: its own
    # tests set it
    "gate": {"max_degenerate_share": 1.0, "min_relevance_ratio": 0.0, "max_garbled_share": 1.0},
    "coverage": {"test_users": 200, "test_lattice": 10},
    "soups": {"enabled": True},  # the tests exercise the soups stage; the default run leaves it off
    "compare": {"k_max": 1, "random_seeds": 1, "grid_budget": 1, "bootstrap": 10},  # dvc repro: 2 new tiny jobs
}


# Real components of `make test` that a machine may lack (Debian's chromium for the MLflow UI
# test; a way for root to run palm without root's power over file permissions). A missing one
# fails the tests that need it, so that CI cannot pass without it; someone who knowingly runs
# without it names it in this variable (comma-separated: PALM_TEST_MISSING_OK=chromium,non-root,
# or `all`), and its tests are skipped with the reason instead (docs/testing.md).
MISSING_OK = "PALM_TEST_MISSING_OK"


def missing_component(component: str, why: str | None) -> None:
    """Nothing when `why` is None (the component is here); else fail the test, or skip it if
    PALM_TEST_MISSING_OK names the component."""
    if why is None:
        return
    allowed = {c.strip() for c in os.environ.get(MISSING_OK, "").split(",")}
    if component in allowed or "all" in allowed:
        pytest.skip(f"{why} ({MISSING_OK} names {component})")
    pytest.fail(f"{why}: a real component of `make test` is missing; install it, or set "
                f"{MISSING_OK}={component} to skip its tests knowingly", pytrace=False)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """@pytest.mark.real_component(name, missing=why or None): checked before any fixture runs."""
    for mark in item.iter_markers("real_component"):
        missing_component(mark.args[0], mark.kwargs.get("missing"))


def tiny_params(base_model: Path) -> dict:
    """The project's params.yaml with the tiny-model overrides (every key dvc.yaml names stays)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base_model"] = str(base_model)
    for section, values in TINY_OVERRIDES.items():
        params[section].update(values)
    return params


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from palm_tasks.llm.base_model import build_tiny_model

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
    from palm_tasks.params_yaml import load_config
    from palm_tasks.stages import STAGES

    root = make_project(tmp_path_factory.mktemp("prepared") / "project", tiny_model)
    cfg = load_config(root / "params.yaml")
    STAGES["rewards"].run(cfg, root)
    STAGES["grid"].run(cfg, root)
    return root


def copy_project(prepared: Path, dest: Path, **sections) -> Path:
    """A copy of a prepared project with params.yaml sections updated (e.g. runner={...}) or
    top-level keys set (e.g. traits=[...])."""
    shutil.copytree(prepared, dest)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(params.get(key), dict):
            params[key].update(value)
        else:
            params[key] = value
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def specialist_values(weights) -> tuple[float, ...]:
    """Values a test gives a policy trained at `weights`: 0.9 on its traits, 0.1 elsewhere (so
    the three specialists of d = 3 are each needed, and certified at delta = 0.8: at confidence 0.95
    on the tiny project's 8 prompts the middle corner's margin must clear about 0.23)."""
    return tuple(round(0.1 + 0.8 * float(w), 6) for w in weights)


def trained_project(prepared: Path, dest: Path, k: int, **sections):
    """A copy of a prepared project whose real align stage trained the k uniform weights (the
    specialists first), with per-prompt scores then set to `specialist_values` on every prompt so
    that coverage outcomes are known in advance: (root, cfg, trained policies). The policies,
    their adapters and member.json are the real stage's; only the tables in data/pool.json are
    the test's, and the base's sample pool scores 0.05 on every trait (so best-of-N is below
    every policy and the evidence agrees with the values the test chose)."""
    from dataclasses import replace

    from palm_tasks import schema
    from palm_tasks.params_yaml import load_config
    from palm_tasks.paths import Paths
    from palm_tasks.schema import load_pool
    from palm_tasks.stages import STAGES

    root = copy_project(prepared, dest, search={"mode": "uniform", "k": k, "max_trainings": k}, **sections)
    cfg = load_config(root / "params.yaml")
    STAGES["align"].run(cfg, root)
    pool = load_pool(root)
    policies = tuple(p.with_scores(replace(p.scores, scores=np.tile(specialist_values(p.weights),
                                                                    (p.scores.prompts, 1))))
                     for p in pool.policies)
    schema.write(Paths(root).pool, replace(pool, policies=policies))
    samples = schema.load_samples(root)
    schema.write(Paths(root).samples / "eval.json", replace(samples, scores=np.full(samples.scores.shape, 0.05)))
    return root, cfg, list(policies)


def build_registered_project(prepared: Path, dest: Path, prefix: str):
    """A project with three trained specialists in a certified portfolio chosen by the real
    coverage stage and registered by the real register stage: (root, keys, cfg, result)."""
    from palm_tasks.params_yaml import load_config
    from palm_tasks.stages import STAGES

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    root, _, policies = trained_project(prepared, dest, 3, coverage={"eps": 0.05, "delta": 0.8},
                                        mlflow={"registered_model_prefix": prefix})
    cfg = load_config(root / "params.yaml")
    STAGES["coverage"].run(cfg, root)  # no soups stage: the candidates are the three specialists
    return root, [p.key for p in policies], cfg, STAGES["register"].run(cfg, root)


@pytest.fixture(scope="session")
def registered(tmp_path_factory, prepared_project):
    """A tiny project with three members and a certified portfolio registered in MLflow
    (router, serving and UI tests): (root, member keys, cfg, register stage's result)."""
    return build_registered_project(prepared_project, tmp_path_factory.mktemp("registered") / "project",
                                    "palmreg")


def command_env(extra: dict | None = None) -> dict:
    """The environment of a `palm`, `dvc` or `git` command a test runs: the venv's commands on
    PATH, and the test harness's Prefect server (no ephemeral server per command)."""
    import sys

    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}  # slow on a busy machine
    if PREFECT_API_URL.value():
        env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    env.pop("DVC_STAGE", None)
    return {**env, **(extra or {})}


def run_command(root: Path, *cmd: str, timeout: int = 900, stderr: bool = False) -> str:
    """Run a command in `root` as a user would: its standard output (and error, with stderr), or a
    failed assertion showing both."""
    import subprocess

    proc = subprocess.run(cmd, cwd=root, env=command_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr if stderr else proc.stdout


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_model, prefect_harness) -> Path:
    """The tiny project after the README's first command: `palm run` in a git repository, every
    stage through Prefect (the harness's server), TRL, MLflow on SQLite, and dvc.lock written.
    Made once per session; tests read it and never change it. A test that changes anything (a
    param, a command that writes) works on a copy (copy_run). Tests that use it share an xdist
    group, so one worker makes it."""
    import sys

    root = make_project(tmp_path_factory.mktemp("finished") / "project", tiny_model)
    run_command(root, "git", "init", "-q")
    run_command(root, "git", "add", "-A")
    run_command(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project")
    run_command(root, sys.executable, "-m", "flows.cli", "run", "--root", str(root), "--params", str(root / "params.yaml"))
    return root


def copy_run(finished: Path, dest: Path) -> Path:
    """A copy of the finished run to change, its MLflow store moved home at once (what any palm
    command does when it first opens a copied store: palm_tasks.tracking.relocate_store)."""
    from palm_tasks.params_yaml import load_config
    from palm_tasks.tracking import tracking_uri

    shutil.copytree(finished, dest, symlinks=True)
    tracking_uri(load_config(dest / "params.yaml"), dest)
    return dest
