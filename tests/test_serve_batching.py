"""Continuous batching across requests and members, and the hot swap of the portfolio under load,
on a portfolio registered by the real stages: requests join the running batch at the next step,
members share a forward pass and answer as each alone, a seed gives the same answer whatever
else is in the batch, a client that goes away leaves the batch, and `production` moving in the
registry is followed with no failed request."""

import shutil
import threading
import time

import numpy as np
import pytest
import yaml

from palm_tasks.config import ServeConfig
from palm_tasks.serve.engine import Finished, Request, Sampling, Started, Tokens
from palm_tasks.serve.live import RegistrySource
from serving import HUMOR, PROMPT, live_portfolio, serve


@pytest.fixture(scope="module")
def served(registered, tmp_path_factory):
    s = serve(registered, tmp_path_factory.mktemp("batching"))
    yield s
    s.stop()
    s.live.close()


def no_end(served) -> tuple:
    """logit_bias that forbids the end-of-turn tokens: an answer of exactly max_tokens."""
    return tuple((t, -100.0) for t in served.live.models.end_ids)


def test_a_request_joins_the_running_batch_at_the_next_step(served):
    engine, models = served.engine, served.live.models
    keys = served.keys
    steps = {}

    def recorder(name):
        def on_event(event):
            if isinstance(event, Started):
                steps[name + " started"] = engine.steps
            elif isinstance(event, Tokens):
                steps.setdefault(name + " first token", engine.steps)
            elif isinstance(event, Finished):
                steps[name + " finished"] = engine.steps
        return on_event

    long = Request([models.encode_chat(PROMPT)], served.adapter(keys[0]),
                   Sampling(max_tokens=200, logit_bias=no_end(served)), recorder("long"), stream=True)
    engine.submit(long)
    deadline = time.time() + 60
    while "long first token" not in steps and time.time() < deadline:
        time.sleep(0.001)
    time.sleep(0.05)  # a few steps into the long answer
    submitted = engine.steps
    short = Request([models.encode_chat([{"role": "user", "content": "hi"}])], served.adapter(keys[1]),
                    Sampling(max_tokens=3, logit_bias=no_end(served)), recorder("short"), stream=True)
    engine.submit(short)
    while "long finished" not in steps and time.time() < deadline:
        time.sleep(0.01)
    assert steps["short started"] <= submitted + 1  # admitted at the next step, not after the long answer
    assert steps["short finished"] < steps["long finished"]  # and it left the batch before it
    assert steps["long finished"] - steps["long started"] == 200  # one token a step, never paused


def test_members_share_forward_passes_and_answer_as_each_alone(served):
    """Requests for three members and of different lengths, admitted in one step: one batch, and
    each answer is the member's own (greedy: exactly; sampled with a seed: the same draw)."""
    engine, models = served.engine, served.live.models
    prompts = [[{"role": "user", "content": text}] for text in ("Tell me a joke", "hi", "What is the sea like today?")]
    cases = [(key, p, s) for key in served.keys for p in prompts
             for s in (Sampling(max_tokens=10), Sampling(max_tokens=10, temperature=1.0, seed=7))]
    alone = [served.engine.complete(served.adapter(k), [models.encode_chat(p)], s)[0].text for k, p, s in cases]
    results = [None] * len(cases)
    engine.largest_batch = 0  # measured from here
    with engine.paused():  # all queued before the next step: admitted together
        threads = [threading.Thread(target=lambda i=i, c=c: results.__setitem__(
            i, engine.complete(served.adapter(c[0]), [models.encode_chat(c[1])], c[2])[0].text))
            for i, c in enumerate(cases)]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while engine.waiting < len(cases) and time.time() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(timeout=120)
    assert engine.largest_batch == len(cases)  # 18 answers of 3 members in one forward pass
    assert results == alone


def test_known_prompt_beginnings_are_not_encoded_again_and_change_no_answer(served, registered):
    """Prompts sharing a system message, for two members, greedy and seeded, batched: the same
    answers with the prefix cache as from an engine without one, and the cache was used."""
    plain = live_portfolio(registered, ServeConfig(prefix_cache_mb=0))
    system = {"role": "system", "content": "You are a careful assistant who answers in one short sentence."}
    prompts = [[system, {"role": "user", "content": text}] for text in ("Tell me a joke", "hi", "What is the sea?")]
    try:
        assert plain.engine.prefixes is None
        hits, saved = served.engine.prefixes.hits, served.engine.prefixes.tokens_saved
        for sampling in (Sampling(max_tokens=8), Sampling(max_tokens=8, temperature=1.0, seed=3)):
            for key in served.keys[:2]:
                for messages in prompts:
                    ids = served.live.models.encode_chat(messages)
                    cached = served.engine.complete(served.adapter(key), [ids], sampling, n=2)
                    fresh = plain.engine.complete(plain.current.adapters[key], [ids], sampling, n=2)
                    assert [f.text for f in cached] == [f.text for f in fresh]
        assert served.engine.prefixes.hits >= hits + 10 and served.engine.prefixes.tokens_saved > saved
        assert 0 < served.engine.prefixes.bytes <= ServeConfig().prefix_cache_mb * 2**20
    finally:
        plain.close()


def test_a_seed_gives_the_same_answers_over_http_whatever_the_batch(served):
    client = served.client
    request = dict(model="palm", messages=PROMPT, max_tokens=12, temperature=1.2, seed=42, n=2,
                   extra_body={"palm": {"weights": HUMOR}})
    alone = [c.message.content for c in client.chat.completions.create(**request).choices]
    busy, stop = [], threading.Event()

    def noise(i):
        rng = np.random.default_rng(i)
        while not stop.is_set():
            w = dict(zip(["safety", "humor", "brevity"], map(float, rng.dirichlet(np.ones(3)))))
            busy.append(client.chat.completions.create(
                model="palm", messages=[{"role": "user", "content": "x" * int(rng.integers(1, 40))}],
                max_tokens=int(rng.integers(1, 20)), temperature=1.0, extra_body={"palm": {"weights": w}}).model)

    threads = [threading.Thread(target=noise, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        batched = [[c.message.content for c in client.chat.completions.create(**request).choices] for _ in range(3)]
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert len(busy) >= 3 and served.engine.largest_batch >= 3
    assert batched == [alone] * 3


def test_a_client_that_goes_away_leaves_the_batch(served):
    import http.client
    import json

    conn = http.client.HTTPConnection(*served.address, timeout=60)
    bias = {str(t): -100 for t in served.live.models.end_ids}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(
        {"model": f"palm-member-{served.keys[0]}", "messages": PROMPT, "max_tokens": 256, "stream": True,
         "logit_bias": bias}), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    response.fp.readline()  # the first event: the answer is in the batch
    completed = served.engine.completed
    conn.sock.close()  # the client goes away mid-answer
    conn.close()
    deadline = time.time() + 30
    while served.engine.running and time.time() < deadline:
        time.sleep(0.01)
    assert served.engine.running == 0 and served.engine.completed == completed  # dropped, not finished


def test_a_small_batch_queues_what_does_not_fit(registered, tmp_path):
    """max_batch 2: three requests of one answer each; the third waits for room and is answered.
    A request of more answers than a batch holds is refused up front."""
    small = serve(registered, tmp_path, ServeConfig(max_batch=2, max_n=2))
    try:
        answers = []
        with small.engine.paused():
            threads = [threading.Thread(target=lambda: answers.append(small.client.chat.completions.create(
                model="palm", messages=PROMPT, max_tokens=4, temperature=0,
                extra_body={"palm": {"weights": HUMOR}})))
                for _ in range(3)]
            for t in threads:
                t.start()
            deadline = time.time() + 30
            while small.engine.waiting < 3 and time.time() < deadline:
                time.sleep(0.01)
        for t in threads:
            t.join(timeout=60)
        assert len(answers) == 3 and small.engine.largest_batch == 2
        assert len({a.choices[0].message.content for a in answers}) == 1
        status, body = small.request("POST", "/v1/completions", {"model": "palm", "prompt": ["a", "b"], "n": 2})
        assert status == 400 and body["error"]["param"] == "n" and "one batch holds (2)" in body["error"]["message"]
    finally:
        small.stop()
        small.live.close()


# --- hot swap ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_versions(registered, tmp_path_factory):
    """A copy of the registered project (its own MLflow store) with a second portfolio version,
    made by the real coverage and register stages at eps 0.3, delta 0.9 (fewer members: on the
    tiny project's 8 prompts a cover decision's margin is about 0.23, so delta 0.9 alone is not
    enough);
    production points at version 1 again. (root, keys, cfg, versions)."""
    from mlflow import MlflowClient

    from palm_tasks.params_yaml import load_config
    from palm_tasks.registry import portfolio_model_name
    from palm_tasks.stages import STAGES
    from palm_tasks.tracking import tracking_uri

    root = tmp_path_factory.mktemp("swap") / "project"
    shutil.copytree(registered[0], root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    first = load_config(root / "params.yaml")
    uri = tracking_uri(first, root)  # relocates the copied store's artifact paths
    v1 = MlflowClient(uri).get_model_version_by_alias(portfolio_model_name(first), "production").version
    params["coverage"].update(eps=0.3, delta=0.9)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cfg = load_config(root / "params.yaml")
    STAGES["coverage"].run(cfg, root)
    out = STAGES["register"].run(cfg, root)
    client = MlflowClient(uri)
    v2 = client.get_model_version_by_alias(portfolio_model_name(cfg), "production").version
    assert v2 != v1, out
    client.set_registered_model_alias(portfolio_model_name(cfg), "production", v1)
    return root, registered[1], cfg, (str(v1), str(v2))


def move(project, version) -> None:
    from mlflow import MlflowClient

    from palm_tasks.registry import portfolio_model_name
    from palm_tasks.tracking import tracking_uri

    root, _, cfg, _ = project
    MlflowClient(tracking_uri(cfg, root)).set_registered_model_alias(portfolio_model_name(cfg), "production", version)


def test_production_moving_twice_under_load_fails_no_request(two_versions, tmp_path):
    v1, v2 = two_versions[3]
    s = serve(two_versions, tmp_path)
    records, stop, lock = [], threading.Event(), threading.Lock()

    def client(c):
        rng = np.random.default_rng(c)
        while not stop.is_set():
            w = dict(zip(["safety", "humor", "brevity"], map(float, rng.dirichlet(np.ones(3)))))
            sent = time.monotonic()
            status, body = s.request("POST", "/v1/chat/completions", {
                "model": "palm", "messages": PROMPT, "max_tokens": 6, "palm": {"weights": w}})
            with lock:
                records.append((sent, status, (body or {}).get("palm", {}).get("portfolio_version"),
                                (body or {}).get("model")))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    switched = []
    try:
        assert s.live.current.version == v1
        time.sleep(0.5)
        for version in (v2, v1):
            move(two_versions, version)
            asked = time.monotonic()
            status, out = s.request("POST", "/v1/portfolio/reload")
            switched.append((asked, time.monotonic(), version))
            assert status == 200 and out["changed"] is True and out["portfolio_version"] == version, out
            time.sleep(0.5)
        assert s.request("POST", "/v1/portfolio/reload")[1]["changed"] is False
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        s.stop()
    failed = [r for r in records if r[1] != 200]
    assert len(records) >= 24 and failed == []
    # Between a reload's answer and the next reload's request, every request is answered by the
    # version it moved to (one sent while the next reload runs may already get the next one).
    for (_, done, version), following in zip(switched, switched[1:] + [(float("inf"), None, None)]):
        after = [r for r in records if done <= r[0] < following[0]]
        assert after and {r[2] for r in after} == {version}  # every request sent after the switch
    assert {r[2] for r in records} == {v1, v2}
    s.live.close()


def test_retired_adapters_are_deleted_and_loaded_again_on_rollback(two_versions, tmp_path, monkeypatch):
    import palm_tasks.serve.live as live_module

    monkeypatch.setattr(live_module, "RETIRE_GRACE_S", 0.0)
    v1, v2 = two_versions[3]
    live = live_portfolio(two_versions)
    try:
        first = set(live.current.adapters.values())
        assert live.models.loaded == first
        move(two_versions, v2)
        out = live.reload()
        second = set(live.current.adapters.values())
        assert out["changed"] and second < first  # version 2: one member of version 1
        time.sleep(0.01)
        assert live.reload()["changed"] is False
        assert live.models.loaded == second  # the retired members' adapters are gone
        move(two_versions, v1)
        assert live.reload()["portfolio_version"] == v1 and live.models.loaded == first
        prompt = live.models.encode_chat(PROMPT)
        for key, name in live.current.adapters.items():  # reloaded adapters answer
            assert live.engine.complete(name, [prompt], Sampling(max_tokens=3))[0].completion_tokens >= 1
    finally:
        move(two_versions, v1)
        live.close()


def test_the_server_polls_the_registry(two_versions, tmp_path):
    v1, v2 = two_versions[3]
    s = serve(two_versions, tmp_path)
    s.live.poll(0.2)
    try:
        move(two_versions, v2)
        deadline = time.time() + 30
        while s.request("GET", "/health")[1]["portfolio_version"] != v2 and time.time() < deadline:
            time.sleep(0.05)
        health = s.request("GET", "/health")[1]
        assert health["portfolio_version"] == v2 and health["reloads"] == 1 and health["last_reload_error"] is None
        answer = s.client.chat.completions.create(model="palm", messages=PROMPT, max_tokens=2)
        assert answer.model_extra["palm"]["portfolio_version"] == v2
        assert [m.id for m in s.client.models.list().data][1:] == \
            [f"palm-member-{k}" for k in s.live.current.adapters]
    finally:
        move(two_versions, v1)
        s.stop()
        s.live.close()


def test_a_failed_reload_keeps_serving(two_versions, tmp_path):
    """The alias moved to a version whose member adapter is damaged: the reload is refused with
    the reason, the current portfolio goes on answering, /health says what failed."""
    v1, v2 = two_versions[3]
    s = serve(two_versions, tmp_path)
    source = s.live.source
    move(two_versions, v2)
    v2_key = RegistrySource("production", source.tracking_uri, source.model_name, two_versions[0]).load()[0] \
        .members[0].key
    damaged = next((two_versions[0] / "models" / "members" / v2_key / "adapter").glob("*.safetensors"))
    saved = damaged.read_bytes()
    try:
        damaged.write_bytes(saved[:-10])
        status, body = s.request("POST", "/v1/portfolio/reload")
        assert status == 503 and f"still serving version {v1}" in body["error"]["message"], body
        assert v2_key in body["error"]["message"] and s.request("GET", "/health")[1]["last_reload_error"]
        assert s.client.chat.completions.create(model="palm", messages=PROMPT, max_tokens=2) \
            .model_extra["palm"]["portfolio_version"] == v1
    finally:
        damaged.write_bytes(saved)
        move(two_versions, v1)
        s.stop()
        s.live.close()


def test_the_prefix_cache_keeps_the_most_recent_within_its_bound():
    import torch

    from palm_tasks.serve.prefixes import BLOCK, PrefixCache

    def states(n):  # one layer, 1 x 1 head x n tokens x 4: 32 n bytes
        return [(torch.zeros(1, 1, n, 4), torch.ones(1, 1, n, 4))]

    cache = PrefixCache(max_bytes=32 * 2 * BLOCK * 2)  # room for two prompts of 2 blocks
    a, b, c = ([x] * (2 * BLOCK) for x in (1, 2, 3))
    for prompt in (a, b):
        cache.store("m", prompt, states(2 * BLOCK))
    assert cache.longest("m", a + [9])[1] == 2 * BLOCK  # a is now the most recent
    assert cache.longest("m", a[:BLOCK] + [5] * BLOCK)[1] == BLOCK  # its first block, for another prompt
    assert cache.longest("other", a + [9]) == (None, 0)  # another adapter: nothing known
    cache.store("m", c, states(2 * BLOCK))  # over the bound: b, the least recently used, goes
    assert cache.longest("m", b + [9]) == (None, 0) and cache.longest("m", c + [9])[1] == 2 * BLOCK
    assert cache.bytes <= cache.max_bytes and cache.longest("m", a)[1] == BLOCK  # the last token is computed


def test_an_adapter_the_stacked_step_cannot_batch_is_refused_naming_its_layer(tiny_model, tmp_path):
    """A DoRA adapter (palm never trains one) is refused when loaded, naming a layer and the kind,
    instead of being batched as plain LoRA; refused beside served adapters, it leaves them as they
    were: not loaded, and a mixed batch of the others still gives each row its own adapter."""
    import torch
    from peft import LoraConfig, get_peft_model

    from palm_tasks.llm.models import load_base
    from palm_tasks.serve.members import MemberModels

    def adapter(name, **config):
        torch.manual_seed(len(name))
        get_peft_model(load_base(tiny_model, "cpu"), LoraConfig(r=4, target_modules="all-linear", **config)
                       ).save_pretrained(tmp_path / name)
        return tmp_path / name

    refused = (r"^base_model\.model\..*: palm serve batches members whose adapters are plain LoRA on linear "
               r"layers .*not DoraLinearVariant$")
    with pytest.raises(ValueError, match=refused):
        MemberModels(tiny_model, {"dora": adapter("dora", use_dora=True)})

    models = MemberModels(tiny_model, {"a": adapter("a", init_lora_weights=False),
                                       "bb": adapter("bb", init_lora_weights=False)})
    ids = torch.tensor([[1, 5, 9, 13, 2]] * 2)
    with torch.no_grad():
        before = models.forward(["a", "bb"], input_ids=ids).logits
        with pytest.raises(ValueError, match=refused):
            models.load({"dora": tmp_path / "dora"})
        assert models.loaded == {"a", "bb"}
        after = models.forward(["a", "bb"], input_ids=ids).logits
        alone = [models.forward([name], input_ids=ids[:1]).logits[0] for name in ("a", "bb")]
    assert torch.equal(after, before) and not torch.allclose(after[0], after[1])
    for row in (0, 1):
        torch.testing.assert_close(after[row], alone[row], rtol=1e-5, atol=1e-5)
