"""RSFT (palm_tasks.llm.rsft) on the tiny model: rounds, the base's pool as round 1, warm start."""

import numpy as np
import pytest

from palm_tasks.config import TrainingConfig
from palm_tasks.llm import rsft
from palm_tasks.llm.rewards import BrevityReward

PROMPTS = ["Tell me a joke.", "What is the capital of France?", "Why is the sky blue?"]
W = (0.2, 0.8)
REWARDS = [BrevityReward(10), BrevityReward(30)]  # two cheap traits, so that w matters
# min_relevance 0: these made-up answers are on topic for nothing (the on-topic rule has its own test)
T = TrainingConfig(rounds=2, samples_per_prompt=2, epochs=1, batch_size=2, max_completion_length=4,
                   min_relevance=0.0)

# The base's pool: prompt 0's best under W is answer 1 (0.64 > 0.5 > 0.18); prompt 1 scores 0
# everywhere (skipped); prompt 2 ties, so answer 0 is kept.
POOL = ([["a b c", "d e f g", "h i j k l"], ["m n o", "p q r", "s t u"], ["v w x", "y z a", "b c d e"]],
        np.array([[[0.9, 0.0], [0.0, 0.8], [0.5, 0.5]],
                  [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
                  [[0.3, 0.3], [0.3, 0.3], [0.0, 0.0]]]))


def lora_weights(model) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def test_best_by_weight_ties_and_direction():
    assert rsft.best_by_weight(POOL[1], W).tolist() == [1, 0, 0]
    assert rsft.best_by_weight(POOL[1], (1.0, 0.0)).tolist() == [0, 0, 0]
    assert rsft.best_by_weight(POOL[1], (0.0, 1.0)).tolist() == [1, 0, 0]


def test_rounds_use_the_pool_first_then_sample(tiny_model, tmp_path, monkeypatch):
    pairs_seen, sampled, logged = [], [], []
    real_sft, real_sample = rsft.sft, rsft.sample

    def sft(model, tokenizer, pairs, *args):
        pairs_seen.append(pairs)
        return real_sft(model, tokenizer, pairs, *args)

    def sample(*args):
        sampled.append(args[-1])  # the seed
        return real_sample(*args)

    monkeypatch.setattr(rsft, "sft", sft)
    monkeypatch.setattr(rsft, "sample", sample)
    work = tmp_path / "trainer"
    model, _, history = rsft.train_rsft(tiny_model, REWARDS, PROMPTS, W, T, "cpu", 0, work,
                                        first_round=POOL, on_log=lambda *a: logged.append(a))

    assert [h["round"] for h in history] == [1, 2] and [a[:2] for a in logged] == [(1, 2), (2, 2)]
    # round 1 imitates the pool's best-by-w answers, the all-zero prompt skipped
    assert pairs_seen[0] == [(PROMPTS[0], "d e f g"), (PROMPTS[2], "v w x")]
    assert history[0]["kept"] == 2 and history[0]["kept_reward"] == pytest.approx((0.64 + 0 + 0.3) / 3)
    assert history[0]["reward"] == pytest.approx(float((POOL[1] @ np.array(W)).mean()))
    assert history[0]["loss"] > 0
    assert sampled == [2]  # only round 2 sampled, with a seed of its own
    assert history[1]["kept_reward"] >= history[1]["reward"]
    assert not work.exists()  # no TRL output (pickled args) left behind
    # the adapter trained: LoRA's B matrices start at zero
    assert any(v.abs().sum() > 0 for k, v in lora_weights(model).items() if "lora_B" in k)
    model.save_pretrained(tmp_path / "adapter")
    saved = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved
    assert not [n for n in saved if n.endswith((".bin", ".pt", ".pkl"))]  # no pickles


def test_warm_start_begins_at_the_given_adapter(tiny_model, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import torch

    t = T.model_copy(update={"rounds": 1})
    model, _, _ = rsft.train_rsft(tiny_model, REWARDS, PROMPTS, W, t, "cpu", 0, tmp_path / "w1", first_round=POOL)
    model.save_pretrained(tmp_path / "adapter")
    given = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in given.items() if "lora_B" in k)  # not a fresh adapter

    at_start, sampled = [], []
    real_sft, real_sample = rsft.sft, rsft.sample

    def sft(model, *args):
        at_start.append(lora_weights(model))
        return real_sft(model, *args)

    def sample(*args):
        sampled.append(1)
        completions, scores = real_sample(*args)
        return completions, scores + 0.5  # the noise model's answers may all score 0: SFT must run

    monkeypatch.setattr(rsft, "sft", sft)
    monkeypatch.setattr(rsft, "sample", sample)
    warm, _, history = rsft.train_rsft(tiny_model, REWARDS, PROMPTS, W, t, "cpu", 1, tmp_path / "w2",
                                       first_round=POOL, init_adapter=tmp_path / "adapter")
    assert sampled == [1]  # the base's pool is not the warm policy's: round 1 samples
    assert at_start[0].keys() == given.keys()
    assert all(torch.equal(at_start[0][k], given[k]) for k in given)
    # and it kept training that adapter
    assert any(not torch.equal(v, given[k]) for k, v in lora_weights(warm).items())
    assert history[0]["kept"] == len(PROMPTS)


def test_train_dispatches_by_method(monkeypatch):
    from palm_tasks.llm import train

    calls = []
    monkeypatch.setattr(rsft, "train_rsft", lambda *a, **k: calls.append(("rsft", k["first_round"])))
    monkeypatch.setattr(train, "train_grpo", lambda *a, **k: calls.append(("grpo", k["init_adapter"])))
    args = ("base", REWARDS, PROMPTS, W)
    train.train(*args, TrainingConfig(), "cpu", 0, "work", first_round=POOL)
    train.train(*args, TrainingConfig(method="grpo"), "cpu", 0, "work", init_adapter="a")
    assert calls == [("rsft", POOL), ("grpo", "a")]
    assert TrainingConfig().lr == 2e-3 and TrainingConfig(method="grpo").lr == 1e-3
    assert TrainingConfig().batch == 8 and TrainingConfig(method="grpo").batch == 4


def test_grpo_warm_start(tiny_model, tmp_path):
    from palm_tasks.llm.train import train_grpo

    t = T.model_copy(update={"rounds": 1})
    model, _, _ = rsft.train_rsft(tiny_model, REWARDS, PROMPTS, W, t, "cpu", 0, tmp_path / "w1", first_round=POOL)
    model.save_pretrained(tmp_path / "adapter")
    given = lora_weights(model)
    g = TrainingConfig(method="grpo", steps=1, batch_size=2, num_generations=2, max_completion_length=4,
                       beta=0.1)  # beta > 0: TRL adds a "ref" copy of the adapter, which must not stay
    warm, _, _ = train_grpo(tiny_model, REWARDS, PROMPTS, W, g, "cpu", 0, tmp_path / "g",
                            init_adapter=tmp_path / "adapter")
    assert list(warm.peft_config) == ["default"] and lora_weights(warm).keys() == given.keys()
    assert not (tmp_path / "g").exists()


def test_min_relevance_keeps_only_on_topic_answers():
    allowed = np.array([[True, False, True], [False, False, False], [True, True, True]])
    # prompt 0's best under W (answer 1) is not allowed: the best allowed one (answer 2) is chosen
    assert rsft.best_by_weight(POOL[1], W, allowed).tolist() == [2, 0, 0]
    assert rsft.on_topic(PROMPTS, [["x"]] * 3, 0.0) is None  # 0: every answer may be kept
    answers = [["Paris is the capital of France.", "I like turtles and bananas very much."]]
    on = rsft.on_topic(["What is the capital of France?"], answers, 0.4)
    assert on.tolist() == [[True, False]]


def test_answer_only_loss_is_trls_loss(tiny_model, tmp_path):
    """The SFT loss that projects only the answer's positions is TRL's loss (the mean negative
    log-likelihood of the answer tokens) with the same gradients, on a batch TRL built."""
    import datasets
    import torch
    from trl import SFTConfig, SFTTrainer

    from palm_tasks.llm.models import chat, common_args, load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    model = rsft.lora_model(tiny_model, T, "cpu", 0)
    for name, p in model.named_parameters():  # B starts at 0: make the adapter's gradients all matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    data = datasets.Dataset.from_list([{"prompt": chat(p), "completion": [{"role": "assistant", "content": a}]}
                                       for p, a in zip(PROMPTS, ["a b c d e", "Paris.", "Light scatters."])])
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, **common_args("cpu", 0))
    trainer = rsft.answer_only_trainer()(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()  # prompt masked, answer not

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute(trainer, model, dict(batch))
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    ours, ours_grads = loss_and_grads(type(trainer).compute_loss)
    trls, trls_grads = loss_and_grads(SFTTrainer.compute_loss)
    assert ours > 0 and ours == pytest.approx(trls, rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(ours_grads, trls_grads))


def test_rounds_go_on_only_while_the_policy_is_short_of_the_evidence(tiny_model, tmp_path):
    # The real test after each round (palm_tasks.round_stop) on the tiny model's answers: against
    # evidence no answer can reach (w . r = 1 on every prompt) the policy is shown short after
    # every round, so all three run, looked at after rounds 1 and 2 only; against evidence every
    # answer reaches (0) it is not short after round 1, and the job stops there.
    from palm_tasks.config import EvaluationConfig
    from palm_tasks.round_stop import RoundStop

    ev = EvaluationConfig(n_prompts=3, chunk_prompts=3, min_prompts=3, samples_per_prompt=2, max_new_tokens=4,
                          batch_size=8)
    t = T.model_copy(update={"rounds": 3})
    looked = []

    def stop(evidence):
        real = RoundStop(PROMPTS, np.full(len(PROMPTS), evidence), np.array(W), 0.05, tuple(REWARDS), ev, 0)

        def look(model, tokenizer, round_):
            looked.append(round_)
            return real(model, tokenizer, round_)
        return look

    _, _, history = rsft.train_rsft(tiny_model, REWARDS, PROMPTS, W, t, "cpu", 0, tmp_path / "a",
                                    first_round=POOL, look=stop(1.0))
    assert [h["round"] for h in history] == [1, 2, 3] and looked == [1, 2]
    assert [h["stopped"] for h in history[:2]] == [False, False] and "stopped" not in history[2]
    assert all(h["look_upper"] < 0 and h["look_evidence"] == 1.0 for h in history[:2])

    looked.clear()
    _, _, history = rsft.train_rsft(tiny_model, REWARDS, PROMPTS, W, t, "cpu", 0, tmp_path / "b",
                                    first_round=POOL, look=stop(0.0))
    assert [h["round"] for h in history] == [1] and looked == [1] and history[0]["stopped"] is True
    assert history[0]["look_upper"] >= 0 and history[0]["look_seconds"] > 0


def test_a_job_stopped_mid_way_resumes_after_its_last_finished_round(tiny_model, tmp_path, monkeypatch):
    # Each finished round leaves its adapter and figures in the job's checkpoint directory. A job
    # stopped after round 2 (here by its on_log raising, as a kill would stop it) resumes at
    # round 3: rounds 1 and 2 are not trained again, their figures come back, and the adapter it
    # ends with is the one an uninterrupted job trains. A damaged checkpoint starts it over.
    import torch

    real_sample = rsft.sample
    sampled = []

    def sample(*args):
        sampled.append(args[-1])  # the round's seed
        completions, scores = real_sample(*args)
        return completions, scores + 0.5  # the noise model's answers may all score 0: SFT must run

    monkeypatch.setattr(rsft, "sample", sample)
    t = T.model_copy(update={"rounds": 3})

    def train(name, on_log=None):
        return rsft.train_rsft(tiny_model, REWARDS, PROMPTS, W, t, "cpu", 0, tmp_path / f"work-{name}",
                               first_round=POOL, on_log=on_log, checkpoints=tmp_path / name)

    whole, _, whole_history = train("whole")
    assert sampled == [2, 3] and [p.name for p in (tmp_path / "whole").iterdir()] == ["round-3"]

    class Killed(Exception):
        pass

    def killed_after_round_2(r, total, log):
        if r == 2:
            raise Killed

    sampled.clear()
    with pytest.raises(Killed):
        train("stopped", killed_after_round_2)
    assert sampled == [2] and [p.name for p in (tmp_path / "stopped").iterdir()] == ["round-2"]
    before = lora_weights(rsft.lora_model(tiny_model, t, "cpu", 0, tmp_path / "stopped" / "round-2"))

    sampled.clear()
    logged = []
    resumed, _, history = train("stopped", lambda *a: logged.append((a[0], a[2].get("restored", False))))
    assert sampled == [3]  # only round 3 ran
    assert logged == [(1, True), (2, True), (3, False)]
    assert [h["round"] for h in history] == [1, 2, 3]
    assert [h["kept_reward"] for h in history] == [h["kept_reward"] for h in whole_history]
    after, expected = lora_weights(resumed), lora_weights(whole)
    assert any(not torch.equal(after[k], before[k]) for k in after)  # round 3 trained the restored adapter
    assert all(torch.equal(after[k], expected[k]) for k in expected)  # as if never stopped

    # a damaged checkpoint is not trusted: the job starts again from round 1
    weights = tmp_path / "stopped" / "round-3" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    sampled.clear()
    _, _, history = train("stopped")
    assert sampled == [2, 3] and [h.get("restored", False) for h in history] == [False] * 3
