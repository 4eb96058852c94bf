"""fp32 against bf16 on this machine: sampling tokens/s, SFT seconds per step, and whether the
values a policy is measured at stay the same. Writes benchmarks/results/precision.json and prints
the table (docs/precision.md).

Run from the repository root after `make run` (it reads the run's base model, reward models and
prompts), on an otherwise idle machine:
    python benchmarks/precision.py [--project .] [--prompts 128] [--repeats 2]

1. Sampling: the project's sampler (llm.models.generate) on the base model, `--answers` answers to
   each of 32 evaluation prompts, 24 new tokens at most, in fp32, under bf16 autocast over fp32
   weights (what the pipeline does on a CPU, params.yaml precision), and with the weights cast to
   bf16 (for reference: it cannot train). Tokens are the answers' tokens; the best of --repeats.
2. SFT: one rsft SFT pass (llm.rsft.sft, the project's TrainingConfig) on the base's answers to
   the 64 training prompts, fp32 against bf16 (the trainer's CPU autocast), seconds per step.
3. Values: the base measured as the pipeline measures a policy (llm.value.answer_chunk: the
   evaluation sampler, `evaluation.samples_per_prompt` answers to each of --prompts evaluation
   prompts, the same seed) in fp32 and in bf16; per trait the paired difference of the
   per-prompt means, with its se and a 95% interval. bf16 is kept where every interval holds 0
   or lies within +-0.01 (a tenth of the default eps).
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "benchmarks" / "results" / "precision.json"
for _var, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_var, _value)


def best_seconds(run, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - started)
    return best, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", type=Path, default=REPO, help="a project after `make run` (its models/ and data/)")
    p.add_argument("--answers", type=int, default=4, help="sampling: answers per prompt (32 prompts)")
    p.add_argument("--prompts", type=int, default=128, help="values: evaluation prompts measured")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)

    import torch

    from palm_tasks.llm.base_model import resolve_base_model
    from palm_tasks.llm.models import cpu_has_bf16, generate, load_base, load_tokenizer
    from palm_tasks.llm.prompts import read_prompts
    from palm_tasks.llm.rewards import project_rewards
    from palm_tasks.llm.rsft import lora_model, sft
    from palm_tasks.llm.value import answer_chunk
    from palm_tasks.params_yaml import load_config
    from palm_tasks.paths import Paths

    cfg = load_config(args.project / "params.yaml")
    paths = Paths(args.project)
    base = resolve_base_model(paths.base)
    tokenizer = load_tokenizer(base)
    eval_prompts = read_prompts(paths.prompts / "eval.jsonl")
    train_prompts = read_prompts(paths.prompts / "train.jsonl")
    rewards = project_rewards(cfg, args.project, "cpu")
    models = {"fp32": load_base(base, "cpu"), "bf16": load_base(base, "cpu", precision="bf16")}
    result = {"date": datetime.date.today().isoformat(),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True).stdout.strip() or None,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"torch threads {torch.get_num_threads()}",
              "cpu_has_bf16": cpu_has_bf16(), "torch": torch.__version__, "model": "SmolLM2-135M-Instruct"}

    # 1. sampling
    flat = [q for q in eval_prompts[:32] for _ in range(args.answers)]
    weights_bf16 = load_base(base, "cpu").to(torch.bfloat16)
    samplers = {"fp32": models["fp32"], "bf16 autocast (fp32 weights; the pipeline)": models["bf16"],
                "bf16 weights (reference; cannot train)": weights_bf16}
    rows = []
    for name, model in samplers.items():
        seconds, answers = best_seconds(lambda m=model: generate(m, tokenizer, flat, 24, 1.0, 128, 0), args.repeats)
        tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
        rows.append({"sampler": name, "seconds": round(seconds, 2), "answers": len(flat), "tokens": tokens,
                     "tokens_per_second": round(tokens / seconds, 1)})
        print(f"sampling {name:44s} {seconds:6.1f} s  {tokens / seconds:6.1f} tokens/s", flush=True)
    del weights_bf16
    base_speed = rows[0]["tokens_per_second"]
    for row in rows:
        row["speedup"] = round(row["tokens_per_second"] / base_speed, 2)
    result["sampling"] = rows

    # 2. SFT seconds per step on the base's answers to the training prompts
    t = cfg.training
    answers = generate(models["fp32"], tokenizer, train_prompts, t.max_completion_length, 1.0, 128, 0)
    pairs = [(q, a) for q, a in zip(train_prompts, answers) if a]
    steps = -(-len(pairs) // t.batch) * t.epochs
    result["sft"] = []
    for precision in ("fp32", "bf16"):
        def one_pass(precision=precision):
            model = lora_model(base, t, "cpu", 0, precision=precision)
            with tempfile.TemporaryDirectory() as work:  # the trainer's output_dir, not kept
                return sft(model, tokenizer, pairs, t, "cpu", 0, Path(work))
        seconds, loss = best_seconds(one_pass, args.repeats)
        result["sft"].append({"precision": precision, "pairs": len(pairs), "steps": steps,
                              "seconds": round(seconds, 2), "seconds_per_step": round(seconds / steps, 3),
                              "last_loss": loss})
        print(f"sft {precision}: {seconds:.1f} s for {steps} steps ({seconds / steps:.3f} s/step), "
              f"last loss {loss:.3f}", flush=True)
    result["sft_speedup"] = round(result["sft"][0]["seconds"] / result["sft"][1]["seconds"], 2)

    # 3. values: the base measured in fp32 and in bf16, paired by prompt
    ev = cfg.evaluation
    prompts = eval_prompts[:args.prompts]
    per_prompt = {}
    for precision, model in models.items():
        started = time.perf_counter()
        answers = answer_chunk(model, tokenizer, rewards, prompts, ev, cfg.seed)
        per_prompt[precision] = answers.rewards.reshape(len(prompts), ev.samples_per_prompt, -1).mean(axis=1)
        print(f"values {precision}: {np.round(per_prompt[precision].mean(axis=0), 4).tolist()} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    diff = per_prompt["bf16"] - per_prompt["fp32"]
    mean, se = diff.mean(axis=0), diff.std(axis=0, ddof=1) / np.sqrt(len(diff))
    values = {}
    for i, trait in enumerate(cfg.traits):
        lo, hi = mean[i] - 1.96 * se[i], mean[i] + 1.96 * se[i]
        values[trait] = {"fp32": round(float(per_prompt["fp32"][:, i].mean()), 4),
                         "bf16": round(float(per_prompt["bf16"][:, i].mean()), 4),
                         "difference": round(float(mean[i]), 4), "se": round(float(se[i]), 4),
                         "interval_95": [round(float(lo), 4), round(float(hi), 4)],
                         "same_within_noise": bool(lo <= 0 <= hi or (lo >= -0.01 and hi <= 0.01))}
        print(f"  {trait:8s} bf16 - fp32 = {mean[i]:+.4f} ± {se[i]:.4f} (95%: {lo:+.4f}, {hi:+.4f})")
    result["values"] = {"prompts": len(prompts), "answers_per_prompt": ev.samples_per_prompt,
                        "max_new_tokens": ev.max_new_tokens, "temperature": ev.temperature, "by_trait": values}
    result["decision"] = ("bf16 (autocast) where the CPU has it: faster, values the same within noise"
                          if all(v["same_within_noise"] for v in values.values()) and rows[1]["speedup"] > 1
                          else "fp32: bf16 changed a value beyond noise or was not faster")
    print(result["decision"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
