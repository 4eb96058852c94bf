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
                    "evaluation": {"n_prompts": 4, "chunk_prompts": 4, "max_new_tokens": 8}, "data": {"n_eval": 4}})


def spec(**changes) -> JobSpec:
    base = JobSpec(traits=("safety", "brevity"), weights=(0.25, 0.75), base_model_sha256="b" * 64,
                   reward_versions=("s1", "b1"), data_sha256="d" * 64,
                   training=CFG.training.model_dump())
    return dataclasses.replace(base, **changes)


def test_key_is_the_hash_of_everything_that_determines_the_job():
    assert spec().key == spec().key
    changed = [spec(weights=(0.3, 0.7)), spec(base_model_sha256="c" * 64), spec(reward_versions=("s2", "b1")),
               spec(data_sha256="e" * 64), spec(seed=1),
               spec(training={**CFG.training.model_dump(), "steps": 3})]
    keys = {s.key for s in changed} | {spec().key}
    assert len(keys) == len(changed) + 1
    # how a policy is measured is no part of what it is: its chunks are keyed by the evaluation
    assert not any(f.name == "evaluation" for f in dataclasses.fields(JobSpec))


def test_keys_of_the_default_settings_are_those_finished_jobs_have_on_disk():
    # The key a finished job of the default settings has on disk. It changed on purpose when jobs
    # gained a method (rsft), warm starts and repair attempts (every reward's version changed in
    # the same commit, so no old job was valid anyway), and when the defaults became 3 rsft rounds
    # at lr 2e-3 and batches of 128 answers (with a new sampler), when rsft gained
    # min_relevance, when it became 0.3 with 256 eval prompts x 2 answers, when evaluation
    # became 384 prompts x 2 answers, and when the evaluation left the key (a policy is measured
    # in chunks keyed by the evaluation, docs/evidence.md), and when rsft gained stop_alpha (rounds
    # that stop once done); an accidental change re-trains every job.
    default = parse_config({})
    s = JobSpec(traits=("safety", "humor", "brevity"), weights=(1.0, 0.0, 0.0), base_model_sha256="b" * 64,
                reward_versions=("s1", "h1", "b1"), data_sha256="d" * 64, training=default.training.model_dump())
    assert s.key == "b98a73ce3a2a29b1"


def test_a_job_whose_rounds_stop_once_done_names_the_pool_it_was_tested_against(tmp_path_factory, prepared_project):
    # rsft with 2 rounds and stop_alpha > 0: after round 1 the policy is tested against the
    # sample pool's best-of-N (palm_tasks.round_stop), so the pool's sha256 is in the job key and
    # the look's figures are in the round's history; with stop_alpha 0 neither.
    from conftest import copy_project
    from palm_tasks.jobs import JobContext
    from palm_tasks.params_yaml import load_config

    root = copy_project(prepared_project, tmp_path_factory.mktemp("stops") / "project")
    cfg = load_config(root / "params.yaml")
    looking = cfg.model_copy(update={"training": cfg.training.model_copy(update={"rounds": 2})})
    ctx = JobContext(looking, root)
    spec = ctx.spec([0.25, 0.25, 0.5])
    assert spec.evidence_sha256 == ctx.evidence_sha and len(spec.evidence_sha256) == 64
    never = cfg.model_copy(update={"training": looking.training.model_copy(update={"stop_alpha": 0.0})})
    assert JobContext(never, root).spec([0.25, 0.25, 0.5]).evidence_sha256 == ""

    policy = run_job(looking, root, Job.train([0.25, 0.25, 0.5]), ctx)
    assert policy.key == spec.key
    history = policy.training["history"]
    assert {"look_value", "look_evidence", "look_lower", "look_upper", "stopped"} <= set(history[0])
    assert len(history) == (1 if history[0]["stopped"] else 2)
    assert history[0]["look_lower"] <= history[0]["look_value"] - history[0]["look_evidence"] <= history[0]["look_upper"]


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


@pytest.fixture(scope="module")
def measured(tmp_path_factory, prepared_project):
    """A real trained policy of its own (the truncation test above destroys `policy`), its
    project and configuration."""
    from conftest import copy_project
    from palm_tasks.params_yaml import load_config

    root = copy_project(prepared_project, tmp_path_factory.mktemp("chunks") / "project")
    cfg = load_config(root / "params.yaml")
    return root, cfg, run_job(cfg, root, Job.train([0.5, 0.25, 0.25]))


def test_a_policy_is_measured_chunk_by_chunk_and_never_twice(measured, capsys):
    from palm_tasks import scores

    root, cfg, policy = measured
    ev = cfg.evaluation
    assert policy.scores.prompts == ev.first_prompts  # a trained policy: its first measurement only
    chunks = policy.path / scores.EVALUATIONS / policy.training["eval_key"]
    first = sorted(chunks.glob("chunk-*.json"))
    assert [p.name for p in first] == [f"chunk-{i:05d}.json" for i in range(ev.first_prompts // ev.chunk_prompts)]
    stamps = {p.name: p.stat().st_mtime_ns for p in first}

    more = run_job(cfg, root, Job.evaluate(str(policy.path.relative_to(root)), ev.n_prompts))
    assert more.scores.prompts == ev.n_prompts and more.key == policy.key
    assert np.array_equal(more.scores.scores[:policy.scores.prompts], policy.scores.scores)  # the same chunks
    assert all(p.stat().st_mtime_ns == stamps[p.name] for p in first), "a finished chunk was measured again"
    assert more.scores.value.n == ev.n_prompts * ev.samples_per_prompt
    assert set(more.quality) >= {"degenerate_share", "relevance"}

    # a run killed while writing a chunk leaves its temporary file: ignored, the chunk measured again
    last = sorted(chunks.glob("chunk-*.json"))[-1]
    last.rename(chunks / f".{last.name}.tmp-12345")
    again = run_job(cfg, root, Job.evaluate(str(policy.path.relative_to(root)), ev.n_prompts))
    assert again.scores.prompts == ev.n_prompts and last.is_file()
    assert np.allclose(again.scores.scores, more.scores.scores)  # chunk i is sampled with seed + i
    # a damaged chunk is named, removed and measured again; nothing before it is touched
    last.write_text(last.read_text().replace('"index"', '"indx"', 1))
    capsys.readouterr()
    again = run_job(cfg, root, Job.evaluate(str(policy.path.relative_to(root)), ev.n_prompts))
    assert f"scorechunk{last}" in "".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert np.allclose(again.scores.scores, more.scores.scores)
    assert all(p.stat().st_mtime_ns == stamps[p.name] for p in first)
    # the policy's own files still check out: chunks carry their own checksums
    assert load_policy(policy.path) == policy


def test_a_stage_measuring_another_stages_policy_writes_only_into_its_own_store(measured):
    from palm_tasks import scores

    root, cfg, policy = measured
    before = {p: p.stat().st_mtime_ns for p in policy.path.rglob("*") if p.is_file()}
    home_store = "models/evaluation/members"
    theirs = run_job(cfg, root, Job.evaluate(str(policy.path.relative_to(root)), cfg.evaluation.n_prompts,
                                             store=home_store))
    assert theirs.scores.prompts == cfg.evaluation.n_prompts
    after = {p: p.stat().st_mtime_ns for p in policy.path.rglob("*") if p.is_file()}
    assert after == before, "the evaluate stage changed another stage's output"
    home = root / "models" / "evaluation" / "scores" / policy.key
    written = {p.name for p in home.rglob("chunk-*.json")}
    own = {p.name for p in (policy.path / scores.EVALUATIONS).rglob("chunk-*.json")}
    assert written == {f"chunk-{i:05d}.json" for i in range(cfg.evaluation.n_prompts // cfg.evaluation.chunk_prompts)} - own
