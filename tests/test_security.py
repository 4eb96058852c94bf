"""Security defaults: servers on loopback, nothing unpickled from disk, no writes outside the
project from paths in params.yaml."""

import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from palm_tasks.config import ConfigError, parse_config
from palm_tasks.tracking import inside_project, tracking_uri, ui_command

ROOT = Path(__file__).resolve().parents[1]


def test_servers_bind_to_loopback_by_default(tmp_path):
    from prefect.settings import PREFECT_SERVER_API_HOST

    from flows.cli import build_parser

    assert "--host 127.0.0.1" in ui_command(parse_config({}), tmp_path)  # MLflow UI
    assert PREFECT_SERVER_API_HOST.value() == "127.0.0.1"  # `prefect server start`
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"  # `palm serve`
    from palm_tasks.serve.server import make_server

    assert inspect.signature(make_server).parameters["host"].default == "127.0.0.1"


# Calls that unpickle (run code from) a file. alt-profanity-check loads its own packaged model
# with joblib inside the installed package: a file of the package, never one of our outputs.
UNPICKLING = {("pickle", "load"), ("pickle", "loads"), ("joblib", "load"), ("dill", "load"),
              ("cloudpickle", "load"), ("torch", "load"), ("pd", "read_pickle"),
              ("pandas", "read_pickle")}


def _unpickling_calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        kwargs = {k.arg: k.value for k in node.keywords}
        if (owner, node.func.attr) in UNPICKLING:
            safe = (owner == "torch" and isinstance(kwargs.get("weights_only"), ast.Constant)
                    and kwargs["weights_only"].value is True)
            if not safe:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {owner}.{node.func.attr}")
        if node.func.attr == "load" and isinstance(kwargs.get("allow_pickle"), ast.Constant) \
                and kwargs["allow_pickle"].value is True:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} load(allow_pickle=True)")
    return found


def test_nothing_unpickles_files():
    # every module, sub-packages included (core/, llm/, stages/, serve/, report/, ...)
    sources = sorted((ROOT / "palm_tasks").rglob("*.py")) + sorted((ROOT / "flows").rglob("*.py"))
    found = [c for s in sources for c in _unpickling_calls(s)]
    on_disk = {Path(d) / name for top in ("palm_tasks", "flows") for d, _, names in os.walk(ROOT / top)
               for name in names if name.endswith(".py")}
    assert set(sources) == on_disk and len(sources) == len(on_disk) > 50, sorted(on_disk ^ set(sources))
    assert found == []
    # the checker itself catches what it is meant to
    assert _unpickling_calls_on("import pickle\npickle.load(open('x'))\n")
    assert _unpickling_calls_on("import torch\ntorch.load('x')\n")
    assert _unpickling_calls_on("import numpy as np\nnp.load('x', allow_pickle=True)\n")
    assert not _unpickling_calls_on("import torch\ntorch.load('x', weights_only=True)\n")


def _unpickling_calls_on(code: str) -> list[str]:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".py", dir=ROOT / "tests", delete=False) as fh:
        fh.write(code)
    try:
        return _unpickling_calls(Path(fh.name))
    finally:
        os.unlink(fh.name)


@pytest.mark.parametrize("uri", ["sqlite:///../outside.db", "sqlite:///mlruns/../../outside.db",
                                 "sqlite:////tmp/palm-elsewhere/mlflow.db", "../mlruns-outside",
                                 "file:///tmp/palm-elsewhere"])
def test_a_store_outside_the_project_is_refused(tmp_path, uri):
    root = tmp_path / "project"
    root.mkdir()
    with pytest.raises(ConfigError, match="outside the project directory"):
        tracking_uri(parse_config({"mlflow": {"tracking_uri": uri}}), root)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]  # nothing created


def test_paths_inside_the_project_are_fine_and_symlinks_cannot_escape(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    inside = f"sqlite:///{root}/mlruns/mlflow.db"
    assert tracking_uri(parse_config({"mlflow": {"tracking_uri": inside}}), root) == inside
    assert inside_project(root, "a/../b", "k") == (root / "b").resolve()
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="outside"):
        tracking_uri(parse_config({"mlflow": {"tracking_uri": "sqlite:///link/mlflow.db"}}), root)


@pytest.mark.parametrize("bad", ["x'; drop", "a/b", "", "é"])
def test_mlflow_names_cannot_inject_into_registry_filters(bad):
    with pytest.raises(ConfigError, match="mlflow.registered_model_prefix"):
        parse_config({"mlflow": {"registered_model_prefix": bad}})


def test_palm_refuses_a_store_outside_the_project_before_any_work(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["mlflow"]["tracking_uri"] = "sqlite:///../stolen/mlflow.db"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--root", str(root),
                           "--params", str(root / "params.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("palm: error: mlflow.tracking_uri")
    assert not (tmp_path / "stolen").exists()
    assert sorted(p.name for p in root.iterdir()) == ["params.yaml"]  # no work started
