"""The members in memory: one base model with every member's LoRA adapter as a named adapter.

Switching members is PEFT's `set_adapter` (no reload). The active adapter is state of the one
model, so `complete` holds a lock from the switch to the last token; routing needs no model.
`palm generate`, `palm serve` and the load benchmark all answer through `complete`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MAX_NEW_TOKENS = 256  # per answer: a CPU answers 256 tokens of SmolLM2-135M in a few seconds
DEFAULT_NEW_TOKENS = 48  # when a request gives none
# Temperatures below this answer greedily: dividing the logits by 1e-91 (the API allows any
# number from 0 to 2) overflows them to inf and sampling fails; at 1e-3 it is greedy already.
GREEDY_BELOW = 1e-3


@dataclass(frozen=True)
class Completion:
    """One answer: the text, token counts as the OpenAI API reports them, and why it ended."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn) or "length" (max_new_tokens reached)
    switched: bool  # the member's adapter had to be made active for this answer


class MemberModels:
    """The base model once, with each member's adapter loaded as a named PEFT adapter."""

    def __init__(self, base_path: Path, adapters: dict[str, Path], device: str = "cpu"):
        from peft import PeftModel

        from palm_tasks.llm.models import load_base, load_tokenizer, verify_member

        if not adapters:
            raise ValueError("no adapters to serve")
        for key, path in adapters.items():  # a damaged adapter: an error naming it, before loading
            verify_member(path, key)
        self.tokenizer = load_tokenizer(base_path)
        self.base = load_base(base_path, device)
        keys = list(adapters)
        # Adapter names are module names inside the model: prefixed so they never start with a digit.
        self.model = PeftModel.from_pretrained(self.base, adapters[keys[0]],
                                               adapter_name=self.adapter_name(keys[0]))
        for key in keys[1:]:
            self.model.load_adapter(adapters[key], adapter_name=self.adapter_name(key))
        self.model.eval()
        self.keys = keys
        self.switches = 0
        self._lock = threading.Lock()

    @staticmethod
    def adapter_name(key: str) -> str:
        return f"member_{key}"

    @property
    def active(self) -> str:
        return self.model.active_adapter.removeprefix("member_")

    def use(self, key: str) -> bool:
        """Make `key` the active adapter; True when that was a switch."""
        if key not in self.keys:
            raise KeyError(f"member {key} is not loaded")
        if key == self.active:
            return False
        self.model.set_adapter(self.adapter_name(key))
        self.switches += 1
        return True

    def count_tokens(self, messages: list[dict]) -> int:
        """Tokens of the conversation as the member reads it (chat template, generation prompt)."""
        return len(self._encode(messages)["input_ids"][0])

    def _encode(self, messages: list[dict]):
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.base.device)

    def complete(self, key: str, messages: list[dict], max_new_tokens: int = DEFAULT_NEW_TOKENS,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 on_text: Callable[[str], None] | None = None) -> Completion:
        """Member `key`'s answer to a conversation ([{"role", "content"}], as the chat template
        takes it). temperature 0 is greedy (the member's one answer); above 0, sampling with
        top_p, reproducible with `seed`. `on_text` receives the answer in pieces as it is
        generated (word boundaries, as transformers' TextStreamer cuts them). Temperatures below
        GREEDY_BELOW are greedy."""
        import torch
        from transformers import TextStreamer

        streamer = None
        if on_text is not None:
            class _Pieces(TextStreamer):
                def on_finalized_text(self, text: str, stream_end: bool = False):
                    if text:
                        on_text(text)

            streamer = _Pieces(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) \
            if temperature >= GREEDY_BELOW else dict(do_sample=False)
        with self._lock:
            switched = self.use(key)
            enc = self._encode(messages)
            if seed is not None:
                torch.manual_seed(seed)
            with torch.no_grad():
                ids = self.model.generate(**enc, max_new_tokens=max_new_tokens, streamer=streamer,
                                          pad_token_id=self.tokenizer.pad_token_id, **sampling)
        new = ids[0, enc["input_ids"].shape[1]:]
        ended = len(new) > 0 and int(new[-1]) in _end_ids(self.tokenizer, self.model)
        return Completion(text=self.tokenizer.decode(new, skip_special_tokens=True).strip(),
                          prompt_tokens=int(enc["input_ids"].shape[1]), completion_tokens=len(new),
                          finish_reason="stop" if ended or len(new) < max_new_tokens else "length",
                          switched=switched)

    def generate(self, key: str, prompt: str, max_new_tokens: int = DEFAULT_NEW_TOKENS) -> tuple[str, bool]:
        """Greedy answer of member `key` to one user prompt; (text, whether it switched)."""
        from palm_tasks.llm.models import chat

        done = self.complete(key, chat(prompt), max_new_tokens)
        return done.text, done.switched


def _end_ids(tokenizer, model) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def load_models(router, device: str = "cpu") -> MemberModels:
    """The base model of the router's portfolio with every member's adapter on it."""
    adapters = {m.key: router.adapter_dir(m.key) for m in router.members}
    return MemberModels(router.base_model_path(), adapters, device)
