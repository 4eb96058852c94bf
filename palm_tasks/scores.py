"""A policy measured chunk by chunk on the evaluation prompts, and the store of its chunks
(docs/evidence.md; docs/theory.md section 13).

Chunk i holds prompts [i C, (i + 1) C) of the one shuffled order every policy and best-of-N
share (data/prompts/eval.jsonl, C = evaluation.chunk_prompts, up to the cap evaluation.n_prompts),
`evaluation.samples_per_prompt` answers to each, sampled with seed + i: its answers do not depend
on which other chunks exist or in which run they were made. Each chunk is one file, written
atomically with the sha256 of its content inside it, under

    <policy>/evaluations/<eval key>/chunk-00003.json      (written by the stage that made the policy)
    <home>/<policy key>/<eval key>/chunk-00003.json        (a stage measuring another stage's policy)

The first holds for align's and the soups' own policies and a retraining run's; the second for
the evaluate stage, which must not change another stage's outputs (its home is
models/evaluation/scores). A table is read from the first chunk on, stopping at the first one
missing; a damaged chunk is removed, named, and measured again. So a run killed mid-chunk
resumes at that chunk, and a finished chunk is never measured twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from palm_tasks.log import progress, say, warn
from palm_tasks.schema import ScoreTable

EVALUATIONS = "evaluations"
CHUNK_FORMAT = "score-chunk-v1"


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Chunk:
    """One chunk of a policy's answers: prompt texts, completions, each answer's rewards (n k, d),
    degenerate flags and relevance, in prompt order (k answers to a prompt in a row); seconds:
    the wall time its answers and rewards took, tokens: the tokens sampled for its answers (each
    None in chunks written before it was kept)."""
    eval_key: str
    index: int
    answers_per_prompt: int
    prompts: list
    completions: list
    rewards: np.ndarray
    degenerate: np.ndarray
    relevance: np.ndarray
    seconds: float | None = None
    tokens: int | None = None

    def per_prompt(self) -> np.ndarray:
        """(prompts, d): each prompt's mean reward over its answers."""
        k = self.answers_per_prompt
        return self.rewards.reshape(len(self.rewards) // k, k, -1).mean(axis=1)

    def write(self, path: Path) -> None:
        body = {"format": CHUNK_FORMAT, "eval_key": self.eval_key, "index": self.index,
                "answers_per_prompt": self.answers_per_prompt, "prompts": list(self.prompts),
                "completions": list(self.completions), "rewards": np.round(self.rewards, 6).tolist(),
                "degenerate": [bool(b) for b in self.degenerate],
                "relevance": np.round(self.relevance, 6).tolist()}
        if self.seconds is not None:
            body["seconds"] = round(float(self.seconds), 2)
        if self.tokens is not None:
            body["tokens"] = int(self.tokens)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({**body, "sha256": _digest(body)}))
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path, eval_key: str, index: int) -> "Chunk":
        """The chunk in `path`; ValueError if it is not whole (its checksum) or not this chunk."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ValueError(f"not readable as JSON ({str(exc)[:100]})") from None
        if not isinstance(data, dict) or "sha256" not in data:
            raise ValueError("not a chunk file")
        digest = data.pop("sha256")
        if digest != _digest(data):
            raise ValueError("does not match its checksum (damaged)")
        if data.get("format") != CHUNK_FORMAT or data.get("eval_key") != eval_key or data.get("index") != index:
            raise ValueError("is another chunk (format, evaluation key or index differ)")
        k = int(data["answers_per_prompt"])
        rewards = np.asarray(data["rewards"], float)
        n = len(data["prompts"])
        if rewards.ndim != 2 or len(rewards) != n or len(data["completions"]) != n or n % k:
            raise ValueError("its answers and rewards do not match")
        seconds, tokens = data.get("seconds"), data.get("tokens")
        return cls(eval_key, index, k, data["prompts"], data["completions"], rewards,
                   np.asarray(data["degenerate"], bool), np.asarray(data["relevance"], float),
                   float(seconds) if isinstance(seconds, (int, float)) else None,
                   tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None)


def chunk_path(directory: Path, index: int) -> Path:
    return Path(directory) / f"chunk-{index:05d}.json"


def chunk_dirs(policy_path: Path, key: str, eval_key: str, home: Path | None = None) -> tuple[list[Path], Path]:
    """(directories its chunks are read from, the one new chunks go to): the policy's own, and
    with a `home` (a stage measuring another stage's policy) the home's, which is written."""
    own = Path(policy_path) / EVALUATIONS / eval_key
    if home is None:
        return [own], own
    theirs = Path(home) / key / eval_key
    return [theirs, own], theirs


def read_chunks(dirs: list[Path], eval_key: str, upto: int | None = None) -> list[Chunk]:
    """The chunks 0, 1, ... found in `dirs` (the first directory holding a chunk wins), up to
    the first missing one (or `upto` chunks). A damaged chunk is named, removed and ends the list."""
    chunks: list[Chunk] = []
    while upto is None or len(chunks) < upto:
        index = len(chunks)
        path = next((chunk_path(d, index) for d in dirs if chunk_path(d, index).is_file()), None)
        if path is None:
            break
        try:
            chunks.append(Chunk.read(path, eval_key, index))
        except ValueError as exc:
            warn(f"score chunk {path}: {exc}; it will be measured again")
            path.unlink(missing_ok=True)
            break
    return chunks


def table_of(chunks: list[Chunk], traits, eval_key: str, answers_per_prompt: int) -> ScoreTable | None:
    """The ScoreTable of consecutive chunks (None when there are none)."""
    if not chunks:
        return None
    from palm_tasks.llm.validity import garbled

    bad = np.concatenate([c.degenerate for c in chunks])
    rel = np.concatenate([c.relevance for c in chunks])
    noise = garbled([a for c in chunks for a in c.completions])  # from the stored answers: no new key
    quality = {"degenerate_share": float(bad.mean()), "relevance": float(rel.mean()),
               "garbled_share": float(noise.mean()), "answers": int(len(bad))}
    return ScoreTable(tuple(traits), eval_key, answers_per_prompt,
                      np.concatenate([c.per_prompt() for c in chunks]), quality)


def measure(ctx, model, tokenizer, dirs: list[Path], write_dir: Path, prompts: int, label: str = "") -> ScoreTable:
    """The policy's table on at least `prompts` evaluation prompts (whole chunks, at most the
    cap): the chunks found, then the missing ones measured (ctx: jobs.JobContext)."""
    ev, eval_key = ctx.cfg.evaluation, ctx.evaluation_key()
    cap = min(ev.n_prompts, len(ctx.eval_prompts))
    wanted = -(-min(int(prompts), cap) // ev.chunk_prompts)
    chunks = read_chunks(dirs, eval_key, wanted)
    if len(chunks) < wanted:
        from palm_tasks.llm.value import answer_chunk

        say(f"measure{' ' + label if label else ''}: chunks {len(chunks) + 1}-{wanted} of "
            f"{-(-cap // ev.chunk_prompts)} ({ev.chunk_prompts} prompts x {ev.samples_per_prompt} answers each)")
    for index in progress(range(len(chunks), wanted), wanted - len(chunks),
                          f"measure{' ' + label if label else ''}", lines_from=3):
        first = index * ev.chunk_prompts
        part = ctx.eval_prompts[first:min(first + ev.chunk_prompts, cap)]
        started = time.time()
        answers = answer_chunk(model, tokenizer, ctx.rewards, part, ev, ctx.cfg.seed + index)
        # rounded as the file holds them: a table read back equals the one measured
        chunk = Chunk(eval_key, index, ev.samples_per_prompt, answers.prompts, answers.completions,
                      np.round(answers.rewards, 6), answers.degenerate, np.round(answers.relevance, 6),
                      time.time() - started, answers.tokens)
        chunk.write(chunk_path(write_dir, index))
        chunks.append(chunk)
    return table_of(chunks, ctx.cfg.traits, eval_key, ev.samples_per_prompt)
