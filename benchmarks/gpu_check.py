"""The CUDA/bf16 path on SmolLM2-135M, and the GPU figures: sampling speed, the time of a GRPO job
at GPU-scale settings and of an rsft job, and each job's shortfall against best-of-8 of the base
at its own weight. Writes --out (JSON) and prints the table.

On a GPU machine this runs through benchmarks/gpu_check.sh (docs/gpu.md says how to send it to
the device: wheels and the model split over two calls). On a CPU it runs as a smoke test of the
same code at small sizes:
    python benchmarks/gpu_check.py --device cpu --quick

What it does, in order (each step prints one line):
1. torch, CUDA, the device and bf16 support; the pipeline's own choice (models.resolve_device,
   resolve_precision, the TRL arguments of common_args) must agree with them;
2. SmolLM2-135M converted as the pipeline converts it, loaded in the pipeline's dtype (bf16 on a
   GPU that supports it), a parameter dtype check;
3. the sample pool: --best-of answers to each of --eval-prompts chatterbot questions (the
   traits brevity and sentiment: rewards with no model to download, so the check needs no MiniLM
   or classifier), answers per second, best-of-N at the job weight;
4. one GRPO job (TRL GRPOTrainer, bf16) at GPU-scale settings, one rsft job, each evaluated on the
   eval prompts (value ± se) with its shortfall against best-of-N and the seconds it took;
5. peak GPU memory.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "benchmarks" / "results" / "gpu_check.json"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
TRAITS = ["brevity", "sentiment"]


def say(text: str) -> None:
    print(text, flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the code on a CPU")
    p.add_argument("--train-prompts", type=int, default=64)
    p.add_argument("--eval-prompts", type=int, default=384)
    p.add_argument("--best-of", type=int, default=8)
    p.add_argument("--grpo-steps", type=int, default=200, help="GPU scale (docs/evaluation.md)")
    p.add_argument("--weights", type=float, nargs=2, default=[0.5, 0.5], help="the jobs' w over brevity, sentiment")
    p.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / ".cache")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.train_prompts, args.eval_prompts, args.best_of, args.grpo_steps = 8, 16, 4, 2

    import numpy as np
    import torch

    from palm_tasks.config import EvaluationConfig, TrainingConfig
    from palm_tasks.core.evidence import best_of_n, scalar
    from palm_tasks.llm.base_model import prepare_base_model, resolve_base_model
    from palm_tasks.llm.models import (common_args, generate, load_base, load_tokenizer, resolve_device,
                                       resolve_precision)
    from palm_tasks.llm.prompts import chatterbot_questions
    from palm_tasks.llm.rewards import build_rewards, score_all
    from palm_tasks.llm.train import train
    from palm_tasks.llm.value import evaluate

    out = {"date": datetime.date.today().isoformat(), "machine": platform.machine(), "quick": args.quick,
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                    text=True).stdout.strip() or None}
    # 1. the device and the pipeline's choice of it
    device = resolve_device(args.device)
    cuda = torch.cuda.is_available()
    env = {"torch": torch.__version__, "cuda_available": cuda, "device": device,
           "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
           "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
           "pipeline_bf16": resolve_precision("auto", device) == "bf16"}
    precision = resolve_precision("auto", device)
    trl_args = common_args(device, 0, precision)
    assert device != "cuda" or env["pipeline_bf16"] == env["bf16_supported"], env
    assert trl_args["bf16"] == env["pipeline_bf16"] and trl_args["use_cpu"] == (device == "cpu"), trl_args
    out["environment"] = env
    say(f"1. torch {env['torch']}, device {device} ({env['device_name']}), bf16 {env['pipeline_bf16']}")
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    # 2. the base model, converted and loaded as the pipeline does
    started = time.perf_counter()
    info = prepare_base_model("smollm2", args.workdir / "base")
    base = resolve_base_model(args.workdir / "base")
    model, tokenizer = load_base(base, device, precision=precision), load_tokenizer(base)
    dtype = next(model.parameters()).dtype
    assert dtype == (torch.bfloat16 if env["pipeline_bf16"] and device == "cuda" else torch.float32), dtype
    out["base"] = {"name": info["name"], "dtype": str(dtype), "seconds": round(time.perf_counter() - started, 1)}
    say(f"2. {info['name']} loaded in {dtype} ({out['base']['seconds']} s with the conversion)")

    # 3. prompts, rewards, the sample pool and best-of-N
    questions = list(dict.fromkeys(q for _, q in chatterbot_questions() if len(q) <= 200))
    order = np.random.default_rng(0).permutation(len(questions))
    need = args.train_prompts + args.eval_prompts
    if need > len(questions):
        raise SystemExit(f"--train-prompts + --eval-prompts = {need}: chatterbot has {len(questions)} questions")
    train_prompts = [questions[i] for i in order[:args.train_prompts]]
    eval_prompts = [questions[i] for i in order[args.train_prompts:need]]
    rewards = build_rewards(TRAITS, reward_dir=args.workdir)
    batch = 512 if device == "cuda" else 128
    w = np.asarray(args.weights, float)

    def pool(prompts):
        flat = [q for q in prompts for _ in range(args.best_of)]
        t0 = time.perf_counter()
        answers = generate(model, tokenizer, flat, 24, 1.0, batch, 0)
        seconds = time.perf_counter() - t0
        scores = score_all(rewards, flat, answers).reshape(len(prompts), args.best_of, -1)
        return answers, scores, seconds

    answers, eval_scores, seconds = pool(eval_prompts)
    bon_mean, _, bon_se = best_of_n(eval_scores, w[None])
    bon = float(scalar(w[None], bon_mean)[0])
    out["sample_pool"] = {"answers": len(answers), "seconds": round(seconds, 1),
                          "answers_per_second": round(len(answers) / seconds, 1), "batch": batch,
                          "best_of": args.best_of, "best_of_n_value": round(bon, 4), "best_of_n_se": round(float(bon_se[0]), 4),
                          "base_mean_value": round(float((eval_scores @ w).mean()), 4)}
    say(f"3. sample pool: {len(answers)} answers in {seconds:.1f} s ({len(answers) / seconds:.1f}/s); "
        f"best-of-{args.best_of} at w = {w.tolist()}: {bon:.4f} ± {bon_se[0]:.4f}")
    train_answers, train_scores, _ = pool(train_prompts)
    first_round = ([train_answers[i * args.best_of:(i + 1) * args.best_of] for i in range(len(train_prompts))],
                   train_scores)
    model = None  # free the base model before training (pool() reads it through its closure)
    if cuda:
        torch.cuda.empty_cache()

    # 4. one job per method, each evaluated and checked against best-of-N
    ev = EvaluationConfig(n_prompts=args.eval_prompts, batch_size=batch)
    methods = {
        "grpo": TrainingConfig(method="grpo", steps=args.grpo_steps, num_generations=8,
                               batch_size=32 if not args.quick else 8, min_relevance=0.0),
        "rsft": TrainingConfig(method="rsft", rounds=3 if not args.quick else 1, min_relevance=0.0),
    }
    out["jobs"] = {}
    for name, t in methods.items():
        work = args.workdir / f"gpu_check_{name}"
        shutil.rmtree(work, ignore_errors=True)
        t0 = time.perf_counter()
        policy, tok, history = train(base, rewards, train_prompts, w, t, device, 0, work,
                                     first_round=first_round if name == "rsft" else None, precision=precision)
        trained = time.perf_counter() - t0
        value, *_ = evaluate(policy, tok, rewards, eval_prompts, ev, 0)
        total = time.perf_counter() - t0
        own = float(w @ value.mean)
        own_se = float(w @ value.se)
        shortfall = bon - own
        se = float(np.hypot(own_se, bon_se[0]))
        out["jobs"][name] = {"settings": {k: v for k, v in t.model_dump().items()
                                          if k in ("method", "steps", "rounds", "num_generations", "batch_size",
                                                   "max_completion_length", "learning_rate")},
                             "train_seconds": round(trained, 1), "job_seconds": round(total, 1),
                             "value": dict(zip(TRAITS, np.round(value.mean, 4).tolist())),
                             "se": dict(zip(TRAITS, np.round(value.se, 4).tolist())),
                             "value_at_w": round(own, 4), "shortfall_vs_best_of_n": round(shortfall, 4),
                             "shortfall_se": round(se, 4), "beaten_beyond_2_se": bool(shortfall > 2 * se),
                             "history_points": len(history)}
        say(f"4. {name}: {total:.1f} s a job ({trained:.1f} s training); w . value {own:.4f} ± {own_se:.4f}, "
            f"best-of-{args.best_of} {bon:.4f}: short by {shortfall:+.4f} ± {se:.4f}")
        del policy
        if cuda:
            torch.cuda.empty_cache()

    # 5. memory
    out["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None
    say(f"5. peak GPU memory: {out['peak_gpu_memory_gib']} GiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
