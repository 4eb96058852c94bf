"""Jobs: keys that change exactly when the job changes (and did not change with the redesign),
finished policies found again, damaged ones detected and redone."""

import dataclasses
import json

import numpy as np
import pytest

from palm_tasks.config import parse_config
from palm_tasks.jobs import CorruptPolicyError, Job, JobSpec, find_finished, load_policy, run_job
from palm_tasks.schema import Policy

CFG = parse_config({"traits": ["safety", "brevity"], "training": {"steps": 2, "max_completion_length": 8},
                    "evaluation": {"n_prompts": 4, "max_new_tokens": 8}, "data": {"n_eval": 4}})


def spec(**changes) -> JobSpec:
    base = JobSpec(traits=("safety", "brevity"), weights=(0.25, 0.75), base_model_sha256="b" * 64,
                   reward_versions=("s1", "b1"), data_sha256="d" * 64,
                   training=CFG.training.model_dump(), evaluation=CFG.evaluation.model_dump())
    return dataclasses.replace(base, **changes)


def test_key_is_the_hash_of_everything_that_determines_the_job():
    assert spec().key == spec().key
    changed = [spec(weights=(0.3, 0.7)), spec(base_model_sha256="c" * 64), spec(reward_versions=("s2", "b1")),
               spec(data_sha256="e" * 64), spec(seed=1),
               spec(training={**CFG.training.model_dump(), "steps": 3}),
               spec(evaluation={**CFG.evaluation.model_dump(), "n_prompts": 2})]
    keys = {s.key for s in changed} | {spec().key}
    assert len(keys) == len(changed) + 1


def test_keys_of_the_default_settings_are_those_finished_jobs_have_on_disk():
    # The key a finished job of the default settings has on disk. It changed on purpose when jobs
    # gained a method (rsft), warm starts and repair attempts (every reward's version changed in
    # the same commit, so no old job was valid anyway), and when the defaults became 3 rsft rounds
    # at lr 2e-3 and batches of 128 answers (with a new sampler), when rsft gained
    # min_relevance, when it became 0.3 with 256 eval prompts x 2 answers, and when evaluation
    # became 384 prompts x 2 answers; an accidental change re-trains every job.
    default = parse_config({})
    s = JobSpec(traits=("safety", "humor", "brevity"), weights=(1.0, 0.0, 0.0), base_model_sha256="b" * 64,
                reward_versions=("s1", "h1", "b1"), data_sha256="d" * 64,
                training=default.training.model_dump(), evaluation=default.evaluation.model_dump())
    assert s.key == "a1a5d1504e25ed1d"


@pytest.fixture(scope="module")
def policy(tmp_path_factory, prepared_project):
    from conftest import copy_project
    from palm_tasks.params_yaml import load_config

    root = copy_project(prepared_project, tmp_path_factory.mktemp("jobs") / "project")
    return run_job(load_config(root / "params.yaml"), root, Job.train([0.25, 0.25, 0.5]))


def test_a_finished_policy_is_found_and_complete(policy):
    assert find_finished(policy.path.parent, policy.key) == policy
    assert (policy.adapter / "adapter_model.safetensors").is_file()
    assert not list(policy.path.parent.glob(".*.tmp-*")), "no temporary directory left behind"
    assert policy.kind == "trained" and policy.values.shape == (3,) and np.all(policy.std_errors >= 0)
    assert policy.training["job"]["weights"] == [0.25, 0.25, 0.5]
    assert json.loads((policy.path / "member.json").read_text())["schema_version"] == 1


def test_a_member_json_from_before_the_redesign_is_read(policy, tmp_path):
    old = {"key": "k" * 16, "traits": ["safety", "brevity"], "weights": [1.0, 0.0], "values": [0.9, 0.2],
           "std_errors": [0.01, 0.02], "n_eval": 8, "job": {"base_model_sha256": "b" * 64},
           "device": "cpu", "mlflow_run_id": "r"}
    p = Policy.from_json(old, tmp_path)
    assert p.kind == "trained" and p.value.n == 8 and p.base_model_sha256 == "b" * 64
    assert p.training["mlflow_run_id"] == "r" and p.adapter == tmp_path / "adapter"
    assert Policy.from_json(p.to_json(), tmp_path) == p  # and the new layout round-trips


def test_a_truncated_adapter_is_named_and_the_policy_redone(policy, capsys):
    weights = policy.adapter / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptPolicyError, match=f"policy {policy.key}: adapter/adapter_model.safetensors"):
        load_policy(policy.path)
    assert find_finished(policy.path.parent, policy.key) is None  # so the job runs again
    assert f"policy {policy.key}" in capsys.readouterr().err
    assert not policy.path.exists()
