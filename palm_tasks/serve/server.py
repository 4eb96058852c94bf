"""`palm serve`: an HTTP server that routes users to portfolio members and generates with them.

    GET  /health      {"status": "ok", "portfolio_id", "members", "traits"}
    POST /route       {"weights": {"safety": 0.5, ...}}            -> the Route (router.py)
    POST /generate    {"weights": {...}, "prompt": "...", "max_new_tokens": 32}
                      -> {"route": ..., "completion": "...", "switched": bool, "seconds": ...}

Every bad request (bad JSON, bad weights, missing or too long prompt, unknown path, wrong
method, body too large) gets a 4xx with {"error": "..."} and the server keeps serving.

One base model is loaded once; every member's LoRA adapter is loaded onto it as a named PEFT
adapter, and switching members is `set_adapter` (no reload). Generation holds a lock, since
the active adapter is state of the one model; routing does not. The standard library's
ThreadingHTTPServer is enough here: requests are few and generation is the bottleneck.
Bound to 127.0.0.1 unless told otherwise: there is no authentication.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from palm_tasks.llm.models import chat
from palm_tasks.serve.router import Router, WeightsError

MAX_BODY_BYTES = 64 * 1024
MAX_PROMPT_CHARS = 4000
MAX_NEW_TOKENS = 256
DEFAULT_NEW_TOKENS = 48


class MemberModels:
    """The base model once, with each member's adapter loaded as a named PEFT adapter."""

    def __init__(self, base_path: Path, adapters: dict[str, Path], device: str = "cpu"):
        from peft import PeftModel

        from palm_tasks.llm.models import load_base, load_tokenizer

        if not adapters:
            raise ValueError("no adapters to serve")
        self.tokenizer = load_tokenizer(base_path)
        self.base = load_base(base_path, device)
        keys = list(adapters)
        # Adapter names are module names inside the model: prefixed so they never start with a digit.
        self.model = PeftModel.from_pretrained(self.base, adapters[keys[0]],
                                               adapter_name=self.adapter_name(keys[0]))
        for key in keys[1:]:
            self.model.load_adapter(adapters[key], adapter_name=self.adapter_name(key))
        self.model.eval()
        self.keys = keys
        self.switches = 0
        self._lock = threading.Lock()

    @staticmethod
    def adapter_name(key: str) -> str:
        return f"member_{key}"

    @property
    def active(self) -> str:
        return self.model.active_adapter.removeprefix("member_")

    def use(self, key: str) -> bool:
        """Make `key` the active adapter; True when that was a switch."""
        if key not in self.keys:
            raise KeyError(f"member {key} is not loaded")
        if key == self.active:
            return False
        self.model.set_adapter(self.adapter_name(key))
        self.switches += 1
        return True

    def generate(self, key: str, prompt: str, max_new_tokens: int = DEFAULT_NEW_TOKENS) -> tuple[str, bool]:
        """Greedy chat completion of `prompt` by member `key`; (text, whether it switched)."""
        import torch

        with self._lock:
            switched = self.use(key)
            text = self.tokenizer.apply_chat_template(chat(prompt), tokenize=False, add_generation_prompt=True)
            enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(
                self.base.device)
            with torch.no_grad():
                ids = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id)
        text = self.tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return text.strip(), switched


class BadRequest(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class PalmServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, router: Router, models: MemberModels | None):
        super().__init__(address, Handler)
        self.router, self.models = router, models


class Handler(BaseHTTPRequestHandler):
    server: PalmServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # one short line per request on stderr
        sys.stderr.write(f"palm serve: {self.address_string()} {fmt % args}\n")

    def _send(self, status: int, body: dict) -> None:
        data = (json.dumps(body) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _json_body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None:
            raise BadRequest(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        try:
            length = int(length)
        except ValueError:
            raise BadRequest(HTTPStatus.BAD_REQUEST, "Content-Length is not a number") from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the body is not read
            raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                             f"request body of {length} bytes is over the limit of {MAX_BODY_BYTES}")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        if "weights" not in body:
            raise BadRequest(HTTPStatus.BAD_REQUEST,
                             'missing "weights": an object of trait: weight, e.g. '
                             + json.dumps({t: round(1 / len(self.server.router.traits), 3)
                                           for t in self.server.router.traits}))
        return body

    def _route(self, body: dict) -> dict:
        try:
            route = self.server.router.route(body["weights"])
        except WeightsError as exc:
            raise BadRequest(HTTPStatus.BAD_REQUEST, str(exc)) from None
        out = route.to_dict()
        if route.normalized:
            out["note"] = "the weights did not sum to 1 and were normalized"
        return out

    def do_GET(self):
        if self.path == "/health":
            r = self.server.router
            return self._send(200, {"status": "ok", "portfolio_id": r.portfolio.id,
                                    "traits": r.traits, "members": [m.key for m in r.members],
                                    "generate": self.server.models is not None})
        if self.path in ("/route", "/generate"):
            return self._send(405, {"error": f"use POST for {self.path}"})
        self._send(404, {"error": f"no such endpoint: GET {self.path}; "
                                  "endpoints: GET /health, POST /route, POST /generate"})

    def do_POST(self):
        try:
            if self.path == "/route":
                return self._send(200, self._route(self._json_body()))
            if self.path == "/generate":
                return self._send(200, self._generate(self._json_body()))
            if self.path == "/health":
                raise BadRequest(HTTPStatus.METHOD_NOT_ALLOWED, "use GET for /health")
            raise BadRequest(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {self.path}; "
                                                   "endpoints: POST /route, POST /generate")
        except BadRequest as exc:
            self._send(exc.status, {"error": exc.message})
        except Exception as exc:  # a bug must not take the server down
            self._send(500, {"error": f"{type(exc).__name__}: {exc}"})

    def _not_allowed(self):
        self._send(405, {"error": f"method {self.command} is not allowed; "
                                  "endpoints: GET /health, POST /route, POST /generate"})

    do_PUT = do_DELETE = do_PATCH = _not_allowed

    def _generate(self, body: dict) -> dict:
        models = self.server.models
        if models is None:
            raise BadRequest(HTTPStatus.NOT_IMPLEMENTED, "this server only routes (no models loaded)")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRequest(HTTPStatus.BAD_REQUEST, 'missing "prompt": a non-empty string')
        if len(prompt) > MAX_PROMPT_CHARS:
            raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                             f"prompt of {len(prompt)} characters is over the limit of "
                             f"{MAX_PROMPT_CHARS}")
        n = body.get("max_new_tokens", DEFAULT_NEW_TOKENS)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_NEW_TOKENS:
            raise BadRequest(HTTPStatus.BAD_REQUEST,
                             f'"max_new_tokens" must be an integer from 1 to {MAX_NEW_TOKENS}, '
                             f"got {n!r}")
        route = self._route(body)
        start = time.perf_counter()
        text, switched = models.generate(route["member_key"], prompt, n)
        return {"route": route, "completion": text, "switched": switched,
                "seconds": round(time.perf_counter() - start, 4)}


def load_models(router: Router, device: str = "cpu") -> MemberModels:
    """The base model of the router's portfolio with every member's adapter on it."""
    adapters = {m.key: router.adapter_dir(m.key) for m in router.members}
    return MemberModels(router.base_model_path(), adapters, device)


def make_server(router: Router, models: MemberModels | None, host: str = "127.0.0.1",
                port: int = 8000) -> PalmServer:
    """A server bound to (host, port); port 0 picks a free one (server.server_address)."""
    return PalmServer((host, port), router, models)
