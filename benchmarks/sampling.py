"""How fast the pipeline samples answers on this machine: our decoding loop (palm_tasks.llm.models
.generate: the prompt's cache shared by its N answers, top-k draws) against transformers'
model.generate, on SmolLM2-135M. Writes benchmarks/results/sampling.json and prints the table.

Run from the repository root, on an otherwise idle machine:
    python benchmarks/sampling.py [--prompts 16] [--answers 8] [--max-new-tokens 24]
        [--adapters models/members/*/adapter]

The workload is the sample pool's: --answers answers to each of --prompts evaluation prompts,
at temperature 1, --max-new-tokens tokens at most. Each row is the best of --repeats runs.
--adapters: also sample from these trained policies (LoRA adapters of a finished run on the same
base), as rsft's later rounds and evaluation do; their rows say how long the answers were
(`steps_used`: the share of the rows' decoding steps before each answer ended).
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "benchmarks" / "results" / "sampling.json"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def hf_generate(model, tokenizer, prompts, max_new_tokens, batch_size):
    """transformers' sampling (its default top_k = 50), each answer encoded on its own."""
    import torch

    from palm_tasks.llm.models import chat

    tokenizer.padding_side = "left"
    for i in range(0, len(prompts), batch_size):
        chats = [tokenizer.apply_chat_template(chat(p), tokenize=False, add_generation_prompt=True)
                 for p in prompts[i:i + batch_size]]
        enc = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0,
                           pad_token_id=tokenizer.pad_token_id)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--answers", type=int, default=8, help="answers per prompt")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / ".cache")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--adapters", type=Path, nargs="*", default=[], help="LoRA adapter directories to sample from")
    args = p.parse_args(argv)

    import torch

    from palm_tasks.llm.base_model import prepare_base_model, resolve_base_model
    from palm_tasks.llm.models import generate, load_base, load_policy, load_tokenizer
    from palm_tasks.llm.prompts import load_prompt_pool

    prepare_base_model("smollm2", args.workdir / "base")  # converted once, then reused
    base = resolve_base_model(args.workdir / "base")
    model, tokenizer = load_base(base, "cpu"), load_tokenizer(base)
    prompts = load_prompt_pool("assistant")[:args.prompts]
    flat = [q for q in prompts for _ in range(args.answers)]
    runs = {
        "transformers generate, batch 64": lambda: hf_generate(model, tokenizer, flat, args.max_new_tokens, 64),
        "palm generate, batch 64": lambda: generate(model, tokenizer, flat, args.max_new_tokens, 1.0, 64, 0),
        "palm generate, batch 128": lambda: generate(model, tokenizer, flat, args.max_new_tokens, 1.0, 128, 0),
    }
    policies = {f"palm generate, batch 128, policy {a.parent.name}": load_policy(base, a, "cpu")[0]
                for a in args.adapters}
    for name, policy in policies.items():
        runs[name] = lambda policy=policy: generate(policy, tokenizer, flat, args.max_new_tokens, 1.0, 128, 0)
    rows = []
    for name, run in runs.items():
        seconds, answers = [], None
        for _ in range(args.repeats):
            started = time.perf_counter()
            answers = run()
            seconds.append(time.perf_counter() - started)
        row = {"sampler": name, "seconds": round(min(seconds), 2),
               "answers_per_second": round(len(flat) / min(seconds), 2)}
        if answers is not None:  # palm's: how many of the rows' steps ran before each answer ended
            tokens = [min(len(tokenizer(a, add_special_tokens=False)["input_ids"]) + 1, args.max_new_tokens)
                      for a in answers]
            row["steps_used"] = round(sum(tokens) / (len(tokens) * args.max_new_tokens), 3)
        rows.append(row)
        print(f"{name:60s} {min(seconds):7.1f} s  {len(flat) / min(seconds):6.2f} answers/s "
              f"{row.get('steps_used', '')}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    result = {"date": datetime.date.today().isoformat(), "commit": commit, "machine": platform.machine(),
              "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "model": "SmolLM2-135M-Instruct (fp32)",
              "answers": len(flat), "prompts": args.prompts, "answers_per_prompt": args.answers,
              "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
              "adapters": [str(a) for a in args.adapters], "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
