"""The pipeline's alignment job against a plain TRL GRPO script doing the same work; writes
benchmarks/results/align.json.

Run from the repository root:  python benchmarks/align_bench.py [--models tiny smollm2] [--reps 3]

Both sides train the same base model on the same prompts with the same rewards, weights, steps,
GRPO and LoRA settings, and save the adapter. The pipeline side is `palm_tasks.jobs.run_job`
(job key, MLflow run with per-step curves, atomic write with checksums, and the value-vector
evaluation a plain script does not do: timed apart). Each measurement is a fresh process (the
peak resident memory, ru_maxrss, is per process), the two sides alternate, and the median of
`--reps` runs is reported. Projects (converted base model, prompts, humor classifier) are
prepared once under --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "benchmarks" / "results" / "align.json"
WEIGHTS = [0.5, 0.25, 0.25]
STEPS = {"tiny": 16, "smollm2": 8}  # SmolLM2 takes ~5 s a step on 2 cores

for _var, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                     "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(_var, _value)


def prepare(model: str, workdir: Path) -> Path:
    """A project for `model` whose rewards stage has run (done once, then reused)."""
    import yaml

    from palm_tasks.params_yaml import load_config
    from palm_tasks.llm.base_model import build_tiny_model
    from palm_tasks.stages import STAGES

    root = workdir / model
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["base_model"] = str(build_tiny_model(workdir / "tiny-model")) if model == "tiny" else "smollm2"
    params["training"]["steps"] = STEPS[model]
    params["training"]["method"] = "grpo"  # the plain side is a GRPO script: compare like with like
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if not (root / "metrics" / "rewards.json").is_file():
        STAGES["rewards"].run(load_config(root / "params.yaml"), root)
    return root


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def completion_tokens(history: list[dict], completions_per_step: int) -> float:
    """Completion tokens sampled during training, from TRL's per-step mean completion length."""
    return sum(h["completions/mean_length"] * completions_per_step for h in history
               if "completions/mean_length" in h)


def first_job_config(cfg):
    """The job each process runs first, untimed for the main figures: 1 step, 2 eval prompts.
    It pays what a process pays once (lazy imports, the MLflow store, reward models), as the
    first job of a pipeline run does; the job measured next is any later one."""
    return cfg.model_copy(update={"training": cfg.training.model_copy(update={"steps": 1}),
                                  "evaluation": cfg.evaluation.model_copy(update={"n_prompts": 2})})


def one_pipeline(root: Path) -> dict:
    """Alignment jobs as the pipeline runs them (palm_tasks.jobs.run_job)."""
    import mlflow
    import trl  # noqa: F401  (both sides import the libraries before the clock starts)

    from palm_tasks.params_yaml import load_config
    from palm_tasks.jobs import Job, JobContext, run_job
    from palm_tasks.llm import value

    evaluate, evals = value.evaluate, []

    def timed_evaluate(*args, **kwargs):
        t, c = time.perf_counter(), time.process_time()
        out = evaluate(*args, **kwargs)
        evals.append((time.perf_counter() - t, time.process_time() - c))
        return out

    value.evaluate = timed_evaluate

    def job(cfg) -> dict:
        key = JobContext(cfg, root).spec(WEIGHTS).key
        shutil.rmtree(root / "models" / "members" / key, ignore_errors=True)  # so it trains again
        evals.clear()
        t, c = time.perf_counter(), time.process_time()
        policy = run_job(cfg, root, Job.train(WEIGHTS))
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        history = mlflow.MlflowClient().get_metric_history(policy.training["mlflow_run_id"],
                                                           "completions.mean_length")
        tokens = completion_tokens([{"completions/mean_length": m.value} for m in history],
                                   cfg.training.batch_size)
        return {"wall_s": wall, "cpu_s": cpu, "train_phase_s": policy.training["train_seconds"],
                "eval_s": evals[0][0], "eval_cpu_s": evals[0][1], "completion_tokens": tokens,
                "device": policy.training["device"]}

    cfg = load_config(root / "params.yaml")
    first = job(first_job_config(cfg))
    return {**job(cfg), "peak_rss_mib": peak_rss_mib(), "first_job": first}


def one_plain(root: Path) -> dict:
    """The same jobs as a plain TRL script: load, GRPOTrainer with LoRA, train, save the adapter."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from palm_tasks.llm.base_model import resolve_base_model
    from palm_tasks.params_yaml import load_config
    from palm_tasks.llm.prompts import read_prompts
    from palm_tasks.llm.rewards import build_rewards

    cfg = load_config(root / "params.yaml")
    base = resolve_base_model(root / "models" / "base")  # the converted SmolLM2, or the tiny model's dir
    prompts = read_prompts(root / "data" / "prompts" / "train.jsonl")
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    bf16 = cuda and torch.cuda.is_bf16_supported()

    def reward_func(reward):
        def f(prompts, completions, **_):
            return reward([p[-1]["content"] for p in prompts], [c[-1]["content"] for c in completions]).tolist()

        f.__name__ = reward.name
        return f

    def job(t) -> dict:
        out = Path(tempfile.mkdtemp(prefix="plain-grpo-"))
        start, start_cpu = time.perf_counter(), time.process_time()
        rewards = build_rewards(cfg.traits, root / "models" / "rewards", cfg.rewards.brevity_max_words,
                                brevity_full_words=cfg.rewards.brevity_full_words)
        tokenizer = AutoTokenizer.from_pretrained(base)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16 if bf16 else torch.float32)
        args = GRPOConfig(
            output_dir=str(out), max_steps=t.steps, learning_rate=t.lr,
            per_device_train_batch_size=t.batch_size, num_generations=t.num_generations,
            max_completion_length=t.max_completion_length, temperature=t.temperature, beta=t.beta,
            reward_weights=WEIGHTS, use_cpu=not cuda, bf16=bf16, logging_steps=1, save_strategy="no",
            report_to="none", seed=cfg.seed, data_seed=cfg.seed, gradient_checkpointing=False,
        )
        trainer = GRPOTrainer(
            model=model, reward_funcs=[reward_func(r) for r in rewards], args=args,
            train_dataset=Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]}),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                                   target_modules="all-linear", task_type="CAUSAL_LM"),
        )
        trainer.train()
        train_phase = time.perf_counter() - start
        trainer.model.save_pretrained(out / "adapter")
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        shutil.rmtree(out)
        return {"wall_s": wall, "cpu_s": cpu, "train_phase_s": train_phase,
                "completion_tokens": completion_tokens(trainer.state.log_history, t.batch_size),
                "device": "cuda" if cuda else "cpu"}

    first = job(first_job_config(cfg).training)
    return {**job(cfg.training), "peak_rss_mib": peak_rss_mib(), "first_job": first}


def measure(side: str, root: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--one", side, "--root", str(root)],
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"{side} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], float)}
    med["tokens_per_s"] = statistics.median(r["completion_tokens"] / r["train_phase_s"] for r in runs)
    return {k: round(v, 3) for k, v in med.items()}


def bench(model: str, reps: int, workdir: Path) -> dict:
    root = prepare(model, workdir)
    from palm_tasks.params_yaml import load_config

    cfg = load_config(root / "params.yaml")
    runs = {"pipeline": [], "plain": []}
    for i in range(reps):
        for side in (("pipeline", "plain") if i % 2 == 0 else ("plain", "pipeline")):
            r = measure(side, root)
            print(f"{model} {side} rep {i}: " + ", ".join(f"{k}={v:.2f}" for k, v in r.items()
                                                       if isinstance(v, float)), flush=True)
            runs[side].append(r)
    pipe, plain = summarize(runs["pipeline"]), summarize(runs["plain"])
    without_eval = statistics.median(r["wall_s"] - r["eval_s"] for r in runs["pipeline"])
    cpu_without_eval = statistics.median(r["cpu_s"] - r["eval_cpu_s"] for r in runs["pipeline"])
    first_pipe = statistics.median(r["first_job"]["wall_s"] - r["first_job"]["eval_s"] for r in runs["pipeline"])
    first_plain = statistics.median(r["first_job"]["wall_s"] for r in runs["plain"])
    first_pipe_cpu = statistics.median(r["first_job"]["cpu_s"] - r["first_job"]["eval_cpu_s"]
                                       for r in runs["pipeline"])
    first_plain_cpu = statistics.median(r["first_job"]["cpu_s"] for r in runs["plain"])
    return {
        "model": model, "base_model": cfg.base_model if model == "smollm2" else "tiny 2-layer Llama (tests)",
        "device": runs["pipeline"][0]["device"], "weights": WEIGHTS, "steps": cfg.training.steps,
        "training": cfg.training.model_dump(), "evaluation": cfg.evaluation.model_dump(),
        "reps": reps, "pipeline": pipe, "plain_trl": plain,
        "pipeline_job_without_eval_s": round(without_eval, 3),
        "pipeline_job_without_eval_cpu_s": round(cpu_without_eval, 3),
        "overhead_pct": {
            # load + GRPOTrainer set-up + train: the same span on both sides
            "train_phase": round(100 * (pipe["train_phase_s"] / plain["train_phase_s"] - 1), 1),
            # everything but the value-vector evaluation (key, MLflow, save, checksums, rename)
            "job_without_eval": round(100 * (without_eval / plain["wall_s"] - 1), 1),
            # the whole job, evaluation included, which the plain script does not do
            "whole_job": round(100 * (pipe["wall_s"] / plain["wall_s"] - 1), 1),
            # CPU time of the process (all threads): what contention from other work distorts least
            "job_without_eval_cpu": round(100 * (cpu_without_eval / plain["cpu_s"] - 1), 1),
            "whole_job_cpu": round(100 * (pipe["cpu_s"] / plain["cpu_s"] - 1), 1),
        },
        # the first job of a process (1 step), without its evaluation: what a process pays once
        "first_job_without_eval": {"pipeline_s": round(first_pipe, 3), "plain_s": round(first_plain, 3),
                                   "pipeline_cpu_s": round(first_pipe_cpu, 3),
                                   "plain_cpu_s": round(first_plain_cpu, 3)},
        "runs": runs,
    }


def write(results: dict, torch_version: str, trl_version: str) -> None:
    out = {
        "what": "the pipeline's alignment job (palm_tasks.jobs.run_job) vs a plain TRL GRPO script, "
                "same model, prompts, rewards, weights, steps, GRPO and LoRA settings; medians of "
                "fresh-process runs, the two sides alternating",
        "measures": {
            "wall_s": "the job, in a process that already ran a 1-step job (as any job after the "
                      "first of a pipeline run): pipeline run_job (incl. evaluation); plain "
                      "rewards+load+train+save",
            "cpu_s": "CPU time of the process (user + system, all threads) over the same span as wall_s",
            "train_phase_s": "model load + GRPOTrainer set-up + training, the same span on both sides",
            "eval_s": "pipeline only: the value vector (sampling the eval prompts and scoring them)",
            "tokens_per_s": "completion tokens sampled during training / train_phase_s",
            "peak_rss_mib": "peak resident memory of the process (getrusage ru_maxrss), imports and "
                            "reward models included",
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch_version, "trl": trl_version,
                    "note": "a shared machine: other work ran beside the benchmark (1-minute load "
                            "averages before and after each model are in its results)"},
        "gpu": "not measured: no GPU machine was lent to this session; on one, run the same "
               "command (device: auto picks CUDA + bf16)",
        "results": sorted(results.values(), key=lambda r: r["model"] != "tiny"),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {OUT}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=sorted(STEPS))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "palm-align-bench")
    p.add_argument("--one", choices=["pipeline", "plain"], help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        result = (one_pipeline if args.one == "pipeline" else one_plain)(args.root)
        print(json.dumps({k: (float(v) if isinstance(v, (int, float)) else v) for k, v in result.items()}))
        return

    import torch
    import trl

    for model in args.models:  # each model's figures are written as soon as they are measured
        load_before = os.getloadavg()
        result = bench(model, args.reps, args.workdir)
        result["load_average_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
        old = json.loads(OUT.read_text())["results"] if OUT.is_file() else []
        write({r["model"]: r for r in old} | {model: result}, torch.__version__, trl.__version__)
        r = result
        print(f"{model}: pipeline {r['pipeline']['wall_s']:.1f}s (eval {r['pipeline']['eval_s']:.1f}s), "
              f"plain {r['plain_trl']['wall_s']:.1f}s; overhead {r['overhead_pct']}; tokens/s "
              f"{r['pipeline']['tokens_per_s']:.1f} vs {r['plain_trl']['tokens_per_s']:.1f}; peak RSS "
              f"{r['pipeline']['peak_rss_mib']:.0f} vs {r['plain_trl']['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
