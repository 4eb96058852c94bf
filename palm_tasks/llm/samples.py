"""The sample pool of the base model: N answers to each prompt, every trait scored once
(docs/evidence.md).

Generating it is the longest part of the rewards stage, so it is written in chunks of prompts:
each chunk is a file of its own, written atomically, under a directory named by the hash of
everything that decides the answers. A killed run resumes at the first missing chunk; changed
settings start a new directory. Chunk i is sampled with seed + i, so the pool is the same
whether it was made in one go or resumed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from palm_tasks.log import say, steps


def sampler_key(sampler: dict) -> str:
    return hashlib.sha256(json.dumps(sampler, sort_keys=True).encode()).hexdigest()[:16]


def sample_pool(model, tokenizer, rewards, prompts: list[str], sampler: dict, chunk_prompts: int,
                work_dir: Path) -> tuple[list[list[str]], np.ndarray]:
    """(completions [P][N], scores (P, N, d)) of `sampler["n"]` answers to each prompt.

    sampler: n, max_new_tokens, temperature, batch_size, seed, and anything else that decides
    the answers (prompt data and reward versions belong in it too: they name the chunks).
    """
    from palm_tasks.llm.models import generate
    from palm_tasks.llm.rewards import score_all

    n = int(sampler["n"])
    chunks = Path(work_dir) / f"chunks-{sampler_key(sampler)}"
    chunks.mkdir(parents=True, exist_ok=True)
    completions, scores = [], []
    starts = range(0, len(prompts), chunk_prompts)
    missing = sum(not (chunks / f"{i:05d}.json").is_file() for i in range(len(starts)))
    if missing < len(starts):
        say(f"sample pool: {len(starts) - missing} of {len(starts)} chunks found from a run before")
    with steps(missing, f"sample pool: chunks of {chunk_prompts} prompts x {n} answers") as advance:
        for i, start in enumerate(starts):
            part = prompts[start:start + chunk_prompts]
            path = chunks / f"{i:05d}.json"
            if path.is_file():
                data = json.loads(path.read_text())
            else:
                flat = [p for p in part for _ in range(n)]
                answers = generate(model, tokenizer, flat, sampler["max_new_tokens"], sampler["temperature"],
                                   sampler["batch_size"], sampler["seed"] + i)
                data = {"completions": answers, "scores": score_all(rewards, flat, answers).round(6).tolist()}
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(data))
                tmp.replace(path)
                advance()
            s = np.asarray(data["scores"], float).reshape(len(part), n, -1)
            completions += [data["completions"][k * n:(k + 1) * n] for k in range(len(part))]
            scores.append(s)
    return completions, np.concatenate(scores, axis=0)


def clear_chunks(work_dir: Path) -> None:
    """Remove the chunk directories once the pool is written."""
    for d in Path(work_dir).glob("chunks-*"):
        shutil.rmtree(d, ignore_errors=True)
