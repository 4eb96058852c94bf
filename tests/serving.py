"""What the serving tests share: the real server on a free loopback port, in a thread, over a
portfolio registered by the real stages (conftest's `registered`), and answers taken from the
engine directly to compare the API's with."""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import openai

from palm_tasks.config import ServeConfig
from palm_tasks.serve.api import make_app
from palm_tasks.serve.engine import Engine, Sampling
from palm_tasks.serve.live import LivePortfolio, RegistrySource
from palm_tasks.serve.server import make_server
from palm_tasks.serve.users import UserStore

HUMOR = {"safety": 0, "humor": 1, "brevity": 0}
PROMPT = [{"role": "user", "content": "Tell me a joke"}]


def start(app):
    """A real uvicorn server for `app` on a free loopback port, in a thread: (server, address, thread)."""
    server, sock = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    return server, sock.getsockname()[:2], thread


def live_portfolio(project, cfg: ServeConfig = ServeConfig()) -> LivePortfolio:
    from palm_tasks.registry import portfolio_model_name
    from palm_tasks.tracking import tracking_uri

    root, keys, pcfg, _ = project
    source = RegistrySource("production", tracking_uri(pcfg, root), portfolio_model_name(pcfg), root)
    return LivePortfolio(source, lambda models: Engine(models, cfg.max_batch, cfg.max_queue, cfg.queue_timeout_s,
                                                       cfg.prefix_cache_mb * 2**20))


@dataclass
class Served:
    """A running server: its address, the live portfolio it serves, the user store, the key."""

    address: tuple[str, int]
    live: LivePortfolio
    users: UserStore
    keys: list[str]
    api_key: str | None
    server: object
    thread: threading.Thread
    app: object

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://{self.address[0]}:{self.address[1]}/v1",
                             api_key=self.api_key or "unused", max_retries=0, timeout=120)

    @property
    def router(self):
        return self.live.current.router

    @property
    def engine(self) -> Engine:
        return self.live.engine

    def adapter(self, key: str) -> str:
        return self.live.current.adapters[key]

    def answer(self, key: str, messages=PROMPT, max_tokens: int = 4, **sampling) -> str:
        """Member `key`'s answer from the engine itself (what the API must return), stripped as
        chat answers are."""
        prompt = self.live.models.encode_chat(messages)
        return self.engine.complete(self.adapter(key), [prompt], Sampling(max_tokens=max_tokens, **sampling))[0] \
            .text.strip()

    def request(self, method, path, body=None, raw: bytes | None = None, headers=None, key: str | None = "own"):
        """(status, decoded JSON or None) of one raw HTTP request; `key` "own" sends the server's."""
        key = self.api_key if key == "own" else key
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        return http_request(self.address, method, path, body, raw, {**auth, **(headers or {})})

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve(project, tmp: Path, cfg: ServeConfig = ServeConfig(), api_key: str | None = None,
          live: LivePortfolio | None = None, users: UserStore | None = None) -> Served:
    live = live or live_portfolio(project, cfg)
    users = users or UserStore(tmp / "users.db")
    app = make_app(live, cfg, users, api_key, base_model_name="tiny-base")
    server, address, thread = start(app)
    return Served(address, live, users, project[1], api_key, server, thread, app)


def http_request(address, method, path, body=None, raw: bytes | None = None, headers=None):
    conn = http.client.HTTPConnection(*address, timeout=120)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    try:
        return response.status, (json.loads(payload) if payload else None)
    except ValueError:
        return response.status, {"raw": payload.decode("utf-8", "replace")}


def start_palm_serve(root: Path, *extra: str, env: dict | None = None, deadline_s: float = 240):
    """`palm serve` as a user starts it, on a free port: (process, "http://127.0.0.1:PORT")."""
    import os
    import re
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--port", "0", "--root", str(root),
                                "--params", str(root / "params.yaml"), *extra],
                               stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                               cwd=Path(__file__).resolve().parents[1])
    deadline, lines = time.time() + deadline_s, []
    while time.time() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        if found:
            threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True).start()
            process.lines = lines
            return process, found.group(1)
    process.kill()
    raise AssertionError("palm serve did not start:\n" + "".join(lines[-20:]))


def preferences_crash(start, store_path: Path, traits: list[str], key: str, users: int = 1000, writers: int = 8,
                      kill_after: int = 500) -> dict:
    """`writers` threads store the preferences of `users` users through PUT /v1/users/{id}/preferences
    of the server `start()` starts ((process, url)); after `kill_after` acknowledged writes the
    server is killed with SIGKILL and started again, and the writers go on (a write that was not
    acknowledged is sent again). Then every acknowledged write is read back from the store.
    Returns the counts: acknowledged, acknowledged_before_kill, failed_at_kill (requests the kill
    broke), busy_503 (writes answered 503, store busy, and sent again), refused (writes answered
    otherwise, each "user: status body"), missing, wrong, integrity (SQLite's integrity_check),
    users_stored, seconds."""
    import queue
    import signal

    import httpx
    import numpy as np

    from palm_tasks.serve.users import UserStore

    rng = np.random.default_rng(0)
    todo: queue.Queue = queue.Queue()
    for i in range(users):
        todo.put((f"user-{i:05d}", dict(zip(traits, map(float, rng.dirichlet(np.ones(len(traits))))))))
    acked, broken, busy, refused, lock = {}, [0], [0], [], threading.Lock()
    process, url = start()
    state = {"url": url, "up": threading.Event()}
    state["up"].set()
    started = time.perf_counter()

    def writer():
        with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {key}"}) as http:
            while True:
                try:
                    user, weights = todo.get_nowait()
                except queue.Empty:
                    return
                while True:
                    state["up"].wait()
                    try:
                        r = http.put(f"{state['url']}/v1/users/{user}/preferences", json={"weights": weights})
                    except httpx.HTTPError:
                        with lock:
                            broken[0] += 1
                        time.sleep(0.05)
                        continue
                    if r.status_code == 503:  # the store busy beyond its timeout: not acknowledged, sent again
                        with lock:
                            busy[0] += 1
                        time.sleep(0.05)
                        continue
                    if r.status_code != 200:
                        with lock:
                            refused.append(f"{user}: {r.status_code} {r.text[:200]}")
                        break
                    with lock:
                        acked[user] = r.json()["weights"]
                    break

    threads = [threading.Thread(target=writer) for _ in range(writers)]
    for t in threads:
        t.start()
    while len(acked) < kill_after and any(t.is_alive() for t in threads):
        time.sleep(0.001)
    state["up"].clear()
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    before_kill = len(acked)
    process, state["url"] = start()
    state["up"].set()
    for t in threads:
        t.join(timeout=600)
    seconds = time.perf_counter() - started
    process.terminate()
    process.wait(timeout=60)
    store = UserStore(store_path)
    missing = [u for u in acked if store.get(u) is None]
    wrong = [u for u, w in acked.items() if u not in missing and store.get(u).weights != w]
    return {"users": users, "writers": writers, "acknowledged": len(acked), "acknowledged_before_kill": before_kill,
            "failed_at_kill": broken[0], "busy_503": busy[0], "refused": refused, "missing": len(missing), "wrong": len(wrong),
            "integrity": store.integrity(), "users_stored": store.count(), "seconds": round(seconds, 1)}
