"""Iterated rejection-sampling fine-tuning (RSFT): the CPU default alignment oracle.

One round: sample `samples_per_prompt` answers to every training prompt from the current
policy, keep each prompt's best answer under the scalarized reward w . r (the objective GRPO
optimizes with `reward_weights = w`, docs/theory.md 1), and fine-tune the LoRA adapter on the
kept (prompt, answer) pairs with TRL's SFTTrainer, the loss on the answer only. The next round
samples from the fine-tuned policy, so the adapter climbs w . r round after round (expert
iteration / ReST / RAFT); it stays near the base because it only ever imitates its own samples.

Why it is the CPU default: on SmolLM2-135M (2 cores, w = humor, 64 training prompts, 8 samples
at temperature 1, 2 epochs of LoRA r = 8 SFT at lr 2e-3 in batches of 8 per round), humor on 32
held-out prompts went 0.295 (base) -> 0.328 -> 0.373 -> 0.441 in 3 rounds, level with best-of-8
of the base (0.443), in 8.3 training minutes (SFT 105 s with TRL's loss, sampling and scoring
90 s a round): the sampling is batched generation without gradients and the SFT sees 64 short sequences, where a
GRPO step pays both for every group. benchmarks/oracle_methods.py measures both methods.

Round 1 can reuse the base model's sample pool (`first_round`), saving one sampling pass per job.
A job trains up to `rounds` rounds and stops sooner once its policy is not short of best-of-N at
w, tested after each round by the caller's `look` (palm_tasks/round_stop.py, docs/oracle.md).

With `checkpoints`, every finished round leaves its adapter and the rounds' figures there
(RoundCheckpoint), so a job killed mid-way resumes after its last finished round instead of
redoing them: a round's samples and SFT seeds are seed + round and each round's optimizer starts
afresh, so the resumed job trains the same adapter as one never stopped.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from palm_tasks.config import TrainingConfig
from palm_tasks.hashing import file_sha256
from palm_tasks.llm.models import (chat, common_args, generate, load_base, load_tokenizer, precision_of,
                                   tokens_counted)
from palm_tasks.llm.rewards import score_all
from palm_tasks.log import progress, warn

SAMPLE_BATCH = 128  # answers generated per forward pass (as evaluation.batch_size)


def best_by_weight(scores, weights, allowed=None) -> np.ndarray:
    """Index of each prompt's best answer under w . r, shape (P,): scores (P, N, d); ties: the first.
    allowed: (P, N) booleans, the answers that may be chosen; a prompt with none keeps index 0."""
    value = np.asarray(scores, float) @ np.asarray(weights, float)
    if allowed is not None:
        value = np.where(allowed, value, -np.inf)
    return np.argmax(value, axis=1)


def on_topic(prompts: list[str], completions: list[list[str]], min_relevance: float) -> np.ndarray | None:
    """(P, N) booleans: answers whose relevance (llm.validity.relevance, as the quality gate
    measures it) reaches min_relevance; None when min_relevance is 0 (every answer allowed).
    The same rule as schema.SamplePool.on_topic, which the best-of-N reference picks from."""
    if min_relevance <= 0:
        return None
    from palm_tasks.llm.validity import relevance

    n = len(completions[0]) if completions else 0
    flat = [a for answers in completions for a in answers]
    return (relevance([p for p in prompts for _ in range(n)], flat) >= min_relevance).reshape(len(prompts), n)


def lora_model(base_path: Path, t: TrainingConfig, device: str, seed: int, init_adapter: Path | None = None,
               precision: str | None = None):
    """The base model with a trainable LoRA adapter on `device`: a fresh one (r, alpha, dropout
    of `t`, every linear layer), or `init_adapter` to warm-start from."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    base = load_base(base_path, device, place=False, precision=precision)
    if init_adapter is not None:
        model = PeftModel.from_pretrained(base, init_adapter, is_trainable=True)
    else:
        torch.manual_seed(seed)  # LoRA's A matrices are random: reproducible per job
        model = get_peft_model(base, LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha,
                                                lora_dropout=t.lora_dropout, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    return model.to(device)


def sample(model, tokenizer, rewards, prompts: list[str], t: TrainingConfig, seed: int):
    """(completions (P lists of N), scores (P, N, d)): N = t.samples_per_prompt answers per prompt."""
    n = t.samples_per_prompt
    flat = [p for p in prompts for _ in range(n)]
    answers = generate(model, tokenizer, flat, t.max_completion_length, t.temperature, SAMPLE_BATCH, seed)
    scores = score_all(rewards, flat, answers)
    return [answers[i * n:(i + 1) * n] for i in range(len(prompts))], scores.reshape(len(prompts), n, -1)


def sft(model, tokenizer, pairs: list[tuple[str, str]], t: TrainingConfig, device: str, seed: int,
        work_dir: Path, answer_only_loss: bool = True) -> float | None:
    """Fine-tune the adapter of `model` in place on (prompt, answer) pairs; -> the last logged loss.
    answer_only_loss=False: TRL's own loss path (the same loss, slower; benchmarks/sft_loss.py)."""
    import datasets
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()  # five bars per round (tokenizing ...): the job logs rounds instead
    # Conversational prompt-completion rows: TRL renders the chat template and puts the loss on
    # the completion only (completion_only_loss defaults to True for this format).
    data = datasets.Dataset.from_list([{"prompt": chat(p), "completion": [{"role": "assistant", "content": a}]}
                                       for p, a in pairs])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' renames, not ours to fix
        args = SFTConfig(
            output_dir=str(work_dir),
            num_train_epochs=t.epochs,
            learning_rate=t.lr,
            per_device_train_batch_size=t.batch,
            **common_args(device, seed, precision_of(model)),
        )
        # model is already a PeftModel, so no peft_config: the same adapter keeps training
        trainer_class = answer_only_trainer() if answer_only_loss else SFTTrainer
        trainer = trainer_class(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # it prints every raw log dict
        bar = step_progress("SFT steps")
        trainer.add_callback(bar)
        try:
            trainer.train()
        finally:
            bar.close()  # also when the training fails: the bar is not left on the screen
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return float(losses[-1]) if losses else None


def step_progress(description: str):
    """A TrainerCallback showing the trainer's steps as a palm_tasks.log.steps bar (on a terminal
    only: each round's line says what its SFT took)."""
    from contextlib import ExitStack

    from transformers import TrainerCallback

    from palm_tasks.log import steps

    class StepProgress(TrainerCallback):
        def __init__(self):
            self.stack = ExitStack()

        def on_train_begin(self, args, state, control, **kwargs):
            self.advance = self.stack.enter_context(steps(state.max_steps, description, lines_from=None))

        def on_step_end(self, args, state, control, **kwargs):
            self.advance()

        def close(self):
            self.stack.close()

    return StepProgress()


@functools.cache
def answer_only_trainer():
    """TRL's SFTTrainer with a loss that sends only the answer's positions through the LM head.

    TRL's own loss projects every position (system prompt and question included) through the
    LM head in vocabulary chunks, and without Triton (on a CPU) those chunks took 43% of an SFT
    round on SmolLM2-135M. The answers are about a third of the positions, and one matrix
    product over them gives the same negative log-likelihood: the mean over the answer tokens,
    as TRL computes it. A default round went from 72.4 to 46.4 s on 2 cores
    (benchmarks/sft_loss.py). TRL's advice for a custom loss is to subclass and override
    compute_loss; its token-accuracy and entropy logs are dropped.
    """
    import torch
    import torch.nn.functional as F
    from trl import SFTTrainer

    class AnswerOnlyLossTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            causal_lm = self.accelerator.unwrap_model(model).get_base_model()
            backbone = getattr(causal_lm, causal_lm.base_model_prefix)  # the decoder, LoRA layers in it
            labels = inputs["labels"][:, 1:]
            answer = labels != -100
            features = {k: v for k, v in inputs.items() if k not in ("labels", "use_cache")}
            hidden = backbone(**features, use_cache=False).last_hidden_state[:, :-1]
            logits = causal_lm.get_output_embeddings()(hidden[answer]).float()
            tokens = answer.sum() if num_items_in_batch is None else num_items_in_batch
            loss = F.cross_entropy(logits, labels[answer], reduction="sum") / torch.as_tensor(tokens).clamp(min=1)
            return (loss, None) if return_outputs else loss

    return AnswerOnlyLossTrainer


ROUND_FILE = "round.json"  # a checkpoint's figures: the rounds so far and its adapter's sha256
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # what PEFT's save_pretrained writes


@dataclass(frozen=True)
class RoundCheckpoint:
    """The last finished round of a job, in `<checkpoints>/round-<r>/`: the adapter after it
    (PEFT's safetensors) and `round.json` (the history of rounds 1..r, the adapter's sha256).
    Written to a temporary directory and renamed, so a kill leaves the previous one whole; only
    the latest is kept."""

    round: int
    adapter: Path
    history: list[dict]

    @staticmethod
    def save(checkpoints: Path, model, history: list[dict]) -> None:
        r = history[-1]["round"]
        tmp = checkpoints / f".round-{r}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        (tmp / ROUND_FILE).write_text(json.dumps({"round": r, "history": history,
                                                  "adapter_sha256": file_sha256(tmp / ADAPTER_WEIGHTS)}))
        final = checkpoints / f"round-{r}"
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoints.glob("round-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def latest(checkpoints: Path) -> RoundCheckpoint | None:
        """The last finished round, or None (none yet, or a damaged one: warned, then removed)."""
        found = sorted(checkpoints.glob("round-*"), key=lambda p: int(p.name.split("-")[1])
                       if p.name.split("-")[1].isdigit() else -1)
        if not found:
            return None
        path = found[-1]
        try:
            record = json.loads((path / ROUND_FILE).read_text())
            if file_sha256(path / ADAPTER_WEIGHTS) != record["adapter_sha256"]:
                raise ValueError("its adapter does not match its checksum")
            history = record["history"]
            if not history or history[-1]["round"] != record["round"]:
                raise ValueError("its rounds do not end at its round")
            return RoundCheckpoint(int(record["round"]), path, history)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warn(f"rsft: the checkpoint {path} is damaged ({' '.join(str(exc).split())[:200]}); "
                 "the job starts again from round 1")
            shutil.rmtree(checkpoints, ignore_errors=True)
            return None


def _plain(value):
    """A round's figure as JSON can hold it (numpy scalars from the look)."""
    return value.item() if isinstance(value, np.generic) else value


def train_rsft(base_path: Path, rewards, train_prompts: list[str], weights: Sequence[float],
               t: TrainingConfig, device: str, seed: int, work_dir: Path,
               first_round=None, init_adapter: Path | None = None,
               on_log: Callable[[int, int, dict], None] | None = None, precision: str | None = None,
               look: Callable[[object, object, int], dict] | None = None,
               checkpoints: Path | None = None):
    """(policy, tokenizer, history) after up to `t.rounds` rounds of sample -> keep the best under w -> SFT.

    first_round: (completions, scores) of the base on train_prompts (P lists of N answers,
    scores (P, N, d)), used as round 1's samples unless warm-starting from `init_adapter`.
    t.min_relevance > 0: only answers at least that relevant to their prompt may be kept.
    history: one dict per round, also handed to on_log(round, t.rounds, dict): round, reward (mean
    w . r of the sampled answers), kept_reward (mean w . r of each prompt's kept answer), kept
    (pairs trained on), sample_seconds, sample_tokens (0 for the pool's round), sft_seconds, loss
    (last SFT step's; None if nothing kept).
    look(model, tokenizer, round) -> dict with `stop`: called after every round but the last
    (palm_tasks.round_stop); its figures join the round's dict, and `stop` ends the job there.
    checkpoints: a directory of this job's own (its key's) where each finished round is kept
    (RoundCheckpoint); a job started again resumes after the last one, its rounds' dicts (with
    `restored: true`) handed to on_log again.
    """
    w = np.asarray(weights, float)
    tokenizer = load_tokenizer(base_path)
    resumed = RoundCheckpoint.latest(checkpoints) if checkpoints is not None else None
    model = lora_model(base_path, t, device, seed, resumed.adapter if resumed else init_adapter, precision)
    history, first = [], 1
    if resumed:
        history, first = resumed.history, resumed.round + 1
        for log in history:
            log["restored"] = True
            if on_log:
                on_log(log["round"], t.rounds, log)
        if history[-1].get("stopped"):
            first = t.rounds + 1  # it had stopped there: nothing left to train
    left = range(first, t.rounds + 1)
    try:
        for r in progress(left, len(left), f"rsft rounds at w={np.round(w, 2).tolist()}") if left else ():
            started = time.time()
            if r == 1 and first_round is not None and init_adapter is None:
                completions, scores = first_round  # the base's samples: the round-1 policy is the base
                scores = np.asarray(scores, float)
                if scores.shape[0] != len(train_prompts) or len(completions) != len(train_prompts):
                    raise ValueError(f"first_round covers {scores.shape[0]} prompts, not the "
                                     f"{len(train_prompts)} training prompts")
                sampled_tokens = 0
            else:
                with tokens_counted() as count:
                    completions, scores = sample(model, tokenizer, rewards, train_prompts, t, seed + r)
                sampled_tokens = count.tokens
            sampled = time.time()
            allowed = on_topic(train_prompts, completions, t.min_relevance)
            best = best_by_weight(scores, w, allowed)
            value = scores @ w  # (P, N)
            kept = value[np.arange(len(best)), best]
            usable = kept > 0  # a best answer worth 0 under w teaches nothing but the answer itself
            if allowed is not None:  # the gate measures relevance: do not imitate answers off the topic
                usable &= allowed[np.arange(len(best)), best]
            pairs = [(p, completions[i][best[i]]) for i, p in enumerate(train_prompts) if usable[i]]
            loss = sft(model, tokenizer, pairs, t, device, seed + r, work_dir) if pairs else None
            log = {"round": r, "reward": float(value.mean()), "kept_reward": float(kept.mean()),
                   "kept": len(pairs), "sample_seconds": round(sampled - started, 2), "sample_tokens": sampled_tokens,
                   "sft_seconds": round(time.time() - sampled, 2), "loss": loss}
            stop = False
            if look is not None and r < t.rounds:
                verdict = look(model, tokenizer, r)
                stop = bool(verdict.pop("stop"))
                log.update({k: _plain(v) for k, v in verdict.items()}, stopped=stop)
            history.append(log)
            if checkpoints is not None:
                RoundCheckpoint.save(checkpoints, model, history)
            if on_log:
                on_log(r, t.rounds, log)
            if stop:
                break
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)  # TRL's pickled training_args: never kept
    return model, tokenizer, history
