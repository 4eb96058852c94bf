"""One alignment job: GRPO with `reward_weights = w` on a LoRA adapter, then its value vector.

A job is fully determined by its `JobSpec` (base model identity, traits and reward versions, w,
training and evaluation settings, prompt data, seed); its key is the hash of that spec. The job
writes `models/members/<key>/`:

    adapter/            the LoRA adapter (adapter_model.safetensors + adapter_config.json)
    member.json         spec, value vector with standard errors, training summary
    completions.jsonl   the evaluation responses and their per-trait rewards
    checksums.json      sha256 of every file above, checked on load

Everything is written to a temporary directory first and renamed into place when complete,
so a directory under members/ with a valid checksum file is a finished job, and a finished job
is never trained again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from palm_tasks.config import PalmConfig

MEMBER_FILE = "member.json"
CHECKSUMS = "checksums.json"
ADAPTER_DIR = "adapter"


class CorruptMemberError(RuntimeError):
    """A member directory exists but its files do not match its checksums."""


@dataclass(frozen=True)
class JobSpec:
    """Everything that determines an alignment job's result; its hash is the job key."""

    traits: tuple[str, ...]
    weights: tuple[float, ...]
    base_model_sha256: str
    reward_versions: tuple[str, ...]
    data_sha256: str
    training: dict = field(hash=False)
    evaluation: dict = field(hash=False)
    seed: int = 0

    @property
    def key(self) -> str:
        payload = asdict(self)
        payload["weights"] = [round(float(x), 9) for x in self.weights]
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class Member:
    """A finished job as read back from disk."""

    key: str
    path: Path
    traits: list[str]
    weights: np.ndarray
    values: np.ndarray
    std_errors: np.ndarray
    info: dict

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER_DIR


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_checksums(directory: Path) -> None:
    sums = {
        str(p.relative_to(directory)): file_sha256(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != CHECKSUMS
    }
    (directory / CHECKSUMS).write_text(json.dumps(sums, indent=2))


def store_member(tmp: Path, final: Path, info: dict, prompts, completions, scores) -> None:
    """Finish a member (or soup) directory written under `tmp`: its completions, member.json and
    checksums, then one rename into `final`, so a reader sees a whole member or none."""
    with open(tmp / "completions.jsonl", "w") as fh:
        for p, c, s in zip(prompts, completions, scores):
            fh.write(json.dumps({"prompt": p, "completion": c,
                                 "rewards": dict(zip(info["traits"], s.round(6).tolist()))}) + "\n")
    (tmp / MEMBER_FILE).write_text(json.dumps(info, indent=2))
    _write_checksums(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def load_member(path: Path, verify: bool = True) -> Member:
    """Read a finished member; `CorruptMemberError` names the member and the bad file."""
    path = Path(path)
    sums_path = path / CHECKSUMS
    if not sums_path.is_file():
        raise CorruptMemberError(f"member {path.name}: {CHECKSUMS} missing (unfinished or damaged job)")
    sums = json.loads(sums_path.read_text())
    if verify:
        for rel, digest in sums.items():
            f = path / rel
            if not f.is_file():
                raise CorruptMemberError(f"member {path.name}: {rel} is missing")
            if file_sha256(f) != digest:
                raise CorruptMemberError(f"member {path.name}: {rel} does not match its checksum")
    info = json.loads((path / MEMBER_FILE).read_text())
    return Member(
        key=info["key"], path=path, traits=info["traits"],
        weights=np.asarray(info["weights"], float), values=np.asarray(info["values"], float),
        std_errors=np.asarray(info["std_errors"], float), info=info,
    )


def find_member(members_dir: Path, key: str, redo: str = "it will be trained again") -> Member | None:
    """The finished member with this key, or None. A damaged one is removed so it is redone."""
    path = Path(members_dir) / key
    if not path.is_dir():
        return None
    try:
        return load_member(path)
    except CorruptMemberError as exc:
        print(f"warning: {exc}; {redo}")
        shutil.rmtree(path)
        return None


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for in params.yaml but torch sees no CUDA device")
    return device


def load_policy(base_path: Path, adapter_dir: Path, device: str):
    """(model, tokenizer): the base model with a LoRA adapter on `device` (a resolved one), in the
    dtype its jobs train and evaluate in (bf16 on CUDA when supported, else fp32), so a member
    evaluated again later (a soup, a retraining run) is scored like it was the first time."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16 if bf16 else torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).to(device), tokenizer


def _completion_text(completion) -> str:
    # TRL passes conversational completions as [{"role": "assistant", "content": ...}].
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return completion


def _prompt_text(prompt) -> str:
    if isinstance(prompt, list):
        return prompt[-1]["content"] if prompt else ""
    return prompt


def trl_reward_funcs(rewards) -> list:
    """Wrap our rewards in TRL's reward-function signature, one function per trait."""
    from palm_tasks.rewards import score_all

    def make(reward):
        def fn(prompts, completions, **_):
            texts = [_completion_text(c) for c in completions]
            asked = [_prompt_text(p) for p in prompts]
            return score_all([reward], asked, texts)[:, 0].tolist()

        fn.__name__ = reward.name  # TRL logs rewards/<name>/mean under this name
        return fn

    return [make(r) for r in rewards]


def _chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float,
             batch_size: int, seed: int) -> list[str]:
    """Sampled chat responses, batched with left padding, reproducible for a seed."""
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    out = []
    model.eval()
    for i in range(0, len(prompts), batch_size):
        chats = [
            tokenizer.apply_chat_template(_chat(p), tokenize=False, add_generation_prompt=True)
            for p in prompts[i : i + batch_size]
        ]
        enc = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            ids = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                pad_token_id=tokenizer.pad_token_id,
            )
        out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [t.strip() for t in out]


def value_vector(rewards, prompts: list[str], completions: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and standard error of each normalized reward; also the per-response scores."""
    from palm_tasks.rewards import score_all

    scores = score_all(rewards, prompts, completions)
    n = len(completions)
    se = scores.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(scores.shape[1])
    return scores.mean(axis=0), se, scores


def evaluate(model, tokenizer, rewards, eval_prompts: list[str], cfg: PalmConfig):
    """The value vector of a policy on the evaluation prompts (samples_per_prompt each)."""
    ev = cfg.evaluation
    prompts = [p for p in eval_prompts[: ev.n_prompts] for _ in range(ev.samples_per_prompt)]
    completions = generate(model, tokenizer, prompts, ev.max_new_tokens, ev.temperature,
                           ev.batch_size, cfg.seed)
    values, se, scores = value_vector(rewards, prompts, completions)
    return values, se, prompts, completions, scores


def training_callback(key: str, client=None, run_id: str | None = None):
    """A TrainerCallback printing one short line per step and logging the curves to MLflow."""
    from transformers import TrainerCallback

    class TrainingLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "reward" in logs:
                print(f"  {key} step {state.global_step}/{state.max_steps} "
                      f"reward {float(logs['reward']):.3f}", flush=True)
            metrics = {k.replace("/", "."): float(v) for k, v in logs.items()
                       if isinstance(v, (int, float)) and np.isfinite(v)}
            if client is not None and metrics:
                client.log_batch(run_id, metrics=[_metric(k, v, state.global_step)
                                                  for k, v in metrics.items()])

    return TrainingLog()


def _metric(key, value, step):
    from mlflow.entities import Metric

    return Metric(key, value, int(time.time() * 1000), step)


def train_member(spec: JobSpec, cfg: PalmConfig, base_path: Path, rewards, train_prompts: list[str],
                 eval_prompts: list[str], members_dir: Path, mlflow_client=None,
                 experiment_id: str | None = None) -> Member:
    """Run one alignment job and write its member directory atomically."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    key = spec.key
    final = Path(members_dir) / key
    tmp = Path(members_dir) / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    device = resolve_device(cfg.device)
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    t = cfg.training
    run_id = None
    if mlflow_client is not None:
        from palm_tasks.tracking import lineage_tags

        _close_killed_runs(mlflow_client, experiment_id, key)
        run = mlflow_client.create_run(
            experiment_id, run_name=f"align-{key[:10]}",
            tags={"palm.stage": "align", "palm.member_key": key, **lineage_tags(members_dir)},
        )
        run_id = run.info.run_id
        params = {f"w.{tr}": round(w, 6) for tr, w in zip(spec.traits, spec.weights)}
        params.update({f"training.{k}": v for k, v in spec.training.items()})
        params.update({f"evaluation.{k}": v for k, v in spec.evaluation.items()})
        params.update({"key": key, "seed": spec.seed, "device": device, "bf16": bf16,
                       "base_model_sha256": spec.base_model_sha256[:16], "data_sha256": spec.data_sha256[:16]})
        mlflow_client.log_batch(run_id, params=[_param(k, v) for k, v in params.items()])

    started = time.time()
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(
            base_path, dtype=torch.bfloat16 if bf16 else torch.float32
        )
        args = GRPOConfig(
            output_dir=str(tmp / "trainer"),
            max_steps=t.steps,
            learning_rate=t.learning_rate,
            per_device_train_batch_size=t.batch_size,
            num_generations=t.num_generations,
            max_completion_length=t.max_completion_length,
            temperature=t.temperature,
            beta=t.beta,
            reward_weights=[float(w) for w in spec.weights],
            use_cpu=device == "cpu",
            bf16=bf16,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=spec.seed,
            data_seed=spec.seed,
            disable_tqdm=True,  # training_callback prints one line per step instead
            gradient_checkpointing=False,  # small models: memory is not the constraint, time is
        )
        dataset = Dataset.from_dict({"prompt": [_chat(p) for p in train_prompts]})
        lora = LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = GRPOTrainer(
            model=model, reward_funcs=trl_reward_funcs(rewards), args=args,
            train_dataset=dataset, processing_class=tokenizer, peft_config=lora,
            callbacks=[training_callback(key, mlflow_client, run_id)],
        )
        trainer.remove_callback(PrinterCallback)  # it prints every raw log dict
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers' renames, not ours to fix
            trainer.train()
        train_seconds = time.time() - started
        history = [h for h in trainer.state.log_history if "reward" in h]

        policy = trainer.model
        policy.save_pretrained(tmp / ADAPTER_DIR)  # adapter_model.safetensors + adapter_config.json
        shutil.rmtree(tmp / "trainer", ignore_errors=True)  # TRL's pickled training_args: never kept

        values, se, prompts, completions, scores = evaluate(policy, tokenizer, rewards, eval_prompts, cfg)
        info = {
            "key": key,
            "traits": list(spec.traits),
            "weights": [float(w) for w in spec.weights],
            "values": values.tolist(),
            "std_errors": se.tolist(),
            "n_eval": len(completions),
            "job": asdict(spec),
            "device": device,
            "train_seconds": round(train_seconds, 2),
            "total_seconds": round(time.time() - started, 2),
            "final_reward": history[-1]["reward"] if history else None,
            "mlflow_run_id": run_id,
            "worker": {"host": socket.gethostname(), "pid": os.getpid()},
        }
        store_member(tmp, final, info, prompts, completions, scores)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if mlflow_client is not None and run_id:
            mlflow_client.set_terminated(run_id, status="FAILED")
        raise
    if mlflow_client is not None:
        metrics = {f"value.{tr}": v for tr, v in zip(spec.traits, values)}
        metrics.update({f"se.{tr}": s for tr, s in zip(spec.traits, se)})
        metrics.update({"train_seconds": info["train_seconds"], "total_seconds": info["total_seconds"]})
        mlflow_client.log_batch(run_id, metrics=[_metric(k, float(v), t.steps) for k, v in metrics.items()])
        mlflow_client.log_artifact(run_id, str(final / MEMBER_FILE))
        mlflow_client.set_terminated(run_id)
    return load_member(final)


def _close_killed_runs(client, experiment_id: str, key: str) -> None:
    """Mark this job's runs still RUNNING as KILLED: no finished member exists, so they belong
    to a run of the pipeline that was killed mid-job (their process never closed them)."""
    for run in client.search_runs(
        [experiment_id], f"tags.`palm.member_key` = '{key}' and attributes.status = 'RUNNING'"
    ):
        client.set_terminated(run.info.run_id, status="KILLED")


def _param(key, value):
    from mlflow.entities import Param

    return Param(key, str(value)[:6000])
