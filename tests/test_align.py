"""Alignment jobs: keys that change exactly when the job changes, and damaged members detected."""

import dataclasses

import numpy as np
import pytest

from palm_tasks.align import CorruptMemberError, JobSpec, find_member, load_member, train_member
from palm_tasks.config import parse_config
from palm_tasks.rewards import build_rewards

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


@pytest.fixture(scope="module")
def member(tmp_path_factory, tiny_model):
    members = tmp_path_factory.mktemp("members")
    rewards = build_rewards(CFG.traits, members)
    return train_member(spec(), CFG, tiny_model, rewards, ["Hello?", "Tell me a joke."] * 4,
                        ["Hi!", "What is 2 + 2?", "Name a colour.", "Why?"], members)


def test_a_finished_member_is_found_and_complete(member):
    assert find_member(member.path.parent, member.key).key == member.key
    assert (member.adapter / "adapter_model.safetensors").is_file()
    assert not list(member.path.parent.glob(".*.tmp-*")), "no temporary directory left behind"
    assert member.values.shape == (2,) and np.all(member.std_errors >= 0)


def test_a_truncated_adapter_is_named_and_the_member_redone(member, capsys):
    weights = member.adapter / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptMemberError, match=f"member {member.key}: adapter/adapter_model.safetensors"):
        load_member(member.path)
    assert find_member(member.path.parent, member.key) is None  # so the job runs again
    assert f"member {member.key}" in capsys.readouterr().out
    assert not member.path.exists()
