"""Loading the base model and a policy (base + LoRA adapter), and sampling answers from them.

The device, precision and pad token are decided here once. Precision (params.yaml `precision`):
fp32, or bf16 where the device computes it natively (auto: on a CUDA device; on a CPU with
avx512_bf16 or AMX when asked for by name). On CUDA the weights are bf16; on a CPU they stay
fp32 and sampling runs under torch's CPU autocast (2.4x as fast on this project's CPU, with
answers measurably shorter: docs/precision.md); SFT gets TRL's bf16 flag, which on that CPU
changed nothing. The tokenizer pads with EOS when it has no pad token, on the left.
Every job, soup, re-evaluation and server loads through these functions, so a policy evaluated
again later is scored exactly as it was the first time.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from palm_tasks.hashing import file_sha256
from palm_tasks.log import progress

# the counters open in this context (tokens_counted): a job thread's count is its own
_COUNTERS: ContextVar[tuple] = ContextVar("palm_token_counters", default=())


class TokenCount:
    """Tokens generated while it was open (tokens_counted): every answer's tokens up to and
    including the one that ended it."""

    def __init__(self):
        self.tokens = 0


@contextmanager
def tokens_counted():
    """Count the tokens `generate` samples inside the block, in this thread or task; nested
    counters each count them all (a stage's and a chunk's)."""
    count = TokenCount()
    reset = _COUNTERS.set((*_COUNTERS.get(), count))
    try:
        yield count
    finally:
        _COUNTERS.reset(reset)


def resolve_device(device: str) -> str:
    """params.yaml `device` (auto | cpu | cuda) -> the device to use here."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for in params.yaml but torch sees no CUDA device")
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (the avx512_bf16 or amx_bf16 flag): elsewhere
    torch emulates it, and autocast would be slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: str) -> str:
    """params.yaml `precision` (auto | fp32 | bf16) on a resolved device -> fp32 | bf16. auto
    takes bf16 on a CUDA device that computes it, fp32 on a CPU (bf16 there is asked for by
    name: docs/precision.md has the measurements); an explicit bf16 where the device does not
    compute it natively is a RuntimeError naming the key."""
    import torch

    native = torch.cuda.is_bf16_supported() if device == "cuda" else cpu_has_bf16()
    if precision == "auto":
        return "bf16" if native and device == "cuda" else "fp32"
    if precision == "bf16" and not native:
        what = "CUDA device" if device == "cuda" else "CPU (no avx512_bf16 or amx_bf16 flag)"
        raise RuntimeError(f"precision: bf16 was asked for in params.yaml, but this {what} does not "
                           f"compute bf16 natively; use precision: auto or fp32")
    return precision


def precision_of(model) -> str:
    """The precision a model was loaded for (load_base): fp32 | bf16."""
    return getattr(model, "palm_precision", "fp32")


def common_args(device: str, seed: int, precision: str = "fp32") -> dict:
    """TRL config settings every method shares: device and precision (bf16 on a CPU: the
    trainer's autocast over fp32 weights), seeds, logging, no checkpoints."""
    return dict(use_cpu=device == "cpu", bf16=precision == "bf16", logging_steps=1, save_strategy="no",
                report_to="none", seed=seed, data_seed=seed,
                disable_tqdm=True,  # the job's on_log reports progress instead
                gradient_checkpointing=False)  # small models: memory is not the constraint, time is


def tokenizer_dir(base_path: Path) -> Path:
    """Where the base model's tokenizer is: beside its weights, or, for a base model read from
    the MLflow registry (the transformers flavor keeps weights in model/ and the tokenizer in
    components/tokenizer/), in the sibling directory."""
    base_path = Path(base_path)
    flavor = base_path.parent / "components" / "tokenizer"
    if not (base_path / "tokenizer_config.json").is_file() and (flavor / "tokenizer_config.json").is_file():
        return flavor
    return base_path


def load_tokenizer(base_path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(base_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(base_path: Path, device: str, place: bool = True, precision: str | None = None):
    """The base model for `precision` (resolve_precision; None: what `auto` gives on `device`,
    as the server and the registered model load it) on `device` (a resolved one), moved there
    unless `place` is false (a trainer places it itself): bf16 weights on CUDA, fp32 weights
    elsewhere (a CPU computes bf16 under autocast). The model remembers its precision
    (precision_of), so sampling and SFT on it use it."""
    import torch
    from transformers import AutoModelForCausalLM

    precision = precision or resolve_precision("auto", device)

    dtype = torch.bfloat16 if precision == "bf16" and device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    model.palm_precision = precision
    return model.to(device) if place else model


# What to run when a member's files are damaged: the align stage removes a damaged member and
# trains its job again (jobs.find_finished); coverage and register then use the new one.
REPAIR_MEMBER = "run `palm run` to train it again (finished members are reused)"


def verify_member(adapter_dir: Path, key: str | None = None) -> None:
    """schema.ArtifactError naming the member and the file unless the adapter at `adapter_dir`
    is whole: every file of it listed in its member's checksums.json (`<member>/adapter/...`,
    written by jobs.store_policy) matches, and each *.safetensors file holds all the bytes its
    header promises. The second check covers an adapter without checksums (one downloaded
    from the registry); without either, a truncated adapter fails deep in safetensors with an
    error that names no member."""
    import json

    from palm_tasks.schema import ArtifactError

    adapter_dir = Path(adapter_dir)
    member = adapter_dir.parent
    key = key or member.name

    def damaged(path: Path, problem: str) -> ArtifactError:
        return ArtifactError(f"member {key}: {path} {problem}; {REPAIR_MEMBER}")

    sums_file = member / "checksums.json"
    if sums_file.is_file():
        try:
            sums = json.loads(sums_file.read_text(encoding="utf-8"))
            if not isinstance(sums, dict):
                raise ValueError("not an object")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise damaged(sums_file, f"is unreadable ({str(exc)[:100]})") from None
        prefix = adapter_dir.name + "/"
        for rel, digest in sums.items():
            if not str(rel).startswith(prefix):
                continue
            path = member / rel
            if not path.is_file():
                raise damaged(path, "is missing")
            if file_sha256(path) != digest:
                raise damaged(path, "does not match its checksum (damaged or changed since training)")
    for path in sorted(adapter_dir.glob("*.safetensors")):
        problem = _safetensors_problem(path)
        if problem:
            raise damaged(path, problem)


def _safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (8-byte header length, JSON header, then the
    tensors' bytes up to the largest end offset), or None."""
    import json
    import struct

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"is {size} bytes, shorter than a safetensors header (truncated)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"is {size} bytes, but its header alone needs {n + 8} (truncated)"
            header = json.loads(fh.read(n))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"is not a safetensors file ({str(exc)[:100]})"
    if not isinstance(header, dict):
        return "is not a safetensors file (its header is not an object)"
    try:
        ends = [int(t["data_offsets"][1]) for name, t in header.items() if name != "__metadata__"]
    except (KeyError, TypeError, IndexError, ValueError):
        return "is not a safetensors file (a tensor without data_offsets)"
    needed = 8 + n + max(ends, default=0)
    if needed != size:
        return f"is {size} bytes, but its header describes {needed} (truncated or damaged)"
    return None


def load_policy(base_path: Path, adapter_dir: Path, device: str, precision: str | None = None):
    """(model, tokenizer): the base model with a LoRA adapter (safetensors) on `device`, for
    `precision` (as load_base); schema.ArtifactError naming the member and the file when the adapter is damaged."""
    from peft import PeftModel

    verify_member(adapter_dir)
    base = load_base(base_path, device, place=False, precision=precision)
    model = PeftModel.from_pretrained(base, adapter_dir).to(device)
    return model, load_tokenizer(base_path)


def chat(prompt: str) -> list[dict]:
    """A prompt as the one-turn conversation every policy is trained and asked with."""
    return [{"role": "user", "content": prompt}]


# Sampling keeps the TOP_K most likely tokens, then draws from their softmax at the temperature:
# transformers' default sampling (top_k = 50), so the answers follow the distribution they did
# when generation went through model.generate.
TOP_K = 50


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float,
             batch_size: int, seed: int) -> list[str]:
    """Sampled chat responses, batched with left padding, reproducible for a seed.

    Several answers to one prompt come as runs of that prompt in `prompts` (the sample pool,
    evaluation and rsft ask for N each). The prompt is then encoded once and its key/value
    cache copied to the N answers: on a CPU the prompt is most of the tokens a short answer
    costs. The decoding loop is ours rather than model.generate's, because on a CPU the
    latter spends 15% of its time drawing a random number for every vocabulary entry. With the
    shared prompt and batches of 128 answers this samples 7.8 answers a second against
    model.generate's 3.4 at batch 64 (SmolLM2-135M, 2 cores; benchmarks/sampling.py). A
    policy's LoRA adapter is merged into the weights while it samples (`adapter_merged`), and
    answers that have ended leave the batch (`_sample`).
    """
    import torch

    tokenizer.padding_side = "left"
    runs = _runs(prompts)
    k = len(runs[0][1]) if runs and all(len(r[1]) == len(runs[0][1]) for r in runs) else 1
    unique = [r[0] for r in runs] if k > 1 else list(prompts)
    per_batch = max(1, batch_size // k)  # batch_size counts answers
    torch.manual_seed(seed)
    out = []
    model.eval()
    device = next(model.parameters()).device
    # bf16 on a CPU: autocast over the fp32 weights (on CUDA the weights are bf16 already)
    autocast = precision_of(model) == "bf16" and device.type == "cpu"
    starts = range(0, len(unique), per_batch)
    with adapter_merged(model):
        for i in progress(starts, len(starts), f"sampling {len(prompts)} answers", lines_from=10):
            chats = [tokenizer.apply_chat_template(chat(p), tokenize=False, add_generation_prompt=True)
                     for p in unique[i: i + per_batch]]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out += _sample(model, tokenizer, chats, k, max_new_tokens, temperature)
    return [t.strip() for t in out]


@contextmanager
def adapter_merged(model):
    """The model's active LoRA adapter merged into its fp32 base weights for the duration: each
    layer then runs one matrix product instead of three. Unmerged, the worked example's trained
    policies sampled 128 answers in 8.6-12.2 s against the base's 10.0 s, though their answers
    were shorter; merged and with ended answers out of the batch, in 5.4-8.6 s (SmolLM2-135M,
    2 cores; benchmarks/sampling.py). The merged weights are copied first and put back after,
    bit for bit, so training goes on from exactly the weights it had (PEFT's unmerge subtracts
    the product again, which leaves rounding errors). bf16 weights are not merged: their 8-bit
    mantissa would round away most of a LoRA product."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and not m.merged
              and any(a in m.lora_A for a in m.active_adapters)] if isinstance(model, PeftModel) else []
    if not layers or any(m.get_base_layer().weight.dtype != torch.float32 for m in layers):
        yield
        return
    saved = [m.get_base_layer().weight.detach().clone() for m in layers]
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for layer, weight in zip(layers, saved):
                layer.get_base_layer().weight.copy_(weight)


def _runs(prompts: list[str]) -> list[tuple[str, list[int]]]:
    """Consecutive runs of equal prompts: (prompt, indices)."""
    runs: list[tuple[str, list[int]]] = []
    for i, p in enumerate(prompts):
        if runs and runs[-1][0] == p:
            runs[-1][1].append(i)
        else:
            runs.append((p, [i]))
    return runs


def _draw(logits, temperature: float):
    """One token per row: from the softmax of the TOP_K largest logits at `temperature`."""
    import torch

    top, index = torch.topk(logits.float(), min(TOP_K, logits.shape[-1]), dim=-1)
    choice = torch.multinomial(torch.softmax(top / temperature, dim=-1), 1)
    return index.gather(-1, choice).squeeze(-1)


def _sample(model, tokenizer, chats: list[str], k: int, max_new_tokens: int, temperature: float) -> list[str]:
    """k sampled answers to each chat, in order: the prompts are encoded once, their cache copied
    k times, then one token per step for every answer until all have ended (EOS) or max_new_tokens.

    Answers that have ended leave the batch (their rows of the cache dropped) once they are a
    quarter of it: a trained policy's answers end early (41-76% of the rows' 24 steps ran before
    their answer ended for the worked example's four members, against 99% for the base;
    benchmarks/sampling.py), and each step costs about what its rows cost. Dropping rows at
    every step instead would copy the cache too often."""
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    enc = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    mask = enc["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens only
    stop = _stop_ids(model, tokenizer)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=positions, cache=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        if k > 1:
            cache.batch_repeat_interleave(k)
            logits, mask = logits.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
        position = positions[:, -1:].repeat_interleave(k, 0) + 1
        tokens = torch.full((len(logits), max_new_tokens), tokenizer.pad_token_id, dtype=torch.long, device=device)
        rows = torch.arange(len(logits), device=device)  # the answer each row of the batch is writing
        ended = torch.zeros(len(logits), dtype=torch.bool, device=device)
        generated = 0
        for step in range(max_new_tokens):
            token = torch.where(ended, tokenizer.pad_token_id, _draw(logits, temperature))
            tokens[rows, step] = token
            generated += len(ended) - int(ended.sum())  # the rows still writing drew a token
            ended |= torch.isin(token, stop)
            if step == max_new_tokens - 1 or bool(ended.all()):
                break
            if 4 * int(ended.sum()) >= len(rows):  # a quarter of the batch has ended: drop those rows
                keep = (~ended).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                rows, token, mask, position, ended = rows[keep], token[keep], mask[keep], position[keep], ended[keep]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, cache=cache,
                           use_cache=True).logits[:, -1]
            position = position + 1
    for count in _COUNTERS.get():
        count.tokens += generated
    return tokenizer.batch_decode(tokens, skip_special_tokens=True)


def _stop_ids(model, tokenizer):
    """The token ids that end an answer: the generation config's EOS ids and the tokenizer's."""
    import torch

    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    ids = {i for i in ids + [tokenizer.eos_token_id] if i is not None}
    return torch.tensor(sorted(ids), device=next(model.parameters()).device)
