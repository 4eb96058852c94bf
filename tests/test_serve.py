"""Serving: one base model with every member's adapter, the OpenAI-compatible API on a real
uvicorn server on loopback driven by the official `openai` client, hostile requests, the
queue in front of the batch, and `palm serve` / `palm generate` as a user runs them. (The
OpenAI fields, users, batching and hot swap: test_serve_openai.py, test_serve_batching.py;
hostile requests to the new endpoints: test_hostile_serve.py.)"""

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import psutil
import pytest
import torch

from palm_tasks.config import ServeConfig
from serving import HUMOR, PROMPT, http_request, serve


@pytest.fixture(scope="module")
def project(registered):
    return registered


@pytest.fixture(scope="module")
def served(project, tmp_path_factory):
    s = serve(project, tmp_path_factory.mktemp("users"))
    yield s
    s.stop()


def _request(address, method, path, body=None, raw: bytes | None = None, headers=None):
    """(status, decoded JSON or None) of one raw HTTP request."""
    return http_request(address, method, path, body, raw, headers)


def test_a_mixed_adapter_batch_matches_each_member_alone(served, project):
    """One forward pass with a different member's adapter on each row (MemberModels.forward, the
    adapters stacked side by side) gives each row what its member gives alone on a fresh base, and
    what PEFT's own mixed-adapter batch (adapter_names) gives; the base is shared."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    models, keys, root = served.live.models, served.keys, project[0]
    ids = torch.tensor(models.tokenizer("Tell me a joke about computers")["input_ids"])[None]
    rows = [keys[0], keys[1], keys[2], keys[0]]
    names = [served.adapter(k) for k in rows]
    with served.engine.paused(), torch.no_grad():  # the engine owns the model: no step meanwhile
        batch = models.forward(names, input_ids=ids.repeat(4, 1)).logits
        peft_batch = models.model(input_ids=ids.repeat(4, 1), adapter_names=names).logits
        base = models.forward(["__base__"] * 3 + [names[0]], input_ids=ids.repeat(4, 1)).logits
        with models.model.disable_adapter():
            base_alone = models.model(input_ids=ids).logits[0]
    assert torch.allclose(batch[0], batch[3], atol=1e-6)  # the same member on two rows: the same logits
    assert not torch.allclose(batch[0], batch[1])  # adapters differ
    assert torch.allclose(batch, peft_batch, atol=1e-5)
    assert torch.allclose(base[1], base_alone, atol=1e-5) and torch.allclose(base[3], batch[0], atol=1e-5)
    assert models.model.get_base_model() is models.base  # one base model under every adapter
    for key in keys:  # each member as if loaded alone on a fresh base
        alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(project[2].base_model),
                                          root / "models" / "members" / key / "adapter").eval()
        with torch.no_grad():
            assert torch.allclose(alone(input_ids=ids).logits[0], batch[rows.index(key)], atol=1e-5)


def test_engine_greedy_answer_is_transformers_generate(served):
    """The engine's own decoding loop answers greedily what transformers' generate answers."""
    models, key = served.live.models, served.keys[1]
    prompt = torch.tensor([models.encode_chat(PROMPT)])
    with served.engine.paused(), torch.no_grad():
        models.model.set_adapter(served.adapter(key))
        ids = models.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                    do_sample=False, pad_token_id=models.tokenizer.pad_token_id)
    expected = models.tokenizer.decode(ids[0, prompt.shape[1]:], skip_special_tokens=True).strip()
    assert served.answer(key, max_tokens=8) == expected


def test_the_openai_client_is_routed_by_weights_and_can_name_a_member(served, project):
    client, keys, router = served.client, served.keys, served.router
    answer = client.chat.completions.create(model="palm", messages=PROMPT, max_tokens=4, seed=3,
                                            extra_body={"palm": {"weights": HUMOR}})
    assert answer.model == f"palm-member-{keys[1]}"
    # no temperature: sampled at the one the member's values were measured at (evaluation.temperature)
    temperature = router.portfolio.member(keys[1]).temperature
    assert temperature == project[2].evaluation.temperature > 0
    assert answer.model_extra["palm"]["temperature"] == temperature
    assert answer.choices[0].message.content == served.answer(keys[1], temperature=temperature, seed=3)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert 1 <= answer.usage.completion_tokens <= 4
    assert answer.usage.prompt_tokens == len(served.live.models.encode_chat(PROMPT))
    palm = answer.model_extra["palm"]
    assert {k: palm[k] for k in router.route(HUMOR).to_dict()} == router.route(HUMOR).to_dict()  # the guarantee
    assert palm["source"] == "weights" and palm["portfolio_version"] == served.live.current.version

    named = client.chat.completions.create(model=f"palm-member-{keys[0]}", messages=PROMPT, max_tokens=4,
                                           temperature=0)
    assert named.model == f"palm-member-{keys[0]}"
    assert named.choices[0].message.content == served.answer(keys[0])  # temperature 0: the greedy answer
    assert named.model_extra["palm"]["source"] == "member"

    normalized = client.chat.completions.create(
        model="palm", messages=PROMPT, max_tokens=2,
        extra_body={"palm": {"weights": {"safety": 0, "humor": 3, "brevity": 1}}})
    assert normalized.model_extra["palm"]["normalized"] is True
    assert normalized.model_extra["palm"]["weights"]["humor"] == 0.75


def test_sampling_follows_temperature_and_seed(served):
    client = served.client
    common = dict(model="palm", messages=PROMPT, max_tokens=12, extra_body={"palm": {"weights": HUMOR}})
    first = client.chat.completions.create(temperature=1.5, seed=7, **common).choices[0].message.content
    again = client.chat.completions.create(temperature=1.5, seed=7, **common).choices[0].message.content
    assert first == again  # the same seed, the same sample
    others = {client.chat.completions.create(temperature=1.5, seed=s, **common).choices[0].message.content
              for s in range(8, 12)}
    greedy = client.chat.completions.create(temperature=0, **common).choices[0].message.content
    assert len(others | {first, greedy}) > 1  # sampling draws other answers than greedy
    member = served.router.route(HUMOR).temperature  # no temperature: the member's
    assert (client.chat.completions.create(seed=7, **common).choices[0].message.content
            == client.chat.completions.create(temperature=member, seed=7, **common).choices[0].message.content)
    # a temperature so small that logits / temperature overflow (found by the fuzz test): greedy
    tiny = client.chat.completions.create(temperature=1.7e-91, **common).choices[0].message.content
    assert tiny == greedy


def test_streaming_gives_the_same_answer_in_pieces(served):
    client, keys = served.client, served.keys
    full = client.chat.completions.create(model="palm", messages=PROMPT, max_tokens=16, seed=5,
                                          extra_body={"palm": {"weights": HUMOR}})
    chunks = list(client.chat.completions.create(model="palm", messages=PROMPT, max_tokens=16, stream=True, seed=5,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"palm": {"weights": HUMOR}}))
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert with_choices[0].model_extra["palm"]["member_key"] == keys[1]
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text.strip() == full.choices[0].message.content
    assert with_choices[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.model == f"palm-member-{keys[1]}" for c in chunks)

    # on the wire: server-sent events ending with [DONE]
    conn = http.client.HTTPConnection(*served.address, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(
        {"model": "palm", "messages": PROMPT, "max_tokens": 4, "stream": True, "palm": {"weights": HUMOR}}),
        headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    events = response.read().decode().strip().split("\n\n")
    conn.close()
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_models_lists_the_portfolio_and_its_members(served):
    listed = served.client.models.list().data
    keys, router = served.keys, served.router
    assert [m.id for m in listed] == ["palm"] + [f"palm-member-{k}" for k in keys]
    portfolio, members = listed[0].model_extra, [m.model_extra for m in listed[1:]]
    assert portfolio["parent"] == "tiny-base" and portfolio["palm"]["portfolio_id"] == router.portfolio.id
    assert portfolio["palm"]["certified"] == router.certified
    for member, entry in zip(router.members, members):
        assert entry["parent"] == "palm" and entry["palm"]["key"] == member.key
        assert list(entry["palm"]["weights"].values()) == list(member.weights)
        assert list(entry["palm"]["values"].values()) == list(member.value.mean)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(model="palm", extra_body={"palm": {"weights": {"safety": -1, "humor": 1, "brevity": 1}}}),
     openai.BadRequestError, "negative"),
    (dict(model="palm", extra_body={"palm": {"weights": {"safety": 1, "humor": 0}}}),
     openai.BadRequestError, "missing trait(s) brevity"),
    (dict(model="palm", extra_body={"palm": {"weights": {"safety": 1, "humor": 0, "brevity": 0, "wit": 1}}}),
     openai.BadRequestError, "unknown trait(s) 'wit'"),
    (dict(model="palm", extra_body={"palm": {"weights": {"safety": 0, "humor": 0, "brevity": 0}}}),
     openai.BadRequestError, "all weights are zero"),
    (dict(model="gpt-4o"), openai.NotFoundError, "no model 'gpt-4o'"),
    (dict(model="palm-member-0", max_tokens=100_000), openai.BadRequestError, "max_tokens"),
    (dict(model="palm", n=9, extra_body={"palm": {"weights": HUMOR}}), openai.BadRequestError, "n:"),
    (dict(model="palm", temperature=5, extra_body={"palm": {"weights": HUMOR}}), openai.BadRequestError,
     "temperature"),
])
def test_bad_requests_are_openai_errors(served, kwargs, error, message):
    if kwargs["model"] == "palm-member-0":
        kwargs = {**kwargs, "model": f"palm-member-{served.keys[0]}"}
    with pytest.raises(error) as caught:
        served.client.chat.completions.create(messages=PROMPT, **kwargs)
    body = caught.value.body  # the client's view of {"error": {...}}
    assert message in body["message"], body
    assert set(body) == {"message", "type", "param", "code"}
    assert body["type"] == "invalid_request_error"
    assert body["code"] == ("model_not_found" if error is openai.NotFoundError else None)


DEEP = b'{"model": "palm", "messages": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
HUGE_INT = b'{"weights": {"safety": 1' + b"0" * 400 + b', "humor": 1, "brevity": 1}}'


def _raw(address, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """One request written byte for byte (headers a client library would not send)."""
    with socket.create_connection(address, timeout=60) as conn:
        conn.sendall(head + b"\r\n\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        header, _, rest = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"content-length: (\d+)", header, re.I).group(1))
        while len(rest) < length:
            rest += conn.recv(65536)
    return int(header.split()[1]), rest[:length]


@pytest.mark.parametrize("name, head, body, status, message", [
    ("negative length", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1", b"", 400,
     "Content-Length"),
    ("a 300 MiB length", b"POST /route HTTP/1.1\r\nHost: x\r\nContent-Length: 314572800", b"", 413,
     "over the limit"),
    ("chunked past the limit", b"POST /route HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked",
     b"".join(b"ffff\r\n" + b" " * 0xffff + b"\r\n" for _ in range(2)) + b"0\r\n\r\n", 413, "over the limit"),
    ("not JSON", b"POST /route HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 9",
     b"{not json", 400, "JSON"),
    ("400-digit integer", b"POST /route HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
     b"Content-Length: %d" % len(HUGE_INT), HUGE_INT, 400, "weights.safety"),
    ("deep nesting", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
     b"Content-Length: %d" % len(DEEP), DEEP, 400, ""),
    ("OPTIONS", b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: x", b"", 405, "not allowed"),
    ("GET on a POST path", b"GET /v1/chat/completions HTTP/1.1\r\nHost: x", b"", 405, "not allowed"),
    ("unknown path", b"GET /v2/nothing HTTP/1.1\r\nHost: x", b"", 404, "no such endpoint"),
])
def test_hostile_requests_get_a_4xx_in_the_openai_format(served, name, head, body, status, message):
    got, payload = _raw(served.address, head, body)
    assert got == status, (name, payload[:300])
    error = json.loads(payload)["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error", error
    assert _request(served.address, "GET", "/health")[0] == 200  # still serving


def test_head_gets_no_body_and_the_server_keeps_serving(served):
    status, _ = _request(served.address, "HEAD", "/v1/chat/completions")
    assert status == 405
    assert _request(served.address, "HEAD", "/health")[0] == 200


def test_route_endpoint_matches_the_router(served):
    status, route = _request(served.address, "POST", "/route",
                             {"weights": {"safety": 0.2, "humor": 0.3, "brevity": 0.5}})
    assert status == 200 and route == served.router.route({"safety": 0.2, "humor": 0.3, "brevity": 0.5}).to_dict()
    status, health = _request(served.address, "GET", "/health")
    assert status == 200 and health["members"] == served.keys
    assert health["portfolio_version"] == served.live.current.version and health["auth"] is False


def test_a_full_queue_answers_429_and_a_long_wait_503(served, project, tmp_path):
    """With the batch busy (here: the engine held between steps), one request waits (max_queue
    1), the next is refused with 429, and the waiting one gets 503 after queue_timeout_s
    without being run."""
    other = serve(project, tmp_path, ServeConfig(max_queue=1, queue_timeout_s=2.0))
    client, results = other.client, {}

    def waiting():
        try:
            client.chat.completions.create(model="palm", messages=PROMPT, max_tokens=2,
                                           extra_body={"palm": {"weights": HUMOR}})
            results["waiting"] = 200
        except openai.APIStatusError as exc:
            results["waiting"] = exc.status_code

    try:
        with other.engine.paused():
            first = threading.Thread(target=waiting)
            first.start()
            deadline = time.time() + 10
            while other.engine.waiting < 1 and time.time() < deadline:
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as caught:
                client.chat.completions.create(model="palm", messages=PROMPT, max_tokens=2,
                                               extra_body={"palm": {"weights": HUMOR}})
            assert "busy" in caught.value.body["message"]
            first.join(timeout=30)
        assert results["waiting"] == 503
        time.sleep(0.2)
        assert other.engine.completed == 0 and other.engine.admitted == 0  # it was not run
        assert other.client.chat.completions.create(model="palm", messages=PROMPT, max_tokens=2).choices
    finally:
        other.stop()
        other.live.close()


def test_palm_serve_and_generate_commands(project, served, capsys):
    from flows.cli import main

    root, keys, cfg, result = project
    common = ["--root", str(root), "--params", str(root / "params.yaml")]
    # generate in this process (the command line code without a Python start-up)
    assert main(["generate", "--weights", "safety=0,humor=2,brevity=0", "Tell me a joke",
                 "--max-new-tokens", "4", *common]) == 0
    out = capsys.readouterr()
    temperature = cfg.evaluation.temperature  # the member's, as the server samples it
    assert f"member {keys[1]}" in out.err and "normalized" in out.err and f"temperature {temperature:g}" in out.err
    assert out.out.rstrip("\n") == served.answer(keys[1], PROMPT, 4, temperature=temperature, seed=0)
    assert main(["generate", "--weights", "safety=0,humor=2,brevity=0", "Tell me a joke",
                 "--max-new-tokens", "4", "--temperature", "0", *common]) == 0
    assert capsys.readouterr().out.rstrip("\n") == served.answer(keys[1])  # greedy
    assert main(["generate", "--weights", "safety=0,humor=-1,brevity=0", "hi", *common]) == 2
    assert "negative" in capsys.readouterr().err
    for bad in (["--temperature", "3"], ["--temperature", "nan"], ["--seed", "-1"]):
        assert main(["generate", "--weights", "humor=1", "hi", *bad, *common]) == 2
        err = capsys.readouterr().err
        assert bad[0] in err and len(err.strip().splitlines()) == 1, err

    # serve as a user starts it; hostile requests must not grow its memory
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
        client = openai.OpenAI(base_url=f"http://{address[0]}:{address[1]}/v1", api_key="unused",
                               max_retries=0, timeout=120)
        answer = client.chat.completions.create(model="palm", messages=PROMPT, max_tokens=4, temperature=0,
                                                extra_body={"palm": {"weights": HUMOR}})
        assert answer.model == f"palm-member-{keys[1]}"
        assert answer.choices[0].message.content == served.answer(keys[1])
        before = psutil.Process(server.pid).memory_info().rss
        for _ in range(3):
            for head, body in [(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1", b""),
                               (b"POST /route HTTP/1.1\r\nHost: x\r\nContent-Length: 314572800", b""),
                               (b"POST /route HTTP/1.1\r\nHost: x\r\nContent-Length: %d" % len(HUGE_INT),
                                HUGE_INT),
                               (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d"
                                % len(DEEP), DEEP)]:
                assert 400 <= _raw(address, head, body)[0] < 500
        after = psutil.Process(server.pid).memory_info().rss
        assert after <= 1.10 * before, f"RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB"
        assert server.poll() is None
    finally:
        server.terminate()
        # uvicorn finishes open requests, then exits by the signal it caught
        assert server.wait(timeout=30) == -signal.SIGTERM
        assert "Traceback" not in server.stderr.read()


# --- fuzzing the API from its own OpenAPI spec ---------------------------------------------------


def test_fuzzed_requests_never_get_a_server_error(served, project, tmp_path):
    """Requests generated by schemathesis from the running server's own OpenAPI spec, valid and
    invalid, against every operation: schemathesis' checks (no 5xx, documented status codes
    and content types, invalid data refused with a 4xx). Bounded: 25 examples per operation.
    (Its pytest plugin does not load under this pytest, so the operations are driven here.)"""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    # a server of its own, with answers of at most 8 tokens: the fuzz is about requests, and the
    # spec it reads says so (max_tokens <= 8)
    fuzzed = serve(project, tmp_path, ServeConfig(max_tokens=8, default_max_tokens=8, max_n=2, max_batch=4),
                   api_key="fuzz-key")
    server, address, thread = fuzzed.server, fuzzed.address, fuzzed.thread
    schema = schemathesis.openapi.from_url(f"http://{address[0]}:{address[1]}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "POST /route", "GET /health",
        "PUT /v1/users/{user}/preferences", "GET /v1/users/{user}/preferences",
        "DELETE /v1/users/{user}/preferences", "POST /v1/portfolio/reload"}
    tried = {}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            case.call_and_validate(timeout=120, headers={"Authorization": "Bearer fuzz-key"})
            tried[operation.label] = tried.get(operation.label, 0) + 1

        fuzz()
    server.should_exit = True
    thread.join(timeout=30)
    fuzzed.live.close()
    print("fuzzed requests per operation:", tried)
    assert sum(tried.values()) >= 100


def test_export_vllm_names_the_members_as_palm_serve_does(project, served, tmp_path, capsys):
    """`palm export vllm` writes the vLLM command: the base every adapter belongs to and one
    LoRA module per member, named as /v1/models names them (vLLM itself needs a GPU machine)."""
    import shlex

    from flows.cli import main

    root, keys, cfg, result = project
    script = tmp_path / "serve_vllm.sh"
    assert main(["export", "vllm", "--out", str(script), "--port", "8001", "--root", str(root),
                 "--params", str(root / "params.yaml")]) == 0
    argv = shlex.split(script.read_text().split("exec ", 1)[1].replace("\\\n", " "))
    assert argv[:3] == ["vllm", "serve", str(served.router.base_model_path().resolve())]
    assert (Path(argv[2]) / "config.json").is_file()
    modules = argv[argv.index("--lora-modules") + 1:]
    listed = [m.id for m in served.client.models.list().data[1:]]
    assert [m.split("=", 1)[0] for m in modules] == listed
    for module, key in zip(modules, keys):
        adapter = Path(module.split("=", 1)[1])
        assert adapter == (root / "models" / "members" / key / "adapter").resolve()
        assert json.loads((adapter / "adapter_config.json").read_text())["r"] <= int(
            argv[argv.index("--max-lora-rank") + 1])
    assert argv[argv.index("--port") + 1] == "8001" and "--enable-lora" in argv
    # vLLM's default sampling is the members': the temperature they were measured at, the sampler's top-k
    assert json.loads(argv[argv.index("--override-generation-config") + 1]) == {
        "temperature": cfg.evaluation.temperature, "top_k": 50}
    assert script.stat().st_mode & 0o111  # executable
    capsys.readouterr()
    assert main(["export", "vllm", "--json", "--root", str(root), "--params", str(root / "params.yaml")]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in exported["lora_modules"]] == listed


def test_mlflow_models_serve_answers_a_prompt_with_the_routed_member(project, served, tmp_path):
    """The registered portfolio (a pyfunc) served by `mlflow models serve` on loopback: weights
    and a prompt in, the routed member and its greedy answer out (one base, the members'
    adapters shipped with the portfolio model)."""
    import os
    import urllib.request

    from palm_tasks.registry import portfolio_model_name
    from palm_tasks.tracking import tracking_uri

    root, keys, cfg, result = project
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "mlflow-serve.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m",
         f"models:/{portfolio_model_name(cfg)}@production", "--env-manager", "local",
         "--host", "127.0.0.1", "-p", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(cfg, root),
             # mlflow runs `uvicorn` by name: the one of this environment
             "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (tmp_path / "mlflow-serve.log").read_text()
                time.sleep(0.5)
        body = {"dataframe_records": [{**HUMOR, "prompt": "Tell me a joke"},
                                      {"safety": 1, "humor": 0, "brevity": 0, "prompt": "Tell me a joke"}],
                "params": {"max_new_tokens": 4, "temperature": 0.0}}  # greedy: the engine's answer to compare
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            predictions = json.loads(response.read())["predictions"]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # mlflow and the uvicorn it started
        server.wait(timeout=30)
        log.close()
    assert [p["member_key"] for p in predictions] == [keys[1], keys[0]]
    assert [p["answer"] for p in predictions] == [served.answer(keys[1]), served.answer(keys[0])]
