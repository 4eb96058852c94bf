"""The `palm` command: run the pipeline, one stage, or see what exists.

    palm run                 the whole pipeline (one Prefect flow, five stage flows under it)
    palm stage NAME          one stage; what each dvc.yaml stage calls
    palm status              members, portfolio, registry, where to look

Every command validates params.yaml first: a bad value exits with status 2 and one message
naming the key, the value and what is allowed, before any work starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Nothing may reach a model hub, and nothing should phone home.
for _var, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1",
                     "TOKENIZERS_PARALLELISM": "false", "DO_NOT_TRACK": "1",
                     "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}.items():
    os.environ.setdefault(_var, _value)

from palm_tasks.config import ConfigError, PalmConfig, load_config  # noqa: E402
from palm_tasks.layout import Layout  # noqa: E402
from palm_tasks.stages import STAGES  # noqa: E402


def _fail(message: str, code: int) -> int:
    print(f"palm: error: {message}", file=sys.stderr)
    return code


def _args_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    p.add_argument("--root", default=".", help="the project directory (default: .)")


def cmd_run(args, cfg: PalmConfig) -> int:
    from flows.pipeline import pipeline

    pipeline(args.params, args.root)
    print_summary(cfg, Path(args.root))
    return 0


def cmd_stage(args, cfg: PalmConfig) -> int:
    from flows.stages import STAGE_FLOWS

    STAGE_FLOWS[args.name](args.params, args.root)
    return 0


def cmd_status(args, cfg: PalmConfig) -> int:
    print_status(cfg, Path(args.root))
    return 0


def _table(title: str, columns: list[str]):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c)
    return table


def _vec(values: dict, se: dict | None = None) -> str:
    if se is None:
        return ", ".join(f"{k}={v:.3f}" for k, v in values.items())
    return ", ".join(f"{k}={v:.3f}±{se[k]:.3f}" for k, v in values.items())


def print_summary(cfg: PalmConfig, root: Path) -> None:
    """The end-of-run summary: members, coverage figures, and how to open the MLflow UI."""
    from rich.console import Console

    from palm_tasks.tracking import ui_command

    console = Console()
    lay = Layout(root)
    portfolio = json.loads(lay.portfolio.read_text())
    cert, cov = portfolio["certificate"], portfolio["coverage"]
    table = _table(f"PALM portfolio {portfolio['id']} ({len(portfolio['members'])} members of "
                   f"{len(portfolio['pool'])} trained)", ["member", "weights", "value ± se", "users served"])
    for m in portfolio["members"]:
        table.add_row(m["key"], _vec(m["weights"]), _vec(m["values"], m["std_errors"]), f"{m['share']:.1%}")
    console.print(table)
    verdict = "[green]CERTIFIED[/]" if cert["certified"] else "[red]NOT certified[/]"
    console.print(
        f"Certificate over the whole simplex: {verdict} at eps={portfolio['eps']}, delta="
        f"{portfolio['delta']} (z={portfolio['z']}); this portfolio is within max eps "
        f"{cert['max_eps']:.4f} at delta={portfolio['delta']}, or max delta {cert['max_delta']:.4f} "
        f"at eps={portfolio['eps']}, relative to {cert['relative_to']}."
    )
    console.print(
        f"Gaps on {cov['test_weights']} test weights (relative to the best of the trained pool): "
        f"multiplicative max {cov['max_multiplicative_gap']:.4f} mean {cov['mean_multiplicative_gap']:.4f}, "
        f"additive max {cov['max_additive_gap']:.4f} mean {cov['mean_additive_gap']:.4f}; "
        f"usage perplexity {cov['usage_perplexity']:.2f}."
    )
    reg = lay.metrics / "register.json"
    if reg.is_file():
        r = json.loads(reg.read_text())
        console.print(f"Registered: portfolio version {r['portfolio_version']} (alias {r['alias']}).")
    console.print(f"Open the MLflow UI: [bold]{ui_command(cfg, root)}[/] then http://127.0.0.1:5000")


def print_status(cfg: PalmConfig, root: Path) -> None:
    """What exists under the project: base model, data, members, portfolio, registry."""
    from rich.console import Console

    from palm_tasks.align import CorruptMemberError, load_member
    from palm_tasks.tracking import ui_command

    console = Console()
    lay = Layout(root)
    base = lay.base / "base.json"
    console.print(f"base model: {json.loads(base.read_text())['name'] if base.is_file() else 'not prepared'} "
                  f"({lay.base})")
    train = lay.prompts / "train.jsonl"
    console.print(f"prompts: {'prepared' if train.is_file() else 'not prepared'} ({lay.prompts})")
    dirs = sorted(p for p in lay.members.glob("*") if p.is_dir() and not p.name.startswith(".")) \
        if lay.members.is_dir() else []
    table = _table(f"members: {len(dirs)} finished alignment jobs in {lay.members}",
                   ["key", "weights", "value ± se"])
    for p in dirs:
        try:
            m = load_member(p, verify=False)
            table.add_row(m.key, _vec(dict(zip(m.traits, m.weights))),
                          _vec(dict(zip(m.traits, m.values)), dict(zip(m.traits, m.std_errors))))
        except (CorruptMemberError, OSError, ValueError, KeyError) as exc:
            table.add_row(p.name, "[red]damaged[/]", str(exc))
    console.print(table)
    if lay.portfolio.is_file():
        pf = json.loads(lay.portfolio.read_text())
        cert = pf["certificate"]
        console.print(f"portfolio: {pf['id']} with {len(pf['members'])} members "
                      f"({', '.join(m['key'] for m in pf['members'])}); certified={cert['certified']} "
                      f"at eps={pf['eps']}, delta={pf['delta']} ({lay.portfolio})")
    else:
        console.print("portfolio: none yet (palm stage coverage)")
    reg = lay.metrics / "register.json"
    if reg.is_file():
        r = json.loads(reg.read_text())
        console.print(f"registry: portfolio version {r['portfolio_version']}, alias {r['alias']}")
    console.print(f"MLflow UI: {ui_command(cfg, root)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="palm",
        description="PALM: train a small certified portfolio of LoRA-aligned LLMs covering every "
                    "user's trade-off between traits.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="run the whole pipeline (rewards, grid, align, coverage, register)",
                       description="Run the whole pipeline as one Prefect flow and print a summary.")
    _args_common(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("stage", help="run one stage (what dvc.yaml calls)",
                       description="Run one pipeline stage as its Prefect flow.")
    p.add_argument("name", choices=STAGES, help="the stage: " + ", ".join(STAGES))
    _args_common(p)
    p.set_defaults(func=cmd_stage)
    p = sub.add_parser("status", help="show members, portfolio and where to look",
                       description="Show what the pipeline has produced so far.")
    _args_common(p)
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.params)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    args.params = str(Path(args.params).resolve())
    args.root = str(Path(args.root).resolve())
    try:
        return args.func(args, cfg)
    except KeyboardInterrupt:
        return _fail("interrupted; finished alignment jobs are kept and will be reused", 130)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        if os.environ.get("PALM_DEBUG"):
            raise
        return _fail(f"{exc} (PALM_DEBUG=1 shows the traceback)", 1)


if __name__ == "__main__":
    sys.exit(main())
