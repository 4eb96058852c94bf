"""The `palm` command: run the pipeline, one stage, or see what exists.

    palm run                 the whole pipeline (one Prefect flow, six stage flows under it)
    palm stage NAME          one stage; what each dvc.yaml stage calls
    palm evaluate            PALM against the baselines at equal sizes; reports/evaluation.md
    palm status              members, portfolio, registry, where to look
    palm retrain             one retraining run (flows/retrain.py)
    palm schedule --cron C   serve the retraining flow on a cron schedule
    palm route --weights W   which member serves the weights W, with its guarantee
    palm generate --weights W PROMPT    answer with that member
    palm serve               HTTP server: POST /route, POST /generate

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
                     "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                     # a busy machine can take longer than the default 20 s to start the ephemeral server
                     "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90"}.items():
    os.environ.setdefault(_var, _value)

from palm_tasks.config import ConfigError, PalmConfig, load_config  # noqa: E402
from palm_tasks.lock import ProjectLockedError  # noqa: E402
from palm_tasks.report.console import print_status, print_summary  # noqa: E402
from palm_tasks.schema import ArtifactError  # noqa: E402
from palm_tasks.stages import STAGES  # noqa: E402


def _fail(message: str, code: int) -> int:
    print(f"palm: error: {message}", file=sys.stderr)
    return code


def _args_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    p.add_argument("--root", default=".", help="the project directory (default: .)")


def cmd_run(args, cfg: PalmConfig) -> int:
    from flows.pipeline import pipeline
    from palm_tasks.lock import project_lock

    with project_lock(Path(args.root), "palm run", wait=args.wait):
        pipeline(args.params, args.root)
    print_summary(cfg, Path(args.root))
    return 0


def cmd_stage(args, cfg: PalmConfig) -> int:
    from flows.stages import STAGE_FLOWS
    from palm_tasks.lock import project_lock

    with project_lock(Path(args.root), f"palm stage {args.name}", wait=args.wait):
        out = STAGE_FLOWS[args.name](args.params, args.root)
    if args.name == "evaluate":
        _evaluated(args, out)
    return 0


def cmd_evaluate(args, cfg: PalmConfig) -> int:
    args.name = "evaluate"
    return cmd_stage(args, cfg)


def _evaluated(args, out: dict) -> None:
    print(f"evaluation of {len(out['methods'])} methods at k = 1..{max(out['ks'])} on a reference pool of "
          f"{out['reference_pool']['size']} policies ({out['seconds']:.0f} s): "
          f"{Path(args.root) / 'reports' / 'evaluation.md'}, metrics/evaluate.json")


def cmd_retrain(args, cfg: PalmConfig) -> int:
    from flows.retrain import retrain_flow

    retrain_flow(args.params, args.root)  # the flow holds the project lock itself
    print_summary(cfg, Path(args.root))
    return 0


def cmd_schedule(args, cfg: PalmConfig) -> int:
    from flows.retrain import check_cron, serve

    check_cron(args.cron)
    print(f"palm: serving deployment {args.name} of flow palm-retrain on cron {args.cron!r}; "
          "Ctrl-C stops it")
    serve(args.cron, args.params, args.root, args.name)
    return 0


def cmd_status(args, cfg: PalmConfig) -> int:
    problems = print_status(cfg, Path(args.root))  # damaged files: shown, then one error line
    return _fail("; ".join(problems), 1) if problems else 0


def _router(args, cfg: PalmConfig):
    """The portfolio to route with: --portfolio PATH, else the registry's --alias version."""
    from palm_tasks.registry import portfolio_model_name
    from palm_tasks.serve.router import Router
    from palm_tasks.tracking import tracking_uri

    if args.portfolio:
        return Router.from_portfolio(args.portfolio)
    return Router.from_registry(args.alias, tracking_uri(cfg, Path(args.root)),
                                portfolio_model_name(cfg), root=args.root)


def cmd_route(args, cfg: PalmConfig) -> int:
    from palm_tasks.serve.router import WeightsError, parse_weights

    try:
        parse_weights(args.weights, cfg.traits)  # before any loading: bad weights fail fast
        route = _router(args, cfg).route(args.weights)
    except WeightsError as exc:
        return _fail(str(exc), 2)
    except LookupError as exc:
        return _fail(str(exc), 1)
    print(json.dumps(route.to_dict(), indent=2) if args.json else route.describe())
    return 0


def cmd_generate(args, cfg: PalmConfig) -> int:
    from palm_tasks.serve.router import WeightsError, parse_weights
    from palm_tasks.serve.server import MAX_NEW_TOKENS, MemberModels

    try:
        parse_weights(args.weights, cfg.traits)
        router = _router(args, cfg)
        route = router.route(args.weights)
    except WeightsError as exc:
        return _fail(str(exc), 2)
    except LookupError as exc:
        return _fail(str(exc), 1)
    if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        return _fail(f"--max-new-tokens must be from 1 to {MAX_NEW_TOKENS}", 2)
    if route.normalized:
        print(f"note: the weights did not sum to 1 and were normalized to "
              f"{', '.join(f'{t}={v:.4g}' for t, v in route.weights.items())}", file=sys.stderr)
    print(f"member {route.member_key} ({route.model_uri or 'local'})", file=sys.stderr)
    models = MemberModels(router.base_model_path(), {route.member_key: router.adapter_dir(route.member_key)})
    print(models.generate(route.member_key, args.prompt, args.max_new_tokens)[0])
    return 0


def cmd_serve(args, cfg: PalmConfig) -> int:
    from palm_tasks.serve.server import load_models, make_server

    try:
        router = _router(args, cfg)
    except LookupError as exc:
        return _fail(str(exc), 1)
    models = load_models(router)
    try:
        server = make_server(router, models, args.host, args.port)
    except OSError as exc:  # port taken, address not on this machine
        return _fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", 1)
    host, port = server.server_address[:2]
    print(f"palm serve: portfolio {router.portfolio.id} ({len(router.members)} members) on "
          f"http://{host}:{port} (GET /health, POST /route, POST /generate); Ctrl-C stops",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


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
    p.add_argument("name", choices=list(STAGES), help="the stage: " + ", ".join(STAGES))
    _args_common(p)
    p.set_defaults(func=cmd_stage)
    p = sub.add_parser("evaluate", help="compare PALM with the baselines at equal sizes; write the report",
                       description="Train what each method of params.yaml compare needs (reusing "
                                   "finished jobs), compare them and write reports/evaluation.md.")
    _args_common(p)
    p.set_defaults(func=cmd_evaluate)
    for p in sub.choices["run"], sub.choices["stage"], sub.choices["evaluate"]:
        p.add_argument("--wait", action="store_true",
                       help="if another palm process holds the project, wait for it (default: refuse)")
    p = sub.add_parser("retrain", help="one retraining run: re-evaluate, train only where needed",
                       description="Refresh data and rewards, re-evaluate the existing members, "
                                   "train only where the certificate fails, register; production "
                                   "moves only to a certified portfolio.")
    _args_common(p)
    p.set_defaults(func=cmd_retrain)
    p = sub.add_parser("schedule", help="serve the retraining flow on a cron schedule (Prefect)",
                       description="Serve a Prefect deployment of the palm-retrain flow that runs "
                                   "on a cron schedule, until interrupted.")
    p.add_argument("--cron", default="0 3 * * 0", help='cron schedule (default: "0 3 * * 0", Sundays 03:00)')
    p.add_argument("--name", default="palm-retrain-weekly", help="deployment name")
    _args_common(p)
    p.set_defaults(func=cmd_schedule)
    p = sub.add_parser("status", help="show members, portfolio and where to look",
                       description="Show what the pipeline has produced so far.")
    _args_common(p)
    p.set_defaults(func=cmd_status)

    def args_router(p, weights: bool):
        if weights:
            p.add_argument("--weights", required=True,
                           help="trait weights, e.g. safety=0.5,humor=0.3,brevity=0.2 (normalized "
                                "if they do not sum to 1)")
        p.add_argument("--alias", default="production",
                       help="registered portfolio to use (default: production)")
        p.add_argument("--portfolio", help="a local portfolio.json instead of the registry")
        _args_common(p)

    p = sub.add_parser("route", help="which member serves these weights, and its guarantee",
                       description="Route trait weights to the portfolio member that serves them.")
    args_router(p, weights=True)
    p.add_argument("--json", action="store_true", help="print the route as JSON")
    p.set_defaults(func=cmd_route)
    p = sub.add_parser("generate", help="answer a prompt with the member these weights route to",
                       description="Route the weights, then generate with that member (greedy).")
    args_router(p, weights=True)
    p.add_argument("prompt", help="the prompt")
    p.add_argument("--max-new-tokens", type=int, default=48, help="(default: 48)")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("serve", help="HTTP server: POST /route, POST /generate",
                       description="Serve the portfolio over HTTP: one base model, every member's "
                                   "adapter on it.")
    args_router(p, weights=False)
    p.add_argument("--host", default="127.0.0.1", help="(default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="(default: 8000; 0 picks a free port)")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.params)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    args.params = str(Path(args.params).resolve())
    args.root = str(Path(args.root).resolve())
    try:  # paths in params.yaml must fit the project (store inside it, no output as input): before any work
        from palm_tasks.stages import check_project_paths

        check_project_paths(cfg, Path(args.root))
    except ConfigError as exc:
        return _fail(str(exc), 2)
    try:
        return args.func(args, cfg)
    except KeyboardInterrupt:
        return _fail("interrupted; finished alignment jobs are kept and will be reused", 130)
    except ConfigError as exc:  # e.g. a path in params.yaml that leaves the project
        return _fail(str(exc), 2)
    except ProjectLockedError as exc:
        return _fail(str(exc), 3)
    except ArtifactError as exc:  # a stage's output is missing or damaged: says which stage to rerun
        return _fail(str(exc), 1)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        if os.environ.get("PALM_DEBUG"):
            raise
        return _fail(f"{exc} (PALM_DEBUG=1 shows the traceback)", 1)


if __name__ == "__main__":
    sys.exit(main())
