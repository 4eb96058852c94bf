"""Repair inside the real align stage (docs/theory.md section 9): a row the evidence beats is
trained again once, warm-started, and a run killed during a repair resumes without redoing the
finished trainings."""

from dataclasses import replace

import numpy as np
import pytest

from conftest import copy_project

pytestmark = pytest.mark.slow


class Killed(BaseException):
    """Stands for the process dying mid-job."""


def unbeatable_evidence(root):
    """Best-of-N that scores 1 on every trait: every trained row is beaten at its own weight."""
    from palm_tasks import schema
    from palm_tasks.paths import Paths

    samples = schema.load_samples(root)
    schema.write(Paths(root).samples / "eval.json", replace(samples, scores=np.ones(samples.scores.shape)))


def test_a_run_killed_during_a_repair_resumes_with_the_repairs_only(prepared_project, tmp_path, monkeypatch):
    from palm_tasks.params_yaml import load_config
    from palm_tasks.llm import train as train_module
    from palm_tasks.schema import load_pool
    from palm_tasks.stages import STAGES

    # best-of-N scores 1 on every trait (unbeatable_evidence) and answers of 2 tokens are degenerate
    # (fewer than 3 words), which every reward scores 0: every row is short of the evidence by 1 on
    # every prompt, so the paired decision calls every row beaten at its first look, whatever the
    # tiny model's noise
    root = copy_project(prepared_project, tmp_path / "project", evaluation={"max_new_tokens": 2, "min_prompts": 8},
                        search={"mode": "lazy", "max_trainings": 6, "max_repairs": 1, "warm_start": False})
    unbeatable_evidence(root)
    cfg = load_config(root / "params.yaml")  # warm_start off: only a repair starts from an adapter
    real, calls, alive = train_module.train, [], [True]

    def train(*args, init_adapter=None, **kwargs):
        calls.append("repair" if init_adapter is not None else "first")
        if init_adapter is not None and alive[0]:
            alive[0] = False
            raise Killed("killed during the first repair")
        return real(*args, init_adapter=init_adapter, **kwargs)

    monkeypatch.setattr(train_module, "train", train)
    with pytest.raises(Killed):
        STAGES["align"].run(cfg, root)
    assert calls == ["first"] * 3 + ["repair"]  # the d extremes, then the first beaten row
    members = root / "models" / "members"
    finished = {p.name: (p / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
                for p in members.glob("[!.]*")}
    assert len(finished) == 3

    calls.clear()
    metrics = STAGES["align"].run(cfg, root)
    assert calls == ["repair"] * 3  # each beaten row once; none of the finished trainings again
    assert {k: (members / k / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
            for k in finished} == finished
    assert metrics["trainings"] == 6 and metrics["repairs"] == 3
    assert metrics["still_beaten"] == 3 and metrics["stopped"] == "budget"
    pool = load_pool(root)
    assert len(pool.policies) == 3  # one row per weight: a repair replaces its row or is dropped
    repairs = [h for h in pool.history["steps"] if h["source"] == "repair"]
    assert sorted(h["row"] for h in repairs) == [0, 1, 2]
    for h in repairs:  # the policy kept in each row is the better of the two at that weight
        kept = pool.policies[h["row"]]
        assert (kept.key == h["key"]) == (h["kept"] == "new")
    # a repair job starts from the row's own adapter (best-of-N beat it) with another seed
    from palm_tasks.jobs import load_policy

    repaired = [load_policy(members / h["key"]) for h in repairs]
    assert all(p.training["job"]["attempt"] == 1 and p.training["job"]["init_from"] in finished
               for p in repaired)
