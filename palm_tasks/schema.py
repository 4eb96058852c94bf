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
import math
from dataclasses import asdict, dataclass, field, replace
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


# ------------------------------------------------------------------------------ checked decoding
# What reads an artifact checks each field's type here, so a damaged or hand-edited file is
# refused with the field's name (`read` adds the file's) instead of failing later in a reader
# (a list joined to a path, a string read as an object, a number routed to as a member key).


def _what(x) -> str:
    """The JSON type of a decoded value, for a message (the value itself may be huge)."""
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "true/false"
    if isinstance(x, (int, float)):
        return "a number"
    return {dict: "an object", list: "a list", tuple: "a list", str: "a string"}.get(type(x), type(x).__name__)


def _wrong(where: str, expected: str, x) -> ArtifactError:
    return ArtifactError(f"{where} is {_what(x)}, not {expected}")


def _object(x, where: str) -> dict:
    if not isinstance(x, dict):
        raise _wrong(where, "an object", x)
    return x


def _optional_object(data: dict, key: str, where: str = "") -> dict:
    """data[key] as an object; {} when it is absent or null."""
    value = data.get(key)
    return {} if value is None else _object(value, f"{where}{key}")


def _list(x, where: str) -> list:
    if not isinstance(x, (list, tuple)):  # a tuple: to_json's output read back without a file
        raise _wrong(where, "a list", x)
    return list(x)


def _string(x, where: str, empty: bool = False) -> str:
    if not isinstance(x, str):
        raise _wrong(where, "a string", x)
    if not x and not empty:
        raise ArtifactError(f"{where} is an empty string")
    return x


def _optional_string(x, where: str) -> str | None:
    return None if x is None else _string(x, where, empty=True)


def _boolean(x, where: str) -> bool:
    if not isinstance(x, bool):
        raise _wrong(where, "true or false", x)
    return x


def _number(x, where: str, minimum: float | None = None, finite: bool = True) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise _wrong(where, "a number", x)
    try:
        value = float(x)
    except OverflowError:  # an integer of hundreds of digits
        raise ArtifactError(f"{where} is a number too large for a float") from None
    if finite and not math.isfinite(value):
        raise ArtifactError(f"{where} is {value}, not a finite number")
    if minimum is not None and value < minimum:
        raise ArtifactError(f"{where} is {value}, below {minimum}")
    return value


def _integer(x, where: str, minimum: int | None = None) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise _wrong(where, "an integer", x)
    if minimum is not None and x < minimum:
        raise ArtifactError(f"{where} is {x}, below {minimum}")
    return x


def _strings(x, where: str) -> tuple[str, ...]:
    return tuple(_string(v, f"{where}[{i}]") for i, v in enumerate(_list(x, where)))


def _numbers(x, where: str, n: int | None = None, minimum: float | None = None) -> tuple[float, ...]:
    values = _list(x, where)
    if n is not None and len(values) != n:
        raise ArtifactError(f"{where} has {len(values)} numbers, not {n}")
    return tuple(_number(v, f"{where}[{i}]", minimum) for i, v in enumerate(values))


def _trait_numbers(traits, value, where: str, minimum: float | None = None) -> tuple[float, ...]:
    """A per-trait value written either as {trait: x} (every trait, no other) or as a list in
    trait order; finite numbers."""
    if isinstance(value, dict):
        missing = [t for t in traits if t not in value]
        if missing:
            raise ArtifactError(f"{where} has no {', '.join(missing)}")
        unknown = [k for k in value if k not in traits]
        if unknown:
            raise ArtifactError(f"{where} names {len(unknown)} trait(s) the portfolio does not have")
        return tuple(_number(value[t], f"{where}.{t}", minimum) for t in traits)
    if not isinstance(value, (list, tuple)):
        raise _wrong(where, "an object of trait: number", value)
    return _numbers(value, where, len(traits), minimum)


def _required(data: dict, key: str, where: str = ""):
    if key not in data:
        raise ArtifactError(f"{where}{key} is missing")
    return data[key]


def _relative_path(x, where: str) -> str:
    """A path inside the project, as the stages write it (Paths.relative): relative, no `..`."""
    path = _string(x, where)
    parts = Path(path).parts
    if "\x00" in path or Path(path).is_absolute() or ".." in parts:
        raise ArtifactError(f"{where} is not a path inside the project")
    return path


def _member_key(x, where: str) -> str:
    """A policy key: names a directory (models/members/<key>), so one path component."""
    key = _string(x, where)
    if "/" in key or "\\" in key or "\x00" in key or key in (".", ".."):
        raise ArtifactError(f"{where} is not a policy key (one name, no path)")
    return key


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
    def from_json(cls, data: dict, d: int | None = None, where: str = "certificate") -> "Certificate":
        """Every field checked (`where` names them in an error), weights of d numbers; `n_corners`
        is derived."""
        at = f"{where}."
        data = _object(data, where)
        out: dict[str, Any] = {k: _number(_required(data, k, at), at + k)
                               for k in ("eps", "delta", "z", "worst_slack", "max_eps", "max_delta")}
        out["certified"] = _boolean(_required(data, "certified", at), at + "certified")
        if "worst_weight" in data:
            out["worst_weight"] = _numbers(data["worst_weight"], at + "worst_weight", d)
        out["corner_weights"] = tuple(_numbers(c, f"{at}corner_weights[{i}]", d)
                                      for i, c in enumerate(_list(data.get("corner_weights", []),
                                                                  at + "corner_weights")))
        if "slacks" in data:
            out["slacks"] = _numbers(data["slacks"], at + "slacks", len(out["corner_weights"]))
        out["members"] = tuple(_integer(m, f"{at}members[{i}]", 0)
                               for i, m in enumerate(_list(data.get("members", []), at + "members")))
        if "n_oracle" in data:
            out["n_oracle"] = _integer(data["n_oracle"], at + "n_oracle", 0)
        if "tolerance" in data:
            out["tolerance"] = _number(data["tolerance"], at + "tolerance", 0)
        if "relative_to" in data:
            out["relative_to"] = _string(data["relative_to"], at + "relative_to", empty=True)
        return cls(**out)


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
    def from_json(cls, data: dict, traits, where: str = "member") -> "Member":
        """Every field checked (`where` names it in an error): a key is one name, a path stays
        inside the project, values and standard errors are finite, one per trait."""
        at = f"{where}."
        data = _object(data, where)
        kind = data.get("kind")
        if kind not in (None, "trained", "soup", "member"):  # 'member' before versioning
            raise ArtifactError(f"{at}kind is {_what(kind) if not isinstance(kind, str) else 'a string'} "
                                "other than trained or soup")
        kind = "soup" if kind == "soup" else "trained"
        key = _member_key(_required(data, "key", at), at + "key")
        path = data.get("path")
        path = (f"models/{'soups' if kind == 'soup' else 'members'}/{key}" if path is None
                else _relative_path(path, at + "path"))
        model_version = data.get("model_version")
        if isinstance(model_version, bool) or not isinstance(model_version, (str, int, type(None))):
            raise _wrong(at + "model_version", "a version", model_version)
        return cls(key=key, kind=kind, path=path,
                   weights=_trait_numbers(traits, _required(data, "weights", at), at + "weights"),
                   value=ValueVector(_trait_numbers(traits, _required(data, "values", at), at + "values"),
                                     _trait_numbers(traits, _required(data, "std_errors", at), at + "std_errors",
                                                    minimum=0),
                                     _integer(data.get("n_eval", 0), at + "n_eval", 0)),
                   share=_number(data.get("share", 0.0), at + "share", 0),
                   ingredients=_strings(data.get("ingredients", []), at + "ingredients"),
                   lambdas=_numbers(data.get("lambdas", []), at + "lambdas"),
                   model_uri=_optional_string(data.get("model_uri"), at + "model_uri"),
                   model_version=model_version)


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
    def from_json(cls, data: dict, d: int | None = None, where: str = "table") -> "PolicyTable":
        """One row of d finite numbers per key in each of weights, values and std_errors."""
        at = f"{where}."
        data = _object(data, where)
        keys = _strings(_required(data, "keys", at), at + "keys")
        tables = []
        for k in ("weights", "values", "std_errors"):
            rows = _list(_required(data, k, at), at + k)
            if len(rows) != len(keys):
                raise ArtifactError(f"{at}{k} has {len(rows)} rows for {len(keys)} keys")
            tables.append(tuple(_numbers(r, f"{at}{k}[{i}]", d, 0 if k == "std_errors" else None)
                                for i, r in enumerate(rows)))
        for i, w in enumerate(tables[0]):  # the certificate's LP and every route's bound read them
            if min(w, default=0.0) < 0 or abs(math.fsum(w) - 1) > 1e-4:
                raise ArtifactError(f"{at}weights[{i}] is not a weight vector (non-negative, summing to 1)")
        return cls(keys, *tables)


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
    base_model_uri: str | None = None  # set in the registered copy: models:/<prefix>-<task>-base/<version>

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

    def evidence_summary(self) -> str:
        """The evidence audit in one sentence, as the run summary and the registry description
        both say it; empty for a portfolio without an audit (docs/evidence.md)."""
        ev = self.evidence
        if not ev:
            return ""
        return (f"Against the evidence (best-of-{ev['best_of_n']} sampling from the base and every measured "
                f"policy, on {ev['test_weights']} test weights): worst gap {ev['worst_gap']:.4f} ± "
                f"{ev['worst_gap_se']:.4f} at w = {ev['worst_weight']} against {ev['worst_against']}; mean "
                f"{ev['mean_gap']:.4f}" + ("; it contradicts the certificate" if ev.get("contradicted") else "")
                + (f"; at delta {self.delta} it asks for eps {ev['evidence_eps']:.4f}" if "evidence_eps" in ev else "")
                + ".")

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
        if self.base_model_uri:
            out["base_model_uri"] = self.base_model_uri
        return out

    @classmethod
    def from_json(cls, data: dict) -> "Portfolio":
        """Every field the readers use is checked here, with its name in the error (schema.read
        adds the file's): the router, `palm status`, the register stage and the server read a
        Portfolio and nothing else of portfolio.json."""
        data = _object(data, "the portfolio")
        version = data.get("schema_version", 0)
        if isinstance(version, bool) or version not in (0, SCHEMA_VERSION):
            raise ArtifactError(f"schema_version {str(version)[:40]} is not {SCHEMA_VERSION}")
        traits = _strings(_required(data, "traits"), "traits")
        if not traits or len(set(traits)) != len(traits):
            raise ArtifactError("traits is empty or names a trait twice")
        members = tuple(Member.from_json(m, traits, f"members[{i}]")
                        for i, m in enumerate(_list(_required(data, "members"), "members")))
        if not members:
            raise ArtifactError("members is empty: the portfolio has no members")
        keys = [m.key for m in members]
        for i, k in enumerate(keys):
            if k in keys[:i]:
                raise ArtifactError(f"members[{i}].key repeats members[{keys.index(k)}].key")
        oracle = data.get("oracle")
        if oracle is None:  # before versioning, hand-made files: the members bound OPT, more loosely
            oracle = PolicyTable(tuple(keys), tuple(m.weights for m in members),
                                 tuple(m.value.mean for m in members), tuple(m.value.se for m in members))
        else:
            oracle = PolicyTable.from_json(oracle, len(traits), "oracle")
        # soup rows raise the bound at the oracle rows: without them a route would promise more than
        # the certificate; only a file from before versioning (and before soups) has none
        if "soup_rows" not in data and version != 0:
            raise ArtifactError("soup_rows is missing")
        soup_rows = data.get("soup_rows", {"keys": [], "weights": [], "values": [], "std_errors": []})
        evidence = _evidence(_optional_object(data, "evidence"), len(oracle.keys))
        return cls(id=_string(_required(data, "id"), "id"),
                   task=_string(data.get("task", ""), "task", empty=True), traits=traits,
                   eps=_number(_required(data, "eps"), "eps", 0), delta=_number(_required(data, "delta"), "delta", 0),
                   z=_number(data.get("z", 0.0), "z", 0), members=members,
                   certificate=Certificate.from_json(_required(data, "certificate"), len(traits)),
                   oracle=oracle,
                   soup_rows=PolicyTable.from_json(soup_rows, len(traits), "soup_rows"),
                   pool=_strings(data.get("pool", []), "pool"),
                   soups=_optional_object(data, "soups"),
                   pool_certificate=_optional_object(data, "pool_certificate"),
                   conservative_certificate=_optional_object(data, "conservative_certificate"),
                   oracle_check=_optional_object(data, "oracle_check"),
                   coverage=_figures(_optional_object(data, "coverage"), "coverage.", _COVERAGE_FIGURES),
                   evidence=evidence, gate=_gate(_optional_object(data, "gate")),
                   base_model_sha256=_optional_string(data.get("base_model_sha256"), "base_model_sha256"),
                   base_model_uri=_optional_string(data.get("base_model_uri"), "base_model_uri"))


# What the readers of a portfolio format as numbers (console, registry, coverage stage): checked
# where present, so a summary never fails on a string where a figure belongs.
_COVERAGE_FIGURES = ("max_multiplicative_gap", "mean_multiplicative_gap", "max_additive_gap",
                     "mean_additive_gap", "users_mean_multiplicative_gap", "usage_perplexity")
_EVIDENCE_FIGURES = ("min_relevance", "worst_gap", "worst_gap_se", "worst_evidence", "worst_portfolio_value",
                     "mean_gap", "share_beyond_eps", "share_bon_is_evidence", "evidence_eps")
_CONTRADICTION_FIGURES = ("portfolio_value", "evidence", "shortfall", "se")
_GATE_FIGURES = ("degenerate_share", "relevance")


def _figures(data: dict, at: str, numbers=(), counts=("test_weights", "best_of_n")) -> dict:
    for k in numbers:
        if k in data:
            _number(data[k], at + k, finite=False)
    for k in counts:
        if k in data:
            _integer(data[k], at + k, 0)
    return data


def _evidence(ev: dict, n_oracle: int) -> dict:
    """portfolio.json's evidence audit: its figures, the contradiction (Portfolio.blockers) and the
    best-of-N reference at each oracle row (the router's bound)."""
    _figures(ev, "evidence.", _EVIDENCE_FIGURES)
    if "contradicted" in ev:
        _boolean(ev["contradicted"], "evidence.contradicted")
    _figures(_optional_object(ev, "contradiction", "evidence."), "evidence.contradiction.", _CONTRADICTION_FIGURES)
    ref = _optional_object(ev, "reference_at_oracle", "evidence.")
    if ref:
        at = "evidence.reference_at_oracle."
        _numbers(_required(ref, "values", at), at + "values", n_oracle)
        _numbers(_required(ref, "std_errors", at), at + "std_errors", n_oracle, minimum=0)
    return ev


def _gate(gate: dict) -> dict:
    """portfolio.json's quality gate: passed, and each member's verdict, figures and reasons."""
    if "passed" in gate:
        _boolean(gate["passed"], "gate.passed")
    for key, verdict in _optional_object(gate, "members", "gate.").items():
        at = f"gate.members.{key[:40]}"
        verdict = _object(verdict, at)
        _figures(verdict, at + ".", _GATE_FIGURES, counts=())
        if "passed" in verdict:
            _boolean(verdict["passed"], at + ".passed")
        if "reasons" in verdict:
            _strings(verdict["reasons"], at + ".reasons")
    return gate


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
