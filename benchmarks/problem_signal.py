"""Can the base model answer a task's problems at all? Correctness of SmolLM2-135M's sampled
answers on reasoning-gym problem sets, and how correctness goes with answer length (a trade-off
with brevity needs long answers to be the right ones). Writes benchmarks/results/problem_signal.json
and prints the table.

Run from the repository root, on an otherwise idle machine:
    python benchmarks/problem_signal.py [--problems 64] [--answers 4]

Each row samples --answers answers (temperature 1, the pipeline's sampler) to each of --problems
problems of one set, and scores them with both rules: reasoning-gym's own scorer (gsm_symbolic's
reads the first number) and the last number stated (task arithmetic's rule). any-of-N is the
share of problems with at least one right answer among the N: a best-of-N reference has that to
find. corr(right, words) is the correlation of rightness with the answer's word count.
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
OUT = REPO / "benchmarks" / "results" / "problem_signal.json"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# (label, reasoning-gym dataset, options, new tokens)
SETS = [
    ("gsm_symbolic, 96 tokens", "gsm_symbolic", {}, 96),
    ("chain_sum 2 terms, 1 digit", "chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}, 24),
    ("chain_sum 2 terms, 1-2 digits (task arithmetic)", "chain_sum",
     {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}, 24),
    ("chain_sum 3 terms, 1 digit, 48 tokens", "chain_sum",
     {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}, 48),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", type=int, default=64)
    p.add_argument("--answers", type=int, default=4, help="answers per problem")
    p.add_argument("--seed", type=int, default=1, help="problems are drawn with this seed (not the task pools')")
    p.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / ".cache")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)

    import numpy as np
    from reasoning_gym import create_dataset

    from palm_tasks.llm.base_model import prepare_base_model, resolve_base_model
    from palm_tasks.llm.correctness import last_number
    from palm_tasks.llm.models import generate, load_base, load_tokenizer

    prepare_base_model("smollm2", args.workdir / "base")  # converted once, then reused
    base = resolve_base_model(args.workdir / "base")
    model, tokenizer = load_base(base, "cpu"), load_tokenizer(base)
    rows = []
    for label, dataset, options, new_tokens in SETS:
        ds = create_dataset(dataset, size=args.problems, seed=args.seed, **options)
        entries = [ds[i] for i in range(args.problems)]
        flat = [e for e in entries for _ in range(args.answers)]
        started = time.perf_counter()
        answers = generate(model, tokenizer, [e["question"] for e in flat], new_tokens, 1.0, 128, args.seed)
        seconds = time.perf_counter() - started
        scorer = np.array([ds.score_answer(a, e) >= 1.0 for a, e in zip(answers, flat)], float)
        said = [last_number(a) for a in answers]
        last = np.array([s is not None and abs(s - float(e["answer"])) < 1e-9 for s, e in zip(said, flat)], float)
        words = np.array([len(a.split()) for a in answers], float)

        def corr(x):
            return float(np.corrcoef(x, words)[0, 1]) if x.std() > 0 and words.std() > 0 else None

        n = len(answers)
        row = {"set": label, "dataset": dataset, "options": options, "max_new_tokens": new_tokens,
               "answers": n, "seconds": round(seconds, 1),
               "right_by_scorer": round(float(scorer.mean()), 4),
               "right_by_last_number": round(float(last.mean()), 4),
               "right_by_last_number_se": round(float(last.std(ddof=1) / np.sqrt(n)), 4),
               "any_of_n_by_last_number": round(float(last.reshape(-1, args.answers).max(axis=1).mean()), 4),
               "corr_right_words": None if corr(last) is None else round(corr(last), 3),
               "mean_words": round(float(words.mean()), 1),
               "examples": answers[:3]}
        rows.append(row)
        c = "n/a" if row["corr_right_words"] is None else f"{row['corr_right_words']:+.3f}"
        print(f"{label:48s} scorer {row['right_by_scorer']:.3f}  last number {row['right_by_last_number']:.3f} "
              f"± {row['right_by_last_number_se']:.3f}  any-of-{args.answers} {row['any_of_n_by_last_number']:.3f}  "
              f"corr(right, words) {c}  {row['mean_words']:.1f} words  {seconds:.0f} s", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    import torch

    out = {"date": datetime.date.today().isoformat(), "commit": commit, "machine": platform.machine(),
           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "model": "SmolLM2-135M-Instruct (fp32)",
           "problems": args.problems, "answers_per_problem": args.answers, "temperature": 1.0,
           "problem_seed": args.seed, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
