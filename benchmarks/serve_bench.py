"""Serving cost of a portfolio (issue 5); writes benchmarks/results/serve.json.

Run from the repository root: python benchmarks/serve_bench.py [--k 4] [--base DIR]

- memory: resident set size (RSS) of a fresh process that loads (a) the base model alone,
  (b) the base once with k members' adapters as named PEFT adapters (palm_tasks.serve.members), and
  (c) k members as separate models (k copies of base + adapter in one process); each in its own
  subprocess, measured after loading and one forward pass. The target is (b) <= RSS(a) + k x
  adapter bytes + 10%.
- route latency: Router.route on a portfolio of k members certified by the real prune + certify
  over a synthetic pool (values are synthetic; routing cost does not depend on them).
- generation latency per member switch: greedy generation of a fixed number of new tokens,
  alternating members (every call switches adapter) against the same member every call.

The base model is SmolLM2-135M-Instruct (models/base when the pipeline ran, else --base, else a
fresh conversion into a temporary directory). The adapters are real PEFT LoRA adapters with the
training config's rank and target modules ("all-linear"), not trained: A as PEFT initializes
it, B ~ N(0, 1e-3^2) (memory and latency depend on their shapes, not their values, as long as
the activations stay finite). CPU, float32; generation on one thread.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
OUT = ROOT / "benchmarks" / "results" / "serve.json"
PROMPT = "Tell me something interesting about the sea."
# PEFT starts B at 0 (the adapter does nothing); fully random factors make SmolLM2's hidden
# states reach 1e4, nothing like a trained adapter. A small random B is closer to one.
LORA_B_STD = 1e-3


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def measure_memory(mode: str, base: str, adapters: list[str]) -> dict:
    """Runs in a subprocess: load per `mode`, run one forward pass, report RSS."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from palm_tasks.serve.members import MemberModels

    torch.set_num_threads(1)
    before = rss_bytes()
    ids = AutoTokenizer.from_pretrained(base)(PROMPT, return_tensors="pt")["input_ids"]
    if mode == "base":
        models = [AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)]
    elif mode == "multi":
        served = MemberModels(Path(base), {f"m{i}": Path(a) for i, a in enumerate(adapters)})
        models = [served.model]
    elif mode == "separate":
        models = [PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
            base, dtype=torch.float32), a) for a in adapters]
    else:
        raise ValueError(mode)
    with torch.no_grad():
        for m in models:
            m.eval()(input_ids=ids)
    return {"mode": mode, "rss_bytes": rss_bytes(), "rss_before_load_bytes": before}


def in_subprocess(mode: str, base: Path, adapters: list[Path]) -> dict:
    code = ("import json, sys; sys.path.insert(0, %r); from benchmarks.serve_bench import "
            "measure_memory; print(json.dumps(measure_memory(%r, %r, %r)))"
            % (str(ROOT), mode, str(base), [str(a) for a in adapters]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_adapters(base: Path, k: int, out: Path) -> list[Path]:
    """k random LoRA adapters of the training config's shape (rank, alpha, all-linear)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from palm_tasks.config import PalmConfig

    t = PalmConfig().training
    paths = []
    for i in range(k):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        lora = LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, target_modules="all-linear",
                          task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, lora)
        with torch.no_grad():  # PEFT starts B at 0; a small B, as after a short training
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, LORA_B_STD)
        peft_model.save_pretrained(out / f"m{i}")
        paths.append(out / f"m{i}")
    return paths


def adapter_bytes(path: Path) -> int:
    """Bytes of the adapter's tensors (float32, as loaded)."""
    from safetensors.torch import load_file

    return sum(t.numel() * t.element_size()
               for t in load_file(path / "adapter_model.safetensors").values())


def synthetic_portfolio(k: int, root: Path = Path("/nonexistent/bench")):
    """A portfolio of k members chosen and certified by the real coverage build over a synthetic
    pool of 3 + 3k policies (values are synthetic: routing and serving cost depend on k only).
    Members live at <root>/models/members/m<j>."""
    from palm_tasks.config import parse_config
    from palm_tasks.core import simplex
    from palm_tasks.paths import Paths
    from palm_tasks.stages.coverage import build

    sys.path.insert(0, str(ROOT / "tests"))
    from support.pools import EVALUATION, flat_sample_pool, policies_with_values

    traits = ["safety", "humor", "brevity"]
    rng = np.random.default_rng(0)
    W = np.vstack([np.eye(3), simplex.random_weights(3, 3 * k, 0)])
    R = np.clip(0.2 + 0.6 * W + 0.03 * rng.standard_normal(W.shape), 0, 1)
    scores = (W @ R.T).max(axis=0)
    members = sorted(np.argsort(-scores)[:k])  # any k members: routing cost depends on k only
    pool = policies_with_values(root, W, R, traits)
    cfg = parse_config({"coverage": {"test_users": 100}, "evaluation": EVALUATION})
    portfolio, *_ = build(cfg, Paths(root), pool, [], members=members, samples=flat_sample_pool(traits))
    return portfolio, len(W)


def route_latency(k: int, n_calls: int = 20_000) -> dict:
    from palm_tasks.core import simplex
    from palm_tasks.serve.router import Router

    portfolio, n_rows = synthetic_portfolio(k)
    router = Router(portfolio)
    traits = list(portfolio.traits)
    users = [dict(zip(traits, u)) for u in simplex.dirichlet_users(3, n_calls, 1)]
    times, cpu = np.empty(n_calls), np.empty(n_calls)
    for i, u in enumerate(users):
        t, c = time.perf_counter(), time.thread_time()
        router.route(u)
        times[i], cpu[i] = time.perf_counter() - t, time.thread_time() - c
    # Wall time includes being descheduled on a busy machine; the thread's CPU time does not.
    return {"calls": n_calls, "members": k, "oracle_rows": n_rows,
            "median_ms": float(np.median(times) * 1e3), "p99_ms": float(np.quantile(times, 0.99) * 1e3),
            "max_ms": float(times.max() * 1e3),
            "cpu_median_ms": float(np.median(cpu) * 1e3), "cpu_p99_ms": float(np.quantile(cpu, 0.99) * 1e3),
            "target_ms": 1.0}


def generation_latency(base: Path, adapters: list[Path], new_tokens: int, reps: int) -> dict:
    import torch

    from palm_tasks.serve.members import MemberModels

    torch.set_num_threads(1)  # one thread: steadier on a shared 2-core machine
    served = MemberModels(base, {f"m{i}": a for i, a in enumerate(adapters)})
    keys = served.keys
    chat = served.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                                tokenize=False, add_generation_prompt=True)
    enc = served.tokenizer(chat, return_tensors="pt", add_special_tokens=False)

    def generate():  # exactly new_tokens tokens, so every call does the same work
        with torch.no_grad():
            served.model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, pad_token_id=served.tokenizer.pad_token_id)

    def timed(key):
        t = time.perf_counter()
        if key is None:
            with served.model.disable_adapter():
                generate()
        else:
            served.model.set_adapter(key)  # one active adapter per call, as palm serve did before batching
            generate()
        return time.perf_counter() - t

    # Interleaved, so that a busy spell of the machine hits all three alike.
    timed(keys[0])  # warm-up
    base_only, same, switching, current = [], [], [], keys[0]
    for i in range(reps):
        base_only.append(timed(None))
        same.append(timed(current))  # the member of the last call: no switch
        current = keys[(i + 1) % len(keys)]
        switching.append(timed(current))  # another member: one set_adapter
    switch_only = []
    for i in range(200):
        t = time.perf_counter()
        served.use(keys[i % len(keys)])
        switch_only.append(time.perf_counter() - t)
    return {"new_tokens": new_tokens, "reps": reps, "threads": torch.get_num_threads(),
            "base_without_adapter_median_s": float(np.median(base_only)),
            "same_member_median_s": float(np.median(same)),
            "switching_median_s": float(np.median(switching)),
            "switch_overhead_median_s": float(np.median(switching) - np.median(same)),
            "set_adapter_median_ms": float(np.median(switch_only) * 1e3),
            "same_member_all_s": [round(x, 4) for x in same],
            "switching_all_s": [round(x, 4) for x in switching]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=4, help="portfolio members (default 4)")
    parser.add_argument("--base", help="a prepared base model directory (default: models/base)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()

    from palm_tasks.llm.base_model import prepare_base_model, resolve_base_model

    tmp = Path(tempfile.mkdtemp(prefix="palm-serve-bench-"))
    base_dir = Path(args.base) if args.base else ROOT / "models" / "base"
    if not (base_dir / "base.json").is_file():
        base_dir = tmp / "base"
        prepare_base_model("smollm2", base_dir)
    base = resolve_base_model(base_dir)
    adapters = make_adapters(base, args.k, tmp / "adapters")
    per_adapter = adapter_bytes(adapters[0])

    mem = {m: in_subprocess(m, base, adapters) for m in ("base", "multi", "separate")}
    single = in_subprocess("separate", base, adapters[:1])
    rss = {m: v["rss_bytes"] for m, v in mem.items()}
    budget = rss["base"] + args.k * per_adapter
    mib = 2 ** 20
    memory = {
        "k": args.k,
        "adapter_bytes": per_adapter,
        "rss_mib": {"base_only": rss["base"] / mib, "one_base_k_adapters": rss["multi"] / mib,
                    "k_separate_models_one_process": rss["separate"] / mib,
                    "one_member_alone": single["rss_bytes"] / mib,
                    "k_separate_processes": args.k * single["rss_bytes"] / mib},
        "target_mib": 1.1 * budget / mib,
        "target": "one_base_k_adapters <= (base_only + k x adapter_bytes) x 1.1",
        "meets_target": rss["multi"] <= 1.1 * budget,
        "saving_vs_separate_one_process": 1 - rss["multi"] / rss["separate"],
    }
    print(json.dumps(memory, indent=2))
    route = route_latency(args.k)
    print(json.dumps(route, indent=2))
    gen = generation_latency(base, adapters, args.new_tokens, args.reps)
    print(json.dumps({k: v for k, v in gen.items() if not k.endswith("_all_s")}, indent=2))

    import torch

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "what": "serving a PALM portfolio: one base + k named LoRA adapters (palm_tasks.serve.members)",
        "base_model": "SmolLM2-135M-Instruct (float32, CPU)",
        "adapters": "PEFT LoRA of the training config's shape, not trained (B ~ N(0, 1e-3^2))",
        "memory": memory, "route_latency": route, "generation": gen,
        "machine": {"cpus": os.cpu_count(), "load_average_1_5_15": os.getloadavg(),
                    "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "command": "python benchmarks/serve_bench.py " + " ".join(sys.argv[1:]),
    }, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
