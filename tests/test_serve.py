"""Serving: one base model with every member's adapter, real HTTP on loopback, bad requests,
and `palm serve` / `palm generate` as a user runs them."""

import http.client
import json
import re
import subprocess
import sys
import threading
import time

import pytest
import torch

from palm_tasks.serve.router import Router
from palm_tasks.serve.server import MAX_BODY_BYTES, MAX_PROMPT_CHARS, load_models, make_server


@pytest.fixture(scope="module")
def project(registered):
    return registered


@pytest.fixture(scope="module")
def served(project):
    from palm_tasks.registry import portfolio_model_name
    from palm_tasks.tracking import tracking_uri

    root, keys, cfg, result = project
    router = Router.from_registry("production", tracking_uri(cfg, root), portfolio_model_name(cfg),
                                  root=root)
    models = load_models(router)
    server = make_server(router, models, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, router, models, keys
    server.shutdown()
    server.server_close()


def _request(server, method, path, body=None, raw: bytes | None = None, headers=None):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                   **(headers or {})})
    response = conn.getresponse()
    out = response.status, json.loads(response.read())
    conn.close()
    return out


def test_switching_members_keeps_the_base_and_matches_each_member_alone(served, project):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    server, router, models, keys = served
    root = project[0]
    base, base_weight = models.base, models.base.get_input_embeddings().weight
    ids = models.tokenizer("Tell me a joke about computers", return_tensors="pt")["input_ids"]
    logits = {}
    for key in [keys[0], keys[1], keys[2], keys[0]]:
        models.use(key)
        with torch.no_grad():
            logits.setdefault(key, []).append(models.model(input_ids=ids).logits)
    assert models.base is base and models.base.get_input_embeddings().weight is base_weight
    assert torch.equal(logits[keys[0]][0], logits[keys[0]][1])  # back to the first: same
    assert not torch.allclose(logits[keys[0]][0], logits[keys[1]][0])  # adapters differ
    for key in keys:  # each member as if loaded alone on a fresh base
        alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(project[2].base_model),
                                          root / "models" / "members" / key / "adapter").eval()
        with torch.no_grad():
            assert torch.allclose(alone(input_ids=ids).logits, logits[key][0], atol=1e-5)


def test_route_and_generate_over_http(served):
    server, router, models, keys = served
    status, health = _request(server, "GET", "/health")
    assert status == 200 and health["members"] == keys and health["generate"] is True

    status, route = _request(server, "POST", "/route",
                             {"weights": {"safety": 0.2, "humor": 0.3, "brevity": 0.5}})
    assert status == 200 and route["member_key"] == keys[2] and "note" not in route
    assert route == router.route({"safety": 0.2, "humor": 0.3, "brevity": 0.5}).to_dict()
    status, route = _request(server, "POST", "/route",
                             {"weights": {"safety": 0, "humor": 3, "brevity": 1}})
    assert status == 200 and route["member_key"] == keys[1] and route["normalized"]
    assert "normalized" in route["note"] and route["weights"]["humor"] == 0.75

    models.use(keys[0])
    switches = models.switches
    for key, weights, switched in [(keys[1], {"safety": 0, "humor": 1, "brevity": 0}, True),
                                   (keys[1], {"safety": 0, "humor": 1, "brevity": 0}, False),
                                   (keys[0], {"safety": 1, "humor": 0, "brevity": 0}, True)]:
        status, out = _request(server, "POST", "/generate",
                               {"weights": weights, "prompt": "Tell me a joke", "max_new_tokens": 4})
        assert status == 200, out
        assert out["route"]["member_key"] == key and out["switched"] is switched
        text, _ = models.generate(key, "Tell me a joke", 4)  # greedy: the same answer
        assert out["completion"] == text
    assert models.switches == switches + 2


@pytest.mark.parametrize("method, path, body, status, message", [
    ("POST", "/route", b"{not json", 400, "not valid JSON"),
    ("POST", "/route", b"[1, 2]", 400, "must be a JSON object"),
    ("POST", "/route", {"prompt": "hi"}, 400, 'missing "weights"'),
    ("POST", "/route", {"weights": {"safety": 1, "humor": 0}}, 400, "missing trait(s) brevity"),
    ("POST", "/route", {"weights": {"safety": 1, "humor": 0, "brevity": 0, "wit": 1}}, 400,
     "unknown trait(s) 'wit'"),
    ("POST", "/route", {"weights": {"safety": -1, "humor": 1, "brevity": 1}}, 400, "negative"),
    ("POST", "/route", b'{"weights": {"safety": NaN, "humor": 1, "brevity": 1}}', 400,
     "not a finite number"),
    ("POST", "/route", {"weights": {"safety": 0, "humor": 0, "brevity": 0}}, 400, "all weights are zero"),
    ("POST", "/generate", {"weights": {"safety": 1, "humor": 0, "brevity": 0}}, 400, 'missing "prompt"'),
    ("POST", "/generate", {"weights": {"safety": 1, "humor": 0, "brevity": 0},
                           "prompt": "x" * (MAX_PROMPT_CHARS + 1)}, 413, "over the limit"),
    ("POST", "/generate", {"weights": {"safety": 1, "humor": 0, "brevity": 0}, "prompt": "hi",
                           "max_new_tokens": 100_000}, 400, "max_new_tokens"),
    ("POST", "/route", b"x" * (MAX_BODY_BYTES + 1), 413, "over the limit"),
    ("POST", "/nowhere", {}, 404, "no such endpoint"),
    ("GET", "/route", None, 405, "use POST"),
    ("DELETE", "/route", None, 405, "not allowed"),
])
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(served, method, path, body, status,
                                                             message):
    server = served[0]
    raw = body if isinstance(body, bytes) else None
    got, out = _request(server, method, path, body=None if raw else body, raw=raw)
    assert got == status and message in out["error"]
    assert _request(server, "GET", "/health")[0] == 200


def test_palm_serve_and_generate_commands(project, served, capsys):
    from flows.cli import main

    root, keys, cfg, result = project
    common = ["--root", str(root), "--params", str(root / "params.yaml")]
    # generate in this process (the command line code without a Python start-up)
    assert main(["generate", "--weights", "safety=0,humor=2,brevity=0", "Tell me a joke",
                 "--max-new-tokens", "4", *common]) == 0
    out = capsys.readouterr()
    assert f"member {keys[1]}" in out.err and "normalized" in out.err
    assert out.out.rstrip("\n") == served[2].generate(keys[1], "Tell me a joke", 4)[0]
    assert main(["generate", "--weights", "safety=0,humor=-1,brevity=0", "hi", *common]) == 2
    assert "negative" in capsys.readouterr().err

    # serve as a user starts it

    server = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--port", "0", *common],
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline, address = time.time() + 240, None
        while address is None and time.time() < deadline:
            line = server.stderr.readline()
            if not line:
                break
            found = re.search(r"on http://(127\.0\.0\.1):(\d+)", line)
            address = found and (found.group(1), int(found.group(2)))
        assert address, "palm serve did not say where it listens"
        conn = http.client.HTTPConnection(*address, timeout=60)
        conn.request("POST", "/route", body=json.dumps(
            {"weights": {"safety": 1, "humor": 0, "brevity": 0}}))
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["member_key"] == keys[0]
        conn.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
