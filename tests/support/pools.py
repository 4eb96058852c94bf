"""Policies and a sample pool with chosen values, for tests of what the coverage stage builds from
them (the router, the registry, the hostile inputs): each policy is measured on `prompts`
prompts that all score its value exactly (a constant per-prompt table, se 0), and best-of-N of
the base scores `base` on every trait, below every policy, so the evidence agrees with the values
the test chose."""
from pathlib import Path

import numpy as np

from palm_tasks.schema import Policy, SamplePool, ScoreTable

PROMPTS = 64
EVALUATION = {"n_prompts": PROMPTS, "chunk_prompts": 32, "min_prompts": PROMPTS}  # params.yaml evaluation


def policies_with_values(root: Path, W, R, traits, prompts: int = PROMPTS) -> list[Policy]:
    """Policies m0, m1, ... as the align stage holds them (directories under root), of values R."""
    out = []
    for j, (w, r) in enumerate(zip(np.asarray(W, float), np.asarray(R, float))):
        table = ScoreTable(tuple(traits), "test", 1, np.tile(r, (prompts, 1)),
                           {"degenerate_share": 0.0, "relevance": 0.5, "answers": prompts})
        out.append(Policy(key=f"m{j}", kind="trained", traits=tuple(traits), weights=tuple(w), value=table.value,
                          path=Path(root) / "models" / "members" / f"m{j}").with_scores(table))
    return out


def flat_sample_pool(traits, prompts: int = PROMPTS, n: int = 2, base: float = 0.05) -> SamplePool:
    """The base's sample pool: n answers to each prompt, every one scoring `base` on every trait."""
    return SamplePool(split="eval", traits=tuple(traits), reward_versions=tuple("v" for _ in traits),
                      base_model_sha256="0" * 64, sampler={"n": n}, prompts=tuple(f"p{i}" for i in range(prompts)),
                      completions=(("an answer",) * n,) * prompts, scores=np.full((prompts, n, len(traits)), base),
                      relevance=np.full((prompts, n), 0.5), quality={"degenerate_share": 0.0, "relevance": 0.5})
