"""`palm serve`: an OpenAI-compatible HTTP API over the portfolio (docs/serving.md).

    GET    /health                        status, the portfolio served and its version, the batch
    GET    /v1/models                     "palm" (parent: the base) and each member (parent: "palm")
    POST   /v1/chat/completions           OpenAI chat completions; "stream": true for server-sent events
    POST   /v1/completions                OpenAI (legacy) completions: prompt(s), echo, logprobs
    PUT    /v1/users/{user}/preferences   store a user's trait weights ({"weights": {...}})
    GET    /v1/users/{user}/preferences   read them (and the member they route to now)
    DELETE /v1/users/{user}/preferences   forget them
    POST   /v1/portfolio/reload           serve the registry alias's portfolio now, if it moved
    POST   /route                         {"weights": {...}} -> the route, no model involved

Which member answers, for `"model": "palm"`: the request's weights (`"palm": {"weights": ...}`,
the OpenAI client's extra_body), else the weights stored for its `user`, else the default route
(params.yaml serve.default_route); `"model": "palm-member-<key>"` names a member. Every answer
says who answered (`model`), how it was chosen and what the certificate guarantees there
(`palm`), and which portfolio version answered (`palm.portfolio_version`, `system_fingerprint`).
Answers are decoded by the engine (serve/engine.py), all requests and members in one batch.
"""


import asyncio
import time
import uuid

from fastapi import FastAPI, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from palm_tasks.serve import responses as fmt
from palm_tasks.serve.engine import Failed, Finished, QueueFull, Request as Generation, Sampling, Tokens
from palm_tasks.serve.router import WeightsError, parse_weights
from palm_tasks.serve.schemas import MEMBER_PREFIX, PORTFOLIO_MODEL, USER_ID, ignored_fields, request_models
from palm_tasks.serve.server import error_response
from palm_tasks.serve.users import UserIdError, UserStoreError, check_user_id

ERRORS = {status: {"description": what, "content": {"application/json": {}}} for status, what in
          [(400, "bad request"), (401, "no or a wrong API key"), (403, "writing needs an API key"),
           (404, "unknown model, user or path"), (409, "stored weights no longer fit"), (413, "body too large"),
           (429, "queue full"), (503, "waited too long, or the store or registry is unavailable")]}
STREAMED = {200: {"description": "the answer; with stream: true, server-sent events",
                  "content": {"application/json": {}, "text/event-stream": {}}}, **ERRORS}


class ApiError(Exception):
    """A request the server refuses: HTTP status and the OpenAI error object's fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.code, self.param)


def make_app(live, cfg, users, api_key: str | None = None, base_model_name: str = "base") -> FastAPI:
    """The ASGI app over `live` (serve.live.LivePortfolio), with `cfg` (config.ServeConfig) and
    the user store `users` (serve.users.UserStore); serve.server.make_server wraps it in the
    body limit and the API key."""
    from palm_tasks.log import warn

    app = FastAPI(title="PALM", version="2", description=__doc__.split("\n\n")[0])
    app.state.live, app.state.cfg, app.state.users, app.state.api_key = live, cfg, users, api_key
    engine, models = live.engine, live.models

    def model_names() -> list[str]:
        return [PORTFOLIO_MODEL, *(MEMBER_PREFIX + k for k in live.current.adapters)]

    ChatRequest, CompletionRequest, RouteRequest, PreferencesRequest = request_models(
        live.current.router.traits, model_names, cfg, models.vocab_size)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_tag(p))
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            message = "the body is not valid JSON"
        if ":" in message.split(" ")[0]:  # a model check names its field itself
            where = message.split(":")[0]
        return ApiError(400, message if message.startswith(f"{where}:") or not where else f"{where}: {message}",
                        where or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            detail = f"no such endpoint: {request.method} {request.url.path[:200]}"
        elif exc.status_code == 405:
            detail = f"method {request.method} is not allowed on {request.url.path[:200]}"
        return ApiError(exc.status_code, detail).response()

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):  # a bug must not take the server down
        warn(f"palm serve: {type(exc).__name__}: {exc}")
        return ApiError(500, f"internal error ({type(exc).__name__})").response()

    def note_ignored(body, path: str) -> None:
        names = ignored_fields(body)
        if names:
            from rich.markup import escape

            shown = ", ".join(repr(n[:40]) for n in names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10
                                                                    else "")
            warn(escape(f"{path}: ignored the field(s) this server does not know: {shown}"))

    # --- routing: who answers ------------------------------------------------------------------

    def route(dep, weights, param="palm.weights") -> dict:
        try:
            return dep.router.route(weights).to_dict()
        except WeightsError as exc:
            raise ApiError(400, str(exc), param) from None

    def default_route(dep, reason: str, user: str | None) -> dict:
        if cfg.default_route == "none":
            if user is not None:
                raise ApiError(404, f"no preferences are stored for user {user!r} and this server has no default "
                                    "route: store them (PUT /v1/users/{user}/preferences) or give palm.weights",
                               "user", "user_not_found")
            raise ApiError(400, f'model "{PORTFOLIO_MODEL}" routes by weights: give "palm": {{"weights": {{'
                                + ", ".join(f'"{t}": ...' for t in dep.router.traits)
                                + '}} (extra_body in the OpenAI client), a stored user, or name a member',
                           "palm.weights")
        if cfg.default_route == "uniform":
            served = route(dep, {t: 1.0 for t in dep.router.traits})
        else:  # most_users: the member with the largest share of the population
            member = max(dep.router.members, key=lambda m: m.share)
            served = {"member_key": member.key, "model_uri": member.model_uri, "share": member.share,
                      "portfolio_id": dep.portfolio_id, "certified": dep.router.certified}
        return {**served, "source": "default", "default_route": cfg.default_route, "reason": reason}

    def who_answers(dep, body) -> dict:
        members = {f"{MEMBER_PREFIX}{k}": k for k in dep.adapters}
        if body.model == PORTFOLIO_MODEL:
            if body.palm is not None:
                served = {**route(dep, body.palm.weights), "source": "weights"}
            elif body.user is not None:
                prefs = stored(body.user)
                if prefs is None:
                    served = default_route(dep, f"no preferences stored for user {body.user!r}", body.user)
                else:
                    try:
                        served = {**dep.router.route(prefs.weights).to_dict(), "source": "user"}
                    except WeightsError as exc:
                        raise ApiError(409, f"the weights stored for user {body.user!r} do not fit this portfolio "
                                            f"({exc}): store them again", "user", "preferences_outdated") from None
            else:
                served = default_route(dep, "no weights and no user", None)
        elif body.model in members:
            served = {"member_key": members[body.model], "source": "member"}
            if body.palm is not None:  # the guarantee of this member is only known for the routed one
                routed = route(dep, body.palm.weights)
                served = routed if routed["member_key"] == members[body.model] else {
                    **served, "note": f"named member; the weights route to {MEMBER_PREFIX}{routed['member_key']}"}
                served["source"] = "member"
        else:
            raise ApiError(404, f"no model {body.model[:100]!r}; use {PORTFOLIO_MODEL!r} or one of: "
                                f"{', '.join(members)}", "model", "model_not_found")
        # the temperature the member's values were measured at: a request without one samples at it
        temperature = dep.router.portfolio.member(served["member_key"]).temperature
        return {**served, "temperature": temperature, "user": body.user, "portfolio_id": dep.portfolio_id,
                "portfolio_version": dep.version}

    def stored(user: str):
        try:
            return users.get(user)
        except UserStoreError as exc:
            raise ApiError(503, str(exc)) from None

    def sampling(body, served: dict, max_tokens: int, logprobs: int | None, prompt_logprobs: bool = False) -> Sampling:
        """How to draw the answers: as the request says, and where it says no temperature, at the
        member's (greedy for a portfolio that recorded none)."""
        stop = body.stop if isinstance(body.stop, list) else [body.stop] if body.stop else []
        temperature = body.temperature if body.temperature is not None else served["temperature"] or 0.0
        return Sampling(max_tokens=max_tokens, temperature=temperature,
                        top_p=body.top_p if body.top_p is not None else 1.0, seed=body.seed, stop=tuple(stop),
                        logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                        presence_penalty=body.presence_penalty or 0.0,
                        frequency_penalty=body.frequency_penalty or 0.0,
                        logit_bias=tuple((int(k), float(v)) for k, v in (body.logit_bias or {}).items()))

    def check_prompt(tokens: list[int], param: str) -> None:
        if not tokens:
            raise ApiError(400, f"{param}: the prompt is empty (no tokens)", param)
        if len(tokens) > cfg.max_prompt_tokens:
            raise ApiError(400, f"{param}: the prompt has {len(tokens)} tokens, over the limit of "
                                f"{cfg.max_prompt_tokens}", param, "context_length_exceeded")

    async def start(prompts, served, dep, how: Sampling, n: int, stream: bool):
        """Queue the request; (generation, events) once the engine has admitted it."""
        if len(prompts) * n > cfg.max_batch:
            raise ApiError(400, f"n: {len(prompts)} prompt(s) x n = {n} is {len(prompts) * n} answers, more than "
                                f"one batch holds ({cfg.max_batch})", "n")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        generation = Generation(prompts, dep.adapters[served["member_key"]], how,
                                lambda e: loop.call_soon_threadsafe(events.put_nowait, e), n, stream)
        try:
            engine.submit(generation)
        except QueueFull as exc:
            raise ApiError(429, str(exc)) from None
        try:
            first = await asyncio.wait_for(events.get(), cfg.queue_timeout_s)
        except TimeoutError:
            generation.cancelled.set()  # the engine drops it instead of running it
            raise ApiError(503, f"waited more than {cfg.queue_timeout_s:g} s for room in the batch; "
                                "retry later") from None
        except asyncio.CancelledError:  # the client went away while it waited
            generation.cancelled.set()
            raise
        if isinstance(first, Failed):
            raise ApiError(first.status, first.message)
        return generation, events

    async def collect(generation, events) -> list[Finished]:
        """Wait for every answer (a request that does not stream gets only its Finished events)."""
        finished = {}
        try:
            while len(finished) < generation.answers:
                e = await events.get()
                if isinstance(e, Failed):
                    raise ApiError(e.status, e.message)
                if isinstance(e, Finished):
                    finished[e.index] = e
        finally:
            generation.cancelled.set()  # a client that went away: its answers leave the batch
        return [finished[i] for i in sorted(finished)]

    # --- endpoints ---------------------------------------------------------------------------

    @app.api_route("/health", methods=["GET", "HEAD"])
    def health():
        dep = live.current
        return {"status": "ok", **live.health(), "traits": dep.router.traits, "default_route": cfg.default_route,
                "auth": api_key is not None, "queued": engine.waiting, "running": engine.running,
                "completed": engine.completed, "steps": engine.steps, "largest_batch": engine.largest_batch,
                "max_batch": cfg.max_batch, "prefix_cache": engine.prefixes.stats() if engine.prefixes else None}

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    def list_models():
        dep = live.current
        router = dep.router
        data = [{"id": PORTFOLIO_MODEL, "object": "model", "created": created, "owned_by": "palm",
                 "root": base_model_name, "parent": base_model_name,
                 "palm": {"portfolio_id": dep.portfolio_id, "portfolio_version": dep.version,
                          "traits": router.traits, "certified": router.certified, "eps": router.eps,
                          "delta": router.delta, "max_eps": router.max_eps, "default_route": cfg.default_route,
                          "how": 'give "palm": {"weights": {trait: weight}}, or a user with stored weights'}}]
        for m in router.members:
            data.append({"id": f"{MEMBER_PREFIX}{m.key}", "object": "model", "created": created, "owned_by": "palm",
                         "root": base_model_name, "parent": PORTFOLIO_MODEL,
                         "palm": {"key": m.key, "kind": m.kind, "weights": dict(zip(router.traits, m.weights)),
                                  "values": dict(zip(router.traits, m.value.mean)),
                                  "std_errors": dict(zip(router.traits, m.value.se)),
                                  "share": m.share, "temperature": m.temperature, "model_uri": m.model_uri}})
        return {"object": "list", "data": data}

    @app.post("/route", responses=ERRORS)
    def post_route(body: RouteRequest):
        return route(live.current, body.weights, "weights")

    @app.post("/v1/chat/completions", responses=STREAMED)
    async def chat_completions(body: ChatRequest):
        note_ignored(body, "/v1/chat/completions")
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in body.messages]
        prompt = models.encode_chat(messages)
        check_prompt(prompt, "messages")
        dep = live.current  # read once, right before queuing: this request is answered by this version
        served = who_answers(dep, body)
        top = body.top_logprobs or 0
        how = sampling(body, served, body.max_completion_tokens or body.max_tokens or cfg.default_max_tokens,
                       top if body.logprobs else None)
        name, answer_id = f"{MEMBER_PREFIX}{served['member_key']}", f"chatcmpl-{uuid.uuid4().hex}"
        generation, events = await start([prompt], served, dep, how, body.n or 1, body.stream)
        if not body.stream:
            finished = await collect(generation, events)
            return fmt.chat_body(answer_id, name, dep.portfolio_id, finished, bool(body.logprobs), len(prompt), served)
        return stream(chat_events(generation, events, answer_id, name, dep.portfolio_id, served, len(prompt),
                                  bool(body.logprobs), body.stream_options))

    @app.post("/v1/completions", responses=STREAMED)
    async def completions(body: CompletionRequest):
        note_ignored(body, "/v1/completions")
        prompts, texts = [], []
        for i, p in enumerate(body.prompt_list):
            where = "prompt" if len(body.prompt_list) == 1 else f"prompt.{i}"
            tokens = models.encode_text(p) if isinstance(p, str) else list(p)
            check_prompt(tokens, where)
            prompts.append(tokens)
            texts.append(p if isinstance(p, str) else models.decode(tokens))
        dep = live.current
        served = who_answers(dep, body)
        max_tokens = body.max_tokens if body.max_tokens is not None else cfg.default_max_tokens
        how = sampling(body, served, max_tokens, body.logprobs,
                       prompt_logprobs=body.echo and body.logprobs is not None)
        name, answer_id = f"{MEMBER_PREFIX}{served['member_key']}", f"cmpl-{uuid.uuid4().hex}"
        n = body.n or 1
        generation, events = await start(prompts, served, dep, how, n, body.stream)
        prompt_tokens = sum(len(p) for p in prompts)
        if not body.stream:
            finished = await collect(generation, events)
            choices = []
            for f in finished:
                prompt = prompts[f.index // n]
                echoed = fmt.prompt_entries(f, prompt, models.decode) if body.echo else None
                choices.append(fmt.completion_choice(f, texts[f.index // n] if body.echo else None,
                                                     echoed if body.logprobs is not None else None,
                                                     f.logprobs if body.logprobs is not None else None))
            return fmt.completion_body(answer_id, name, dep.portfolio_id, choices, prompt_tokens,
                                       sum(f.completion_tokens for f in finished), served)
        return stream(completion_events(generation, events, answer_id, name, dep.portfolio_id, served, prompts,
                                        texts, body, n, prompt_tokens))

    def stream(events) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def chat_events(generation, events, answer_id, name, fingerprint, served, prompt_tokens, logprobs,
                          options):
        def chunk(index, delta, finish=None, entries=None, **extra):
            return fmt.event({"id": answer_id, "object": "chat.completion.chunk", "created": int(time.time()),
                              "model": name, "system_fingerprint": fingerprint,
                              "choices": [{"index": index, "delta": delta, "finish_reason": finish,
                                           "logprobs": None if entries is None else
                                           {"content": [fmt.chat_logprob(e) for e in entries], "refusal": None}}],
                              **extra})

        try:
            for i in range(generation.answers):
                yield chunk(i, {"role": "assistant", "content": ""}, **({"palm": served} if i == 0 else {}))
            done, completion_tokens = 0, 0
            while done < generation.answers:
                e = await events.get()
                if isinstance(e, Failed):  # after the first event only the stream can say so
                    yield fmt.event({"error": {"message": e.message, "type": "server_error"}})
                    return
                if isinstance(e, Tokens):
                    yield chunk(e.index, {"content": e.text}, entries=list(e.logprobs) if logprobs else None)
                elif isinstance(e, Finished):
                    done, completion_tokens = done + 1, completion_tokens + e.completion_tokens
                    yield chunk(e.index, {}, e.finish_reason)
            if (options and options.include_usage):
                yield fmt.event({"id": answer_id, "object": "chat.completion.chunk", "created": int(time.time()),
                                 "model": name, "choices": [], "usage": fmt.usage(prompt_tokens, completion_tokens)})
            yield fmt.DONE
        finally:
            generation.cancelled.set()  # the client went away, or the answer is complete

    async def completion_events(generation, events, answer_id, name, fingerprint, served, prompts, texts, body, n,
                                prompt_tokens):
        def chunk(index, text, finish=None, logprobs=None, offset=0, **extra):
            return fmt.event({"id": answer_id, "object": "text_completion", "created": int(time.time()),
                              "model": name, "system_fingerprint": fingerprint,
                              "choices": [{"index": index, "text": text, "finish_reason": finish,
                                           "logprobs": None if logprobs is None else
                                           fmt.completion_logprobs(logprobs, offset)}], **extra})

        offsets = {}
        try:
            if body.echo and body.logprobs is None:  # the prompts first (with logprobs: once they are known)
                for i in range(generation.answers):
                    yield chunk(i, texts[i // n], **({"palm": served} if i == 0 else {}))
                    offsets[i] = len(texts[i // n])
            done, completion_tokens, first = 0, 0, not (body.echo and body.logprobs is None)
            while done < generation.answers:
                e = await events.get()
                extra = {"palm": served} if first else {}
                first = False
                if isinstance(e, Failed):
                    yield fmt.event({"error": {"message": e.message, "type": "server_error"}})
                    return
                if isinstance(e, Tokens):
                    entries = list(e.logprobs) if body.logprobs is not None else None
                    yield chunk(e.index, e.text, logprobs=entries, offset=offsets.get(e.index, 0), **extra)
                    offsets[e.index] = offsets.get(e.index, 0) + len(e.text)
                elif isinstance(e, Finished):
                    done, completion_tokens = done + 1, completion_tokens + e.completion_tokens
                    if body.echo and body.logprobs is not None:  # the prompt with its logprobs, then the end
                        entries = fmt.prompt_entries(e, prompts[e.index // n], models.decode)
                        yield chunk(e.index, texts[e.index // n], logprobs=entries, **extra)
                        extra = {}
                    yield chunk(e.index, "", e.finish_reason, **extra)
            if body.stream_options and body.stream_options.include_usage:
                yield fmt.event({"id": answer_id, "object": "text_completion", "created": int(time.time()),
                                 "model": name, "choices": [], "usage": fmt.usage(prompt_tokens, completion_tokens)})
            yield fmt.DONE
        finally:
            generation.cancelled.set()

    # --- user preferences ------------------------------------------------------------------------

    def user_of(user: str) -> str:
        try:
            return check_user_id(user)
        except UserIdError as exc:
            raise ApiError(400, str(exc), "user") from None

    def writable(request: Request) -> None:
        if api_key is None:  # with a key, the middleware has checked it already
            raise ApiError(403, "writing preferences needs an API key: start palm serve with --api-key (or "
                                "PALM_API_KEY) and send it, or use `palm users set`", None, "api_key_required")

    def in_store(fn, *args):
        try:
            return fn(*args)
        except UserStoreError as exc:
            raise ApiError(503, str(exc)) from None

    # {user:path}: the id as decoded from the URL, slashes included, so that a bad one is refused
    # by its rules (400 naming it), not by a route that does not match (404)
    UserId = Path(description="the user id (the OpenAI `user` field)", json_schema_extra=USER_ID)

    @app.put("/v1/users/{user:path}/preferences", responses=ERRORS)
    def put_preferences(body: PreferencesRequest, request: Request, user: str = UserId):
        writable(request)
        user, dep = user_of(user), live.current
        try:
            w, normalized = parse_weights(body.weights, dep.router.traits)
        except WeightsError as exc:
            raise ApiError(400, str(exc), "weights") from None
        prefs = in_store(users.set, user, dict(zip(dep.router.traits, map(float, w))))
        return {**prefs.to_dict(), "normalized": normalized, "route": dep.router.route(prefs.weights).to_dict()}

    @app.get("/v1/users/{user:path}/preferences", responses=ERRORS)
    def get_preferences(user: str = UserId):
        user, dep = user_of(user), live.current
        prefs = in_store(users.get, user)
        if prefs is None:
            raise ApiError(404, f"no preferences are stored for user {user!r}", "user", "user_not_found")
        try:
            now = dep.router.route(prefs.weights).to_dict()
        except WeightsError as exc:
            now = {"error": f"these weights do not fit the portfolio served ({exc})"}
        return {**prefs.to_dict(), "route": now}

    @app.delete("/v1/users/{user:path}/preferences", responses=ERRORS)
    def delete_preferences(request: Request, user: str = UserId):
        writable(request)
        user = user_of(user)
        if not in_store(users.delete, user):
            raise ApiError(404, f"no preferences are stored for user {user!r}", "user", "user_not_found")
        return {"user": user, "deleted": True}

    @app.post("/v1/portfolio/reload", responses=ERRORS)
    async def reload():
        try:
            out = await run_in_threadpool(live.reload)
        except Exception:  # noqa: BLE001 (the current portfolio goes on serving; the reason is returned)
            raise ApiError(503, f"reload from {live.source.describe()} failed, still serving version "
                                f"{live.current.version}: {live.last_error}") from None
        if out["changed"]:
            app.openapi_schema = None  # the model names changed: a fresh spec
        return out

    return app


def _is_type_tag(part) -> bool:
    """Pydantic names the union member it tried in an error's location (`str`, `list[...]`,
    `function-after[...]`); the field's path is what a client needs."""
    text = str(part)
    return text in ("str", "int", "float", "bool") or "[" in text or text.startswith("function-")
