"""The `palm` command: run the pipeline, one stage, or see what exists.

    palm run                 the whole pipeline (one Prefect flow, six stage flows under it)
    palm stage NAME          one stage; what each dvc.yaml stage calls
    palm evaluate            PALM against the baselines at equal sizes; reports/evaluation.md
    palm status              members, portfolio, registry, where to look
    palm retrain             one retraining run (flows/retrain.py)
    palm schedule --cron C   serve the retraining flow on a cron schedule
    palm route --weights W   which member serves the weights W, with its guarantee
    palm generate --weights W PROMPT    answer with that member
    palm serve               OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models)
    palm users set|show|delete|list     each user's stored trait weights (what serve routes them by)
    palm export vllm         the vLLM command serving the same members (GPU machines)
    palm profile NAME        a profile's settings as dvc exp run -S flags

Every command takes --profile NAME (profiles/NAME.yaml laid over params.yaml) and -S KEY=VALUE
(one setting, as dvc exp run -S takes it): `palm run --profile precise` (docs/profiles.md).

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

from palm_tasks.config import ConfigError, PalmConfig
from palm_tasks.params_yaml import load_config, parse_set, read_profile, write_resolved
from palm_tasks.lock import ProjectLockedError  # noqa: E402
from palm_tasks.report.console import print_cost, print_status, print_summary  # noqa: E402
from palm_tasks.schema import ArtifactError  # noqa: E402
from palm_tasks.stages import STAGES  # noqa: E402
from palm_tasks.tracking import StoreNotWritableError  # noqa: E402


MAX_ERROR = 1000  # characters of an error line: a message may quote its input (a 100 KB --weights)


def _fail(message: str, code: int) -> int:
    message = " ".join(str(message).split())  # one line, whatever the message holds
    if len(message) > MAX_ERROR:
        message = message[:MAX_ERROR] + "..."
    print(f"palm: error: {message}", file=sys.stderr)
    return code


class _Parser(argparse.ArgumentParser):
    """argparse with the one error line every palm refusal has: argparse's own error prints the
    whole usage first, so a bad argument gave several lines and no `palm: error:` at the start."""

    def error(self, message):
        self.exit(2, f"palm: error: {self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")


def _port(text: str) -> int:
    """--port: a TCP port (socket.bind raises OverflowError, not OSError, beyond 65535)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: a number from 0 to 65535") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {port}: a number from 0 to 65535")
    return port


def _count(text: str) -> int:
    """--limit: a number from 1 to 100,000."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text[:40]!r}: a number from 1 to 100000") from None
    if not 1 <= n <= 100_000:
        raise argparse.ArgumentTypeError(f"invalid count {n}: a number from 1 to 100000")
    return n


def _args_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    p.add_argument("--root", default=".", help="the project directory (default: .)")
    p.add_argument("--profile", help="lay a profile over the params file: a name of profiles/ (precise) or a "
                                     "YAML file of some of its keys (docs/profiles.md)")
    p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                   help="lay one setting over the params file (and the profile), as dvc exp run -S takes "
                        "it, e.g. -S coverage.eps=0.05; may be repeated")


def cmd_run(args, cfg: PalmConfig) -> int:
    from flows.pipeline import pipeline
    from palm_tasks.lock import project_lock

    with project_lock(Path(args.root), "palm run", wait=args.wait):
        out = pipeline(args.params, args.root)
    print_summary(cfg, Path(args.root))
    print_cost(Path(args.root), out["seconds"])
    _not_in_dvc(args)
    return 0


def _not_in_dvc(args) -> None:
    """After a run with overrides: dvc.lock records params.yaml's values, which it did not use."""
    if args.overrides:
        flags = " ".join(f"-S {o.as_dvc()}" for o in args.overrides)
        print(f"params: {args.params_file} with {flags} (as {Path(args.params).relative_to(args.root)}); "
              f"dvc.lock records {args.params_file}'s values, so this run is not in it: "
              f"`dvc exp run {flags}` runs the same under DVC")


def cmd_stage(args, cfg: PalmConfig) -> int:
    from flows.stages import STAGE_FLOWS
    from palm_tasks.lock import project_lock

    with project_lock(Path(args.root), f"palm stage {args.name}", wait=args.wait):
        out = STAGE_FLOWS[args.name](args.params, args.root)
    if args.name == "evaluate":
        _evaluated(args, out)
    else:
        _not_in_dvc(args)
    return 0


def cmd_profile(args, cfg: PalmConfig) -> int:
    """The profile's settings as `dvc exp run -S` flags: dvc exp run $(palm profile precise)."""
    for o in args.overrides:
        print(f"-S {o.as_dvc()}")
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
    from palm_tasks.llm.models import chat
    from palm_tasks.serve.engine import Engine, Sampling
    from palm_tasks.serve.members import MemberModels, adapter_name
    from palm_tasks.serve.router import WeightsError, parse_weights

    if not 1 <= args.max_new_tokens <= cfg.serve.max_tokens:  # before opening anything: nothing is touched
        return _fail(f"--max-new-tokens must be from 1 to {cfg.serve.max_tokens} (serve.max_tokens)", 2)
    if args.temperature is not None and not 0 <= args.temperature <= 2:  # the server's range; NaN fails too
        return _fail(f"--temperature must be from 0 to 2 (0: greedy), not {args.temperature:g}", 2)
    if not 0 <= args.seed < 2**63:
        return _fail(f"--seed must be from 0 to 2**63 - 1, not {args.seed}", 2)
    try:
        parse_weights(args.weights, cfg.traits)
        router = _router(args, cfg)
        route = router.route(args.weights)
    except WeightsError as exc:
        return _fail(str(exc), 2)
    except LookupError as exc:
        return _fail(str(exc), 1)
    # loads (and first checks) the member's adapter: a damaged one is the only line printed
    adapter = router.adapter_dir(route.member_key)
    name = adapter_name(route.member_key, adapter)
    engine = Engine(MemberModels(router.base_model_path(), {name: adapter}), max_batch=1)
    if route.normalized:
        print(f"note: the weights did not sum to 1 and were normalized to "
              f"{', '.join(f'{t}={v:.4g}' for t, v in route.weights.items())}", file=sys.stderr)
    temperature = args.temperature if args.temperature is not None else route.temperature or 0.0
    print(f"member {route.member_key} ({route.model_uri or 'local'}), "
          + (f"temperature {temperature:g}, seed {args.seed}" if temperature else "greedy"), file=sys.stderr)
    try:
        answer = engine.complete(name, [engine.models.encode_chat(chat(args.prompt))],
                                 Sampling(max_tokens=args.max_new_tokens, temperature=temperature,
                                          seed=args.seed))[0]
    finally:
        engine.close()
    print(answer.text.strip())
    return 0


def cmd_serve(args, cfg: PalmConfig) -> int:
    from palm_tasks.llm.models import resolve_device
    from palm_tasks.log import say, warn
    from palm_tasks.registry import portfolio_model_name
    from palm_tasks.serve.api import make_app
    from palm_tasks.serve.engine import Engine
    from palm_tasks.serve.live import FileSource, LivePortfolio, RegistrySource
    from palm_tasks.serve.server import API_KEY_ENV, make_server
    from palm_tasks.serve.users import user_store
    from palm_tasks.tracking import tracking_uri

    s = cfg.serve
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if api_key is not None and (not api_key.strip() or not api_key.isprintable() or len(api_key) > 1000):
        return _fail("--api-key (or PALM_API_KEY): give a key of 1 to 1000 printable characters", 2)
    users = user_store(cfg, Path(args.root))  # a path outside the project: refused before loading anything
    if s.threads:
        import torch

        torch.set_num_threads(s.threads)
    source = (FileSource(args.portfolio) if args.portfolio else
              RegistrySource(args.alias, tracking_uri(cfg, Path(args.root)), portfolio_model_name(cfg), args.root))
    try:
        live = LivePortfolio(source, lambda models: Engine(models, s.max_batch, s.max_queue, s.queue_timeout_s,
                                                           s.prefix_cache_mb * 2**20), resolve_device(cfg.device))
    except LookupError as exc:
        return _fail(str(exc), 1)
    app = make_app(live, s, users, api_key, base_model_name=str(cfg.base_model))
    try:
        server, sock = make_server(app, args.host, args.port)
    except OSError as exc:  # port taken, address not on this machine
        live.close()
        return _fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", 1)
    host, port = sock.getsockname()[:2]
    if api_key is None and host not in ("127.0.0.1", "::1", "localhost"):
        warn(f"palm serve listens on {host} without an API key: anyone who reaches it can generate "
             f"(start with --api-key or {API_KEY_ENV})")
    live.poll(s.poll_interval_s, say=lambda line: print(line, file=sys.stderr, flush=True))
    dep = live.current
    print(f"palm serve: portfolio {dep.portfolio_id} (version {dep.version}, {len(dep.adapters)} members) on "
          f"http://{host}:{port} (OpenAI API at /v1: POST /v1/chat/completions, POST /v1/completions, "
          f"GET /v1/models; GET /health, POST /route){' with an API key' if api_key else ''}; Ctrl-C stops",
          file=sys.stderr, flush=True)
    say(f"following {source.describe()}" + (f" every {s.poll_interval_s:g} s" if s.poll_interval_s else
                                            " on POST /v1/portfolio/reload only"))
    try:
        server.run(sockets=[sock])  # returns on Ctrl-C or SIGTERM, after open requests finish
    finally:
        live.close()
    return 0


def cmd_users(args, cfg: PalmConfig) -> int:
    from palm_tasks.serve.router import WeightsError, parse_weights
    from palm_tasks.serve.users import UserIdError, UserStoreError, check_user_id, user_store

    store = user_store(cfg, Path(args.root))
    try:
        if args.action in ("set", "show", "delete"):
            check_user_id(args.user)
        if args.action == "set":
            w, normalized = parse_weights(args.weights, cfg.traits)
            prefs = store.set(args.user, dict(zip(cfg.traits, map(float, w))))
            print(json.dumps(prefs.to_dict()) if args.json else
                  f"user {prefs.user}: {_weights_text(prefs.weights)}"
                  + (" (normalized)" if normalized else "") + f"; stored in {store.path}")
        elif args.action == "show":
            prefs = store.get(args.user)
            if prefs is None:
                return _fail(f"no preferences stored for user {args.user!r} in {store.path}", 1)
            print(json.dumps(prefs.to_dict()) if args.json else f"user {prefs.user}: {_weights_text(prefs.weights)}")
        elif args.action == "delete":
            if not store.delete(args.user):
                return _fail(f"no preferences stored for user {args.user!r} in {store.path}", 1)
            print(f"user {args.user}: deleted from {store.path}")
        else:
            found = store.list(args.limit, args.after)
            if args.json:
                print(json.dumps([p.to_dict() for p in found]))
            for p in [] if args.json else found:
                print(f"{p.user}\t{_weights_text(p.weights)}")
    except (UserIdError, WeightsError) as exc:
        return _fail(str(exc), 2)
    except UserStoreError as exc:
        return _fail(str(exc), 1)
    return 0


def _weights_text(weights: dict) -> str:
    return ", ".join(f"{t}={w:.4g}" for t, w in weights.items())


def cmd_export(args, cfg: PalmConfig) -> int:
    from palm_tasks.serve.vllm_export import vllm_export

    try:
        export = vllm_export(_router(args, cfg), args.host, args.port)
    except (LookupError, ValueError) as exc:  # ValueError: members measured at different temperatures
        return _fail(str(exc), 1)
    text = json.dumps(export.to_dict(), indent=2) + "\n" if args.json else export.script()
    if args.out:
        out = Path(args.out)
        out.write_text(text)
        if not args.json:
            out.chmod(0o755)
        print(f"palm export: wrote {out} ({len(export.lora_modules)} members on {export.base_model})",
              file=sys.stderr)
    else:
        print(text, end="")
    return 0


# Commands that run Prefect flows, and those of them that write the MLflow store (runs of the
# rewards stage, of each job and of palm evaluate; registered models).
FLOW_COMMANDS = ("run", "stage", "evaluate", "retrain", "schedule")
STAGES_WRITING_MLFLOW = ("rewards", "align", "soups", "register", "evaluate")


def _before_flows(args, cfg: PalmConfig) -> None:
    """Before a command runs flows: the temporary Prefect server they start dies with this
    process (a SIGKILL of palm would otherwise leave it running), and a store the command must
    write is writable (else one line naming the file now, not a traceback minutes in)."""
    if args.command not in FLOW_COMMANDS:
        return
    from flows.runners import tie_prefect_server_to_this_process
    from palm_tasks.tracking import check_store_writable

    if args.command != "stage" or args.name in STAGES_WRITING_MLFLOW:
        check_store_writable(cfg, Path(args.root))
    tie_prefect_server_to_this_process()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="palm",
        description="PALM: train a small certified portfolio of LoRA-aligned LLMs covering every "
                    "user's trade-off between traits.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="run the whole pipeline (rewards, grid, align, coverage, register)",
                       description="Run the whole pipeline as one Prefect flow and print a summary.")
    _args_common(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("profile", help="print a profile's settings as dvc exp run -S flags",
                       description="Print the settings of a profile (and any -S) as the flags dvc exp run takes: "
                                   "dvc exp run $(palm profile precise). Checked like params.yaml first.")
    p.add_argument("name", help="a name of profiles/ (precise) or a YAML file of some of params.yaml's keys")
    _args_common(p)
    p.set_defaults(func=cmd_profile)
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
                       description="Route the weights, then generate with that member, sampled at its "
                                   "temperature (the one its values were measured at) unless --temperature.")
    args_router(p, weights=True)
    p.add_argument("prompt", help="the prompt")
    p.add_argument("--max-new-tokens", type=int, default=48, help="(default: 48)")
    p.add_argument("--temperature", type=float, help="0: greedy (default: the member's)")
    p.add_argument("--seed", type=int, default=0, help="the same seed, the same answer (default: 0)")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("export", help="the vLLM command that serves the portfolio (GPU)",
                       description="Print (or --out FILE) the `vllm serve` command that serves the "
                                   "portfolio's members as LoRA modules named as in palm serve.")
    p.add_argument("target", choices=["vllm"], help="what to export for (vllm)")
    args_router(p, weights=False)
    p.add_argument("--host", default="127.0.0.1", help="vLLM's address (default: 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="(default: 8000)")
    p.add_argument("--out", help="write the script (or --json) here instead of printing it")
    p.add_argument("--json", action="store_true", help="the command and modules as JSON")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API: /v1/chat/completions, /v1/models, /route",
                       description="Serve the portfolio over HTTP: one base model, every member's "
                                   "adapter on it.")
    args_router(p, weights=False)
    p.add_argument("--host", default="127.0.0.1", help="(default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="(default: 8000; 0 picks a free port)")
    p.add_argument("--api-key", help="every request but /health must send Authorization: Bearer KEY "
                                     "(default: the PALM_API_KEY environment variable; none: no check, and "
                                     "preferences cannot be written over HTTP)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("users", help="each user's stored trait weights: set, show, delete, list",
                       description="The user store (params.yaml serve.users_db) that palm serve routes a "
                                   "request's `user` by.")
    users = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in [("set", "store a user's weights"), ("show", "a user's weights"),
                         ("delete", "forget a user"), ("list", "the users, in id order")]:
        q = users.add_parser(action, help=text, description=text[0].upper() + text[1:] + ".")
        if action != "list":
            q.add_argument("user", help="the user id (the OpenAI `user` field)")
        if action == "set":
            q.add_argument("--weights", required=True, help="trait weights, e.g. safety=0.5,humor=0.3,brevity=0.2")
        if action == "list":
            q.add_argument("--limit", type=_count, default=100, help="at most this many (default: 100)")
            q.add_argument("--after", default="", help="ids after this one (paging)")
        q.add_argument("--json", action="store_true", help="print JSON")
        _args_common(q)
        q.set_defaults(func=cmd_users)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "profile":
        args.profile = args.name
    if not Path(args.root).is_dir():  # a typo would otherwise show an empty project, or start one
        return _fail(f"--root {args.root}: no such directory (the project directory holding params.yaml)", 2)
    try:
        args.overrides = ([*read_profile(args.profile, args.root)] if args.profile else []) \
            + [parse_set(text) for text in args.set]
        cfg = load_config(args.params, args.overrides)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    args.params_file = Path(args.params).name
    args.params = str(Path(args.params).resolve())
    args.root = str(Path(args.root).resolve())
    try:  # paths in params.yaml must fit the project (store inside it, no output as input): before any work
        from palm_tasks.stages import check_project_paths

        check_project_paths(cfg, Path(args.root))
        if args.overrides and args.command != "profile":  # the stages and job workers read a file
            args.params = str(write_resolved(args.params, args.overrides, args.root))
    except ConfigError as exc:
        return _fail(str(exc), 2)
    try:
        _before_flows(args, cfg)
        return args.func(args, cfg)
    except StoreNotWritableError as exc:  # names the database file and that it is read-only
        return _fail(str(exc), 1)
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
