"""Property-based bad input (hypothesis): malformed params.yaml files and weight vectors get a
clear error and a non-zero exit, never a traceback, and nothing on disk changes."""

import copy
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from palm_tasks.config import ConfigError, PalmConfig, parse_config
from palm_tasks.params_yaml import load_config
from palm_tasks.core.simplex import check_weights
from palm_tasks.serve.router import WeightsError, parse_weights

ROOT = Path(__file__).resolve().parents[1]
VALID = yaml.safe_load((ROOT / "params.yaml").read_text())
TRAITS = VALID["traits"]


def _paths(params: dict, prefix=()) -> list[tuple]:
    """Every key path of the params mapping: sections and their leaves."""
    out = []
    for k, v in params.items():
        out.append(prefix + (k,))
        if isinstance(v, dict):
            out += _paths(v, prefix + (k,))
    return out


PATHS = _paths(VALID)
# Values that no key of params.yaml accepts: every key is a scalar or a list of names or a
# section, and a section rejects keys it does not know (all start with "zz").
POISON = st.one_of(
    st.lists(st.integers(), min_size=1, max_size=3),
    st.dictionaries(st.text(min_size=1, max_size=5).map(lambda s: "zz" + s), st.integers(),
                    min_size=1, max_size=2),
)


@st.composite
def malformed_params(draw):
    """A params mapping with one thing wrong; returns (mapping, dotted key that is wrong)."""
    params = copy.deepcopy(VALID)
    how = draw(st.sampled_from(["poison", "unknown"]))
    path = draw(st.sampled_from(PATHS))
    if how == "unknown":  # a key nobody knows, at the top or in a section
        section = path[:-1]
        target = params
        for k in section:
            target = target[k]
        name = "zz" + draw(st.text(alphabet="abcdefghij_", min_size=1, max_size=6))
        target[name] = draw(st.one_of(st.integers(), st.text(max_size=5), st.none()))
        return params, ".".join(section + (name,))
    target = params
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = draw(POISON)
    return params, ".".join(path)


@settings(max_examples=150, deadline=None)
@given(malformed_params())
def test_every_malformed_params_mapping_names_its_key(case):
    params, key = case
    with pytest.raises(ConfigError) as err:
        parse_config(params)
    assert key.split(".")[0] in str(err.value)
    assert "Traceback" not in str(err.value)


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                         st.text(max_size=8))
yaml_values = st.recursive(yaml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(
    st.binary(max_size=200),  # not even text
    st.text(max_size=200).map(str.encode),  # text that is rarely YAML of a mapping
    yaml_values.map(lambda v: yaml.safe_dump(v).encode()),  # YAML of anything
    st.dictionaries(st.sampled_from(list(VALID)), yaml_values, max_size=4)  # real keys, any values
      .map(lambda v: yaml.safe_dump({**VALID, **v}).encode()),
))
def test_any_file_is_a_config_or_a_config_error(tmp_path, content):
    path = tmp_path / "params.yaml"
    path.write_bytes(content)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc).strip()
    else:
        assert isinstance(cfg, PalmConfig)
    assert path.read_bytes() == content  # loading never writes


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_project(tmp_path_factory) -> Path:
    """A project directory holding finished work that bad input must not touch."""
    root = tmp_path_factory.mktemp("project")
    member = root / "models" / "members" / "0123456789abcdef"
    member.mkdir(parents=True)
    (member / "member.json").write_text('{"key": "0123456789abcdef"}')
    (root / "portfolio.json").write_text('{"id": "p"}')
    (root / "metrics").mkdir()
    (root / "metrics" / "align.json").write_text('{"pool": []}')
    return root


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=malformed_params(), command=st.sampled_from(["run", "status", "retrain", "stage grid"]))
def test_the_cli_gives_one_line_and_exit_2_and_touches_nothing(finished_project, case, command):
    params, key = case
    bad = finished_project / "bad-params.yaml"
    bad.write_text(yaml.safe_dump(params))
    before = _tree_digest(finished_project)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *command.split(), "--params", str(bad),
                           "--root", str(finished_project)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("palm: error: ") and key.split(".")[0] in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert _tree_digest(finished_project) == before


# --- weight vectors ---------------------------------------------------------------------------

numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10))


@settings(max_examples=300, deadline=None)
@given(st.lists(numbers, min_size=0, max_size=5), st.integers(2, 4))
def test_check_weights_accepts_the_simplex_and_names_every_other_problem(values, d):
    w = np.array(values, dtype=float)
    on_simplex = (w.shape == (d,) and np.isfinite(w).all() and (w >= -1e-12).all()
                  and abs(w.sum() - 1) <= 1e-6)
    if on_simplex:
        assert np.array_equal(check_weights(w, d), w)
    else:
        with pytest.raises(ValueError, match="weights"):
            check_weights(w, d)


weight_text = st.one_of(
    st.text(max_size=40),
    st.lists(st.tuples(st.sampled_from(TRAITS + ["wit", ""]), st.one_of(
        st.floats(allow_nan=True).map(repr), st.text(max_size=4), st.integers(-3, 3).map(str))),
        max_size=4).map(lambda kv: ",".join(f"{k}={v}" for k, v in kv)),
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(weight_text, st.dictionaries(st.sampled_from(TRAITS + ["wit"]), yaml_values, max_size=4),
                 yaml_values))
def test_the_router_parser_normalizes_or_says_what_is_wrong(given_weights):
    try:
        w, _ = parse_weights(given_weights, TRAITS)
    except WeightsError as exc:
        assert str(exc).startswith("weights")
    else:
        assert w.shape == (len(TRAITS),) and np.all(w >= 0) and w.sum() == pytest.approx(1)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(weight_text)
def test_palm_route_refuses_bad_weights_with_one_line(finished_project, text):
    try:
        parse_weights(text, TRAITS)
        assume(False)  # only bad weights here
    except WeightsError:
        pass
    assume(not text.startswith("-"))  # argparse would read it as an option
    assume("\x00" not in text)  # no process argument can hold a NUL byte (exec refuses it)
    before = _tree_digest(finished_project)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "route", "--weights", text,
                           "--params", str(ROOT / "params.yaml"), "--root", str(finished_project)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("palm: error: weights")
    assert "Traceback" not in proc.stderr + proc.stdout
    assert _tree_digest(finished_project) == before
