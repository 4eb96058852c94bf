"""One rsft SFT round with TRL's loss against the answer-only loss rsft uses.
Writes benchmarks/results/sft_loss.json and prints the figures.

Run from the repository root, on an otherwise idle machine:
    python benchmarks/sft_loss.py

The round is the default one (training.epochs over one answer per training prompt, batches of
training.batch, LoRA r = 8 on every linear layer): 64 training prompts of the assistant task,
each with one answer the base model sampled (temperature 1, 24 tokens, seed 0). Each loss trains
a fresh adapter from the same seed on the same pairs; the round's wall seconds and its last loss
are reported. TRL's loss projects every position through the LM head in vocabulary chunks; the
answer-only loss (palm_tasks.llm.rsft.answer_only_trainer) projects the answer's positions
only, with one matrix product. The two last losses agree to float precision.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
OUT = REPO / "benchmarks" / "results" / "sft_loss.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=64, help="training prompts (pairs in the round)")
    p.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / ".cache")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()

    import torch
    import trl

    import oracle_methods
    from palm_tasks.config import TrainingConfig
    from palm_tasks.llm import rsft
    from palm_tasks.llm.models import generate, load_base, load_tokenizer

    prep = argparse.Namespace(tiny=None, n_train=args.n_train, n_eval=128, seed=0, brevity_full_words=None)
    base, _, train_prompts, _ = oracle_methods.prepare(prep, args.workdir)
    t = TrainingConfig()
    tokenizer = load_tokenizer(base)
    answers = generate(load_base(base, "cpu"), tokenizer, train_prompts, t.max_completion_length, 1.0, 128, 0)
    pairs = list(zip(train_prompts, answers))

    rows = {}
    for name in ("trl", "answer_only"):
        model = rsft.lora_model(base, t, "cpu", 0)
        started = time.time()
        loss = rsft.sft(model, tokenizer, pairs, t, "cpu", 0, args.workdir / "sft_loss_work",
                        answer_only_loss=name == "answer_only")
        rows[name] = {"round_seconds": round(time.time() - started, 2), "last_loss": loss}
        print(f"{name}: {rows[name]['round_seconds']} s a round, last loss {loss:.6f}")
    speedup = rows["trl"]["round_seconds"] / rows["answer_only"]["round_seconds"]
    print(f"answer-only loss: {speedup:.2f}x faster")
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
              "model": "SmolLM2-135M-Instruct", "device": "cpu", "pairs": len(pairs), "epochs": t.epochs,
              "batch": t.batch, "lora_rank": t.lora_rank, "losses": rows, "speedup": round(speedup, 3),
              "trl": trl.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
