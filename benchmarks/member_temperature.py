"""Would a member be worth more at another sampling temperature? Each trained policy of a finished
run measured at several temperatures on the same evaluation prompts and seed, against best-of-N
of the base at its own weight. Writes benchmarks/results/member_temperature.json and prints the
table (docs/serving.md, "A member is its adapter sampled at its temperature").

Run from the repository root on an otherwise idle machine, after a run (it reads the project's
trained policies, base model, reward models, prompts and sample pool):
    python benchmarks/member_temperature.py [--project .] [--members] [--temperatures 0.3 0.5 0.7 1.0] [--prompts 128]

About 45 s per policy and temperature at 128 prompts on 2 cores: --members for the portfolio's alone.

For each policy in models/members and each temperature T: the policy's answers to the first
--prompts evaluation prompts (llm.value.answer_chunk: evaluation.samples_per_prompt answers each,
evaluation.max_new_tokens, the run's seed), scored as the pipeline scores them; per prompt
w . r at the policy's own weight w. Reported: the mean, the paired difference to T =
evaluation.temperature (the temperature members are measured and served at) and to best-of-N of
the base (the base's eval pool, on-topic answers as training.min_relevance says), each with its
se over prompts. The members are measured, served and certified at one temperature; this says
what choosing it per member would buy, and at what risk of picking on noise.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "benchmarks" / "results" / "member_temperature.json"
for _var, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_var, _value)


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean of a - b, its se over prompts)."""
    d = a - b
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", type=Path, default=REPO, help="a project after a run (models/members, data/)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.3, 0.5, 0.7, 1.0])
    p.add_argument("--prompts", type=int, default=128, help="evaluation prompts measured (the first ones)")
    p.add_argument("--members", action="store_true", help="only the portfolio's members (portfolio.json)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)

    from palm_tasks.core.evidence import chosen_answers
    from palm_tasks.jobs import load_policy
    from palm_tasks.llm.base_model import resolve_base_model
    from palm_tasks.llm.models import load_policy as load_model
    from palm_tasks.llm.prompts import read_prompts
    from palm_tasks.llm.rewards import project_rewards
    from palm_tasks.llm.value import answer_chunk
    from palm_tasks.params_yaml import load_config
    from palm_tasks.paths import Paths
    from palm_tasks.portfolio import Portfolio
    from palm_tasks.schema import load_samples, read

    cfg = load_config(args.project / "params.yaml")
    paths = Paths(args.project)
    ev = cfg.evaluation
    base = resolve_base_model(paths.base)
    prompts = read_prompts(paths.prompts / "eval.jsonl")[:args.prompts]
    samples = load_samples(args.project)
    if list(samples.prompts[:len(prompts)]) != prompts:
        raise SystemExit("the sample pool's prompts are not the evaluation prompts in order")
    allowed = samples.on_topic(cfg.training.min_relevance)
    rewards = project_rewards(cfg, args.project, "cpu")
    keys = {m.key for m in read(paths.portfolio, Portfolio, "coverage").members} if args.members else None
    policies = sorted((load_policy(d) for d in paths.members.iterdir() if d.is_dir() and (keys is None or d.name in keys)),
                      key=lambda q: q.weights)
    result = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True).stdout.strip() or None,
              "project": str(args.project.resolve()), "prompts": len(prompts),
              "answers_per_prompt": ev.samples_per_prompt, "max_new_tokens": ev.max_new_tokens,
              "served_temperature": ev.temperature, "best_of_n": samples.n, "policies": []}
    print(f"{len(policies)} policies x {len(args.temperatures)} temperatures on {len(prompts)} prompts "
          f"x {ev.samples_per_prompt} answers; served at T = {ev.temperature:g}", flush=True)
    for policy in policies:
        w = np.asarray(policy.weights, float)
        # best-of-N of the base at w, per prompt, picked as the pipeline picks it (core.evidence)
        bon = chosen_answers(samples.scores[:len(prompts)], w[None],
                             None if allowed is None else allowed[:len(prompts)])[0] @ w
        model, tokenizer = load_model(base, Path(policy.path) / "adapter", "cpu")
        at = {}
        for t in sorted(set(args.temperatures) | {ev.temperature}):
            started = time.perf_counter()
            answers = answer_chunk(model, tokenizer, rewards, prompts, ev.model_copy(update={"temperature": t}), cfg.seed)
            at[t] = (answers.rewards.reshape(len(prompts), ev.samples_per_prompt, -1).mean(axis=1) @ w,
                     float(answers.degenerate.mean()), time.perf_counter() - started)
        rows = []
        for t, (per_prompt, degenerate, seconds) in at.items():
            vs_served, vs_served_se = paired(per_prompt, at[ev.temperature][0])
            vs_bon, vs_bon_se = paired(per_prompt, bon)
            rows.append({"temperature": t, "value": round(float(per_prompt.mean()), 4),
                         "minus_served": round(vs_served, 4), "minus_served_se": round(vs_served_se, 4),
                         "minus_best_of_n": round(vs_bon, 4), "minus_best_of_n_se": round(vs_bon_se, 4),
                         "degenerate": round(degenerate, 4), "seconds": round(seconds, 1)})
            print(f"{policy.key[:10]} w={np.round(w, 3).tolist()} T={t:<4g} w.r {per_prompt.mean():.4f}  "
                  f"- served {vs_served:+.4f} ± {vs_served_se:.4f}  - best-of-{samples.n} {vs_bon:+.4f} ± "
                  f"{vs_bon_se:.4f}  degenerate {degenerate:.1%}  ({seconds:.0f} s)", flush=True)
        result["policies"].append({"key": policy.key, "weights": w.tolist(),
                                   "best_of_n": round(float(bon.mean()), 4), "at": rows})
        del model
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
