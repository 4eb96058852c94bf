"""`palm serve`: an OpenAI-compatible HTTP API over the portfolio, on uvicorn.

    GET  /health                 {"status": "ok", "portfolio_id", "traits", "members", "generate"}
    GET  /v1/models              the portfolio ("palm", parent: the base model) and each member
                                 ("palm-member-<key>", parent: "palm") with its weights and values
    POST /v1/chat/completions    OpenAI chat completions, non-streaming or `"stream": true`
    POST /route                  {"weights": {...}} -> the route (member and guarantee), no model

Which member answers: `"model": "palm"` routes by the user's trait weights, given as
`"palm": {"weights": {"safety": 0.5, ...}}` in the body (the OpenAI client's
`extra_body={"palm": {...}}`), by the project's one routing rule; `"model": "palm-member-<key>"`
names a member. Every answer carries `"palm"`: the member, the weights and what the certificate
guarantees there (value, U(w), eps at w; the Route of router.py), and `model` names the member.

Limits, each a 4xx in the OpenAI error format ({"error": {"message", "type", "param", "code"}}):
body size, conversation length, max_tokens, and the generation queue: one model answers one
request at a time (the active adapter is its state), at most `max_queue` wait, and a request
that waits longer than `queue_timeout_s` gets 503 without being run. Bound to 127.0.0.1 unless
told otherwise: there is no authentication.
"""

import asyncio
import json
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from palm_tasks.serve.members import DEFAULT_NEW_TOKENS, MAX_NEW_TOKENS, MemberModels
from palm_tasks.serve.router import Router, WeightsError

PORTFOLIO_MODEL = "palm"  # the model name that routes by weights
MEMBER_PREFIX = "palm-member-"


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for, and how long it may wait."""

    max_body_bytes: int = 64 * 1024  # a request body larger than this is refused unread
    max_conversation_chars: int = 16_000  # all messages' text together
    max_new_tokens: int = MAX_NEW_TOKENS  # max_tokens / max_completion_tokens above this: 400
    max_queue: int = 16  # generation requests waiting beyond the one running: 429
    queue_timeout_s: float = 120.0  # waited this long for the model: 503, not run


class ApiError(Exception):
    """A request the server refuses: HTTP status and the OpenAI error object's fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def kind(self) -> str:
        """The error's type as the OpenAI API names it (a missing model is invalid_request_error
        with code model_not_found there too)."""
        if self.status == 429:
            return "rate_limit_error"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind,
                                       "param": self.param, "code": self.code}}, self.status)


# --- request and response shapes (they are the OpenAPI spec the fuzz test reads) ---------------


def request_models(traits: list[str], model_names: list[str], max_new_tokens: int):
    """(ChatRequest, RouteRequest): the request bodies, with a schema as exact as this
    portfolio allows (its traits, its model names, the token limit), so the OpenAPI spec tells
    a client, and the fuzz test, exactly what is accepted. Weights are still checked by
    router.parse_weights, the one place weights are validated; the schema only describes them."""
    weights_schema = {
        "type": "object", "additionalProperties": False, "required": list(traits),
        "properties": {t: {"type": "number", "minimum": 0} for t in traits},
        "anyOf": [{"properties": {t: {"exclusiveMinimum": 0}}} for t in traits],  # not all zero
    }
    weights_help = ("the user's weight on each trait, every trait once, >= 0 and not all zero; "
                    "normalized when they do not sum to 1")

    class PalmOptions(BaseModel):
        """PALM's extension of a chat request (the OpenAI client's extra_body={"palm": ...})."""
        weights: dict[str, float] = Field(description=weights_help, json_schema_extra=weights_schema)

    class ContentPart(BaseModel):
        type: Literal["text"]
        text: str

    class Message(BaseModel):
        model_config = ConfigDict(extra="ignore")
        role: Literal["system", "developer", "user", "assistant"]
        content: str | list[ContentPart]

    class ChatRequest(BaseModel):
        """The OpenAI chat completion request; fields not listed are accepted and ignored."""
        model_config = ConfigDict(extra="ignore", json_schema_extra={
            "if": {"properties": {"model": {"const": PORTFOLIO_MODEL}}, "required": ["model"]},
            "then": {"required": ["palm"], "properties": {"palm": {"type": "object"}}}})
        model: str = Field(description=f'"{PORTFOLIO_MODEL}" (routed by palm.weights) or a member\'s name',
                           json_schema_extra={"enum": model_names})
        messages: list[Message] = Field(min_length=1)
        max_tokens: int | None = Field(None, ge=1, le=max_new_tokens)
        max_completion_tokens: int | None = Field(None, ge=1, le=max_new_tokens,
                                                  description="the newer name of max_tokens")
        temperature: float | None = Field(None, ge=0, le=2, description="0 or absent: greedy")
        top_p: float | None = Field(None, gt=0, le=1)
        seed: int | None = Field(None, ge=0, le=2**32 - 1)
        n: int | None = Field(None, ge=1, le=1, description="one answer per request")
        stream: bool = False
        stream_options: dict[str, Any] | None = None
        palm: PalmOptions | None = None

    class RouteRequest(BaseModel):
        weights: dict[str, float] = Field(description=weights_help, json_schema_extra=weights_schema)

    return ChatRequest, RouteRequest


ERRORS = {status: {"description": what, "content": {"application/json": {}}} for status, what in
          [(400, "bad request"), (404, "unknown model or path"), (413, "body too large"),
           (429, "queue full"), (501, "routing only"), (503, "waited too long")]}


# --- the app -------------------------------------------------------------------------------------


class _GenerationQueue:
    """One thread runs the model; at most max_queue requests wait for it."""

    def __init__(self, limits: ServeLimits):
        self.limits = limits
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="palm-generate")
        self.waiting = 0  # touched from the event loop only
        self.completed = 0

    async def run(self, fn, *args):
        if self.waiting > self.limits.max_queue:  # the one running plus max_queue waiting
            raise ApiError(429, f"the server is busy: {self.waiting} requests are queued for the model "
                                f"(at most {self.limits.max_queue}); retry later")
        cancelled = threading.Event()
        enqueued = time.monotonic()

        def job():
            if cancelled.is_set() or time.monotonic() - enqueued > self.limits.queue_timeout_s:
                return None  # the client was answered 503 already: do not spend the model on it
            return fn(*args)

        self.waiting += 1
        try:
            future = asyncio.get_running_loop().run_in_executor(self.executor, job)
            try:
                # shield: a timeout must not cancel the executor future under a running generation
                done = await asyncio.wait_for(asyncio.shield(future), self.limits.queue_timeout_s)
            except TimeoutError:
                cancelled.set()
                raise ApiError(503, f"no answer within {self.limits.queue_timeout_s:g} s (the model is "
                                    "busy); retry later") from None
        finally:
            self.waiting -= 1
        if done is None:
            raise ApiError(503, f"waited more than {self.limits.queue_timeout_s:g} s for the model; "
                                "retry later")
        self.completed += 1
        return done


def _body_limit(app, max_bytes: int):
    """ASGI middleware: refuse a body over max_bytes (or with a malformed Content-Length) before
    reading it, and stop reading a chunked body once it passes the limit. FastAPI turns any error
    raised while it reads the body into "400 error parsing the body", so the limit is applied
    here, before the app."""

    async def middleware(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        error = None
        if length is not None:
            text = length.decode("latin-1").strip()
            if not text.isdigit():
                error = ApiError(400, f"Content-Length {text[:40]!r} is not a non-negative integer")
            elif int(text) > max_bytes:
                error = ApiError(413, f"request body of {int(text)} bytes is over the limit of {max_bytes}")
        if error is not None:
            return await error.response()(scope, receive, send)
        # Read the body here (at most max_bytes of it), then hand it to the app in one piece.
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > max_bytes:
                return await ApiError(413, f"request body is over the limit of {max_bytes} bytes"
                                      ).response()(scope, receive, send)
        given = False

        async def replay():
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as ASGI apps expect

        await app(scope, replay, send)

    return middleware


def make_app(router: Router, models: MemberModels | None, limits: ServeLimits = ServeLimits(),
             base_model_name: str = "base") -> FastAPI:
    """The ASGI app over `router` (and `models`, None for a routing-only server)."""
    app = FastAPI(title="PALM", version="1", description=__doc__.split("\n\n")[0])
    queue = _GenerationQueue(limits)
    app.state.router, app.state.models, app.state.limits, app.state.queue = router, models, limits, queue
    members = {f"{MEMBER_PREFIX}{m.key}": m for m in router.members}
    ChatRequest, RouteRequest = request_models(router.traits, [PORTFOLIO_MODEL, *members],
                                               limits.max_new_tokens)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message = "the body is not valid JSON"
        return ApiError(400, f"{where}: {message}" if where else message, where or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            detail = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            detail = f"method {request.method} is not allowed on {request.url.path}"
        return ApiError(exc.status_code, detail).response()

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):  # a bug must not take the server down
        print(f"palm serve: {type(exc).__name__}: {exc}", file=sys.stderr)
        return ApiError(500, f"internal error ({type(exc).__name__})").response()

    def route(weights) -> dict:
        try:
            out = router.route(weights).to_dict()
        except WeightsError as exc:
            raise ApiError(400, str(exc), "palm.weights") from None
        return out

    @app.api_route("/health", methods=["GET", "HEAD"])
    def health():
        return {"status": "ok", "portfolio_id": router.portfolio.id, "traits": router.traits,
                "members": [m.key for m in router.members], "generate": models is not None,
                "queued": queue.waiting, "completed": queue.completed}

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    def list_models():
        portfolio = {"id": PORTFOLIO_MODEL, "object": "model", "created": created, "owned_by": "palm",
                     "root": base_model_name, "parent": base_model_name,
                     "palm": {"portfolio_id": router.portfolio.id, "traits": router.traits,
                              "certified": router.certified, "eps": router.eps, "delta": router.delta,
                              "max_eps": router.max_eps,
                              "how": 'give "palm": {"weights": {trait: weight}} to be routed'}}
        data = [portfolio]
        for name, m in members.items():
            data.append({"id": name, "object": "model", "created": created, "owned_by": "palm",
                         "root": base_model_name, "parent": PORTFOLIO_MODEL,
                         "palm": {"key": m.key, "kind": m.kind,
                                  "weights": dict(zip(router.traits, m.weights)),
                                  "values": dict(zip(router.traits, m.value.mean)),
                                  "std_errors": dict(zip(router.traits, m.value.se)),
                                  "share": m.share, "model_uri": m.model_uri}})
        return {"object": "list", "data": data}

    @app.post("/route", responses=ERRORS)
    def post_route(body: RouteRequest):
        return route(body.weights)

    @app.post("/v1/chat/completions", responses={200: {"description": "the answer; with stream: true, "
                                                           "server-sent events",
                                                       "content": {"application/json": {},
                                                                   "text/event-stream": {}}}, **ERRORS})
    async def chat_completions(body: ChatRequest):
        if models is None:
            raise ApiError(501, "this server only routes (started without models)")
        if body.model == PORTFOLIO_MODEL:
            if body.palm is None:
                raise ApiError(400, f'model "{PORTFOLIO_MODEL}" routes by the user\'s weights: give '
                                    '"palm": {"weights": {' + ", ".join(f'"{t}": ...' for t in router.traits)
                               + "}} (extra_body in the OpenAI client), or name a member", "palm")
            served = route(body.palm.weights)
        elif body.model in members:
            served = {"member_key": members[body.model].key}
            if body.palm is not None:  # the guarantee of this member is only known for the routed one
                served = route(body.palm.weights)
                if served["member_key"] != members[body.model].key:
                    served = {"member_key": members[body.model].key, "note": "named member; the weights "
                              f"route to {MEMBER_PREFIX}{served['member_key']}"}
        else:
            raise ApiError(404, f"no model {body.model!r}; use {PORTFOLIO_MODEL!r} with palm.weights or "
                                f"one of: {', '.join(members)}", "model", "model_not_found")
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else
                     "".join(part.text for part in m.content)} for m in body.messages]
        chars = sum(len(m["content"]) for m in messages)
        if chars > limits.max_conversation_chars:
            raise ApiError(400, f"the messages hold {chars} characters, over the limit of "
                                f"{limits.max_conversation_chars}", "messages", "context_length_exceeded")
        n_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_NEW_TOKENS  # schema: <= limit
        args = (served["member_key"], messages, n_tokens, body.temperature or 0.0,
                body.top_p if body.top_p is not None else 1.0, body.seed)
        answer_id, name = f"chatcmpl-{uuid.uuid4().hex}", f"{MEMBER_PREFIX}{served['member_key']}"
        if not body.stream:
            done = await queue.run(models.complete, *args)
            return {"id": answer_id, "object": "chat.completion", "created": int(time.time()),
                    "model": name, "system_fingerprint": router.portfolio.id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                                 "logprobs": None, "finish_reason": done.finish_reason}],
                    "usage": _usage(done), "palm": served}
        return await _stream(queue, models, args, answer_id, name, served,
                             bool((body.stream_options or {}).get("include_usage")), router.portfolio.id)

    return app


def _usage(done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


async def _stream(queue, models, args, answer_id, name, served, include_usage, fingerprint):
    """Server-sent events as the OpenAI API sends them: a first chunk with the role (and PALM's
    route), the text in pieces as it is generated, a last chunk with finish_reason, [DONE]."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()

    def on_text(text):
        loop.call_soon_threadsafe(pieces.put_nowait, text)

    answer = asyncio.ensure_future(queue.run(models.complete, *args, on_text))
    # Pieces are queued from the model's thread before its answer completes, so None (put when
    # the answer is done) comes after the last piece.
    answer.add_done_callback(lambda _: pieces.put_nowait(None))
    first = await pieces.get()
    if first is None and answer.exception() is not None:
        raise answer.exception()  # queue full or waited too long: an error before any event

    def chunk(delta, finish=None, **extra):
        return "data: " + json.dumps({"id": answer_id, "object": "chat.completion.chunk",
                                      "created": int(time.time()), "model": name,
                                      "system_fingerprint": fingerprint,
                                      "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                   "finish_reason": finish}], **extra}) + "\n\n"

    async def events():
        yield chunk({"role": "assistant", "content": ""}, palm=served)
        text = first
        while text is not None:
            yield chunk({"content": text})
            text = await pieces.get()
        if answer.exception() is not None:  # after the first event only the stream can say so
            yield "data: " + json.dumps({"error": {"message": str(answer.exception()),
                                                   "type": "server_error"}}) + "\n\n"
            return
        done = answer.result()
        yield chunk({}, done.finish_reason)
        if include_usage:
            yield "data: " + json.dumps({"id": answer_id, "object": "chat.completion.chunk",
                                         "created": int(time.time()), "model": name, "choices": [],
                                         "usage": _usage(done)}) + "\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


# --- the server ----------------------------------------------------------------------------------


def _protocol():
    """uvicorn's h11 protocol, answering a request h11 cannot parse (a negative Content-Length,
    a malformed request line, headers over the limit) in the OpenAI error format, not plain text."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class OpenAIErrorsH11(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            cause = sys.exc_info()[1]  # uvicorn calls this inside its `except` for h11's error
            body = json.dumps({"error": {"message": f"malformed HTTP request: {cause or msg}", "type":
                                         "invalid_request_error", "param": None, "code": None}}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return OpenAIErrorsH11


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, backlog: int = 2048,
                max_connections: int = 512, keep_alive_s: float = 5.0):
    """(uvicorn.Server, bound socket). Binding here, not in uvicorn, so port 0 works (the socket
    says which port) and a taken port is an OSError before anything starts."""
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(backlog)
    config = uvicorn.Config(_body_limit(app, app.state.limits.max_body_bytes), http=_protocol(),
                            log_level="error",
                            backlog=backlog, limit_concurrency=max_connections,
                            timeout_keep_alive=keep_alive_s, h11_max_incomplete_event_size=64 * 1024,
                            lifespan="off")
    return uvicorn.Server(config), sock
