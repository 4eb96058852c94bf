"""What a policy's measured chunks on disk say, read in the test from the files themselves (not
through palm_tasks.scores): each chunk holds every answer's rewards, answers_per_prompt of them per
prompt, in order."""
import json
from pathlib import Path

import numpy as np


def measured_values(policy_dir: Path, eval_key: str | None = None) -> np.ndarray:
    """The policy's value vector as its chunks hold it: each prompt's mean reward over its answers,
    averaged over every measured prompt. eval_key: which evaluation (the only one when None)."""
    homes = sorted((Path(policy_dir) / "evaluations").iterdir())
    if eval_key is None:
        assert len(homes) == 1, f"{policy_dir}: {len(homes)} evaluations, name one"
        home = homes[0]
    else:
        home = Path(policy_dir) / "evaluations" / eval_key
    per_prompt = []
    for chunk in sorted(home.glob("chunk-*.json")):
        data = json.loads(chunk.read_text())
        k = data["answers_per_prompt"]
        rewards = np.array(data["rewards"], float)
        per_prompt.append(rewards.reshape(len(rewards) // k, k, -1).mean(axis=1))
    assert per_prompt, f"{home}: no measured chunk"
    return np.concatenate(per_prompt).mean(axis=0)
