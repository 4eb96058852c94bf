"""Hostile requests to the serving endpoints and fields of issue 37, against a real uvicorn server
on loopback over a registered portfolio: user ids (path traversal, encodings, 10 kB), weights of
the wrong length, NaN, infinite, negative or all zero, n of 10^6, logprobs of 10^6, prompts and
stops out of bounds, fields this server refuses, an unknown user with no default route.

Each case has one verdict: clean error (a 4xx in the OpenAI error shape naming the field),
accepted (a valid edge value, answered 200), accepted wrongly (a 2xx for what must be refused),
unnamed (refused without naming the field), 5xx, traceback (not the JSON error shape). The last
test asserts 0 of the last four, that refused writes left the store as it was, and that the
server still answers."""

import collections
import json
import re
import socket

import psutil
import pytest

from palm_tasks.config import ServeConfig
from serving import PROMPT, serve

KEY = "sk-hostile"
W = {"safety": 0.5, "humor": 0.25, "brevity": 0.25}
FIGURES: collections.Counter = collections.Counter()
FAILURES: list[str] = []
CHAT, COMPLETE, ROUTE = "/v1/chat/completions", "/v1/completions", "/route"


def chat(**fields) -> dict:
    return {"model": "palm", "messages": PROMPT, "max_tokens": 2, **fields}


def complete(**fields) -> dict:
    return {"model": "palm", "prompt": "Once", "max_tokens": 2, **fields}


def prefs(user: str) -> str:
    return f"/v1/users/{user}/preferences"


# (case, method, path, body (dict, or bytes sent as they are), the field a refusal must name; None: accepted)
USER_IDS = [
    ("path traversal", "../../etc/passwd", "user"), ("encoded traversal", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "user"),
    ("double-encoded traversal", "%252e%252e%252f", "user"), ("dots", "..", "user"), ("one dot", ".", "user"),
    ("a 10 kB id", "u" * 10_000, "user"), ("empty", "", "user"), ("NUL", "a%00b", "user"),
    ("encoded slash", "a%2Fb", "user"), ("non-ASCII", "%C3%A9l%C3%A8ve", "user"), ("a space", "a%20b", "user"),
    ("a backslash", "a%5Cb", "user"), ("every allowed character", "A.b-c_d@e:f+g=h~9", None),
]
WEIGHTS = [
    ("a trait missing", {"safety": 1, "humor": 0}), ("a trait too many", {**W, "wit": 1}),
    ("no trait", {}), ("negative", {**W, "safety": -1}), ("all zero", {"safety": 0, "humor": 0, "brevity": 0}),
    ("a string", {**W, "safety": "0.5"}), ("a boolean", {**W, "safety": True}), ("nested", {**W, "safety": {"a": 1}}),
    ("null", {**W, "safety": None}),
]
RAW_WEIGHTS = [("NaN", b"NaN"), ("Infinity", b"Infinity"), ("-Infinity", b"-Infinity"), ("1e400", b"1e400"),
               ("a 400-digit number", b"1" + b"0" * 400)]
FIELDS = [  # (case, path, body, the field named)
    ("n of 10^6", CHAT, chat(n=10**6), "n"), ("n of 0", CHAT, chat(n=0), "n"), ("n over max_n", CHAT, chat(n=9), "n"),
    ("n of 1.5", CHAT, chat(n=1.5), "n"), ("n as a string", CHAT, chat(n="2"), "n"), ("n as true", CHAT, chat(n=True), "n"),
    ("n of 10^6 (completions)", COMPLETE, complete(n=10**6), "n"),
    ("logprobs of 10^6", COMPLETE, complete(logprobs=10**6), "logprobs"),
    ("logprobs of -1", COMPLETE, complete(logprobs=-1), "logprobs"),
    ("logprobs above the cap", COMPLETE, complete(logprobs=21), "logprobs"),
    ("logprobs as true (completions)", COMPLETE, complete(logprobs=True), "logprobs"),
    ("top_logprobs of 10^6", CHAT, chat(logprobs=True, top_logprobs=10**6), "top_logprobs"),
    ("top_logprobs without logprobs", CHAT, chat(top_logprobs=2), "top_logprobs"),
    ("chat logprobs as a number", CHAT, chat(logprobs=5), "logprobs"),
    ("max_tokens of 10^6", CHAT, chat(max_tokens=10**6), "max_tokens"),
    ("max_tokens of -1", COMPLETE, complete(max_tokens=-1), "max_tokens"),
    ("max_tokens 0 without echo", COMPLETE, complete(max_tokens=0), "max_tokens"),
    ("max_completion_tokens of 10^6", CHAT, chat(max_completion_tokens=10**6), "max_completion_tokens"),
    ("an empty prompt", COMPLETE, complete(prompt=""), "prompt"), ("no prompts", COMPLETE, complete(prompt=[]), "prompt"),
    ("an empty token list", COMPLETE, complete(prompt=[[]]), "prompt"),
    ("a negative token", COMPLETE, complete(prompt=[-1]), "prompt"),
    ("a token beyond the vocabulary", COMPLETE, complete(prompt=[10**9]), "prompt"),
    ("a fractional token", COMPLETE, complete(prompt=[1.5]), "prompt"),
    ("nine prompts", COMPLETE, complete(prompt=["a"] * 9), "prompt"),
    ("a prompt object", COMPLETE, complete(prompt={"a": 1}), "prompt"),
    ("a prompt over the token limit", COMPLETE, complete(prompt="the sea " * 4000), "prompt"),
    ("a conversation over the token limit", CHAT, chat(messages=[{"role": "user", "content": "sea " * 6000}]),
     "messages"),
    ("an empty stop", CHAT, chat(stop=""), "stop"), ("five stops", CHAT, chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("a 300-character stop", CHAT, chat(stop="s" * 300), "stop"), ("a stop number", CHAT, chat(stop=7), "stop"),
    ("temperature -1", CHAT, chat(temperature=-1), "temperature"),
    ("temperature 3", CHAT, chat(temperature=3), "temperature"),
    ("temperature as a string", CHAT, chat(temperature="hot"), "temperature"),
    ("top_p 0", CHAT, chat(top_p=0), "top_p"), ("seed -1", CHAT, chat(seed=-1), "seed"),
    ("seed 2^64", CHAT, chat(seed=2**64), "seed"), ("a penalty of 10", CHAT, chat(presence_penalty=10), "presence_penalty"),
    ("logit_bias beyond the vocabulary", CHAT, chat(logit_bias={"99999999": 1}), "logit_bias"),
    ("logit_bias of 1000", CHAT, chat(logit_bias={"1": 1000}), "logit_bias"),
    ("logit_bias of a word", CHAT, chat(logit_bias={"sea": 1}), "logit_bias"),
    ("301 logit biases", CHAT, chat(logit_bias={str(i): 1 for i in range(301)}), "logit_bias"),
    ("tools", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    ("a JSON response format", CHAT, chat(response_format={"type": "json_object"}), "response_format"),
    ("best_of 2", COMPLETE, complete(best_of=2), "best_of"), ("a suffix", COMPLETE, complete(suffix="x"), "suffix"),
    ("a tool message", CHAT, chat(messages=[{"role": "tool", "content": "x"}]), "messages"),
    ("an image part", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "messages"),
    ("no messages", CHAT, chat(messages=[]), "messages"),
    ("a user id with a slash", CHAT, chat(user="../x"), "user"), ("a 10 kB user id", CHAT, chat(user="u" * 10_000), "user"),
    ("an empty user id", CHAT, chat(user=""), "user"), ("a numeric user id", CHAT, chat(user=5), "user"),
    ("a user id (completions)", COMPLETE, complete(user="a b"), "user"),
    ("an unknown model", CHAT, chat(model="gpt-4o"), "model"), ("an empty model", COMPLETE, complete(model=""), "model"),
    ("stream with n of 10^6", CHAT, chat(stream=True, n=10**6), "n"),
    ("palm options with an extra key", CHAT, chat(palm={"weights": W, "x": 1}), "palm"),
]
ACCEPTED = [  # valid edge values: answered
    ("n at the cap", CHAT, chat(n=8, max_tokens=1)), ("logprobs at the cap", COMPLETE, complete(logprobs=20)),
    ("top_logprobs at the cap", CHAT, chat(logprobs=True, top_logprobs=20)),
    ("max_tokens 0 with echo", COMPLETE, complete(max_tokens=0, echo=True, logprobs=0)),
    ("temperature 2 with a seed", CHAT, chat(temperature=2, seed=2**63 - 1)),
    ("four stops", CHAT, chat(stop=["a", "b", "c", "d"])), ("n as 2.0", CHAT, chat(n=2.0)),
    ("an unknown field", CHAT, chat(frobnicate={"deep": [1, 2]})), ("an unknown user", CHAT, chat(user="nobody-yet")),
    ("tools empty", CHAT, chat(tools=[])), ("a text response format", CHAT, chat(response_format={"type": "text"})),
]


@pytest.fixture(scope="module")
def servers(registered, tmp_path_factory):
    s = serve(registered, tmp_path_factory.mktemp("hostile"), api_key=KEY)
    strict = serve(registered, tmp_path_factory.mktemp("hostile-none"), ServeConfig(default_route="none"),
                   api_key=KEY, live=s.live, users=s.users)
    s.users.set("keeper", W)
    yield s, strict
    strict.stop()
    s.stop()
    s.live.close()


def send(address, method: str, path: str, body) -> tuple[int, bytes]:
    """One request written byte for byte (a path no client library would send as it is)."""
    data = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    head = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n")
    with socket.create_connection(address, timeout=120) as conn:
        conn.sendall(head.encode("latin-1") + data)
        raw = b""
        while chunk := conn.recv(65536):
            raw += chunk
    header, _, payload = raw.partition(b"\r\n\r\n")
    if re.search(rb"transfer-encoding: chunked", header, re.I):  # a stream: de-chunk
        out, rest = b"", payload
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            out, rest = out + rest[:n], rest[n + 2:]
        payload = out
    return int(header.split()[1]), payload


def judge(case: str, status: int, payload: bytes, field: str | None) -> str:
    if b"Traceback" in payload:
        verdict = "traceback"
    elif status >= 500:
        verdict = "5xx"
    elif field is None:
        verdict = "accepted" if status == 200 else "refused wrongly"
    elif status < 400:
        verdict = "accepted wrongly"
    else:
        try:
            error = json.loads(payload)["error"]
            shaped = set(error) == {"message", "type", "param", "code"} and error["message"]
        except (ValueError, KeyError, TypeError):
            shaped = False
        if not shaped:
            verdict = "traceback"  # not the OpenAI error shape
        elif str(error["param"] or "").split(".")[0] != field and not error["message"].startswith(field):
            verdict = "unnamed"
        else:
            verdict = "clean error"
    FIGURES[verdict] += 1
    if verdict not in ("clean error", "accepted"):
        FAILURES.append(f"{case}: {verdict}: {status} {payload[:300]!r}")
    return verdict


@pytest.mark.parametrize("case, user, field", USER_IDS, ids=[c[0] for c in USER_IDS])
def test_user_ids_in_the_path(servers, case, user, field):
    s = servers[0]
    for method, body in [("PUT", {"weights": W}), ("GET", None), ("DELETE", None)]:
        status, payload = send(s.address, method, prefs(user), body)
        expect_missing = field is None and method != "PUT" and status == 404  # valid id, nobody stored yet
        assert judge(f"{method} {case}", status, payload, None if expect_missing else field) != "traceback"
    assert s.users.get("keeper").weights == W


@pytest.mark.parametrize("case, weights", WEIGHTS, ids=[c[0] for c in WEIGHTS])
def test_bad_weights_everywhere(servers, case, weights):
    s = servers[0]
    for path, body, field in [(prefs("keeper"), {"weights": weights}, "weights"), (ROUTE, {"weights": weights}, "weights"),
                              (CHAT, chat(palm={"weights": weights}), "palm"),
                              (COMPLETE, complete(palm={"weights": weights}), "palm")]:
        method = "PUT" if path.startswith("/v1/users") else "POST"
        judge(f"{path} {case}", *send(s.address, method, path, body), field)
    assert s.users.get("keeper").weights == W  # a refused write changed nothing


@pytest.mark.parametrize("case, literal", RAW_WEIGHTS, ids=[c[0] for c in RAW_WEIGHTS])
def test_weights_json_cannot_hold(servers, case, literal):
    s = servers[0]
    weights = b'{"safety": ' + literal + b', "humor": 0.5, "brevity": 0.5}'
    for method, path, body, field in [("PUT", prefs("keeper"), b'{"weights": ' + weights + b"}", "weights"),
                                      ("POST", ROUTE, b'{"weights": ' + weights + b"}", "weights"),
                                      ("POST", CHAT, b'{"model": "palm", "messages": [{"role": "user", "content": '
                                                     b'"x"}], "palm": {"weights": ' + weights + b"}}", "palm")]:
        judge(f"{path} {case}", *send(s.address, method, path, body), field)
    assert s.users.get("keeper").weights == W


@pytest.mark.parametrize("case, path, body, field", FIELDS, ids=[c[0] for c in FIELDS])
def test_fields_out_of_bounds(servers, case, path, body, field):
    judge(case, *send(servers[0].address, "POST", path, body), field)


@pytest.mark.parametrize("case, path, body", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_edge_values_are_answered(servers, case, path, body):
    judge(case, *send(servers[0].address, "POST", path, body), None)


def test_an_unknown_user_with_no_default_route(servers):
    strict = servers[1]
    for path, body in [(CHAT, chat(user="nobody")), (COMPLETE, complete(user="nobody")), (CHAT, chat())]:
        status, payload = send(strict.address, "POST", path, body)
        field = "user" if "user" in body else "palm"
        assert judge(f"no default: {path} {body.get('user')}", status, payload, field) == "clean error"
        assert status == (404 if field == "user" else 400)
    assert json.loads(send(strict.address, "POST", CHAT, chat(user="keeper"))[1])["palm"]["source"] == "user"


def test_the_figures(servers):
    """Runs last: no 5xx, no traceback, nothing accepted wrongly or refused without naming the
    field, the stored user untouched, the server still answering, its memory bounded."""
    s = servers[0]
    rss = psutil.Process().memory_info().rss
    for case, path, body, field in FIELDS[:10]:  # again: nothing accumulates
        send(s.address, "POST", path, body)
    assert psutil.Process().memory_info().rss < rss + 200 * 2**20
    total = sum(FIGURES.values())
    print(f"hostile serving suite: {total} cases, " + ", ".join(f"{v} {k}" for k, v in sorted(FIGURES.items())))
    assert total >= 150
    assert FIGURES["5xx"] == FIGURES["traceback"] == FIGURES["accepted wrongly"] == 0, FAILURES
    assert FIGURES["unnamed"] == FIGURES["refused wrongly"] == 0, FAILURES
    assert s.users.get("keeper").weights == W
    assert s.client.chat.completions.create(model="palm", messages=PROMPT, max_tokens=2).choices
