"""What the `palm` command prints: the end-of-run summary and `palm status`, as rich tables."""

from __future__ import annotations

import json
from pathlib import Path

from palm_tasks import schema
from palm_tasks.config import PalmConfig
from palm_tasks.figures import at_precision, with_se
from palm_tasks.paths import Paths
from palm_tasks.schema import ArtifactError
from palm_tasks.portfolio import Portfolio


def _table(title: str, columns: list[str]):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c)
    return table


def _vec(traits, values, se=None) -> str:
    if se is None:
        return ", ".join(f"{t}={v:.3f}" for t, v in zip(traits, values))
    return ", ".join(f"{t}={with_se(v, s)}" for t, v, s in zip(traits, values, se))


def _console():
    from rich.console import Console

    return Console()


def print_summary(cfg: PalmConfig, root: Path) -> None:
    """The end-of-run summary: members, coverage figures, and how to open the MLflow UI."""
    from palm_tasks.tracking import ui_command

    console, paths = _console(), Paths(root)
    portfolio = schema.read(paths.portfolio, Portfolio, "coverage")
    cert, cov, traits = portfolio.certificate, portfolio.coverage, portfolio.traits
    table = _table(f"PALM portfolio {portfolio.id} ({len(portfolio.members)} members of "
                   f"{len(portfolio.pool)} trained)",
                   ["member", "weights", "value ± se", "users served", "degenerate answers", "gate"])
    gate = portfolio.gate.get("members") or {}
    for m in portfolio.members:
        g = gate.get(m.key, {})
        table.add_row(m.key + (" (soup)" if m.kind == "soup" else ""), _vec(traits, m.weights),
                      _vec(traits, m.value.mean, m.value.se), f"{m.share:.1%}",
                      f"{g['degenerate_share']:.1%}" if "degenerate_share" in g else "-",
                      "pass" if g.get("passed") else "; ".join(g.get("reasons", [])) or "-")
    console.print(table)
    verdict = "[green]CERTIFIED[/]" if cert.certified else "[red]NOT certified[/]"
    split = cert.split
    console.print(
        f"Certificate over the whole simplex: {verdict}: {cert.statement}. alpha {cert.alpha:g} is split over "
        f"{split.get('decisions', cert.decisions)} paired decisions ({split.get('each', 0):.2g} each); every one "
        f"would clear eps = {cert.max_eps:.3f} at delta = {portfolio.delta:g}. Relative to {cert.relative_to}.")
    for name in cert.open_at_cap:
        console.print(f"[red]Open at the cap:[/] {name}")
    se = max([s for m in portfolio.members for s in m.value.se], default=0.0)
    console.print(
        f"Gaps on {cov['test_weights']} test weights (relative to the best of the trained pool): "
        f"multiplicative max {at_precision(cov['max_multiplicative_gap'], se)} mean "
        f"{at_precision(cov['mean_multiplicative_gap'], se)}; usage perplexity {cov['usage_perplexity']:.2f}.")
    if portfolio.evidence:
        console.print(portfolio.evidence_summary())
    price = portfolio.price.get("by_size") or []
    if price:
        console.print("Price of precision (eps certified with confidence 1 - alpha by the best k): "
                      + ", ".join(f"k={r['k']}: {r['certified_eps']:.3f}" for r in price) + ".")
    console.print(f"Largest standard error of a member's value: {se:.3f}.")
    for reason in portfolio.blockers():
        console.print(f"[red]Not for production:[/] {reason}")
    reg = paths.metrics / "register.details.json"  # the alias is text: not in metrics/register.json
    if reg.is_file():
        r = json.loads(reg.read_text())
        console.print(f"Registered: portfolio version {r['portfolio_version']} (alias {r['alias']}).")
    console.print(f"Open the MLflow UI: [bold]{ui_command(cfg, root)}[/] then http://127.0.0.1:5000")


def print_cost(root: Path, stage_seconds: dict) -> None:
    """The end-of-run cost table: each stage's wall seconds, and under align each training's
    seconds by phase (sampling, SFT, the tests after rsft rounds, evaluation), its rounds and
    what ended them (metrics/align.details.json, palm_tasks/cost.py), then what the search
    stopped on."""
    console = _console()
    details = Paths(root).metrics / "align.details.json"
    align = json.loads(details.read_text()) if details.is_file() else {}
    table = _table("What the run cost (seconds; a stage whose work was done before is reused)",
                   ["stage", "job", "sampling", "SFT", "round tests", "evaluation", "rounds", "ended by"])

    def fmt(x) -> str:
        return "-" if x is None else f"{x:.0f}"
    for stage, seconds in stage_seconds.items():
        table.add_row(f"{stage} ({seconds:.0f} s)", "", "", "", "", "", "", "")
        if stage != "align":
            continue
        for row in align.get("cost", []):
            s = row.get("seconds", {})
            job = f"{row['key']} {row.get('source', '')} w=({', '.join(f'{x:.2f}' for x in row.get('weights', []))})"
            table.add_row("", job, fmt(s.get("sampling")), fmt(s.get("sft")), fmt(s.get("round_tests")),
                          fmt(s.get("evaluation")), f"{row.get('rounds', 0)} of {row.get('of', 0)}",
                          row.get("ended", ""))
    console.print(table)
    if align:
        total = align.get("seconds", {})
        tokens = align.get("tokens", {})
        console.print(f"align: {align.get('trainings', 0)} trainings, {align.get('answers_evaluated', 0)} answers "
                      f"evaluated; phases in all: " + ", ".join(f"{k.replace('_', ' ')} {fmt(v)} s" for k, v in total.items())
                      + "; tokens generated: " + ", ".join(f"{k.replace('_', ' ')} {fmt(v)}" for k, v in tokens.items())
                      + f"; the search stopped: {align.get('stopped') or '-'}.")


def _json_object(path: Path, problems: list[str]) -> dict | None:
    """A small JSON object a stage wrote, for status to show; None, with a problem naming the
    file, when it is damaged (status goes on to show the rest)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        problems.append(f"{path} is damaged ({str(exc)[:200]})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path} is damaged (expected an object, got {type(data).__name__})")
        return None
    return data


def print_status(cfg: PalmConfig, root: Path) -> list[str]:
    """What exists under the project: base model, data, members, portfolio, registry. Returns
    the damaged files it found (one problem each, naming the file); the rest is shown anyway."""
    from palm_tasks.jobs import CorruptPolicyError, load_policy
    from palm_tasks.llm.models import REPAIR_MEMBER
    from palm_tasks.tracking import ui_command

    console, paths, problems = _console(), Paths(root), []
    base = paths.base / "base.json"
    info = _json_object(base, problems) if base.is_file() else None
    name = "not prepared" if not base.is_file() else ("damaged" if info is None else info.get("name", "?"))
    console.print(f"base model: {name} ({paths.base})")
    train = paths.prompts / "train.jsonl"
    console.print(f"prompts: {'prepared' if train.is_file() else 'not prepared'} ({paths.prompts})")
    rewards_json = paths.metrics / "rewards.details.json"  # text: not in metrics/rewards.json
    if rewards_json.is_file():  # how each trait's reward is normalized to [0, 1]
        normalization = (_json_object(rewards_json, problems) or {}).get("normalization", {})
        for trait, how in (normalization.items() if isinstance(normalization, dict) else ()):
            console.print(f"reward {trait}: {how}")
    dirs = sorted(p for p in paths.members.glob("*") if p.is_dir() and not p.name.startswith(".")) \
        if paths.members.is_dir() else []
    portfolio, portfolio_error = None, None
    if paths.portfolio.is_file():
        try:
            portfolio = schema.read(paths.portfolio, Portfolio, "coverage")
        except ArtifactError as exc:
            portfolio_error = exc
    # Every member's files are checked against their checksums (a few MB each): a truncated
    # adapter would otherwise show as a fine member here and fail only when served.
    in_portfolio = {m.key for m in portfolio.members} if portfolio else set()
    checked = [*dirs, *(paths.root / m.path for m in (portfolio.members if portfolio else ())
                        if (paths.root / m.path).parent != paths.members)]  # soups live elsewhere
    table = _table(f"members: {len(dirs)} finished alignment jobs in {paths.members}",
                   ["key", "weights", "value ± se"])
    for p in checked:
        try:
            m = load_policy(p, verify=True)
            if p in dirs:
                table.add_row(m.key, _vec(m.traits, m.weights), _vec(m.traits, m.value.mean, m.value.se))
        except (CorruptPolicyError, OSError, ValueError, KeyError) as exc:
            detail = str(exc).removeprefix(f"policy {p.name}: ")
            table.add_row(p.name, "[red]damaged[/]", detail)
            problems.append(f"{'portfolio member' if p.name in in_portfolio else 'member'} {p.name} is "
                            f"damaged: {detail} ({p}); {REPAIR_MEMBER}")
    console.print(table)
    if paths.soup_pool.is_file():
        try:
            soups = schema.read(paths.soup_pool, schema.Pool, "soups")
            console.print(f"soups: {len(soups.policies)} evaluated Rewarded-Soups candidates in {paths.soups}"
                          + (f" (none: {soups.note})" if soups.note else ""))
        except ArtifactError as exc:
            console.print(f"soups: [red]damaged[/] ({paths.soup_pool})")
            problems.append(str(exc))
    if paths.portfolio.is_file():
        try:
            if portfolio_error:
                raise portfolio_error
            pf = portfolio
            console.print(f"portfolio: {pf.id} with {len(pf.members)} members "
                          f"({sum(m.kind == 'soup' for m in pf.members)} of them soups) "
                          f"({', '.join(m.key for m in pf.members)}); certified={pf.certificate.certified} "
                          f"at eps={pf.eps}, delta={pf.delta} ({paths.portfolio})")
        except ArtifactError as exc:
            console.print(f"portfolio: [red]damaged[/] ({paths.portfolio})")
            problems.append(str(exc))
    else:
        console.print("portfolio: none yet (palm stage coverage)")
    reg = paths.metrics / "register.details.json"
    if reg.is_file():
        r = _json_object(reg, problems)
        if r is not None:
            console.print(f"registry: portfolio version {r.get('portfolio_version', '?')}, alias {r.get('alias', '?')}")
    console.print(f"MLflow UI: {ui_command(cfg, root)}")
    return problems
