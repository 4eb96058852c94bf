"""The portfolio the coverage stage chose and what is promised with it (portfolio.json), as
frozen dataclasses with checked JSON round trips: Portfolio, its Members, its Certificate, the
PolicyTables of its oracle rows and soups, and Route, where one user's weights go.

Every field a reader uses (the router, `palm status`, the register stage, the server) is checked
on read with the field's name in the error (palm_tasks/json_fields.py; schema.read adds the
file's), so a damaged or hand-edited portfolio.json is refused in one line.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from palm_tasks.figures import at_precision, with_se
from palm_tasks.json_fields import (FieldError, boolean, integer, mapping, member_key, number, numbers, optional_mapping,
                                    optional_string, relative_path, required, sequence, string, strings,
                                    trait_numbers, what, wrong)
from palm_tasks.paths import Paths
from palm_tasks.schema import SCHEMA_VERSION, ArtifactError, PolicyKind, ValueVector, by_trait, vector, read


@dataclass(frozen=True)
class Certificate:
    """The stored form of a certificate (palm_tasks.core.paired.ConfidentCertificate): (eps, delta)
    coverage of the whole simplex by the members with confidence 1 - alpha, relative to
    `relative_to` (docs/guarantee.md, docs/evidence.md)."""

    # the question: coverage at (eps, delta), with confidence 1 - alpha
    eps: float
    delta: float
    alpha: float
    # the answer, and what it would take: the worst corner, the tolerances every decision clears
    certified: bool
    worst_slack: float
    max_eps: float
    max_delta: float
    worst_weight: tuple[float, ...] = ()
    # the evidence: every corner weight of the members' envelope and the upper end of its slack
    corner_weights: tuple[tuple[float, ...], ...] = ()
    slacks: tuple[float, ...] = ()
    members: tuple[int, ...] = ()  # rows of the candidates (trained, then soups)
    n_oracle: int = 0
    relative_to: str = ""
    # how alpha was split, and the decisions that did not hold (by name)
    split: dict = field(default_factory=dict)
    failing: tuple[str, ...] = ()
    open_at_cap: tuple[str, ...] = ()
    decisions: int = 0

    @classmethod
    def of(cls, cert, relative_to: str) -> "Certificate":
        """From the core's certificate at confidence (core.paired.ConfidentCertificate)."""
        return cls(certified=bool(cert.certified), worst_slack=float(cert.worst_slack),
                   max_eps=float(cert.max_eps), max_delta=float(cert.max_delta), eps=float(cert.eps),
                   delta=float(cert.delta), alpha=float(cert.alpha), worst_weight=vector(cert.worst_weight),
                   members=tuple(int(m) for m in cert.members), n_oracle=int(cert.n_oracle),
                   corner_weights=tuple(vector(c) for c in cert.corner_weights),
                   slacks=vector(cert.slacks), relative_to=relative_to,
                   split=cert.split.to_dict() if cert.split else {},
                   failing=tuple(cert.named("fails")), open_at_cap=tuple(cert.open_at_cap),
                   decisions=len(cert.decisions))

    @property
    def statement(self) -> str:
        """What is promised, in one sentence (portfolio.json, the registry and the summary say it)."""
        held = "" if self.certified else "NOT "
        return (f"{held}(eps, delta) = ({self.eps:g}, {self.delta:g}) covering with confidence "
                f"1 - alpha = {1 - self.alpha:g}, relative to the oracle and the evidence")

    def to_json(self) -> dict:
        out = asdict(self)
        out["n_corners"] = len(self.corner_weights)
        out["statement"] = self.statement
        return out

    @classmethod
    def from_json(cls, data: dict, d: int | None = None, where: str = "certificate") -> "Certificate":
        """Every field checked (`where` names them in an error), weights of d numbers; `n_corners`
        and `statement` are derived."""
        at = f"{where}."
        data = mapping(data, where)
        out: dict[str, Any] = {k: number(required(data, k, at), at + k)
                               for k in ("eps", "delta", "worst_slack", "max_eps", "max_delta")}
        alpha = number(required(data, "alpha", at), at + "alpha")
        if not 0 < alpha < 1:
            raise FieldError(f"{at}alpha is {alpha}, not in (0, 1)")
        out["alpha"] = alpha
        out["certified"] = boolean(required(data, "certified", at), at + "certified")
        if "worst_weight" in data:
            out["worst_weight"] = numbers(data["worst_weight"], at + "worst_weight", d)
        out["corner_weights"] = tuple(numbers(c, f"{at}corner_weights[{i}]", d)
                                      for i, c in enumerate(sequence(data.get("corner_weights", []),
                                                                     at + "corner_weights")))
        if "slacks" in data:
            out["slacks"] = numbers(data["slacks"], at + "slacks", len(out["corner_weights"]))
        out["members"] = tuple(integer(m, f"{at}members[{i}]", 0)
                               for i, m in enumerate(sequence(data.get("members", []), at + "members")))
        if "n_oracle" in data:
            out["n_oracle"] = integer(data["n_oracle"], at + "n_oracle", 0)
        if "relative_to" in data:
            out["relative_to"] = string(data["relative_to"], at + "relative_to", empty=True)
        out["split"] = optional_mapping(data, "split", at)
        for key in ("failing", "open_at_cap"):
            out[key] = strings(data.get(key, []), at + key)
        if "decisions" in data:
            out["decisions"] = integer(data["decisions"], at + "decisions", 0)
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
    # The sampling temperature its values were measured at (evaluation.temperature): part of the
    # policy the certificate speaks of, so the server samples at it unless a request says otherwise.
    # None in a portfolio written before it was recorded.
    temperature: float | None = None

    def to_json(self, traits) -> dict:
        out = {"key": self.key, "kind": self.kind, "path": self.path,
               "weights": by_trait(traits, self.weights), "values": by_trait(traits, self.value.mean),
               "std_errors": by_trait(traits, self.value.se), "n_eval": self.value.n,
               "share": round(self.share, 6)}
        if self.temperature is not None:
            out["temperature"] = self.temperature
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
        data = mapping(data, where)
        kind = data.get("kind")
        if kind not in (None, "trained", "soup", "member"):  # 'member' before versioning
            raise ArtifactError(f"{at}kind is {what(kind) if not isinstance(kind, str) else 'a string'} "
                                "other than trained or soup")
        kind = "soup" if kind == "soup" else "trained"
        key = member_key(required(data, "key", at), at + "key")
        path = data.get("path")
        path = (f"models/{'soups' if kind == 'soup' else 'members'}/{key}" if path is None
                else relative_path(path, at + "path"))
        model_version = data.get("model_version")
        if isinstance(model_version, bool) or not isinstance(model_version, (str, int, type(None))):
            raise wrong(at + "model_version", "a version", model_version)
        temperature = data.get("temperature")
        if temperature is not None:
            temperature = number(temperature, at + "temperature", 0)
            if not 0 < temperature <= 2:  # the server's range (above 0: a member samples)
                raise FieldError(f"{at}temperature is {temperature:g}, not in (0, 2]")
        return cls(key=key, kind=kind, path=path,
                   weights=trait_numbers(traits, required(data, "weights", at), at + "weights"),
                   value=ValueVector(trait_numbers(traits, required(data, "values", at), at + "values"),
                                     trait_numbers(traits, required(data, "std_errors", at), at + "std_errors",
                                                    minimum=0),
                                     integer(data.get("n_eval", 0), at + "n_eval", 0)),
                   share=number(data.get("share", 0.0), at + "share", 0),
                   ingredients=strings(data.get("ingredients", []), at + "ingredients"),
                   lambdas=numbers(data.get("lambdas", []), at + "lambdas"),
                   model_uri=optional_string(data.get("model_uri"), at + "model_uri"),
                   model_version=model_version, temperature=temperature)


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
        data = mapping(data, where)
        keys = strings(required(data, "keys", at), at + "keys")
        tables = []
        for k in ("weights", "values", "std_errors"):
            rows = sequence(required(data, k, at), at + k)
            if len(rows) != len(keys):
                raise ArtifactError(f"{at}{k} has {len(rows)} rows for {len(keys)} keys")
            tables.append(tuple(numbers(r, f"{at}{k}[{i}]", d, 0 if k == "std_errors" else None)
                                for i, r in enumerate(rows)))
        for i, w in enumerate(tables[0]):  # the certificate's LP and every route's bound read them
            if min(w, default=0.0) < 0 or abs(math.fsum(w) - 1) > 1e-4:
                raise FieldError(f"{at}weights[{i}] is not a weight vector (non-negative, summing to 1)")
        return cls(keys, *tables)


@dataclass(frozen=True)
class Portfolio:
    """What the coverage stage chose and why: the members, the certificate, the figures behind it."""

    id: str
    task: str
    traits: tuple[str, ...]
    eps: float
    delta: float
    members: tuple[Member, ...]
    certificate: Certificate
    oracle: PolicyTable
    soup_rows: PolicyTable = field(default_factory=PolicyTable.empty)  # the soups that were candidates
    pool: tuple[str, ...] = ()  # keys of the trained pool
    soups: dict = field(default_factory=dict)  # candidates, how many are in the portfolio
    pool_certificate: dict = field(default_factory=dict)  # the whole pool's certificate (at confidence)
    oracle_check: dict = field(default_factory=dict)  # the trained rows the evidence beats (paired decisions)
    price: dict = field(default_factory=dict)  # the price of precision: certified eps against k and compute
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

    def guarantee_bound(self):
        """U(w) >= OPT(w) at any weight, built as the certificate builds it (core.routing
        GuaranteeBound): the oracle rows, the soups that were candidates, and best-of-N at each
        oracle row's weight when the evidence audit stored it."""
        from palm_tasks.core.routing import GuaranteeBound

        o, soups = self.oracle, self.soup_rows
        ref = self.evidence.get("reference_at_oracle")
        return GuaranteeBound(
            np.array(o.weights), np.array(o.values),
            candidate_values=np.array(soups.values) if soups.keys else None,
            reference=None if not ref else np.array(ref["values"]))

    def blockers(self) -> list[str]:
        """Why this portfolio may not be promoted to production (empty: it may): it must be
        certified, every member must pass the quality gate, and the evidence must not
        contradict the certificate (docs/quality-gate.md, docs/evidence.md)."""
        out = []
        cert = self.certificate
        if not cert.certified:
            why = []
            if cert.open_at_cap:
                why.append(f"{len(cert.open_at_cap)} decision(s) still open at the cap: " + "; ".join(cert.open_at_cap[:3])
                           + ("; ..." if len(cert.open_at_cap) > 3 else ""))
            if cert.failing:
                why.append(f"{len(cert.failing)} decision(s) fail: " + "; ".join(cert.failing[:3])
                           + ("; ..." if len(cert.failing) > 3 else ""))
            out.append(f"not certified at eps = {self.eps}, delta = {self.delta} with confidence "
                       f"1 - alpha = {1 - cert.alpha:g} (every decision would clear eps = {cert.max_eps:.3f})"
                       + (": " + "; ".join(why) if why else ""))
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
        se = ev["worst_gap_se"]
        return (f"Against the evidence (best-of-{ev['best_of_n']} sampling from the base and every measured "
                f"policy, on {ev['test_weights']} test weights): worst gap {with_se(ev['worst_gap'], se)} at "
                f"w = {ev['worst_weight']} against {ev['worst_against']}; mean {at_precision(ev['mean_gap'], se)}"
                + ("; it contradicts the certificate" if ev.get("contradicted") else "")
                + (f"; at delta {self.delta:g} it asks for eps {at_precision(ev['evidence_eps'], se)}"
                   if "evidence_eps" in ev else "") + ".")

    def member(self, key: str) -> Member:
        for m in self.members:
            if m.key == key:
                return m
        raise KeyError(f"portfolio {self.id[:10]} has no member {key}")

    def to_json(self) -> dict:
        out = {"schema_version": SCHEMA_VERSION, "id": self.id, "task": self.task,
               "traits": list(self.traits), "eps": self.eps, "delta": self.delta,
               "members": [m.to_json(self.traits) for m in self.members], "pool": list(self.pool),
               "soups": self.soups, "certificate": self.certificate.to_json(),
               "pool_certificate": self.pool_certificate,
               "price": self.price,
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
        data = mapping(data, "the portfolio")
        version = data.get("schema_version", 0)
        if isinstance(version, bool) or version not in (0, SCHEMA_VERSION):
            raise ArtifactError(f"schema_version {str(version)[:40]} is not {SCHEMA_VERSION}")
        traits = strings(required(data, "traits"), "traits")
        if not traits or len(set(traits)) != len(traits):
            raise ArtifactError("traits is empty or names a trait twice")
        members = tuple(Member.from_json(m, traits, f"members[{i}]")
                        for i, m in enumerate(sequence(required(data, "members"), "members")))
        if not members:
            raise ArtifactError("members is empty: the portfolio has no members")
        keys = [m.key for m in members]
        for i, k in enumerate(keys):
            if k in keys[:i]:
                raise ArtifactError(f"members[{i}].key repeats members[{keys.index(k)}].key")
        oracle = data.get("oracle")
        if oracle is None and version != 0:  # the certificate's bound, every route's guarantee
            raise FieldError("oracle is missing")
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
        evidence = _evidence(optional_mapping(data, "evidence"), len(oracle.keys))
        return cls(id=string(required(data, "id"), "id"),
                   task=string(data.get("task", ""), "task", empty=True), traits=traits,
                   eps=number(required(data, "eps"), "eps", 0), delta=number(required(data, "delta"), "delta", 0),
                   members=members,
                   certificate=Certificate.from_json(required(data, "certificate"), len(traits)),
                   oracle=oracle,
                   soup_rows=PolicyTable.from_json(soup_rows, len(traits), "soup_rows"),
                   pool=strings(data.get("pool", []), "pool"),
                   soups=optional_mapping(data, "soups"),
                   pool_certificate=optional_mapping(data, "pool_certificate"),
                   price=optional_mapping(data, "price"),
                   oracle_check=optional_mapping(data, "oracle_check"),
                   coverage=_figures(optional_mapping(data, "coverage"), "coverage.", _COVERAGE_FIGURES),
                   evidence=evidence, gate=_gate(optional_mapping(data, "gate")),
                   base_model_sha256=optional_string(data.get("base_model_sha256"), "base_model_sha256"),
                   base_model_uri=optional_string(data.get("base_model_uri"), "base_model_uri"))


_COVERAGE_FIGURES = ("max_multiplicative_gap", "mean_multiplicative_gap", "max_additive_gap",
                     "mean_additive_gap", "users_mean_multiplicative_gap", "usage_perplexity")


_EVIDENCE_FIGURES = ("min_relevance", "worst_gap", "worst_gap_se", "worst_evidence", "worst_portfolio_value",
                     "mean_gap", "share_beyond_eps", "share_bon_is_evidence", "evidence_eps")


_CONTRADICTION_FIGURES = ("portfolio_value", "evidence", "shortfall", "se")


_GATE_FIGURES = ("degenerate_share", "relevance")


def _figures(data: dict, at: str, numbers=(), counts=("test_weights", "best_of_n")) -> dict:
    for k in numbers:
        if k in data:
            number(data[k], at + k, finite=False)
    for k in counts:
        if k in data:
            integer(data[k], at + k, 0)
    return data


def _evidence(ev: dict, n_oracle: int) -> dict:
    """portfolio.json's evidence audit: its figures, the contradiction (Portfolio.blockers) and the
    best-of-N reference at each oracle row (the router's bound)."""
    _figures(ev, "evidence.", _EVIDENCE_FIGURES)
    if "contradicted" in ev:
        boolean(ev["contradicted"], "evidence.contradicted")
    _figures(optional_mapping(ev, "contradiction", "evidence."), "evidence.contradiction.", _CONTRADICTION_FIGURES)
    ref = optional_mapping(ev, "reference_at_oracle", "evidence.")
    if ref:
        at = "evidence.reference_at_oracle."
        numbers(required(ref, "values", at), at + "values", n_oracle)
        numbers(required(ref, "std_errors", at), at + "std_errors", n_oracle, minimum=0)
    return ev


def _gate(gate: dict) -> dict:
    """portfolio.json's quality gate: passed, and each member's verdict, figures and reasons."""
    if "passed" in gate:
        boolean(gate["passed"], "gate.passed")
    for key, verdict in optional_mapping(gate, "members", "gate.").items():
        at = f"gate.members.{key[:40]}"
        verdict = mapping(verdict, at)
        _figures(verdict, at + ".", _GATE_FIGURES, counts=())
        if "passed" in verdict:
            boolean(verdict["passed"], at + ".passed")
        if "reasons" in verdict:
            strings(verdict["reasons"], at + ".reasons")
    return gate


@dataclass(frozen=True)
class Route:
    """Where a user with these weights goes, and what is guaranteed for them."""

    member_key: str
    model_uri: str | None  # models:/<prefix>-<task>-member/<version>, None if not registered
    adapter_path: str | None  # local adapter directory when the project has it
    weights: dict  # normalized, trait -> weight
    normalized: bool  # the weights given did not sum to 1 and were divided by their sum
    value: float  # L(w) = w . R of the member
    opt_upper_bound: float  # U(w) >= OPT(w)
    eps_at_w: float  # smallest eps with L >= (1 - eps) U - delta at this w
    delta: float
    portfolio_id: str
    certified: bool  # the portfolio's certificate at (eps, delta) over the whole simplex
    eps: float
    max_eps: float  # the certificate's worst eps over the simplex at this delta
    temperature: float | None = None  # the member's: the value and guarantee are for answers sampled at it

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
            f"{self.delta}"
            + (f", for answers sampled at temperature {self.temperature:g}" if self.temperature else ""),
            f"portfolio {self.portfolio_id[:10]}: "
            f"{'certified' if self.certified else 'NOT certified'} for eps={self.eps}, "
            f"delta={self.delta} over the whole simplex (worst eps {self.max_eps:.4f}); "
            "relative to the alignment oracle and the measured values",
        ]
        return "\n".join(lines)


def load_portfolio(root: Path) -> Portfolio:
    """The portfolio the coverage stage chose."""
    return read(Paths(root).portfolio, Portfolio, "coverage")
