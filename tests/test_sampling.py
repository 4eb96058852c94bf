"""The sampler every stage generates with (palm_tasks.llm.models.generate), on the tiny model.
Its decoding loop is our own (shared prompt cache, left padding, top-k draws), so it is checked
against the model itself: every step's logits must equal a plain forward pass over that answer's
prompt and the tokens drawn before it, one sequence at a time, without padding or cache."""

import pytest
import torch

from palm_tasks.llm import models
from palm_tasks.llm.models import TOP_K, chat, generate, load_base, load_tokenizer

# Prompts of different lengths, so that left padding and the positions under it matter.
PROMPTS = ["Tell me a joke.", "Why is the sky blue on a summer afternoon in the mountains?", "Hi"]


@pytest.mark.parametrize("copies", [1, 3], ids=["one answer per prompt", "three sharing a prompt cache"])
def test_every_step_matches_a_plain_forward_pass(tiny_model, monkeypatch, copies):
    model, tokenizer = load_base(tiny_model, "cpu"), load_tokenizer(tiny_model)
    steps = []  # (logits, drawn tokens) of every decoding step
    draw = models._draw

    def recording_draw(logits, temperature):
        token = draw(logits, temperature)
        steps.append((logits.clone(), token.clone()))
        return token

    monkeypatch.setattr(models, "_draw", recording_draw)
    flat = [p for p in PROMPTS for _ in range(copies)]
    answers = generate(model, tokenizer, flat, 5, 1.0, len(flat), 0)  # one batch
    assert len(answers) == len(flat) and len(steps) >= 2

    for row, prompt in enumerate(flat):
        text = tokenizer.apply_chat_template(chat(prompt), tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        for logits, tokens in steps:
            with torch.no_grad():
                plain = model(input_ids=ids[None]).logits[0, -1]
            torch.testing.assert_close(logits[row], plain, rtol=1e-4, atol=1e-4)
            ids = torch.cat([ids, tokens[row:row + 1]])


def test_sampling_is_reproducible_and_varies_with_the_seed(tiny_model):
    model, tokenizer = load_base(tiny_model, "cpu"), load_tokenizer(tiny_model)
    flat = [p for p in PROMPTS for _ in range(4)]
    first = generate(model, tokenizer, flat, 6, 1.0, 12, 0)
    assert generate(model, tokenizer, flat, 6, 1.0, 12, 0) == first
    assert generate(model, tokenizer, flat, 6, 1.0, 12, 1) != first
    assert len(set(first[:4])) > 1  # answers to one prompt differ from each other


def test_draw_keeps_the_top_k_tokens():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    allowed = torch.topk(logits, TOP_K, dim=-1).indices
    draws = torch.stack([models._draw(logits, 5.0) for _ in range(200)], dim=1)  # hot: spreads over the top k
    assert all(set(draws[i].tolist()) <= set(allowed[i].tolist()) for i in range(4))
    assert min(len(set(draws[i].tolist())) for i in range(4)) > 10


def test_an_answer_stops_at_eos(tiny_model, monkeypatch):
    model, tokenizer = load_base(tiny_model, "cpu"), load_tokenizer(tiny_model)
    eos = tokenizer.eos_token_id
    calls = []

    def eos_on_second_step(logits, temperature):  # every answer ends at its second token
        calls.append(1)
        return torch.full((len(logits),), eos if len(calls) == 2 else 5)

    monkeypatch.setattr(models, "_draw", eos_on_second_step)
    generate(model, tokenizer, PROMPTS, 8, 1.0, 8, 0)
    assert len(calls) == 2  # no forward passes after every answer has ended


def test_the_tokens_generated_are_counted_up_to_each_answers_end(tiny_model, monkeypatch):
    # every answer ends at its 4th token (EOS counted): 4 tokens each, or the cap where it is
    # lower; a nested counter counts them too, a closed one no more, and nothing outside counts
    model, tokenizer = load_base(tiny_model, "cpu"), load_tokenizer(tiny_model)
    eos = tokenizer.eos_token_id
    calls = []

    def eos_on_fourth_step(logits, temperature):
        calls.append(1)
        return torch.full((len(logits),), eos if len(calls) % 4 == 0 else 5)

    monkeypatch.setattr(models, "_draw", eos_on_fourth_step)
    prompts = [p for p in PROMPTS for _ in range(2)]
    with models.tokens_counted() as outer:
        with models.tokens_counted() as inner:
            generate(model, tokenizer, prompts, 8, 1.0, 8, 0)
        assert inner.tokens == outer.tokens == 4 * len(prompts)
        calls.clear()
        generate(model, tokenizer, prompts, 2, 1.0, 8, 0)
    assert inner.tokens == 4 * len(prompts) and outer.tokens == 6 * len(prompts)
    assert models._COUNTERS.get() == ()


def test_answers_that_end_leave_the_batch_and_the_others_go_on_unchanged(tiny_model, monkeypatch):
    """Two of four answers end at their first token: the later steps run on the other two rows
    only, and their logits are still those of a plain forward pass over each answer alone."""
    model, tokenizer = load_base(tiny_model, "cpu"), load_tokenizer(tiny_model)
    eos, draw, steps = tokenizer.eos_token_id, models._draw, []

    def first_two_end_at_once(logits, temperature):
        token = draw(logits, temperature)
        token[token == eos] = 5  # no answer ends by chance
        if not steps:
            token[:2] = eos
        steps.append((logits.clone(), token.clone()))
        return token

    monkeypatch.setattr(models, "_draw", first_two_end_at_once)
    prompts = [*PROMPTS, "Hello there, how are you?"]
    answers = generate(model, tokenizer, prompts, 5, 1.0, len(prompts), 0)
    assert answers[:2] == ["", ""]
    assert [len(logits) for logits, _ in steps] == [4, 2, 2, 2, 2]  # the ended rows left after step 1
    for answer, prompt in ((2, prompts[2]), (3, prompts[3])):
        text = tokenizer.apply_chat_template(chat(prompt), tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        start = len(ids)
        for step, (logits, tokens) in enumerate(steps):
            row = answer if step == 0 else answer - 2
            with torch.no_grad():
                plain = model(input_ids=ids[None]).logits[0, -1]
            torch.testing.assert_close(logits[row], plain, rtol=1e-4, atol=1e-4)
            ids = torch.cat([ids, tokens[row:row + 1]])
        assert answers[answer] == tokenizer.decode(ids[start:], skip_special_tokens=True).strip()


def test_a_policy_samples_with_its_adapter_merged_and_gets_its_weights_back_bit_for_bit(tiny_model):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(0)
    model = get_peft_model(load_base(tiny_model, "cpu"), LoraConfig(r=4, target_modules="all-linear",
                                                                    init_lora_weights=False)).eval()
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    before = [m.get_base_layer().weight.clone() for m in layers]
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        with models.adapter_merged(model):
            assert all(m.merged for m in layers)
            assert not torch.equal(layers[0].get_base_layer().weight, before[0])  # the product is in the weights
            merged = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    assert not any(m.merged for m in layers)
    assert all(torch.equal(m.get_base_layer().weight, w) for m, w in zip(layers, before))
    assert torch.equal(after, unmerged)
