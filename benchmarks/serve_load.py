"""Load on `palm serve` (the OpenAI-compatible API); writes benchmarks/results/serve_load.json.

Run from the repository root:

    python benchmarks/serve_load.py --label after      # or --label before, on the older code

The real `palm serve` command serves a portfolio registered in a real MLflow store (SQLite) on
SmolLM2-135M-Instruct, fp32 on the CPU: k members (default 4) whose adapters are real, untrained
PEFT LoRA adapters of the training config's shape (serve_bench.make_adapters), members chosen from
a synthetic pool by the real coverage build and registered by the real register code
(registry.register_portfolio). Two portfolio versions are registered, with disjoint members:
the swap moves `production` between them. The project is built once under --workdir and reused.

Client threads, each with its own keep-alive HTTP connection, send chat completions back to back
(greedy, max_tokens N, prompts from a fixed list):
- one client on one member (the answer time of one request alone);
- 16 clients on one member (`model`: the member's name);
- 16 clients spread over every member (client c names member c mod k);
- a swap under load: 8 clients routed by random weights (`model: "palm"`) while `production`
  moves twice (v1 -> v2 -> v1) in the registry.

Figures: aggregate completion tokens/s (usage.completion_tokens over the wall time),
batch_gain = 16 clients on one member / one client, mixed_over_single = 16 spread / 16 on one,
p99 latency at 16 clients over one client's median answer time, and for the swap: requests,
failures, and the responses to requests sent after the server switched (its /health says which
portfolio it serves) that came from the old portfolio. Then the preferences crash test
(tests/serving.preferences_crash): 1,000 users written by 8 writers through PUT
/v1/users/{id}/preferences, the server killed with SIGKILL after half were acknowledged and
started again; every acknowledged write is read back and the store's integrity checked.
--threads sets the server's CPU threads (OMP_NUM_THREADS, which the older code honours too).
--label writes its figures under that key of the results file, keeping the other label's.
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
OUT = ROOT / "benchmarks" / "results" / "serve_load.json"
PROMPTS = ["Tell me something interesting about the sea.", "What is a good name for a cat?",
           "How do I boil an egg?", "Why is the sky blue?", "Write a short poem about rain.",
           "What should I pack for a hike?", "Explain what a computer does.", "Give me a tip for sleeping well."]
PREFIX = "palmload"


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def build_project(workdir: Path, k: int) -> dict:
    """workdir/project: models/base (SmolLM2), 2k member policies (models/members/m<j>), and two
    registered portfolio versions (members m0..m<k-1>, then the next k); production -> the first.
    Returns {"root", "versions": [v1, v2], "portfolio_ids": [...]}; built once, then reused."""
    root = workdir / "project"
    ready = root / "benchmark.json"
    if ready.is_file():
        return {**json.loads(ready.read_text()), "root": str(root)}
    import shutil

    import yaml
    from mlflow import MlflowClient

    from benchmarks.serve_bench import make_adapters
    from palm_tasks import schema
    from palm_tasks.config import parse_config
    from palm_tasks.jobs import store_policy
    from palm_tasks.llm.base_model import prepare_base_model, resolve_base_model
    from palm_tasks.paths import Paths
    from palm_tasks.registry import portfolio_model_name, register_portfolio
    from palm_tasks.stages.coverage import build

    sys.path.insert(0, str(ROOT / "tests"))
    from support.pools import EVALUATION, flat_sample_pool, policies_with_values

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    cfg = parse_config({"mlflow": {"registered_model_prefix": PREFIX}, "coverage": {"test_users": 100},
                        "evaluation": EVALUATION})
    (root / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    paths = Paths(root)
    cached_base = workdir / "base"  # the conversion takes minutes: kept beside the project
    prepare_base_model("smollm2", cached_base)
    shutil.copytree(cached_base, paths.base)
    base = resolve_base_model(paths.base)
    # the pool of serve_bench.synthetic_portfolio, with real adapters for the 2k members used
    from palm_tasks.core import simplex

    traits = ["safety", "humor", "brevity"]
    rng = np.random.default_rng(0)
    W = np.vstack([np.eye(3), simplex.random_weights(3, 3 * k, 0)])
    R = np.clip(0.2 + 0.6 * W + 0.03 * rng.standard_normal(W.shape), 0, 1)
    pool = policies_with_values(root, W, R, traits)
    samples = flat_sample_pool(traits)
    adapters = make_adapters(base, 2 * k, workdir / "adapters")
    for j, adapter in enumerate(adapters):
        tmp = paths.members / f"m{j}.tmp"
        tmp.mkdir(parents=True)
        shutil.copytree(adapter, tmp / "adapter")
        pool[j] = store_policy(tmp, paths.members / f"m{j}", pool[j], [])
    client, versions, ids = None, [], []
    for members in (list(range(k)), list(range(k, 2 * k))):
        portfolio, *_ = build(cfg, paths, pool, [], members=members, samples=samples)
        schema.write(paths.portfolio, portfolio)
        out = register_portfolio(cfg, root)
        versions.append(str(out["portfolio_version"]))
        ids.append(out["portfolio_id"])
        client = MlflowClient()
    client.set_registered_model_alias(portfolio_model_name(cfg), "production", versions[0])
    info = {"versions": versions, "portfolio_ids": ids, "model": portfolio_model_name(cfg),
            "members": [[f"m{j}" for j in range(k)], [f"m{j}" for j in range(k, 2 * k)]]}
    ready.write_text(json.dumps(info, indent=2))
    return {**info, "root": str(root)}


def set_params(root: Path, poll_interval_s: float) -> None:
    """The project's params.yaml as the code under test has it (its own defaults), with a short
    registry poll interval when that code has one."""
    import yaml

    from palm_tasks.config import PalmConfig, parse_config

    data = yaml.safe_load((root / "params.yaml").read_text())
    keep = {key: data[key] for key in ("mlflow", "coverage")}
    if "serve" in PalmConfig.model_fields:
        keep["serve"] = {"poll_interval_s": poll_interval_s}
    (root / "params.yaml").write_text(yaml.safe_dump(parse_config(keep).model_dump(), sort_keys=False))


def start_server(root: Path, log: Path, threads: int = 0, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`palm serve` of the code under test; `threads` > 0: torch's CPU threads (OMP_NUM_THREADS,
    which the older code honours too)."""
    env = {**os.environ, **(env or {}), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    server = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--root", str(root), "--params",
                               str(root / "params.yaml"), "--port", "0"], cwd=ROOT, stderr=subprocess.PIPE,
                              text=True, env=env)
    deadline = time.time() + 600
    lines = []
    while time.time() < deadline:
        line = server.stderr.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        if found:
            def drain():
                with open(log, "a") as fh:
                    for rest in server.stderr:
                        fh.write(rest)
            threading.Thread(target=drain, daemon=True).start()
            return server, found.group(1)
    server.kill()
    raise SystemExit("palm serve did not start:\n" + "".join(lines[-20:]))


def _version_of(payload: dict) -> str | None:
    """Which portfolio answered: palm.portfolio_id (every routed answer has it)."""
    palm = payload.get("palm") or {}
    return palm.get("portfolio_id")


def run_clients(url: str, clients: int, requests: int | None, body_of, stop: threading.Event | None = None,
                new_tokens: int = 32) -> dict:
    """C client threads sending `body_of(c, i)` back to back: `requests` each, or until `stop`."""
    import httpx

    records, lock = [], threading.Lock()

    def client(c: int):
        with httpx.Client(base_url=url, timeout=900) as http:
            i = 0
            while (requests is None and not stop.is_set()) or (requests is not None and i < requests):
                body = {"messages": [{"role": "user", "content": PROMPTS[(c + i) % len(PROMPTS)]}],
                        "max_tokens": new_tokens, **body_of(c, i)}
                sent = time.perf_counter()
                try:
                    response = http.post("/v1/chat/completions", json=body)
                    status, payload = response.status_code, response.json()
                except Exception as exc:  # noqa: BLE001 (a dropped connection is a failed request)
                    status, payload = 0, {"error": f"{type(exc).__name__}: {exc}"}
                done = time.perf_counter()
                tokens = (payload.get("usage") or {}).get("completion_tokens", 0) if status == 200 else 0
                with lock:
                    records.append({"client": c, "sent": sent, "done": done, "status": status, "tokens": tokens,
                                    "version": _version_of(payload) if status == 200 else None,
                                    "error": None if status == 200 else str(payload)[:200]})
                i += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"records": records, "wall_s": wall, "start": start}


def summarize(run: dict, clients: int) -> dict:
    records = run["records"]
    latency = np.array([r["done"] - r["sent"] for r in records])
    ok = [r for r in records if r["status"] == 200]
    tokens = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": len(records), "failed": len(records) - len(ok),
            "wall_s": round(run["wall_s"], 2), "completion_tokens": tokens,
            "tokens_per_s": round(tokens / run["wall_s"], 2),
            "latency_p50_s": round(float(np.median(latency)), 3),
            "latency_p99_s": round(float(np.quantile(latency, 0.99)), 3),
            "latency_max_s": round(float(latency.max()), 3),
            "errors": sorted({r["error"] for r in records if r["error"]})[:3]}


def health(url: str) -> dict:
    import httpx

    try:
        return httpx.get(url + "/health", timeout=30).json()
    except Exception:  # noqa: BLE001
        return {}


def swap_under_load(url: str, project: dict, clients: int, settle_s: float, wait_s: float,
                    new_tokens: int) -> dict:
    """`clients` clients routed by random weights while production moves v1 -> v2 -> v1."""
    from mlflow import MlflowClient

    client = MlflowClient()
    rng = np.random.default_rng(1)
    weights = rng.dirichlet(np.ones(3), size=(clients, 10_000))
    stop = threading.Event()
    result = {}

    def body_of(c, i):
        return {"model": "palm", "palm": {"weights": dict(zip(["safety", "humor", "brevity"],
                                                            map(float, weights[c, i % 10_000])))}}

    loader = threading.Thread(target=lambda: result.update(run=run_clients(url, clients, None, body_of, stop,
                                                                         new_tokens)))
    loader.start()
    moves = []
    time.sleep(settle_s)
    for version, portfolio_id in [(project["versions"][1], project["portfolio_ids"][1]),
                                  (project["versions"][0], project["portfolio_ids"][0])]:
        moved = time.perf_counter()
        client.set_registered_model_alias(project["model"], "production", version)
        switched = None
        while time.perf_counter() - moved < wait_s:
            if health(url).get("portfolio_id") == portfolio_id:
                switched = time.perf_counter()
                break
            time.sleep(0.2)
        moves.append({"to_version": version, "portfolio_id": portfolio_id, "moved": moved, "switched": switched})
        time.sleep(settle_s)
    stop.set()
    loader.join()
    records = result["run"]["records"]
    # a response is stale if its request was sent after the server switched (or, for a server that
    # never switched, after wait_s) and it came from another portfolio than the alias's
    stale = 0
    for m, after in zip(moves, moves[1:] + [None]):
        since = m["switched"] if m["switched"] is not None else m["moved"] + wait_s
        until = after["moved"] if after else float("inf")
        stale += sum(1 for r in records if since <= r["sent"] < until and r["status"] == 200
                     and r["version"] != m["portfolio_id"])
    failed = [r for r in records if r["status"] != 200]
    return {"clients": clients, "swap_requests": len(records), "swap_failed": len(failed),
            "stale_after_switch": stale,
            "followed": all(m["switched"] is not None for m in moves),
            "switch_delay_s": [None if m["switched"] is None else round(m["switched"] - m["moved"], 2)
                               for m in moves],
            "moves": [f"production -> version {m['to_version']}" for m in moves],
            "versions_seen": sorted({str(r["version"]) for r in records}),
            "errors": sorted({r["error"] for r in failed})[:3], "wall_s": round(result["run"]["wall_s"], 1)}


def crash_test(root: Path, workdir: Path, args) -> dict:
    """The preferences crash test (tests/serving.preferences_crash) on this project's server:
    `--crash-users` users, 8 writers, SIGKILL after half of them were acknowledged."""
    sys.path.insert(0, str(ROOT / "tests"))
    from serving import preferences_crash

    key = "sk-benchmark"
    store = root / "mlruns" / "users.db"
    for path in (store, store.with_name("users.db-wal"), store.with_name("users.db-shm")):
        path.unlink(missing_ok=True)
    load = _load_average()
    figures = preferences_crash(lambda: start_server(root, workdir / f"server-{args.label}-crash.log", args.threads,
                                                     {"PALM_API_KEY": key}),
                                store, ["safety", "humor", "brevity"], key, users=args.crash_users,
                                kill_after=args.crash_users // 2)
    return {**figures, "load_average_before": load, "load_average_after": _load_average()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="before | after: the key the figures go under")
    parser.add_argument("--workdir", default="/tmp/palm-serve-load", help="where the project is built once")
    parser.add_argument("--k", type=int, default=4, help="portfolio members (default 4)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=3, help="per client in the 16-client runs (default 3)")
    parser.add_argument("--single-requests", type=int, default=6, help="of the one client (default 6)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--swap-clients", type=int, default=8)
    parser.add_argument("--poll-interval", type=float, default=2.0, help="serve.poll_interval_s (default 2)")
    parser.add_argument("--threads", type=int, default=0, help="the server's CPU threads (default: torch's)")
    parser.add_argument("--crash-users", type=int, default=1000, help="users of the preferences crash test "
                        "(0: skip it; skipped for a server without /v1/users)")
    parser.add_argument("--commit", help="the commit measured (default: git HEAD of this checkout)")
    args = parser.parse_args()

    import psutil

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    project = build_project(workdir, args.k)
    root = Path(project["root"])
    from palm_tasks.registry import portfolio_model_name  # noqa: F401 (the code under test imports)
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    from mlflow import MlflowClient

    MlflowClient().set_registered_model_alias(project["model"], "production", project["versions"][0])
    set_params(root, args.poll_interval)
    load_before = _load_average()
    started = time.perf_counter()
    server, url = start_server(root, workdir / f"server-{args.label}.log", args.threads)
    try:
        members = [f"palm-member-{m}" for m in project["members"][0]]
        for m in members:  # warm-up: every member answers once
            run_clients(url, 1, 1, lambda c, i, m=m: {"model": m}, new_tokens=args.max_tokens)
        rss_start = psutil.Process(server.pid).memory_info().rss
        figures = {}
        runs = {"one_client": (1, args.single_requests, lambda c, i: {"model": members[0]}),
                "sixteen_one_member": (args.clients, args.requests, lambda c, i: {"model": members[0]}),
                "sixteen_every_member": (args.clients, args.requests,
                                         lambda c, i: {"model": members[c % len(members)]})}
        for name, (clients, requests, body_of) in runs.items():
            load = _load_average()
            figures[name] = {**summarize(run_clients(url, clients, requests, body_of, new_tokens=args.max_tokens),
                                         clients), "load_average_before": load, "load_average_after": _load_average()}
            print(name, json.dumps(figures[name]), flush=True)
        load = _load_average()
        swap = swap_under_load(url, project, args.swap_clients, settle_s=8.0, wait_s=60.0,
                               new_tokens=args.max_tokens)
        swap.update(load_average_before=load, load_average_after=_load_average())
        print("swap", json.dumps(swap), flush=True)
        rss_end = psutil.Process(server.pid).memory_info().rss
        import httpx

        has_users = "/v1/users/{user}/preferences" in httpx.get(url + "/openapi.json", timeout=60).json()["paths"]
    finally:
        server.terminate()
        server.wait(timeout=120)
    crash = None
    if args.crash_users and has_users:
        crash = crash_test(root, workdir, args)
        print("preferences crash test", json.dumps(crash), flush=True)
    one, single, mixed = (figures[n] for n in ("one_client", "sixteen_one_member", "sixteen_every_member"))
    result = {
        **figures, "swap": swap,
        "batch_gain": round(single["tokens_per_s"] / one["tokens_per_s"], 2),
        "mixed_over_single": round(mixed["tokens_per_s"] / single["tokens_per_s"], 2),
        "p99_over_one_client": round(max(single["latency_p99_s"], mixed["latency_p99_s"])
                                     / one["latency_p50_s"], 2),
        "swap_requests": swap["swap_requests"], "swap_failed": swap["swap_failed"],
        "preferences_crash": crash, "threads": args.threads or "torch default",
        "server_rss_mib": {"start": round(rss_start / 2**20), "end": round(rss_end / 2**20)},
        "commit": args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                                capture_output=True, text=True).stdout.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M"), "seconds": round(time.perf_counter() - started),
        "load_average_1_5_15": {"before": load_before, "after": _load_average()},
        "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
    }
    previous = json.loads(OUT.read_text()) if OUT.is_file() else {}
    earlier = {k: v for k, v in previous.items() if isinstance(v, dict) and "commit" in v}  # other labels' runs
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "what": "palm serve under load: concurrent keep-alive clients sending chat completions",
        "base_model": "SmolLM2-135M-Instruct (float32, CPU)", "members": args.k,
        "adapters": "PEFT LoRA of the training config's shape, not trained (B ~ N(0, 1e-3^2))",
        "commit": result["commit"], "date": result["date"], "latest": args.label,  # the run written last
        "targets": {"batch_gain": ">= 5", "mixed_over_single": ">= 0.75", "p99_over_one_client": "<= 3",
                    "swap_failed": "0", "stale_after_switch": "0"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "note": "a 2-core machine shared with other work: see each run's load averages"},
        **earlier, args.label: result,
    }, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("batch_gain", "mixed_over_single", "p99_over_one_client",
                                             "swap_requests", "swap_failed")}))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
