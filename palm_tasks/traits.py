"""The traits a run can score, by name, and the check of a declared reward-model directory.

What params.yaml may name, known without loading a reward: the configuration validates traits
against BUILTIN_TRAITS and reward-model directories with `check_reward_model_dir` before any
work starts. The rewards themselves (scoring, models, classifiers) live in palm_tasks/llm/.
"""

from __future__ import annotations

import json
from pathlib import Path

# The built-in rewards (palm_tasks/llm/rewards.py REWARD_CLASSES has one class for each);
# params.yaml `rewards.models` declares more.
BUILTIN_TRAITS = ("safety", "humor", "brevity", "sentiment", "relevance", "readability", "correctness")

# Each task's prompt set (palm_tasks/llm/prompts.py) and the traits it is meant for; `traits`
# defaults to the task's when params.yaml leaves it out (or sets it to null).
TASK_TRAITS = {
    "assistant": ["safety", "humor", "brevity"],
    "gsm": ["correctness", "brevity"],
    "arithmetic": ["correctness", "brevity"],
    "safety": ["relevance", "safety"],
}

RM_NORMALIZATIONS = ("sigmoid", "softmax", "minmax")


def reward_model_weights(path: Path) -> list[Path]:
    """The safetensors weight files of a reward-model directory, in name order."""
    return sorted(Path(path).glob("*.safetensors"))


def check_reward_model_dir(path: Path, label: int, normalize: str) -> dict:
    """The config.json of a local sequence-classification reward model, after checking what
    params.yaml declares about it. ValueError says what is wrong (read before any work)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"no such directory {path}")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json (not a Hugging Face model directory)")
    if not reward_model_weights(path):
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        raise ValueError(f"{path} has no *.safetensors weights" + (
            f" (found {', '.join(pickled)}: pickled weights are never loaded; convert them to "
            "safetensors)" if pickled else ""))
    config = json.loads((path / "config.json").read_text())
    n_labels = len(config.get("id2label") or {}) or int(config.get("num_labels", 2))
    if not 0 <= label < n_labels:
        raise ValueError(f"label = {label} but the model at {path} has {n_labels} output(s) "
                         f"(labels 0..{n_labels - 1})")
    if normalize == "softmax" and n_labels < 2:
        raise ValueError(f"normalize = softmax needs at least 2 outputs; the model at {path} has {n_labels}")
    return config
