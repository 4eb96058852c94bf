"""The router: a user's trait weights -> the portfolio member that serves them, with its bound.

`Router.from_registry(alias="production")` reads the portfolio registered under that alias
(its portfolio.json artifact); `Router.from_portfolio("portfolio.json")` reads a local one.
`route(weights)` returns a `Route`: the member, its registered model URI, its local adapter
directory, the normalized weights, and what the certificate guarantees at exactly these weights:

    member value  L(w) = w . R_member   >=   (1 - eps_w) * OPT(w) - delta,
    OPT(w) <= U(w) = max { w . v : w_j . v <= V_j (oracle rows j), 0 <= v <= 1 }

(docs/theory.md sections 3-4; U is the certificate's upper bound). eps_w = 1 - (L + delta) / U is
the tolerance reached at w for the portfolio's delta; it never exceeds the certificate's max_eps,
which holds for every w (U and L here are built from the measured means; the certificate's own
decisions hold them to its stated confidence). The member is chosen by the one routing rule
(core.routing): the best w . R, as in the registered pyfunc and the users' shares.

Latency: the vertices of the polytope behind U are found once (Qhull); a route is then one
argmax over members, one over vertices, and a small NNLS that proves the bound (see
core.certificate.UpperBound), well under a millisecond for a portfolio of a few members.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from palm_tasks import schema
from palm_tasks.core import routing
from palm_tasks.portfolio import Portfolio, Route

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
        except (TypeError, ValueError, OverflowError):  # OverflowError: an int of 400 digits
            raise WeightsError(f"weights: {t} = {value!r} is not a number") from None
        if not math.isfinite(w[i]):
            raise WeightsError(f"weights: {t} = {value} is not a finite number")
        if w[i] < 0:
            raise WeightsError(f"weights: {t} = {value} is negative; weights must be >= 0")
    with np.errstate(over="ignore"):  # finite weights may sum to inf: routing.normalize handles it
        total = float(w.sum())
    if total <= 0:
        raise WeightsError("weights: all weights are zero; give at least one positive weight")
    normalized = abs(total - 1.0) > NORMALIZED_TOL
    return routing.normalize(w), normalized


class Router:
    """Routes weight vectors to portfolio members; everything per route is precomputed."""

    def __init__(self, portfolio: Portfolio, root: Path | None = None):
        self.portfolio = portfolio
        self.root = Path(root) if root is not None else None
        self.traits = list(portfolio.traits)
        self.members = portfolio.members
        _, self.values, self.std_errors = portfolio.member_arrays
        shape = (len(self.members), len(self.traits))
        if self.values.shape != shape or self.std_errors.shape != shape or not (
                np.isfinite(self.values).all() and np.isfinite(self.std_errors).all()):
            raise ValueError(f"the members' values and standard errors must be finite, one per trait "
                             f"({', '.join(self.traits)}) for each of the {len(self.members)} members")
        self._upper_bound = portfolio.guarantee_bound()
        self.certified = portfolio.certificate.certified
        self.eps, self.delta = portfolio.eps, portfolio.delta
        self.max_eps = portfolio.certificate.max_eps

    @classmethod
    def from_portfolio(cls, path: str | Path) -> "Router":
        """A local portfolio.json (as the coverage stage writes it, next to models/)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run the pipeline first (palm run)")
        portfolio = schema.read(path, Portfolio, "coverage")  # ArtifactError names the file
        try:
            return cls(portfolio, root=path.resolve().parent)
        except (ValueError, TypeError, IndexError, KeyError, RuntimeError) as exc:  # parsed, but unusable
            raise schema.ArtifactError(f"{path} is not a portfolio the router can use ({exc}): rerun "
                                       "`palm stage coverage`") from None

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
        router = cls(schema.read(found[0], Portfolio, "register"), root=root)
        router.registered_version = str(version.version)
        return router

    # ---------------------------------------------------------------------------------------

    def route(self, weights: str | Mapping) -> Route:
        w, normalized = parse_weights(weights, self.traits)
        best = int(routing.route(w, self.values))
        value = float(w @ self.values[best])
        upper = max(self._upper_bound(w), value)  # U >= OPT >= any policy's value
        m = self.members[best]
        return Route(
            member_key=m.key, model_uri=m.model_uri, adapter_path=self._local_adapter(m.key),
            weights={t: float(x) for t, x in zip(self.traits, w)}, normalized=normalized,
            value=value, opt_upper_bound=upper, eps_at_w=routing.eps_at(value, upper, self.delta),
            delta=self.delta, portfolio_id=self.portfolio.id, certified=self.certified, eps=self.eps,
            max_eps=self.max_eps, temperature=m.temperature,
        )

    def _local_adapter(self, key: str) -> str | None:
        """<root>/<entry path>/adapter: models/members/<key> or, for a soup, models/soups/<key>."""
        if self.root is None:
            return None
        path = self.root / self.portfolio.member(key).path / "adapter"
        return str(path) if (path / "adapter_config.json").is_file() else None

    def adapter_dir(self, key: str) -> Path:
        """The member's adapter directory: the local one, else downloaded from the registry."""
        local = self._local_adapter(key)
        if local:
            return Path(local)
        member = self.portfolio.member(key)
        if not member.model_uri:
            raise FileNotFoundError(f"member {key}: no local adapter and no registered model URI")
        import mlflow

        downloaded = Path(mlflow.artifacts.download_artifacts(member.model_uri))
        found = sorted(downloaded.rglob("adapter_config.json"))
        if not found:
            raise FileNotFoundError(f"{member.model_uri} holds no LoRA adapter")
        return found[0].parent

    def base_model_path(self) -> Path:
        """The base model the adapters belong to: the local project's, else the registered
        version the portfolio names (base_model_uri), read from the registry."""
        if self.root is not None and (self.root / "models" / "base" / "base.json").is_file():
            from palm_tasks.llm.base_model import resolve_base_model

            return resolve_base_model(self.root / "models" / "base")
        if self.portfolio.base_model_uri:  # the transformers flavor's layout: weights in model/
            import mlflow

            return Path(mlflow.artifacts.download_artifacts(self.portfolio.base_model_uri)) / "model"
        raise FileNotFoundError("no base model: neither <root>/models/base nor base_model_uri "
                                "in the registered portfolio")
