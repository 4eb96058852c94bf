"""Load on `palm serve` (the OpenAI-compatible API); writes benchmarks/results/serve_load.json.

Run from the repository root: python benchmarks/serve_load.py [--clients 8] [--k 4]

The real `palm serve` command serves a portfolio of k members on SmolLM2-135M-Instruct (the
synthetic certified portfolio of serve_bench.py, with real, untrained LoRA adapters of the
training config's shape) on loopback. C client threads, each with its own keep-alive HTTP
connection, send requests back to back:
- route: POST /route with random Dirichlet(1) weights (no model involved);
- generate: POST /v1/chat/completions routed by random weights, max_tokens N (the model answers
  one request at a time, so latency is about the queue length times one answer).
Per kind: requests/s, latency p50/p99/max, errors, and the server's RSS after one warm-up answer
and after the load. The
target: no request slower than 2x p99 (no stalls from the listen backlog or the queue).
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "serve_load.json"
PROMPT = "Tell me something interesting about the sea."


def build_project(k: int, tmp: Path) -> Path:
    """tmp/portfolio.json with k members whose adapters are at tmp/models/members/m<j>/adapter."""
    from benchmarks.serve_bench import make_adapters, synthetic_portfolio
    from palm_tasks import schema
    from palm_tasks.llm.base_model import prepare_base_model, resolve_base_model

    base_dir = ROOT / "models" / "base"
    if not (base_dir / "base.json").is_file():
        base_dir = tmp / "base"
        prepare_base_model("smollm2", base_dir)
    base = resolve_base_model(base_dir)
    portfolio, _ = synthetic_portfolio(k, tmp)
    adapters = make_adapters(base, k, tmp / "adapters")
    for member, adapter in zip(portfolio.members, adapters):
        (tmp / member.path).mkdir(parents=True)
        adapter.rename(tmp / member.path / "adapter")
    prepare_base_model(str(base), tmp / "models" / "base")  # the portfolio's project: its base.json
    schema.write(tmp / "portfolio.json", portfolio)
    return tmp / "portfolio.json"


def start_server(portfolio: Path) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--portfolio", str(portfolio),
                               "--port", "0"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        line = server.stderr.readline()
        if not line:
            break
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        if found:
            threading.Thread(target=server.stderr.read, daemon=True).start()  # keep the pipe drained
            return server, found.group(1)
    server.kill()
    raise SystemExit("palm serve did not start")


def load(url: str, kind: str, clients: int, per_client: int, traits: list[str], new_tokens: int) -> dict:
    import httpx

    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.ones(len(traits)), size=clients * per_client)
    latencies, errors, statuses = [], [], {}
    lock = threading.Lock()

    def client(c: int):
        with httpx.Client(base_url=url, timeout=600) as http:
            for i in range(per_client):
                w = dict(zip(traits, map(float, weights[c * per_client + i])))
                if kind == "route":
                    path, body = "/route", {"weights": w}
                else:
                    path, body = "/v1/chat/completions", {
                        "model": "palm", "messages": [{"role": "user", "content": PROMPT}],
                        "max_tokens": new_tokens, "palm": {"weights": w}}
                t = time.perf_counter()
                response = http.post(path, json=body)
                elapsed = time.perf_counter() - t
                with lock:
                    latencies.append(elapsed)
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                    if response.status_code != 200:
                        errors.append(response.text[:200])

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = np.array(latencies)
    p99 = float(np.quantile(lat, 0.99))
    return {"kind": kind, "clients": clients, "requests": len(lat), "wall_s": wall,
            "requests_per_s": len(lat) / wall, "p50_ms": float(np.median(lat) * 1e3),
            "p99_ms": p99 * 1e3, "max_ms": float(lat.max() * 1e3),
            "max_over_p99": float(lat.max() / p99), "statuses": statuses, "errors": errors[:3],
            **({"max_tokens": new_tokens} if kind == "generate" else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--k", type=int, default=4, help="portfolio members (default 4)")
    parser.add_argument("--route-requests", type=int, default=250, help="per client (default 250)")
    parser.add_argument("--generate-requests", type=int, default=4, help="per client (default 4)")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    import psutil

    tmp = Path(tempfile.mkdtemp(prefix="palm-serve-load-"))
    portfolio = build_project(args.k, tmp)
    server, url = start_server(portfolio)
    try:
        process = psutil.Process(server.pid)
        traits = json.loads(Path(portfolio).read_text())["traits"]
        load(url, "generate", 1, 1, traits, args.max_tokens)  # warm-up: first-answer allocations
        rss_start = process.memory_info().rss
        route = load(url, "route", args.clients, args.route_requests, traits, args.max_tokens)
        print(json.dumps(route, indent=2))
        generate = load(url, "generate", args.clients, args.generate_requests, traits, args.max_tokens)
        print(json.dumps(generate, indent=2))
        rss_end = process.memory_info().rss
    finally:
        server.terminate()
        server.wait(timeout=60)
    memory = {"rss_start_mib": rss_start / 2**20, "rss_end_mib": rss_end / 2**20,
              "growth": rss_end / rss_start - 1}
    print(json.dumps(memory, indent=2))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "what": "palm serve under load: C concurrent keep-alive clients, route-only and generate",
        "base_model": "SmolLM2-135M-Instruct (float32, CPU)", "members": args.k,
        "adapters": "PEFT LoRA of the training config's shape, not trained (B ~ N(0, 1e-3^2))",
        "route": route, "generate": generate, "server_memory": memory,
        "target": "max latency <= 2 x p99 for each kind; no errors",
        "meets_target": all(r["max_over_p99"] <= 2 and not r["errors"] for r in (route, generate)),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "load_average_1_5_15": os.getloadavg(),
                    "platform": platform.platform(), "python": platform.python_version()},
        "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
    }, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
