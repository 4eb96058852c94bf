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
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from palm_tasks.paths import Paths

SCHEMA_VERSION = 1
PolicyKind = Literal["trained", "soup"]


class ArtifactError(ValueError):
    """A stage's output file is missing, damaged or of another layout; says what to rerun."""


def _vec(x) -> tuple[float, ...]:
    return tuple(float(v) for v in np.asarray(x, dtype=float).ravel())


def _by_trait(traits, x, digits: int = 6) -> dict[str, float]:
    return {t: round(float(v), digits) for t, v in zip(traits, x)}


def _from_trait_map(traits, value) -> tuple[float, ...]:
    """A per-trait value written either as {trait: x} or as a list in trait order."""
    if isinstance(value, dict):
        return tuple(float(value[t]) for t in traits)
    return _vec(value)


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
        return cls(_vec(scores.mean(axis=0)), _vec(se), n)


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

    def to_json(self) -> dict:
        out = {"schema_version": SCHEMA_VERSION, "key": self.key, "kind": self.kind,
               "traits": list(self.traits), "weights": list(self.weights),
               "values": list(self.value.mean), "std_errors": list(self.value.se),
               "n_eval": self.value.n}
        if self.kind == "soup":
            out.update(ingredients=list(self.ingredients), lambdas=list(self.lambdas))
        if self.quality:
            out["quality"] = self.quality
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
                   weights=_vec(data["weights"]),
                   value=ValueVector(_vec(data["values"]), _vec(data["std_errors"]), int(data["n_eval"])),
                   training=data.get("training") or {}, ingredients=tuple(data.get("ingredients", ())),
                   lambdas=_vec(data.get("lambdas", ())), path=path, quality=data.get("quality") or {})


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

    def best_of_n(self, weights, min_relevance: float = 0.0):
        """BoN_N at each weight among the on-topic answers: core.evidence.best_of_n's
        (mean (m, d), se (m, d), scalar se (m,))."""
        from palm_tasks.core.evidence import best_of_n

        return best_of_n(self.scores, weights, self.on_topic(min_relevance))

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


@dataclass(frozen=True)
class Certificate:
    """The stored form of a certificate (palm_tasks.core.certificate.Certificate): (eps, delta)
    coverage of the whole simplex by the members, relative to `relative_to`."""

    # the question: coverage at (eps, delta), member values taken z standard errors low
    eps: float
    delta: float
    z: float
    # the answer, and what it would take: the worst corner, the tolerances reached there
    certified: bool
    worst_slack: float
    max_eps: float
    max_delta: float
    worst_weight: tuple[float, ...] = ()
    # the evidence: every corner weight of the members' envelope and its slack
    corner_weights: tuple[tuple[float, ...], ...] = ()
    slacks: tuple[float, ...] = ()
    members: tuple[int, ...] = ()  # rows of the candidates (trained, then soups)
    n_oracle: int = 0
    tolerance: float = 0.0
    relative_to: str = ""

    @classmethod
    def of(cls, cert, relative_to: str | None = None) -> "Certificate":
        """From the core's certificate object."""
        return cls(certified=bool(cert.certified), worst_slack=float(cert.worst_slack),
                   max_eps=float(cert.max_eps), max_delta=float(cert.max_delta), eps=float(cert.eps),
                   delta=float(cert.delta), z=float(cert.z), worst_weight=_vec(cert.worst_weight),
                   members=tuple(int(m) for m in cert.members), n_oracle=int(cert.n_oracle),
                   corner_weights=tuple(_vec(c) for c in cert.corner_weights),
                   slacks=_vec(cert.slacks), tolerance=float(cert.tolerance),
                   relative_to=relative_to or cert.relative_to)

    def to_json(self) -> dict:
        out = asdict(self)
        out["n_corners"] = len(self.corner_weights)
        return out

    @classmethod
    def from_json(cls, data: dict) -> "Certificate":
        names = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in names}
        for k in ("worst_weight", "slacks"):
            if k in data:
                data[k] = _vec(data[k])
        data["members"] = tuple(int(m) for m in data.get("members", ()))
        data["corner_weights"] = tuple(_vec(c) for c in data.get("corner_weights", ()))
        return cls(**data)


@dataclass(frozen=True)
class Member:
    """A portfolio member: a policy of the pool and the share of users routed to it."""

    key: str
    kind: PolicyKind
    path: str  # relative to the project root
    weights: tuple[float, ...]
    value: ValueVector
    share: float  # of the Dirichlet(1) users of the coverage stage, by the routing rule
    ingredients: tuple[str, ...] = ()
    lambdas: tuple[float, ...] = ()
    model_uri: str | None = None  # set in the registered copy of the portfolio
    model_version: str | None = None

    def to_json(self, traits) -> dict:
        out = {"key": self.key, "kind": self.kind, "path": self.path,
               "weights": _by_trait(traits, self.weights), "values": _by_trait(traits, self.value.mean),
               "std_errors": _by_trait(traits, self.value.se), "n_eval": self.value.n,
               "share": round(self.share, 6)}
        if self.kind == "soup":
            out.update(ingredients=list(self.ingredients), lambdas=list(self.lambdas))
        if self.model_uri:
            out.update(model_uri=self.model_uri, model_version=self.model_version)
        return out

    @classmethod
    def from_json(cls, data: dict, traits) -> "Member":
        kind = "soup" if data.get("kind") == "soup" else "trained"  # 'member' before versioning
        return cls(key=data["key"], kind=kind,
                   path=data.get("path") or f"models/{'soups' if kind == 'soup' else 'members'}/{data['key']}",
                   weights=_from_trait_map(traits, data["weights"]),
                   value=ValueVector(_from_trait_map(traits, data["values"]),
                                     _from_trait_map(traits, data.get("std_errors") or [0.0] * len(traits)),
                                     int(data.get("n_eval", 0))),
                   share=float(data.get("share", 0.0)), ingredients=tuple(data.get("ingredients", ())),
                   lambdas=_vec(data.get("lambdas", ())), model_uri=data.get("model_uri"),
                   model_version=data.get("model_version"))


@dataclass(frozen=True)
class PolicyTable:
    """Weights, values and standard errors of some policies, one row each. The portfolio keeps
    two: its oracle rows (the trained policies, each trusted optimal at its weight: they bound
    OPT(w) from above in the certificate and in every route's guarantee) and the soups that were
    candidates (they raise the best value known at an oracle row's weight, as in the certificate)."""

    keys: tuple[str, ...]
    weights: tuple[tuple[float, ...], ...]
    values: tuple[tuple[float, ...], ...]
    std_errors: tuple[tuple[float, ...], ...]

    def to_json(self) -> dict:
        return {k: [list(r) if isinstance(r, tuple) else r for r in v] for k, v in asdict(self).items()}

    @classmethod
    def empty(cls) -> "PolicyTable":
        return cls((), (), (), ())

    @classmethod
    def from_json(cls, data: dict) -> "PolicyTable":
        return cls(tuple(data["keys"]), *(tuple(_vec(r) for r in data[k])
                                          for k in ("weights", "values", "std_errors")))


@dataclass(frozen=True)
class Portfolio:
    """What the coverage stage chose and why: the members, the certificate, the figures behind it."""

    id: str
    task: str
    traits: tuple[str, ...]
    eps: float
    delta: float
    z: float
    members: tuple[Member, ...]
    certificate: Certificate
    oracle: PolicyTable
    soup_rows: PolicyTable = field(default_factory=PolicyTable.empty)  # the soups that were candidates
    pool: tuple[str, ...] = ()  # keys of the trained pool
    soups: dict = field(default_factory=dict)  # candidates, how many are in the portfolio
    pool_certificate: dict = field(default_factory=dict)  # the whole pool's certificate
    conservative_certificate: dict = field(default_factory=dict)  # at z_conservative
    oracle_check: dict = field(default_factory=dict)  # core.metrics.OracleCheck.to_dict()
    coverage: dict = field(default_factory=dict)  # gaps on the test weights (numbers and what they are)
    evidence: dict = field(default_factory=dict)  # the evidence audit: worst evidence gap, where, against what
    gate: dict = field(default_factory=dict)  # the quality gate: passed, each member's figures, reasons
    base_model_sha256: str | None = None  # the base model every member's adapter belongs to
    base_model_path: str | None = None  # set in the registered copy

    @property
    def member_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(weights, values, standard errors) of the members, one row each."""
        return (np.array([m.weights for m in self.members]), np.array([m.value.mean for m in self.members]),
                np.array([m.value.se for m in self.members]))

    def blockers(self) -> list[str]:
        """Why this portfolio may not be promoted to production (empty: it may): it must be
        certified, every member must pass the quality gate, and the evidence must not
        contradict the certificate (docs/quality-gate.md, docs/evidence.md)."""
        out = []
        if not self.certificate.certified:
            out.append(f"not certified at eps = {self.eps}, delta = {self.delta} "
                       f"(reaches eps = {self.certificate.max_eps:.4f})")
        failing = [k for k, g in (self.gate.get("members") or {}).items() if not g.get("passed")]
        if failing:
            out.append("quality gate failed by " + ", ".join(
                f"{k[:10]} ({'; '.join(self.gate['members'][k].get('reasons', []))})" for k in failing))
        if self.evidence.get("contradicted"):
            c = self.evidence.get("contradiction") or {}
            out.append(f"the evidence contradicts the certificate: at w = {c.get('weight')} the portfolio "
                       f"gives {c.get('portfolio_value', float('nan')):.4f}, below (1 - eps) x "
                       f"{c.get('evidence', float('nan')):.4f} - delta ({c.get('against')}) by "
                       f"{c.get('shortfall', float('nan')):.4f} ± {c.get('se', float('nan')):.4f}")
        return out

    def member(self, key: str) -> Member:
        for m in self.members:
            if m.key == key:
                return m
        raise KeyError(f"portfolio {self.id[:10]} has no member {key}")

    def to_json(self) -> dict:
        out = {"schema_version": SCHEMA_VERSION, "id": self.id, "task": self.task,
               "traits": list(self.traits), "eps": self.eps, "delta": self.delta, "z": self.z,
               "members": [m.to_json(self.traits) for m in self.members], "pool": list(self.pool),
               "soups": self.soups, "certificate": self.certificate.to_json(),
               "pool_certificate": self.pool_certificate,
               "conservative_certificate": self.conservative_certificate,
               "oracle_check": self.oracle_check, "coverage": self.coverage,
               "evidence": self.evidence, "gate": self.gate,
               "oracle": self.oracle.to_json(), "soup_rows": self.soup_rows.to_json(),
               "base_model_sha256": self.base_model_sha256}
        if self.base_model_path:
            out["base_model_path"] = self.base_model_path
        return out

    @classmethod
    def from_json(cls, data: dict) -> "Portfolio":
        version = data.get("schema_version", 0)
        if version not in (0, SCHEMA_VERSION):
            raise ArtifactError(f"schema_version {version} is not {SCHEMA_VERSION}")
        traits = tuple(data["traits"])
        members = tuple(Member.from_json(m, traits) for m in data["members"])
        if not members:
            raise ArtifactError(f"portfolio {data.get('id')} has no members")
        oracle = data.get("oracle")
        if oracle is None:  # before versioning, hand-made files: the members bound OPT, more loosely
            oracle = {"keys": [m.key for m in members], "weights": [m.weights for m in members],
                      "values": [m.value.mean for m in members], "std_errors": [m.value.se for m in members]}
        return cls(id=str(data["id"]), task=str(data.get("task", "")), traits=traits,
                   eps=float(data["eps"]), delta=float(data["delta"]), z=float(data.get("z", 0.0)),
                   members=members, certificate=Certificate.from_json(data["certificate"]),
                   oracle=PolicyTable.from_json(oracle),
                   soup_rows=PolicyTable.from_json(data["soup_rows"]) if "soup_rows" in data else PolicyTable.empty(),
                   pool=tuple(data.get("pool", ())),
                   soups=data.get("soups") or {}, pool_certificate=data.get("pool_certificate") or {},
                   conservative_certificate=data.get("conservative_certificate") or {},
                   oracle_check=data.get("oracle_check") or {}, coverage=data.get("coverage") or {},
                   evidence=data.get("evidence") or {}, gate=data.get("gate") or {},
                   base_model_sha256=data.get("base_model_sha256"),
                   base_model_path=data.get("base_model_path"))


@dataclass(frozen=True)
class Route:
    """Where a user with these weights goes, and what is guaranteed for them."""

    member_key: str
    model_uri: str | None  # models:/<prefix>-<task>-member/<version>, None if not registered
    adapter_path: str | None  # local adapter directory when the project has it
    weights: dict  # normalized, trait -> weight
    normalized: bool  # the weights given did not sum to 1 and were divided by their sum
    value: float  # L(w) = w . (R - z se) of the member
    opt_upper_bound: float  # U(w) >= OPT(w)
    eps_at_w: float  # smallest eps with L >= (1 - eps) U - delta at this w
    delta: float
    portfolio_id: str
    certified: bool  # the portfolio's certificate at (eps, delta) over the whole simplex
    eps: float
    max_eps: float  # the certificate's worst eps over the simplex at this delta

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """The lines `palm route` prints."""
        w = ", ".join(f"{t}={v:.4g}" for t, v in self.weights.items())
        lines = []
        if self.normalized:
            lines.append(f"note: the weights did not sum to 1 and were normalized to {w}")
        lines += [
            f"member: {self.member_key}",
            f"model URI: {self.model_uri or '(not registered)'}",
            f"adapter: {self.adapter_path or '(not on this machine)'}",
            f"weights: {w}",
            f"guaranteed at these weights: value {self.value:.4f}, at most "
            f"{self.opt_upper_bound - self.value:.4f} below the best possible (OPT(w) <= "
            f"{self.opt_upper_bound:.4f}), i.e. value >= (1 - {self.eps_at_w:.4f}) x OPT(w) - "
            f"{self.delta}",
            f"portfolio {self.portfolio_id[:10]}: "
            f"{'certified' if self.certified else 'NOT certified'} for eps={self.eps}, "
            f"delta={self.delta} over the whole simplex (worst eps {self.max_eps:.4f}); "
            "relative to the alignment oracle and the measured values",
        ]
        return "\n".join(lines)


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


def load_portfolio(root: Path) -> Portfolio:
    """The portfolio the coverage stage chose."""
    return read(Paths(root).portfolio, Portfolio, "coverage")
