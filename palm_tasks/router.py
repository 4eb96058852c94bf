"""The router: a user's trait weights -> the portfolio member that serves them, with its bound.

`Router.from_registry(alias="production")` reads the portfolio registered under that alias
(its portfolio.json artifact); `Router.from_portfolio("portfolio.json")` reads a local one.
`route(weights)` returns a `Route`: the member, its registered model URI, its local adapter
directory, the normalized weights, and what the certificate guarantees at exactly these weights:

    member value  L(w) = w . R_member   >=   (1 - eps_w) * OPT(w) - delta,
    OPT(w) <= U(w) = max { w . v : w_j . v <= V_j (oracle rows j), 0 <= v <= 1 }

(theory.md sections 3-4; U is the certificate's upper bound). eps_w = 1 - (L + delta) / U is the
tolerance reached at w for the portfolio's delta; it never exceeds the certificate's max_eps,
which holds for every w. Like the certificate, member values count with R - z se and the oracle
constraints with R + z se; the member chosen is the one with the best w . (R - z se).

Latency: the vertices of the polytope behind U are found once (Qhull); a route is then one
argmax over members, one over vertices, and a small NNLS that proves the bound (see
coverage.upper_bounds), well under a millisecond for a portfolio of a few members.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from palm_tasks import coverage as cov

NORMALIZED_TOL = 1e-9  # weights summing to 1 within this are taken as given


class WeightsError(ValueError):
    """The weights a user gave are not a valid point of the simplex (and cannot be made one)."""


def parse_weights(weights: str | Mapping, traits: list[str]) -> tuple[np.ndarray, bool]:
    """'safety=0.5,humor=0.3,brevity=0.2' or {"safety": 0.5, ...} -> (weights on the simplex,
    whether they had to be normalized). Every trait must be given exactly once; values must be
    finite and >= 0, not all zero. The one place CLI, server and Python validate weights."""
    if isinstance(weights, str):
        pairs = {}
        for part in (p.strip() for p in weights.split(",")):
            if not part:
                continue
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or not name:
                raise WeightsError(f"weights: {part!r} is not TRAIT=VALUE "
                                   f"(e.g. {','.join(f'{t}=0.5' for t in traits[:2])})")
            if name in pairs:
                raise WeightsError(f"weights: trait {name!r} is given twice")
            pairs[name] = value.strip()
    elif isinstance(weights, Mapping):
        pairs = dict(weights)
    else:
        raise WeightsError(f"weights must be an object of trait: weight, got {type(weights).__name__}")
    unknown = [n for n in pairs if n not in traits]
    if unknown:
        raise WeightsError(f"weights: unknown trait(s) {', '.join(map(repr, unknown))}; "
                           f"the traits are {', '.join(traits)}")
    missing = [t for t in traits if t not in pairs]
    if missing:
        raise WeightsError(f"weights: missing trait(s) {', '.join(missing)}; give a weight for each "
                           f"of {', '.join(traits)} (0 is allowed)")
    w = np.empty(len(traits))
    for i, t in enumerate(traits):
        value = pairs[t]
        if isinstance(value, bool):
            raise WeightsError(f"weights: {t} = {value!r} is not a number")
        try:
            w[i] = float(value)
        except (TypeError, ValueError):
            raise WeightsError(f"weights: {t} = {value!r} is not a number") from None
        if not math.isfinite(w[i]):
            raise WeightsError(f"weights: {t} = {value} is not a finite number")
        if w[i] < 0:
            raise WeightsError(f"weights: {t} = {value} is negative; weights must be >= 0")
    total = float(w.sum())
    if total <= 0:
        raise WeightsError("weights: all weights are zero; give at least one positive weight")
    normalized = abs(total - 1.0) > NORMALIZED_TOL
    return w / total, normalized


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


class Router:
    """Routes weight vectors to portfolio members; everything per route is precomputed."""

    def __init__(self, portfolio: dict, root: Path | None = None):
        self.portfolio = portfolio
        self.root = Path(root) if root is not None else None
        self.traits = list(portfolio["traits"])
        self.members = portfolio["members"]
        if not self.members:
            raise ValueError(f"portfolio {portfolio.get('id')} has no members")
        z = float(portfolio.get("z", 0.0))
        R = np.array([[m["values"][t] for t in self.traits] for m in self.members], float)
        SE = np.array([[m.get("std_errors", {}).get(t, 0.0) for t in self.traits]
                       for m in self.members], float)
        self.member_values = R - z * SE
        oracle = portfolio.get("oracle")
        if oracle:  # every trained pool policy (all were trained for their weight)
            W, RO, SEO = (np.array(oracle[k], float) for k in ("weights", "values", "std_errors"))
            self.bound_from = f"the {len(W)} trained policies of the pool"
        else:  # a subset of the oracle rows still gives an upper bound, only a looser one
            W = np.array([[m["weights"][t] for t in self.traits] for m in self.members], float)
            RO, SEO = R, SE
            self.bound_from = "the portfolio members only (portfolio.json has no oracle rows)"
        self._upper_bound = cov.UpperBound(W, (W @ (RO + z * SEO).T).max(axis=1))
        cert = portfolio["certificate"]
        self.certified = bool(cert["certified"])
        self.eps, self.delta = float(portfolio["eps"]), float(portfolio["delta"])
        self.max_eps = float(cert["max_eps"])

    @classmethod
    def from_portfolio(cls, path: str | Path) -> "Router":
        """A local portfolio.json (as the coverage stage writes it, next to models/)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run the pipeline first (palm run)")
        return cls(json.loads(path.read_text()), root=path.resolve().parent)

    @classmethod
    def from_registry(cls, alias: str = "production", tracking_uri: str | None = None,
                      model_name: str = "palm-assistant-portfolio",
                      root: str | Path | None = None) -> "Router":
        """The portfolio registered as `model_name@alias` (its portfolio.json, with model URIs).

        tracking_uri defaults to MLflow's current one; root, if given, is where local adapters
        are looked for (models/members/<key>/adapter) before downloading from the registry.
        """
        import mlflow
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(tracking_uri)
        client = MlflowClient()
        try:
            version = client.get_model_version_by_alias(model_name, alias)
        except MlflowException as exc:
            raise LookupError(
                f"no portfolio registered as {model_name}@{alias} in {mlflow.get_tracking_uri()}: "
                "run the pipeline (palm run) and check that its portfolio is certified "
                f"({type(exc).__name__})") from None
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_name}/{version.version}"))
        found = sorted(local.rglob("portfolio.json"))
        if not found:
            raise FileNotFoundError(f"{model_name} version {version.version} has no portfolio.json")
        router = cls(json.loads(found[0].read_text()), root=root)
        router.registered_version = str(version.version)
        return router

    # ---------------------------------------------------------------------------------------

    def route(self, weights: str | Mapping) -> Route:
        w, normalized = parse_weights(weights, self.traits)
        scores = self.member_values @ w
        best = int(np.argmax(scores))
        value = float(scores[best])
        upper = max(self._upper_bound(w), value)  # U >= OPT >= any policy's value
        eps_w = max(0.0, 1.0 - (value + self.delta) / upper) if upper > 0 else 0.0
        m = self.members[best]
        return Route(
            member_key=m["key"], model_uri=m.get("model_uri"),
            adapter_path=self._local_adapter(m["key"]),
            weights={t: float(x) for t, x in zip(self.traits, w)}, normalized=normalized,
            value=value, opt_upper_bound=upper, eps_at_w=eps_w, delta=self.delta,
            portfolio_id=self.portfolio["id"], certified=self.certified, eps=self.eps,
            max_eps=self.max_eps,
        )

    def _local_adapter(self, key: str) -> str | None:
        """<root>/<entry path>/adapter: models/members/<key> or, for a soup, models/soups/<key>."""
        if self.root is None:
            return None
        entry = next((m for m in self.members if m["key"] == key), {})
        for where in (entry.get("path"), f"models/members/{key}", f"models/soups/{key}"):
            path = self.root / where / "adapter" if where else None
            if path is not None and (path / "adapter_config.json").is_file():
                return str(path)
        return None

    def adapter_dir(self, key: str) -> Path:
        """The member's adapter directory: the local one, else downloaded from the registry."""
        local = self._local_adapter(key)
        if local:
            return Path(local)
        member = next((m for m in self.members if m["key"] == key), None)
        if member is None or not member.get("model_uri"):
            raise FileNotFoundError(f"member {key}: no local adapter and no registered model URI")
        import mlflow

        downloaded = Path(mlflow.artifacts.download_artifacts(member["model_uri"]))
        found = sorted(downloaded.rglob("adapter_config.json"))
        if not found:
            raise FileNotFoundError(f"{member['model_uri']} holds no LoRA adapter")
        return found[0].parent

    def base_model_path(self) -> Path:
        """The base model the adapters belong to (local project first, then the registry's note)."""
        if self.root is not None and (self.root / "models" / "base" / "base.json").is_file():
            from palm_tasks.base_model import resolve_base_model

            return resolve_base_model(self.root / "models" / "base")
        if self.portfolio.get("base_model_path"):
            return Path(self.portfolio["base_model_path"])
        raise FileNotFoundError("no base model: neither <root>/models/base nor base_model_path "
                                "in the registered portfolio")
