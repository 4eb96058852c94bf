"""The OpenAI fields clients send, through the official `openai` client against a real uvicorn
server on loopback, over a portfolio registered by the real stages: `model` alone and the
default route, `user` and stored preferences, `n`, /v1/completions with echo and logprobs,
chat logprobs, stop, seed, usage, max_completion_tokens, penalties and logit_bias, streaming,
and unknown fields (ignored and logged)."""

import logging

import openai
import pytest
import torch

from palm_tasks.config import ServeConfig
from serving import HUMOR, PROMPT, serve

KEY = "sk-test-openai"
UNIFORM = {"safety": 1 / 3, "humor": 1 / 3, "brevity": 1 / 3}


@pytest.fixture(scope="module")
def served(registered, tmp_path_factory):
    s = serve(registered, tmp_path_factory.mktemp("openai"), api_key=KEY)
    yield s
    s.stop()
    s.live.close()


def member_logprobs(served, key: str, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) under member `key`, from one forward pass of the model itself."""
    models = served.live.models
    with served.engine.paused(), torch.no_grad():
        logits = models.model(input_ids=torch.tensor([ids]), adapter_names=[served.adapter(key)]).logits[0]
    return torch.log_softmax(logits.float(), -1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_model_alone_is_answered_by_the_documented_default_route(served):
    answer = served.client.chat.completions.create(model="palm", messages=PROMPT, max_tokens=4, temperature=0)
    palm = answer.model_extra["palm"]
    expected = served.router.route(UNIFORM).member_key
    assert answer.model == f"palm-member-{expected}"
    assert palm["source"] == "default" and palm["default_route"] == "uniform"
    assert palm["reason"] == "no weights and no user"
    assert palm["weights"] == pytest.approx(UNIFORM) and palm["opt_upper_bound"] >= palm["value"]
    assert answer.choices[0].message.content == served.answer(expected)


def test_the_other_default_routes(served, registered, tmp_path):
    """most_users: the member with the largest share of the population; none: refused, naming
    what to give."""
    most = serve(registered, tmp_path, ServeConfig(default_route="most_users"), live=served.live)
    none = serve(registered, tmp_path / "none", ServeConfig(default_route="none"), live=served.live)
    try:
        answer = most.client.chat.completions.create(model="palm", messages=PROMPT, max_tokens=2)
        top = max(served.router.members, key=lambda m: m.share)
        assert answer.model == f"palm-member-{top.key}"
        assert answer.model_extra["palm"]["default_route"] == "most_users"
        assert answer.model_extra["palm"]["share"] == top.share
        with pytest.raises(openai.BadRequestError) as caught:
            none.client.chat.completions.create(model="palm", messages=PROMPT, max_tokens=2)
        assert caught.value.body["param"] == "palm.weights" and "routes by weights" in caught.value.body["message"]
        with pytest.raises(openai.NotFoundError) as caught:
            none.client.chat.completions.create(model="palm", messages=PROMPT, max_tokens=2, user="nobody")
        assert caught.value.body["code"] == "user_not_found" and caught.value.body["param"] == "user"
    finally:
        most.stop()
        none.stop()


def test_user_preferences_route_every_later_request(served):
    client = served.client
    status, stored = served.request("PUT", "/v1/users/alice@example.com/preferences",
                                    {"weights": {"safety": 0, "humor": 2, "brevity": 0}})
    assert status == 200 and stored["weights"] == {"safety": 0, "humor": 1, "brevity": 0}
    assert stored["normalized"] is True and stored["route"]["member_key"] == served.keys[1]
    assert served.request("GET", "/v1/users/alice@example.com/preferences")[1]["weights"] == stored["weights"]

    answer = client.chat.completions.create(model="palm", messages=PROMPT, max_tokens=4, user="alice@example.com")
    palm = answer.model_extra["palm"]
    assert answer.model == f"palm-member-{served.keys[1]}" and palm["source"] == "user"
    assert palm["user"] == "alice@example.com" and palm["eps_at_w"] == served.router.route(HUMOR).eps_at_w
    completion = client.completions.create(model="palm", prompt="Once", max_tokens=2, user="alice@example.com")
    assert completion.model == f"palm-member-{served.keys[1]}"

    # precedence: explicit weights, then the stored user, then the default
    safety = {"safety": 1, "humor": 0, "brevity": 0}
    explicit = client.chat.completions.create(model="palm", messages=PROMPT, max_tokens=2, user="alice@example.com",
                                              extra_body={"palm": {"weights": safety}})
    assert explicit.model_extra["palm"]["source"] == "weights"
    assert explicit.model == f"palm-member-{served.router.route(safety).member_key}"
    unknown = client.chat.completions.create(model="palm", messages=PROMPT, max_tokens=2, user="bob")
    assert unknown.model_extra["palm"]["source"] == "default"
    assert unknown.model_extra["palm"]["reason"] == "no preferences stored for user 'bob'"

    assert served.request("DELETE", "/v1/users/alice@example.com/preferences") == \
        (200, {"user": "alice@example.com", "deleted": True})
    after = client.chat.completions.create(model="palm", messages=PROMPT, max_tokens=2, user="alice@example.com")
    assert after.model_extra["palm"]["source"] == "default"
    assert served.request("GET", "/v1/users/alice@example.com/preferences")[0] == 404


def test_n_answers_in_one_request(served):
    key = served.keys[0]
    common = dict(model=f"palm-member-{key}", messages=PROMPT, max_tokens=6, n=4)
    sampled = served.client.chat.completions.create(temperature=1.5, seed=11, logprobs=True, **common)
    assert [c.index for c in sampled.choices] == [0, 1, 2, 3]
    texts = [c.message.content for c in sampled.choices]
    assert len(set(texts)) > 1  # four draws, not one answer four times
    again = served.client.chat.completions.create(temperature=1.5, seed=11, **common)
    assert [c.message.content for c in again.choices] == texts  # the same seed, the same four
    prompt_tokens = len(served.live.models.encode_chat(PROMPT))
    assert sampled.usage.prompt_tokens == prompt_tokens  # the prompt once, as the OpenAI API counts it
    lengths = [len(c.logprobs.content) for c in sampled.choices]  # one entry per token drawn
    assert sampled.usage.completion_tokens == sum(lengths)
    assert all(n == 6 for n, c in zip(lengths, sampled.choices) if c.finish_reason == "length")
    assert all(n <= 6 for n in lengths)
    greedy = served.client.chat.completions.create(temperature=0, **common)
    assert {c.message.content for c in greedy.choices} == {served.answer(key, max_tokens=6)}


def test_completions_with_echo_and_logprobs(served):
    key = served.keys[2]
    # greedy: a sampled token may decode as another of the top 5 does, and the legacy format's
    # top_logprobs is a dict keyed by the text, so it would hold 4
    answer = served.client.completions.create(model=f"palm-member-{key}", prompt="Tell me a joke", max_tokens=4,
                                              logprobs=5, echo=True, temperature=0)
    choice = answer.choices[0]
    models = served.live.models
    prompt = models.encode_text("Tell me a joke")
    assert choice.text.startswith("Tell me a joke")
    lp = choice.logprobs
    n_prompt, n_answer = len(prompt), answer.usage.completion_tokens
    assert answer.usage.prompt_tokens == n_prompt
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n_prompt + n_answer
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.tokens[:n_prompt] == [models.decode([t]) for t in prompt]
    # the prompt's log-probabilities are the model's own, computed here in one forward pass
    assert lp.token_logprobs[1:n_prompt] == pytest.approx(member_logprobs(served, key, prompt).tolist(), abs=1e-4)
    for token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert value <= 0 and 5 <= len(top) <= 6 and top[token] == pytest.approx(value)
        assert max(top.values()) >= value
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0

    # 0 new tokens with echo: the prompt's likelihood only, as evaluation harnesses ask
    scored = served.client.completions.create(model=f"palm-member-{key}", prompt="Tell me a joke", max_tokens=0,
                                              logprobs=1, echo=True)
    assert scored.choices[0].text == "Tell me a joke" and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:n_prompt], abs=1e-5)


def test_completions_of_several_prompts_and_token_ids(served):
    key = served.keys[0]
    models = served.live.models
    answer = served.client.completions.create(model=f"palm-member-{key}", prompt=["Once upon", "The sea is"],
                                              max_tokens=3, n=2, temperature=0)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    assert answer.usage.prompt_tokens == len(models.encode_text("Once upon")) + len(models.encode_text("The sea is"))
    alone = served.client.completions.create(model=f"palm-member-{key}", prompt="The sea is", max_tokens=3,
                                             temperature=0)
    assert answer.choices[2].text == answer.choices[3].text == alone.choices[0].text  # greedy: prompt 2's answer
    as_ids = served.client.completions.create(model=f"palm-member-{key}", prompt=models.encode_text("The sea is"),
                                              max_tokens=3, temperature=0)
    assert as_ids.choices[0].text == alone.choices[0].text


def test_chat_logprobs_are_answered(served):
    key = served.keys[1]
    answer = served.client.chat.completions.create(model=f"palm-member-{key}", messages=PROMPT, max_tokens=5,
                                                   logprobs=True, top_logprobs=3, temperature=0)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens  # one entry per token, the end-of-turn included
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.bytes == list(entry.token.encode())
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy: the most likely token
    plain = served.client.chat.completions.create(model=f"palm-member-{key}", messages=PROMPT, max_tokens=5,
                                                  logprobs=True)
    assert [e.top_logprobs for e in plain.choices[0].logprobs.content] == [[]] * len(content)
    assert served.client.chat.completions.create(model=f"palm-member-{key}", messages=PROMPT,
                                                 max_tokens=5).choices[0].logprobs is None


def test_stop_strings_end_the_answer_streamed_or_not(served):
    key = served.keys[1]
    common = dict(model=f"palm-member-{key}", prompt="Tell me a joke", max_tokens=16, temperature=0)
    full = served.client.completions.create(**common).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert len(stop) == 3
    cut = served.client.completions.create(stop=[stop, "\x00never"], **common).choices[0]
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"
    streamed = list(served.client.completions.create(stop=stop, stream=True, **common))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.text
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "stop"


def test_max_completion_tokens_is_the_newer_name(served):
    common = dict(model=f"palm-member-{served.keys[1]}", messages=PROMPT, temperature=0)
    answer = served.client.chat.completions.create(max_completion_tokens=3, **common)
    assert answer.usage.completion_tokens <= 3
    both = served.client.chat.completions.create(max_completion_tokens=2, max_tokens=9, **common)
    assert both.usage.completion_tokens <= 2
    assert served.client.chat.completions.create(max_tokens=9, **common).usage.completion_tokens > 2


def test_penalties_and_logit_bias_change_the_answer(served):
    key = served.keys[1]
    models = served.live.models
    common = dict(model=f"palm-member-{key}", prompt="Tell me a joke", max_tokens=12, logprobs=0, temperature=0)
    plain = served.client.completions.create(**common).choices[0].logprobs.tokens
    assert len(set(plain)) < len(plain)  # this member repeats itself: a penalty has something to change
    penalized = served.client.completions.create(frequency_penalty=2, **common).choices[0].logprobs.tokens
    assert penalized != plain
    token = models.encode_text(" sea")[-1]
    biased = served.client.completions.create(logit_bias={str(token): 100}, **common).choices[0].logprobs.tokens
    assert biased == [models.decode([token])] * len(biased)


def test_streaming_gives_the_same_answers_in_pieces(served):
    key = served.keys[0]
    common = dict(model=f"palm-member-{key}", messages=PROMPT, max_tokens=8, n=2, temperature=1.0, seed=5)
    full = served.client.chat.completions.create(**common)
    chunks = list(served.client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                        **common))
    texts = {0: "", 1: ""}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    assert [texts[i].strip() for i in (0, 1)] == [c.message.content for c in full.choices]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[0].model_extra["palm"]["member_key"] == key

    completion = served.client.completions.create(model=f"palm-member-{key}", prompt="The sea", max_tokens=6,
                                                  echo=True, seed=2)
    streamed = list(served.client.completions.create(model=f"palm-member-{key}", prompt="The sea", max_tokens=6,
                                                     echo=True, stream=True, seed=2))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == completion.choices[0].text


def test_unknown_fields_are_ignored_and_logged(served):
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("palm").addHandler(handler)
    try:
        answer = served.client.chat.completions.create(
            model=f"palm-member-{served.keys[0]}", messages=PROMPT, max_tokens=2, temperature=0,
            extra_body={"frobnicate": True, "metadata": {"x": 1}})
    finally:
        logging.getLogger("palm").removeHandler(handler)
    assert answer.choices[0].message.content == served.answer(served.keys[0], max_tokens=2)
    assert any("'frobnicate'" in line and "'metadata'" in line and "ignored" in line for line in seen), seen
