"""The alignment oracle of docs/theory.md 1: a LoRA adapter trained for the scalarized reward w . r.

`train` is the entry point; `training.method` picks how:
- rsft (palm_tasks.llm.rsft): iterated rejection-sampling fine-tuning, the CPU default;
- grpo: TRL's GRPOTrainer with one reward function per trait and `reward_weights = w`, which
  optimizes exactly w . r (with group normalization only the direction of w matters).
Both return the trained model; storing it, evaluating it and tracking it are the job's business
(palm_tasks.jobs).
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from palm_tasks.config import TrainingConfig
from palm_tasks.llm.models import chat, common_args, load_base, load_tokenizer
from palm_tasks.llm.rewards import score_all


def _text(message) -> str:
    # TRL passes conversational prompts and completions as [{"role": ..., "content": ...}].
    if isinstance(message, list):
        return message[-1]["content"] if message else ""
    return message


def trl_reward_funcs(rewards) -> list:
    """Our rewards in TRL's reward-function signature, one function per trait."""

    def make(reward):
        def fn(prompts, completions, **_):
            return score_all([reward], [_text(p) for p in prompts],
                             [_text(c) for c in completions])[:, 0].tolist()

        fn.__name__ = reward.name  # TRL logs rewards/<name>/mean under this name
        return fn

    return [make(r) for r in rewards]


def log_callback(on_log: Callable[[int, int, dict], None]):
    """A TrainerCallback handing every log dict to on_log(step, max_steps, logs)."""
    from transformers import TrainerCallback

    class OnLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            on_log(state.global_step, state.max_steps, logs or {})

    return OnLog()


def train(base_path: Path, rewards, train_prompts: list[str], weights: Sequence[float],
          t: TrainingConfig, device: str, seed: int, work_dir: Path, first_round=None,
          init_adapter: Path | None = None, on_log: Callable[[int, int, dict], None] | None = None,
          precision: str | None = None, look=None, checkpoints: Path | None = None):
    """(policy, tokenizer, history) trained for w . r by `t.method`, sampling and training in
    `precision` (llm.models.load_base; None: what `auto` gives on `device`). look: rsft's test
    after each round (palm_tasks.round_stop; grpo takes none).

    first_round: the base's (completions, scores (P, N, d)) on train_prompts, which rsft uses as
    its first round's samples (grpo samples online and ignores it). init_adapter: a LoRA adapter
    directory to warm-start from instead of a fresh adapter. checkpoints: rsft keeps each
    finished round there and resumes after the last one (llm.rsft.RoundCheckpoint); a GRPO job
    killed mid-way starts again.
    """
    if t.method == "rsft":
        from palm_tasks.llm.rsft import train_rsft

        return train_rsft(base_path, rewards, train_prompts, weights, t, device, seed, work_dir,
                          first_round=first_round, init_adapter=init_adapter, on_log=on_log,
                          precision=precision, look=look, checkpoints=checkpoints)
    return train_grpo(base_path, rewards, train_prompts, weights, t, device, seed, work_dir,
                      init_adapter=init_adapter, on_log=on_log, precision=precision)


def train_grpo(base_path: Path, rewards, train_prompts: list[str], weights: Sequence[float],
               t: TrainingConfig, device: str, seed: int, work_dir: Path,
               init_adapter: Path | None = None, on_log: Callable[[int, int, dict], None] | None = None,
               precision: str | None = None):
    """(policy, tokenizer, reward history) after `t.steps` GRPO steps at weights w, from a fresh
    LoRA adapter or from `init_adapter` (warm start)."""
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = load_tokenizer(base_path)
    model = load_base(base_path, device, place=False, precision=precision)  # the trainer places it
    args = GRPOConfig(
        output_dir=str(work_dir),
        max_steps=t.steps,
        learning_rate=t.lr,
        per_device_train_batch_size=t.batch,
        num_generations=t.num_generations,
        max_completion_length=t.max_completion_length,
        temperature=t.temperature,
        beta=t.beta,
        reward_weights=[float(w) for w in weights],
        **common_args(device, seed, precision),
    )
    lora = None
    if init_adapter is not None:
        # A PeftModel and no peft_config: TRL trains the adapter it is given
        model = PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
    else:
        lora = LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                          target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(
        model=model, reward_funcs=trl_reward_funcs(rewards), args=args,
        train_dataset=Dataset.from_dict({"prompt": [chat(p) for p in train_prompts]}),
        processing_class=tokenizer, peft_config=lora,
        callbacks=[log_callback(on_log)] if on_log else [],
    )
    trainer.remove_callback(PrinterCallback)  # it prints every raw log dict
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' renames, not ours to fix
        trainer.train()
    shutil.rmtree(work_dir, ignore_errors=True)  # TRL's pickled training_args: never kept
    if "ref" in trainer.model.peft_config:
        # beta > 0 with a given adapter: TRL added a frozen copy as the KL reference; not ours to save
        trainer.model.delete_adapter("ref")
    history = [h for h in trainer.state.log_history if "reward" in h]
    return trainer.model, tokenizer, history
