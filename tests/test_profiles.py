"""Profiles and -S: settings laid over params.yaml, the same for `palm` and for `dvc exp run -S`."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dvc.utils.hydra import apply_overrides

from conftest import command_env
from palm_tasks.config import PalmConfig
from palm_tasks.params_yaml import load_config, read_profile

ROOT = Path(__file__).resolve().parents[1]


def palm(*args, root: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args, "--root", str(root)], cwd=root,
                          env=command_env(), capture_output=True, text=True, timeout=timeout)


def _digest(top: Path) -> dict[str, str]:
    return {str(p.relative_to(top)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(top.rglob("*")) if p.is_file()}


@pytest.fixture
def project(tmp_path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    return root


def test_the_precise_profile_is_what_dvc_exp_run_makes_of_its_flags(tmp_path):
    proc = palm("profile", "precise", root=ROOT)
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    assert len(words) >= 2 and words[0::2] == ["-S"] * (len(words) // 2)
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    apply_overrides(params, words[1::2])  # what `dvc exp run -S ...` does to the workspace's params.yaml
    by_dvc = load_config(params)
    overrides = read_profile("precise", ROOT)
    by_palm = load_config(ROOT / "params.yaml", overrides)
    assert by_dvc == by_palm != load_config(ROOT / "params.yaml")
    assert by_palm.coverage.eps == 0.05 and by_palm.search.repair_beaten is True
    defaults = PalmConfig().model_dump()
    for o in overrides:  # each setting of the profile changes a default: none is there for show
        section, key = o.key.split(".")
        assert defaults[section][key] != o.value, o.key


def test_a_stage_reads_the_profile_and_the_set_values_and_params_yaml_stays(project, prefect_harness):
    (project / "wide.yaml").write_text("coverage:\n  eps: 0.2\n  delta: 0.1\nsearch: {}\n")
    before = (project / "params.yaml").read_bytes()
    proc = palm("stage", "grid", "--profile", "wide.yaml", "-S", "coverage.eps=0.25", root=project)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grid = json.loads((project / "data" / "grid.json").read_text())
    assert (grid["eps"], grid["delta"]) == (0.25, 0.1)  # -S after the profile wins
    assert (project / "params.yaml").read_bytes() == before
    [resolved] = (project / ".palm").glob("params-*.yaml")
    assert load_config(resolved).coverage.eps == 0.25
    assert yaml.safe_load(resolved.read_text())["coverage"]["delta"] == 0.1
    assert "dvc exp run -S coverage.eps=0.2 -S coverage.delta=0.1 -S coverage.eps=0.25" in proc.stdout
    assert "this run is not in it" in proc.stdout


@pytest.mark.parametrize("args, profile, names", [
    (["--profile", "p.yaml"], "training:\n  roundz: 3\n", ["p.yaml", "training.roundz", "rounds"]),
    (["--profile", "p.yaml"], "coverage:\n  eps: 0.05\n  eps: 0.1\n", ["p.yaml", "duplicate key", "coverage.eps"]),
    (["--profile", "p.yaml"], "- coverage\n", ["p.yaml", "mapping"]),
    (["--profile", "p.yaml"], "search: 3\n", ["p.yaml", "search"]),
    (["--profile", "nosuch"], None, ["profile nosuch", "profiles/nosuch.yaml"]),
    (["-S", "search.nosuch=1"], None, ["-S", "search.nosuch", "max_trainings"]),
    (["-S", "training.temperature=0"], None, ["training.temperature", "greater than 0"]),
    (["-S", "evaluation.temperature=-1"], None, ["evaluation.temperature", "greater than 0"]),
    (["-S", "coverage.eps"], None, ["-S", "KEY=VALUE"]),
    (["-S", "coverage.eps.x=1"], None, ["coverage.eps.x", "is a value"]),
])
def test_a_bad_override_is_one_line_naming_it_and_nothing_is_written(tmp_path, project, args, profile, names,
                                                                       capsys, monkeypatch):
    # palm's own main() in this process (the subprocess path is the test above): refused before
    # any flow starts
    from flows.cli import main

    if profile is not None:
        (project / "p.yaml").write_text(profile)
    before = _digest(tmp_path)
    monkeypatch.chdir(project)
    code = main(["stage", "grid", *args, "--root", str(project)])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("palm: error: "), err
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert _digest(tmp_path) == before and not (project / ".palm").exists()
