"""Loading the base model and a policy (base + LoRA adapter), and sampling answers from them.

The device, dtype and pad token are decided here once: bf16 on a CUDA device that supports it,
fp32 elsewhere; the tokenizer pads with EOS when it has no pad token, on the left (generation).
Every job, soup, re-evaluation and server loads through these functions, so a policy evaluated
again later is scored exactly as it was the first time.
"""

from __future__ import annotations

from pathlib import Path

from palm_tasks.log import progress


def resolve_device(device: str) -> str:
    """params.yaml `device` (auto | cpu | cuda) -> the device to use here."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for in params.yaml but torch sees no CUDA device")
    return device


def uses_bf16(device: str) -> bool:
    import torch

    return device == "cuda" and torch.cuda.is_bf16_supported()


def load_tokenizer(base_path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(base_path: Path, device: str, place: bool = True):
    """The base model in the dtype its jobs train and evaluate in on `device` (a resolved one),
    moved there unless `place` is false (a trainer places it itself)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if uses_bf16(device) else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    return model.to(device) if place else model


def load_policy(base_path: Path, adapter_dir: Path, device: str):
    """(model, tokenizer): the base model with a LoRA adapter (safetensors) on `device`."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(base_path, device, place=False), adapter_dir).to(device)
    return model, load_tokenizer(base_path)


def chat(prompt: str) -> list[dict]:
    """A prompt as the one-turn conversation every policy is trained and asked with."""
    return [{"role": "user", "content": prompt}]


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float,
             batch_size: int, seed: int) -> list[str]:
    """Sampled chat responses, batched with left padding, reproducible for a seed."""
    import torch

    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    out = []
    model.eval()
    starts = range(0, len(prompts), batch_size)
    for i in progress(starts, len(starts), f"sampling {len(prompts)} answers"):
        chats = [tokenizer.apply_chat_template(chat(p), tokenize=False, add_generation_prompt=True)
                 for p in prompts[i: i + batch_size]]
        enc = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True,
                                 temperature=temperature, pad_token_id=tokenizer.pad_token_id)
        out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [t.strip() for t in out]
