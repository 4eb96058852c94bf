"""The artifacts that pass between stages, as frozen dataclasses with JSON round trips.

Every file one stage writes and another reads is one of these types, read and written here and
nowhere else (`read` / `write`). Each file carries `schema_version`; a file from the layout before
versioning (no `schema_version`) is migrated on read where nothing is missing, and a file that
cannot be read as its type raises `ArtifactError`, which names the file and the stage to rerun.

    ValueVector   mean and standard error of each normalized reward over n evaluation answers
    Policy        a trained LoRA adapter or a soup, its weights and value   (member.json)
    Pool          the policies a stage produced, in order                   (data/pool.json, data/soups.json)
    Certificate   the (eps, delta) certificate of a portfolio, as stored
    Portfolio     members, certificate, coverage figures, oracle rows       (portfolio.json)
    Route         where a user's weights go and what is guaranteed there
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from palm_tasks.json_fields import (FieldError, integer, mapping, numbers, optional_mapping, required,
                                    sequence, string, strings)
from palm_tasks.paths import Paths

SCHEMA_VERSION = 1
PolicyKind = Literal["trained", "soup"]


class ArtifactError(ValueError):
    """A stage's output file is missing, damaged or of another layout; says what to rerun."""


def vector(x) -> tuple[float, ...]:
    return tuple(float(v) for v in np.asarray(x, dtype=float).ravel())


def by_trait(traits, x, digits: int = 6) -> dict[str, float]:
    return {t: round(float(v), digits) for t, v in zip(traits, x)}


@dataclass(frozen=True)
class ValueVector:
    """R(pi): the mean of each normalized reward over n answers, with its standard error."""

    mean: tuple[float, ...]
    se: tuple[float, ...]
    n: int

    @property
    def means(self) -> np.ndarray:
        return np.array(self.mean)

    @property
    def ses(self) -> np.ndarray:
        return np.array(self.se)

    @classmethod
    def from_scores(cls, scores: np.ndarray, answers_per_prompt: int = 1) -> "ValueVector":
        """From per-answer scores (n, d), ordered prompt by prompt with `answers_per_prompt` answers
        each: the mean per trait and its standard error over prompts. Answers to one prompt are
        correlated (a hard prompt is hard for all of them), so the prompt is the unit of sampling:
        the se is the std of the per-prompt means / sqrt(prompts), as best-of-N's is."""
        scores = np.asarray(scores, dtype=float)
        n, k = len(scores), int(answers_per_prompt)
        if k < 1 or n % k:
            raise ValueError(f"{n} answers are not whole groups of {k} per prompt")
        per_prompt = scores.reshape(n // k, k, -1).mean(axis=1) if n else scores
        p = len(per_prompt)
        se = per_prompt.std(axis=0, ddof=1) / np.sqrt(p) if p > 1 else np.zeros(scores.shape[1])
        return cls(vector(scores.mean(axis=0)), vector(se), n)


@dataclass(frozen=True)
class ScoreTable:
    """A policy's per-prompt rewards on the evaluation prompts, in their one shuffled order
    (docs/theory.md section 13): row i is the mean reward of `answers_per_prompt` answers to
    prompt i, for the first `prompts` prompts measured (a whole number of chunks). Its value
    vector is derived from it, and decisions compare two tables prompt by prompt. `eval_key`
    names what decides the answers (base model, rewards, prompts, sampler, seed): tables of one
    key are comparable; `quality` is the answer quality over every answer measured."""

    traits: tuple[str, ...]
    eval_key: str
    answers_per_prompt: int
    scores: np.ndarray = field(compare=False)
    quality: dict = field(default_factory=dict, compare=False)

    @property
    def prompts(self) -> int:
        return int(len(self.scores))

    @property
    def value(self) -> ValueVector:
        S = np.asarray(self.scores, float)
        se = S.std(axis=0, ddof=1) / np.sqrt(len(S)) if len(S) > 1 else np.zeros(S.shape[1])
        return ValueVector(vector(S.mean(axis=0)), vector(se), len(S) * self.answers_per_prompt)

    def to_json(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "traits": list(self.traits), "eval_key": self.eval_key,
                "answers_per_prompt": self.answers_per_prompt, "quality": self.quality,
                "scores": np.round(np.asarray(self.scores, float), 6).tolist()}

    @classmethod
    def from_json(cls, data: dict, where: str = "scores") -> "ScoreTable":
        at = f"{where}."
        data = mapping(data, where)
        if data.get("schema_version") != SCHEMA_VERSION:
            raise FieldError(f"{at}schema_version is not {SCHEMA_VERSION}")
        traits = strings(required(data, "traits", at), at + "traits")
        rows = sequence(required(data, "scores", at), at + "scores")
        if not rows:
            raise FieldError(f"{at}scores is empty: a table holds at least one prompt")
        scores = np.array([numbers(r, f"{at}scores[{i}]", len(traits), 0) for i, r in enumerate(rows)])
        if (scores > 1).any():
            raise FieldError(f"{at}scores holds rewards above 1")
        return cls(traits=traits, eval_key=string(required(data, "eval_key", at), at + "eval_key"),
                   answers_per_prompt=integer(required(data, "answers_per_prompt", at), at + "answers_per_prompt", 1),
                   scores=scores, quality=optional_mapping(data, "quality", at))


@dataclass(frozen=True)
class Policy:
    """A policy of the pool: the base model plus a LoRA adapter (trained, or a soup of trained ones).

    `weights` is the training weight of a trained policy (an oracle row of the certificate); for a
    soup it is where the mix is meant to sit (sum of lambda_i w_i), never an oracle row.
    `training` holds the job's record (spec, seconds, device, MLflow run id, worker).
    """

    key: str
    kind: PolicyKind
    traits: tuple[str, ...]
    weights: tuple[float, ...]
    value: ValueVector
    training: dict = field(default_factory=dict, compare=False)
    ingredients: tuple[str, ...] = ()
    lambdas: tuple[float, ...] = ()
    path: Path | None = field(default=None, compare=False)  # where it was read from; not stored
    # answers on the eval prompts: degenerate_share and relevance (palm_tasks.llm.validity);
    # empty for a policy stored before the quality gate existed
    quality: dict = field(default_factory=dict, compare=False)
    # its per-prompt rewards as measured so far (not in member.json: the chunks are the record)
    scores: ScoreTable | None = field(default=None, compare=False)

    @property
    def w(self) -> np.ndarray:
        return np.array(self.weights)

    @property
    def values(self) -> np.ndarray:
        return self.value.means

    @property
    def std_errors(self) -> np.ndarray:
        return self.value.ses

    @property
    def adapter(self) -> Path:
        if self.path is None:
            raise ArtifactError(f"policy {self.key}: no directory known for its adapter")
        return self.path / "adapter"

    @property
    def base_model_sha256(self) -> str | None:
        return (self.training.get("job") or {}).get("base_model_sha256") or self.training.get("base_model_sha256")

    def with_value(self, value: ValueVector) -> "Policy":
        return replace(self, value=value)

    def with_scores(self, table: ScoreTable) -> "Policy":
        """The policy as measured by `table`: its value and answer quality are the table's."""
        return replace(self, value=table.value, scores=table, quality=dict(table.quality) or self.quality)

    def to_json(self) -> dict:
        out = {"schema_version": SCHEMA_VERSION, "key": self.key, "kind": self.kind,
               "traits": list(self.traits), "weights": list(self.weights),
               "values": list(self.value.mean), "std_errors": list(self.value.se),
               "n_eval": self.value.n}
        if self.kind == "soup":
            out.update(ingredients=list(self.ingredients), lambdas=list(self.lambdas))
        if self.quality:
            out["quality"] = self.quality
        if self.scores is not None:
            out["scores"] = self.scores.to_json()
        return {**out, "training": self.training}

    @classmethod
    def from_json(cls, data: dict, path: Path | None = None) -> "Policy":
        version = data.get("schema_version", 0)
        if version == 0:  # the unversioned member.json: job fields at the top level
            data = {**data, "kind": "soup" if data.get("kind") == "soup" else "trained",
                    "training": {k: v for k, v in data.items()
                                 if k not in ("key", "kind", "traits", "weights", "values", "std_errors",
                                              "n_eval", "ingredients", "lambdas")}}
        elif version != SCHEMA_VERSION:
            raise ArtifactError(f"schema_version {version} is not {SCHEMA_VERSION}")
        return cls(key=data["key"], kind=data["kind"], traits=tuple(data["traits"]),
                   weights=vector(data["weights"]),
                   value=ValueVector(vector(data["values"]), vector(data["std_errors"]), int(data["n_eval"])),
                   training=data.get("training") or {}, ingredients=tuple(data.get("ingredients", ())),
                   lambdas=vector(data.get("lambdas", ())), path=path, quality=data.get("quality") or {},
                   scores=None if data.get("scores") is None else ScoreTable.from_json(data["scores"]))


@dataclass(frozen=True)
class SamplePool:
    """N answers of the base model to each of some prompts, with every trait's reward: the data
    behind the best-of-N reference (docs/evidence.md) and the first round of rsft jobs.

    `sampler` holds what decides the answers (N, tokens, temperature, seed); `scores` has shape
    (prompts, N, d). Produced once by the rewards stage and read by every job and stage."""

    split: str  # "eval" | "train"
    traits: tuple[str, ...]
    reward_versions: tuple[str, ...]
    base_model_sha256: str
    sampler: dict
    prompts: tuple[str, ...]
    completions: tuple[tuple[str, ...], ...]
    scores: np.ndarray = field(compare=False)
    relevance: np.ndarray = field(compare=False)  # (prompts, N): each answer's llm.validity.relevance
    quality: dict = field(default_factory=dict)  # the base's answer quality (llm.validity.answer_quality)

    @property
    def n(self) -> int:
        return self.scores.shape[1]

    def on_topic(self, min_relevance: float) -> np.ndarray | None:
        """(prompts, N) booleans: the answers whose relevance reaches min_relevance (the ones rsft
        may imitate and best-of-N may pick); None when min_relevance is 0 (every answer)."""
        return None if min_relevance <= 0 else self.relevance >= min_relevance

    def to_json(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "split": self.split, "traits": list(self.traits),
                "reward_versions": list(self.reward_versions), "base_model_sha256": self.base_model_sha256,
                "sampler": self.sampler, "prompts": list(self.prompts),
                "completions": [list(c) for c in self.completions], "quality": self.quality,
                "scores": np.round(self.scores, 6).tolist(), "relevance": np.round(self.relevance, 6).tolist()}

    @classmethod
    def from_json(cls, data: dict) -> "SamplePool":
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ArtifactError(f"schema_version {data.get('schema_version')} is not {SCHEMA_VERSION}")
        scores = np.asarray(data["scores"], dtype=float)
        prompts, completions = tuple(data["prompts"]), tuple(tuple(c) for c in data["completions"])
        if scores.ndim != 3 or scores.shape[:2] != (len(prompts), len(completions[0]) if completions else 0) \
                or scores.shape[2] != len(data["traits"]):
            raise ArtifactError(f"scores of shape {scores.shape} do not match {len(prompts)} prompts, "
                                f"{len(data['traits'])} traits")
        if "relevance" not in data:
            raise ArtifactError("no per-answer relevance (a pool written before it was kept): run the rewards "
                                "stage again")
        relevance = np.asarray(data["relevance"], dtype=float)
        if relevance.shape != scores.shape[:2]:
            raise ArtifactError(f"relevance of shape {relevance.shape} does not match scores {scores.shape}")
        return cls(split=data["split"], traits=tuple(data["traits"]),
                   reward_versions=tuple(data["reward_versions"]),
                   base_model_sha256=data["base_model_sha256"], sampler=dict(data["sampler"]),
                   prompts=prompts, completions=completions, scores=scores, relevance=relevance,
                   quality=data.get("quality") or {})


@dataclass(frozen=True)
class Pool:
    """The policies a stage produced (align: trained; soups: soups), in the order it made them.

    Values are the ones the pool counts with: a retraining run re-evaluates kept policies under
    the current rewards and stores the new value here, not in the policy's own directory.
    """

    kind: PolicyKind
    mode: str  # how the policies were chosen: lazy, coarse, grid, uniform, random, retrain, soups
    policies: tuple[Policy, ...]
    history: dict = field(default_factory=dict)  # the search's steps and why it stopped
    trained: int = 0  # jobs run by this stage
    reused: int = 0  # jobs found finished
    note: str | None = None  # why the pool is empty, when it is

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.policies]

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(weights, values, standard errors) with one row per policy."""
        d = len(self.policies[0].traits) if self.policies else 0
        shape = (len(self.policies), d)
        return (np.array([p.weights for p in self.policies]).reshape(shape),
                np.array([p.value.mean for p in self.policies]).reshape(shape),
                np.array([p.value.se for p in self.policies]).reshape(shape))

    def to_json(self, root: Path | None = None) -> dict:
        """`root`: the project; policy directories are stored relative to it."""
        def where(p: Policy) -> str | None:
            if p.path is None:
                return None
            return str(Path(p.path).resolve().relative_to(Path(root).resolve())) if root else str(p.path)

        return {"schema_version": SCHEMA_VERSION, "kind": self.kind, "mode": self.mode,
                "policies": [{**p.to_json(), "path": where(p)} for p in self.policies],
                "history": self.history, "trained": self.trained, "reused": self.reused,
                "note": self.note}

    @classmethod
    def from_json(cls, data: dict, path: Path | None = None) -> "Pool":
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ArtifactError(f"schema_version {data.get('schema_version')} is not {SCHEMA_VERSION}")
        root = path.parent.parent if path is not None else None  # data/pool.json -> the project
        policies = tuple(Policy.from_json(p, (root / p["path"]) if root and p.get("path") else None)
                         for p in data["policies"])
        return cls(kind=data["kind"], mode=data["mode"], policies=policies,
                   history=data.get("history") or {}, trained=int(data.get("trained", 0)),
                   reused=int(data.get("reused", 0)), note=data.get("note"))


# What the readers of a portfolio format as numbers (console, registry, coverage stage): checked
# where present, so a summary never fails on a string where a figure belongs.


# ------------------------------------------------------------------------------ files

def write(path: Path, artifact: Any) -> None:
    """Write an artifact (or a plain JSON value) atomically: readers never see half a file."""
    path = Path(path)
    if isinstance(artifact, Pool):  # data/<pool>.json: policy paths relative to the project
        data = artifact.to_json(root=path.parent.parent)
    else:
        data = artifact.to_json() if hasattr(artifact, "to_json") else artifact
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def read_json(path: Path, stage: str) -> Any:
    """A JSON file a stage wrote, or ArtifactError naming the stage to run."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: run `palm stage {stage}` first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}): rerun `palm stage {stage}`") from None
    except RecursionError:
        raise ArtifactError(f"{path} is nested too deeply to be a stage's output: rerun "
                            f"`palm stage {stage}`") from None
    except OSError as exc:  # a directory, unreadable
        raise ArtifactError(f"{path} cannot be read ({exc.strerror or exc}): rerun `palm stage {stage}`") from None


def read(path: Path, kind: type, stage: str):
    """An artifact of type `kind` from `path`, or ArtifactError naming the file and the stage."""
    data = read_json(path, stage)
    try:
        if not isinstance(data, dict):
            raise ArtifactError(f"expected an object, got {type(data).__name__}")
        if kind is Pool:
            return Pool.from_json(data, Path(path))
        if kind is Policy:
            return Policy.from_json(data, Path(path).parent)
        return kind.from_json(data)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as exc:
        # any of these: a field of the wrong type or shape (a list where an object belongs, ...)
        what = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        if len(what) > 200:  # a message can quote the bad value; it may be large
            what = what[:200] + "..."
        raise ArtifactError(f"{path} is not a {kind.__name__} this version reads ({what}): "
                            f"rerun `palm stage {stage}`") from None


# ------------------------------------------------------------------------------ what stages wrote


def load_pool(root: Path) -> Pool:
    """The trained pool the align stage (or a retraining run) wrote."""
    return read(Paths(root).pool, Pool, "align")


def load_soups(root: Path) -> Pool:
    """The soups the soups stage evaluated; an empty pool if the stage has not run."""
    path = Paths(root).soup_pool
    if not path.is_file():
        return Pool(kind="soup", mode="soups", policies=(), note="the soups stage has not run")
    return read(path, Pool, "soups")


def load_samples(root: Path, split: str = "eval") -> SamplePool:
    """The base model's sample pool on the eval (or train) prompts, from the rewards stage."""
    return read(Paths(root).samples / f"{split}.json", SamplePool, "rewards")


