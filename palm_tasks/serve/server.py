"""The HTTP server around the app: uvicorn on a socket bound here, the API key, the body limit,
and malformed requests answered in the OpenAI error format.

Authentication (`palm serve --api-key`, or PALM_API_KEY): every request except those to
OPEN_PATHS must carry `Authorization: Bearer <key>`, else 401 in the OpenAI error shape (the
key is compared in constant time and never echoed). /health stays open for load balancers,
the OpenAPI spec and its page stay open. Servers bind 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import hmac
import json
import socket
import sys

API_KEY_ENV = "PALM_API_KEY"
OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect"})


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict | None = None):
    from fastapi.responses import JSONResponse

    kind = "rate_limit_error" if status == 429 else "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                        headers=headers)


def with_api_key(app, api_key: str | None):
    """ASGI middleware: 401 for a request without the key, outside OPEN_PATHS (no key: no check)."""
    if not api_key:
        return app
    expected = f"Bearer {api_key}".encode()

    async def middleware(scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, expected):
                message = ("no API key given: send the header Authorization: Bearer <key> (the OpenAI "
                           "client's api_key)" if not given else "incorrect API key provided")
                return await error_response(401, message, "invalid_api_key",
                                            headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        return await app(scope, receive, send)

    return middleware


def with_body_limit(app, max_bytes: int):
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
                error = error_response(400, f"Content-Length {text[:40]!r} is not a non-negative integer")
            elif int(text) > max_bytes:
                error = error_response(413, f"request body of {int(text)} bytes is over the limit of {max_bytes}")
        if error is not None:
            return await error(scope, receive, send)
        # Read the body here (at most max_bytes of it), then hand it to the app in one piece.
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > max_bytes:
                return await error_response(413, f"request body is over the limit of {max_bytes} bytes"
                                            )(scope, receive, send)
        given = False

        async def replay():
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as ASGI apps expect

        await app(scope, replay, send)

    return middleware


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


def make_server(app, host: str = "127.0.0.1", port: int = 8000, backlog: int = 2048,
                max_connections: int = 512, keep_alive_s: float = 5.0):
    """(uvicorn.Server, bound socket) for an app of serve.api.make_app (its body limit and API
    key wrapped around it). Binding here, not in uvicorn, so port 0 works (the socket says which
    port) and a taken port is an OSError before anything starts."""
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
    wrapped = with_api_key(with_body_limit(app, app.state.cfg.max_body_bytes), app.state.api_key)
    config = uvicorn.Config(wrapped, http=_protocol(), log_level="error", backlog=backlog,
                            limit_concurrency=max_connections, timeout_keep_alive=keep_alive_s,
                            h11_max_incomplete_event_size=64 * 1024, lifespan="off")
    return uvicorn.Server(config), sock
