"""Which alignment oracle on CPU: GRPO against iterated rejection-sampling fine-tuning (RSFT).
Writes benchmarks/results/oracle_methods.{md,json} and prints the table.

Run from the repository root, on an otherwise idle machine:
    python benchmarks/oracle_methods.py                      # SmolLM2, defaults of TrainingConfig
    python benchmarks/oracle_methods.py --tiny /tmp/tiny     # smoke test on a tiny random model

For each weight w (default: the extremes of the assistant traits [safety, humor, brevity] and
the centroid) and each method, train a LoRA adapter for w . r with `palm_tasks.llm.train.train`
and the method's TrainingConfig defaults, then sample `--eval-samples` answers to each of the
first `--n-prompts` evaluation prompts (`palm_tasks.llm.value.evaluate`) and compare w . R to the
best-of-N reference of the base model (N = `--best-of` base answers per evaluation prompt at the
evaluation temperature; per prompt the one with the best w . r). Per eval prompt p:
    value_p = mean over the policy's answers of w . r,   ref_p = max over the N base answers of w . r
value = mean_p value_p, shortfall = mean_p (ref_p - value_p); the se's are over prompts (answers
to one prompt are not independent), the shortfall's paired by prompt. The base row's value comes
from the same N base answers (their mean).

RSFT is evaluated after every round (`--final-only` to skip): round r is a warm start from round
r-1's adapter, which is what train_rsft does inside (each round is a fresh SFTTrainer), so the
curve costs only the extra evaluations. Its round 1 uses the base's samples on the training
prompts (the pipeline's shared sample pool), drawn once and reported apart as a shared cost.
Minutes are training time only (no evaluation): wall minutes and CPU minutes (process CPU time,
all threads) on this machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "benchmarks" / "results" / "oracle_methods"
TRAITS = ["safety", "humor", "brevity"]
# Tiny smoke mode: everything small, so the whole benchmark runs end to end in a few minutes.
TINY = {"training": {"steps": 2, "rounds": 2, "samples_per_prompt": 2, "max_completion_length": 8},
        "n_train": 8, "n_eval": 4, "n_prompts": 4, "eval_samples": 2, "best_of": 2, "max_new_tokens": 8}

for _var, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                     "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(_var, _value)


def parse_weights(specs: list[str] | None, d: int) -> list[tuple[float, ...]]:
    """'1,0,0' strings, normalized to sum 1; default: the d extremes and the centroid."""
    if not specs:
        return [tuple(float(i == j) for j in range(d)) for i in range(d)] + [(1 / d,) * d]
    weights = []
    for spec in specs:
        w = np.array([float(x) for x in spec.split(",")])
        if len(w) != d or (w < 0).any() or w.sum() <= 0:
            raise SystemExit(f"--weights {spec!r}: need {d} non-negative numbers, not all 0")
        weights.append(tuple(float(x) for x in w / w.sum()))
    return weights


def prepare(args, workdir: Path):
    """(base path, rewards, train prompts, eval prompts), cached under workdir."""
    from palm_tasks.config import RewardsConfig
    from palm_tasks.llm.base_model import build_tiny_model, prepare_base_model, resolve_base_model
    from palm_tasks.llm.prompts import prepare_prompts, read_prompts
    from palm_tasks.llm.rewards import build_rewards, prepare_rewards

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / ".gitignore").write_text("*\n")  # a cache: never committed
    if args.tiny:
        tiny = Path(args.tiny)
        base = tiny if (tiny / "config.json").is_file() else build_tiny_model(tiny)
    else:
        prepare_base_model("smollm2", workdir / "base")  # converted once (minutes), then reused
        base = resolve_base_model(workdir / "base")
    prompt_dir = workdir / f"prompts-{args.n_train}-{args.n_eval}-{args.seed}"
    prepare_prompts("assistant", prompt_dir, args.n_train, args.n_eval, args.seed)
    r = RewardsConfig()
    prepare_rewards(TRAITS, workdir / "rewards", args.seed, humor_test_fraction=r.humor_test_fraction)
    full_words = r.brevity_full_words if args.brevity_full_words is None else args.brevity_full_words
    rewards = build_rewards(TRAITS, workdir / "rewards", r.brevity_max_words, brevity_full_words=full_words)
    return base, rewards, read_prompts(prompt_dir / "train.jsonl"), read_prompts(prompt_dir / "eval.jsonl")


class Clock:
    """Wall and process CPU seconds (all threads) of the work done inside `with clock:` blocks."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._t = (time.time(), time.process_time())

    def __exit__(self, *exc):
        self.wall += time.time() - self._t[0]
        self.cpu += time.process_time() - self._t[1]


def per_prompt(scores: np.ndarray, w, n_prompts: int) -> np.ndarray:
    """(n_prompts, samples) of w . r from per-answer scores ordered prompt by prompt."""
    return (np.asarray(scores) @ np.asarray(w)).reshape(n_prompts, -1)


def row(method: str, w, value_p: np.ndarray, ref_p: np.ndarray, base_value: float, clock: Clock | None,
        degenerate: float | None, extra: dict) -> dict:
    """One table row: value, reference, shortfall (paired by prompt), costs."""
    n = len(value_p)
    se = (lambda x: float(np.std(x, ddof=1) / np.sqrt(n)) if n > 1 else 0.0)
    value, short = float(value_p.mean()), float((ref_p - value_p).mean())
    wall = clock.wall / 60 if clock else 0.0
    return {"method": method, "weights": list(w), "value": value, "value_se": se(value_p),
            "reference": float(ref_p.mean()), "reference_se": se(ref_p),
            "shortfall": short, "shortfall_se": se(ref_p - value_p),
            "degenerate_share": degenerate, "wall_minutes": wall, "cpu_minutes": clock.cpu / 60 if clock else 0.0,
            "gain_per_minute": (value - base_value) / wall if wall else None,
            "shortfall_per_minute": short / wall if wall else None, **extra}


def degenerate_share(prompts, completions) -> float:
    from palm_tasks.llm.validity import degenerate

    return float(np.mean(degenerate(prompts, completions)))


def answer_relevance(prompts, completions) -> np.ndarray:
    from palm_tasks.llm.validity import relevance as per_answer

    return per_answer(prompts, completions)


def relevance(prompts, completions) -> float:
    """Mean relevance as the quality gate measures it (docs/quality-gate.md)."""
    from palm_tasks.llm.validity import answer_quality

    return answer_quality(prompts, completions)["relevance"]


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# Alignment oracle: GRPO vs RSFT ({result['date']})", "",
             f"Machine: {result['machine']}. Base: {s['base']}. Device: {s['device']}.",
             f"Eval: {s['n_prompts']} held-out assistant prompts x {s['eval_samples']} answers "
             f"(temperature {s['eval_temperature']}, {s['max_new_tokens']} tokens); reference: best of "
             f"{s['best_of']} base answers per prompt under w"
             + (f", among those with relevance >= {s['reference_min_relevance']:g} (training.min_relevance)"
                if s.get("reference_min_relevance") else "") + f". Training prompts: {s['n_train']}.",
             *([f"Rewards: {', '.join(s['rewards'])}."] if s.get("rewards") else []),
             f"Shared base sample pool on the training prompts (RSFT round 1): "
             f"{result['pool_wall_minutes']:.2f} wall min, not counted in the rows.",
             "Minutes: training only, wall clock and process CPU time (all threads) on this machine; "
             "gain/min = (value - base) / wall min; shortfall/min = shortfall / wall min.",
             "se's over prompts; the shortfall's paired by prompt.", "",
             "| w | method | value ± se | BoN ref | shortfall ± se | degenerate | relevance | wall min | CPU min "
             "| gain/min | shortfall/min |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = (lambda x, f="{:.3f}": "-" if x is None else f.format(x))
    for r in result["rows"]:
        lines.append(f"| {','.join(f'{x:.2f}' for x in r['weights'])} | {r['method']} "
                     f"| {r['value']:.3f} ± {r['value_se']:.3f} | {r['reference']:.3f} "
                     f"| {r['shortfall']:.3f} ± {r['shortfall_se']:.3f} | {fmt(r['degenerate_share'], '{:.2f}')} "
                     f"| {fmt(r.get('relevance'))} "
                     f"| {r['wall_minutes']:.2f} | {r['cpu_minutes']:.2f} | {fmt(r['gain_per_minute'])} "
                     f"| {fmt(r['shortfall_per_minute'])} |")
    lines += ["", "TrainingConfig per method: " + json.dumps(s["training"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", nargs="+", help="weight vectors over safety,humor,brevity, e.g. 1,0,0 0.5,0.5,0 "
                   "(default: the 3 extremes and the centroid)")
    p.add_argument("--methods", nargs="+", default=["rsft", "grpo"], choices=["rsft", "grpo"])
    p.add_argument("--n-train", type=int, default=64, help="training prompts")
    p.add_argument("--n-eval", type=int, default=128, help="held-out prompts in the split")
    p.add_argument("--n-prompts", type=int, default=32, help="held-out prompts evaluated")
    p.add_argument("--eval-samples", type=int, default=8, help="answers per evaluated prompt")
    p.add_argument("--best-of", type=int, default=8, help="N of the base's best-of-N reference")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens per evaluation answer")
    p.add_argument("--final-only", action="store_true", help="rsft: evaluate the last round only")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="training settings over TrainingConfig's defaults, e.g. --set learning_rate=2e-3 epochs=3")
    p.add_argument("--brevity-full-words", type=int, help="rewards.brevity_full_words (default: the project's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"],
                   help="sampling and training precision (params.yaml precision); the pool and "
                        "evaluation use it too")
    p.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / ".cache")
    p.add_argument("--out", type=Path, help="output path without suffix (default benchmarks/results/"
                   "oracle_methods; with --tiny: WORKDIR/oracle_methods_tiny)")
    p.add_argument("--tiny", metavar="PATH", help="smoke test: a tiny random model at PATH (built if missing), "
                   "every size shrunk; its numbers mean nothing")
    args = p.parse_args()
    if args.tiny:
        for k, v in TINY.items():
            if k != "training":
                setattr(args, k, v)
    out = args.out or (args.workdir / "oracle_methods_tiny" if args.tiny else OUT)

    import torch

    from palm_tasks.config import EvaluationConfig, TrainingConfig
    from palm_tasks.llm.models import generate, load_base, load_tokenizer, resolve_device, resolve_precision
    from palm_tasks.llm.rewards import score_all
    from palm_tasks.llm.rsft import sample
    from palm_tasks.llm.train import train
    from palm_tasks.llm.value import evaluate

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    base_path, rewards, train_prompts, eval_prompts = prepare(args, args.workdir)
    weights = parse_weights(args.weights, len(TRAITS))
    overrides = dict(kv.split("=", 1) for kv in args.set)  # pydantic parses the strings
    configs = {m: TrainingConfig(method=m, **(TINY["training"] if args.tiny else {}), **overrides) for m in args.methods}
    ev = EvaluationConfig(n_prompts=args.n_prompts, samples_per_prompt=args.eval_samples,
                          max_new_tokens=args.max_new_tokens)
    n = min(args.n_prompts, len(eval_prompts))

    # The base's best-of-N pool on the eval prompts (the reference) and its samples on the
    # training prompts (RSFT's round 1, shared by every job as in the pipeline).
    base, tokenizer = load_base(base_path, device, precision=precision), load_tokenizer(base_path)
    pool_prompts = [q for q in eval_prompts[:n] for _ in range(args.best_of)]
    pool_answers = generate(base, tokenizer, pool_prompts, ev.max_new_tokens, ev.temperature, ev.batch_size,
                            args.seed)
    pool_scores = score_all(rewards, pool_prompts, pool_answers)
    # The reference picks among on-topic answers, as the pipeline's does (training.min_relevance)
    min_relevance = max(c.min_relevance for c in configs.values())
    pool_on_topic = answer_relevance(pool_prompts, pool_answers).reshape(n, args.best_of) >= min_relevance
    pool_on_topic |= ~pool_on_topic.any(axis=1, keepdims=True)  # none on topic: pick among all
    pool_clock = Clock()
    first_round = None
    if "rsft" in configs:
        with pool_clock:
            first_round = sample(base, tokenizer, rewards, train_prompts, configs["rsft"], args.seed)
    del base

    rows, work = [], args.workdir / "runs"

    def result_of(rows):
        return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                           f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
                "settings": {"base": "tiny (smoke test)" if args.tiny else "SmolLM2-135M-Instruct",
                             "device": device, "precision": precision, "n_train": len(train_prompts), "n_prompts": n,
                             "eval_samples": ev.samples_per_prompt, "eval_temperature": ev.temperature,
                             "max_new_tokens": ev.max_new_tokens, "best_of": args.best_of,
                             "reference_min_relevance": min_relevance, "seed": args.seed,
                             "rewards": [r.version for r in rewards],
                             "traits": TRAITS, "training": {m: c.model_dump() | {"lr": c.lr, "batch": c.batch}
                                                            for m, c in configs.items()}},
                "pool_wall_minutes": pool_clock.wall / 60, "pool_cpu_minutes": pool_clock.cpu / 60,
                "rows": rows}

    def write(rows):  # after every measured row: a stopped run keeps what it measured
        out.parent.mkdir(parents=True, exist_ok=True)
        result = result_of(rows)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(result))
    for w in weights:
        pool_p = per_prompt(pool_scores, w, n)
        ref_p, base_value = np.where(pool_on_topic, pool_p, -np.inf).max(axis=1), float(pool_p.mean())
        rows.append(row("base", w, pool_p.mean(axis=1), ref_p, base_value, None,
                        degenerate_share(pool_prompts, pool_answers),
                        {"relevance": relevance(pool_prompts, pool_answers)}))

        def measure(method, model, tok, clock, extra):
            _, prompts, completions, scores = evaluate(model, tok, rewards, eval_prompts, ev, args.seed + 1)
            rows.append(row(method, w, per_prompt(scores, w, n).mean(axis=1), ref_p, base_value, clock,
                            degenerate_share(prompts, completions),
                            {**extra, "relevance": relevance(prompts, completions)}))
            print(f"{method:8s} w={w} value {rows[-1]['value']:.3f} shortfall {rows[-1]['shortfall']:.3f} "
                  f"relevance {rows[-1]['relevance']:.3f} "
                  f"({clock.wall / 60:.1f} wall min)", flush=True)
            write(rows)

        for method, t in configs.items():
            clock = Clock()
            if method == "rsft" and not args.final_only:
                adapter, history = None, []
                for r in range(1, t.rounds + 1):  # round r: a warm start from round r - 1's adapter
                    with clock:
                        model, tok, h = train(base_path, rewards, train_prompts, w,
                                              t.model_copy(update={"rounds": 1}), device, args.seed + r - 1,
                                              work / "trainer", first_round=first_round if r == 1 else None,
                                              init_adapter=adapter, precision=precision)
                        adapter = work / f"adapter-{r}"
                        model.save_pretrained(adapter)
                    history += [{**x, "round": r} for x in h]
                    measure(f"rsft@{r}", model, tok, clock, {"history": list(history)})
                    del model
            else:
                with clock:
                    model, tok, history = train(base_path, rewards, train_prompts, w, t, device, args.seed,
                                                work / "trainer", first_round=first_round, precision=precision)
                # rsft: one entry per round; grpo: one per step, the last kept
                measure(method, model, tok, clock, {"history": history if method == "rsft" else history[-1:]})
                del model
            shutil.rmtree(work, ignore_errors=True)

    write(rows)
    print(markdown(result_of(rows)))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
