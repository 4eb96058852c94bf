"""What one decoding step of `palm serve`'s batch costs, by batch and path; writes
benchmarks/results/serve_steps.json.

Run from the repository root: python benchmarks/serve_steps.py [--workdir /tmp/palm-serve-load]

On SmolLM2-135M-Instruct with 4 members (the adapters serve_load.py builds under --workdir, else
fresh ones of the training shape), fp32, one CPU thread: the time of one decoding step (one new
token for every row, the prompt's 38 tokens cached) for
- 1 row, and 16 rows of one member: PEFT's plain path (the adapter active) and PEFT's mixed-batch
  path (`adapter_names`);
- 16 rows over the 4 members: PEFT's mixed-adapter batch `model(..., adapter_names=...)` (a
  gather, two products and a scatter per member in every LoRA layer), and MemberModels.forward
  (every member's LoRA factors stacked side by side, each row masked to its own: two products);
- encoding 16 prompts of 38 tokens (the prefill a wave of 16 requests costs).
Medians of --reps interleaved runs of --steps steps (interleaved: a busy spell of the machine
hits every path alike); the load average is recorded before and after.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
OUT = ROOT / "benchmarks" / "results" / "serve_steps.json"
PROMPT = "Tell me something interesting about the sea."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/palm-serve-load")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()

    import torch
    from transformers import DynamicCache

    from palm_tasks.serve.members import MemberModels, adapter_name

    torch.set_num_threads(1)
    members = Path(args.workdir) / "project" / "models" / "members"
    base = Path(args.workdir) / "project" / "models" / "base"
    if not (base / "base.json").is_file():
        raise SystemExit(f"run benchmarks/serve_load.py first: it builds {base} and the members")
    adapters = {adapter_name(f"m{i}", members / f"m{i}" / "adapter"): members / f"m{i}" / "adapter" for i in range(4)}
    models = MemberModels(base, adapters)
    names, model = list(adapters), models.model
    prompt = models.encode_chat([{"role": "user", "content": PROMPT}])

    def step_ms(rows: list[str], how: str) -> float:
        """The mean time of `steps` decoding steps for these rows, the prompt cached."""
        ids, cache = torch.tensor([prompt] * len(rows)), DynamicCache(config=model.config)
        if how == "plain":
            model.set_adapter(rows[0])
            run = model
        elif how == "adapter_names":
            def run(**kw):
                return model(adapter_names=rows, **kw)
        else:  # "stacked"
            def run(**kw):
                return models.forward(rows, **kw)
        with torch.no_grad():
            token = run(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)
            start = time.perf_counter()
            for _ in range(args.steps):
                token = run(input_ids=token[:, None], cache=cache, use_cache=True,
                            logits_to_keep=1).logits[:, -1].argmax(-1)
        return (time.perf_counter() - start) / args.steps * 1e3

    def prefill_ms(rows: list[str]) -> float:
        ids = torch.tensor([prompt] * len(rows))
        start = time.perf_counter()
        with torch.no_grad():
            models.forward(rows, input_ids=ids, cache=DynamicCache(config=model.config), use_cache=True,
                           logits_to_keep=1)
        return (time.perf_counter() - start) * 1e3

    mixed = [names[i % 4] for i in range(16)]
    cases = {"1 row, plain": lambda: step_ms(names[:1], "plain"),
             "1 row, adapter_names": lambda: step_ms(names[:1], "adapter_names"),
             "16 rows of one member, plain": lambda: step_ms([names[0]] * 16, "plain"),
             "16 rows of one member, adapter_names": lambda: step_ms([names[0]] * 16, "adapter_names"),
             "16 rows over 4 members, adapter_names": lambda: step_ms(mixed, "adapter_names"),
             "16 rows over 4 members, stacked (MemberModels.forward)": lambda: step_ms(mixed, "stacked"),
             "encoding 16 prompts of %d tokens" % len(prompt): lambda: prefill_ms([names[0]] * 16)}
    load_before = [round(x, 2) for x in os.getloadavg()]
    times = {name: [] for name in cases}
    for _ in range(args.reps):
        for name, case in cases.items():
            times[name].append(case())
    medians = {name: round(float(np.median(t)), 1) for name, t in times.items()}
    print(json.dumps(medians, indent=2))
    OUT.write_text(json.dumps({
        "what": "one decoding step of palm serve's batch (ms), by rows and path; SmolLM2-135M fp32, 1 thread",
        "median_ms": medians, "all_ms": {k: [round(x, 1) for x in v] for k, v in times.items()},
        "prompt_tokens": len(prompt), "reps": args.reps, "steps": args.steps,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_average_1_5_15": {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "note": "a 2-core machine shared with other work"},
        "command": "python benchmarks/serve_steps.py " + " ".join(sys.argv[1:]),
    }, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
