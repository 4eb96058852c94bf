"""What a person browsing the MLflow registry reads of a member or a portfolio: its tags,
description, metrics and answers, in words and figures (palm_tasks/registry.py registers them)."""

from __future__ import annotations

import json
from pathlib import Path

from palm_tasks.core import routing
from palm_tasks.portfolio import Member, Portfolio


def simplex_shares(portfolio: Portfolio, divisions: int) -> dict[str, float]:
    """Each member's share of a simplex lattice: the weights it serves, by the routing rule."""
    from palm_tasks.core.simplex import simplex_lattice

    _, R, _ = portfolio.member_arrays
    shares = routing.usage_shares(simplex_lattice(len(portfolio.traits), divisions), R)
    return {m.key: float(s) for m, s in zip(portfolio.members, shares)}


def member_tags(portfolio: Portfolio, member: Member, portfolios: list[str], share_simplex: float) -> dict:
    tags = {"member_key": member.key, "portfolio_id": portfolio.id,
            "portfolios": ",".join(portfolios), "share": f"{member.share:.4f}",
            "share_simplex": f"{share_simplex:.4f}",
            "certified": str(portfolio.certificate.certified).lower()}
    for t, w, v, se in zip(portfolio.traits, member.weights, member.value.mean, member.value.se):
        tags[f"w.{t}"], tags[f"value.{t}"], tags[f"se.{t}"] = f"{w:.4f}", f"{v:.4f}", f"{se:.4f}"
    tags["kind"] = member.kind
    if member.temperature is not None:  # the values above are of answers sampled at it
        tags["temperature"] = f"{member.temperature:g}"
    if member.kind == "soup":  # no training run: an interpolation of these members' adapters
        tags["ingredients"] = ",".join(member.ingredients)
        tags["lambdas"] = ",".join(f"{x:.4f}" for x in member.lambdas)
    return tags


def member_description(cfg, portfolio: Portfolio, member: Member, member_model: str, base_uri: str, version,
                       share_simplex: float) -> str:
    """Markdown for the MLflow UI: what the member was trained for and how well it does."""
    rows = "\n".join(f"| {t} | {w:.3f} | {v:.3f} ± {se:.3f} |" for t, w, v, se in
                     zip(portfolio.traits, member.weights, member.value.mean, member.value.se))
    return (
        f"### PALM member `{member.key[:10]}` ({cfg.task})\n\n"
        f"LoRA adapter of the base model `{base_uri}`, trained with reward weights w.\n\n"
        f"| trait | weight w | value ± standard error |\n|---|---|---|\n{rows}\n\n"
        + (f"Values of answers sampled at temperature {member.temperature:g}; `palm serve` samples this "
           "member at it unless a request sets `temperature`.\n\n" if member.temperature is not None else "")
        + f"**Serves {100 * member.share:.1f}% of users** (sampled Dirichlet(1) users routed to "
        f"it) and **{100 * share_simplex:.1f}% of the simplex** (a lattice of weights of step "
        f"1/{cfg.coverage.share_lattice}): the weights for which the routing rule chooses this member.\n\n"
        f"{certificate_text(portfolio)}\n\n"
        f"Load offline: `palm_tasks.registry.load_member(\"models:/{member_model}/{version}\")`, "
        f"or with MLflow alone `mlflow.transformers.load_model(\"models:/{member_model}/{version}\", "
        f"base_model_path=mlflow.artifacts.download_artifacts(\"{base_uri}\") + \"/model\")`."
    )


def certificate_text(portfolio: Portfolio) -> str:
    cert = portfolio.certificate
    held = "**certified**" if cert.certified else "**not certified**"
    why = ""
    if not cert.certified and (cert.open_at_cap or cert.failing):
        why = (f" Decisions that did not hold: {len(cert.failing)} fail, {len(cert.open_at_cap)} still open at the "
               f"cap of evaluation prompts" + (f" (e.g. {(cert.open_at_cap or cert.failing)[0]})" if
                                               (cert.open_at_cap or cert.failing) else "") + ".")
    split = cert.split
    return (
        f"Portfolio `{portfolio.id[:10]}` ({len(portfolio.members)} members out of "
        f"{len(portfolio.pool)} trained) is {held}: {cert.statement}. For every weight vector w some "
        f"member reaches (1 - eps) * OPT(w) - delta, OPT relative to {cert.relative_to or 'the trained pool'}. "
        f"alpha = {cert.alpha:g} is split over its {split.get('decisions', cert.decisions)} paired decisions "
        f"({split.get('each', 0):.2g} each); every one of them would clear eps = {cert.max_eps:.3f} at "
        f"delta = {portfolio.delta:g}.{why}" + _evidence_text(portfolio)
    )


def _evidence_text(portfolio: Portfolio) -> str:
    gate, lines = portfolio.gate, []
    if portfolio.evidence:
        lines.append(portfolio.evidence_summary())
    if gate:
        lines.append(f"Quality gate ({'passed' if gate.get('passed') else 'FAILED'}): " + "; ".join(
            f"`{k[:10]}` {g.get('degenerate_share', float('nan')):.1%} degenerate answers, relevance "
            f"{g.get('relevance', float('nan')):.3f}" for k, g in (gate.get("members") or {}).items()) + ".")
    blockers = portfolio.blockers()
    if blockers:
        lines.append("Not for production: " + "; ".join(blockers) + ".")
    return "".join("\n\n" + line for line in lines)


def portfolio_description(cfg, portfolio: Portfolio, member_model: str, member_versions: dict) -> str:
    rows = "\n".join(
        f"| `{m.key[:10]}` | {member_versions[m.key]} | "
        + " | ".join(f"{w:.2f}" for w in m.weights) + f" | {100 * m.share:.1f}% |"
        for m in portfolio.members)
    header = " | ".join(f"w.{t}" for t in portfolio.traits)
    dashes = "|".join("---" for _ in portfolio.traits)
    return (
        f"### PALM portfolio `{portfolio.id[:10]}` ({cfg.task})\n\n"
        f"{certificate_text(portfolio)}\n\n"
        f"| member | version of `{member_model}` | {header} | users served |\n"
        f"|---|---|{dashes}|---|\n{rows}\n\n"
        "`mlflow.pyfunc.load_model(uri).predict(DataFrame of trait weights)` returns the member "
        "the routing rule chooses for each row (the best w . values), its key and model URI. The price of "
        "precision (the eps certified against portfolio size and compute) is the run's "
        "plots/price_of_precision.png.\n\n" + price_table(portfolio)
    )


def price_table(portfolio: Portfolio) -> str:
    """The eps certified with confidence 1 - alpha by the best k candidates, as a table."""
    rows = portfolio.price.get("by_size") or []
    if not rows:
        return ""
    return ("| k | certified eps |\n|---|---|\n"
            + "\n".join(f"| {r['k']} | {r['certified_eps']:.3f} |" for r in rows))


def portfolio_metrics(portfolio: Portfolio) -> dict:
    """Certificate figures plus every number in the coverage summary."""
    cert = portfolio.certificate
    metrics = {"certified": float(cert.certified), "n_members": float(len(portfolio.members)),
               "n_trained": float(len(portfolio.pool)), "certificate.worst_slack": cert.worst_slack,
               "certificate.max_eps": cert.max_eps, "certificate.max_delta": cert.max_delta,
               "certificate.alpha": cert.alpha}
    metrics.update({f"coverage.{k}": float(v) for k, v in portfolio.coverage.items()
                    if isinstance(v, (int, float))})
    return metrics


ANSWERS_TABLE = "evaluation_answers.json"  # the member's answers, as the MLflow UI shows them


def log_answers(policy_dir: Path, traits) -> None:
    """The member's evaluation answers (prompt, answer, each trait's reward) as an MLflow table
    of its run, so a person browsing the registry sees what the member says, not only its
    numbers. Read from the member's completions.jsonl, written with its value."""
    import mlflow

    path = Path(policy_dir) / "completions.jsonl"
    if not path.is_file():
        return
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    table = {"prompt": [r["prompt"] for r in rows], "answer": [r["completion"] for r in rows]}
    table.update({t: [r["rewards"].get(t) for r in rows] for t in traits})
    mlflow.log_table(table, ANSWERS_TABLE)
