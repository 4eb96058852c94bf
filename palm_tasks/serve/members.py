"""The members in memory: one base model with every member's LoRA adapter as a named adapter.

Adapters are named by member key and content (`member_<key>_<sha256 of the weights>`), so two
portfolio versions that share a member share its adapter, and a member key whose files changed
is loaded again under a new name. `forward` runs a batch whose rows are for different members:
each LoRA layer computes PEFT's mixed-adapter batch (`adapter_names`, one adapter per row), or,
when every row is for one member, PEFT's plain path with that adapter active. Adapters are added
and deleted while others answer, between two steps of the engine (serve/engine.py), which owns
the model. `palm generate`, `palm serve` and the load benchmark all answer through the engine.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

from palm_tasks.hashing import files_sha256


def adapter_name(key: str, adapter_dir: Path) -> str:
    """The adapter's name in the model: the member key (as a module name allows) and the first
    hex digits of its weights' sha256."""
    digest = files_sha256(sorted(Path(adapter_dir).glob("*.safetensors")))
    return f"member_{re.sub(r'[^A-Za-z0-9_]', '_', key)}_{digest[:12]}"


class MemberModels:
    """The base model once, with adapters loaded (and deleted) by name."""

    def __init__(self, base_path: Path, adapters: dict[str, Path], device: str = "cpu"):
        """`adapters`: adapter name -> directory (at least one: PEFT wraps the base with the first)."""
        from peft import PeftModel

        from palm_tasks.llm.models import load_base, load_tokenizer

        if not adapters:
            raise ValueError("no adapters to serve")
        for name, path in adapters.items():  # a damaged adapter: an error naming it, before loading anything
            self.verify(name, path)
        self.base_path = Path(base_path)
        self.tokenizer = load_tokenizer(base_path)
        self.base = load_base(base_path, device)
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer is not safe from two threads at once
        first, *rest = adapters
        self.model = PeftModel.from_pretrained(self.base, adapters[first], adapter_name=first)
        self.model.eval()
        self._rows: list[str] | None = None  # the adapter of each row of the forward pass running
        self._hooks: list = []
        self.load({name: adapters[name] for name in rest}, verify=False)
        self.end_ids = _end_ids(self.tokenizer, self.model)

    def forward(self, adapters: list[str], **inputs):
        """The model's output for a batch whose row i is for the adapter adapters[i]."""
        if len(set(adapters)) == 1:  # one member: PEFT's plain path, 18-31% faster (benchmarks/serve_steps.py)
            if self.model.active_adapter != adapters[0]:
                self.model.set_adapter(adapters[0])
            return self.model(**inputs)
        self._rows = adapters
        try:
            return self.model(**inputs)
        finally:
            self._rows = None

    def _hook_layers(self) -> None:
        """Hand each LoRA layer the adapter of every row from a hook registered once, PEFT's own
        `_adapter_names_pre_forward_hook` on the modules PEFT hooks. `model(..., adapter_names=)`
        registers and removes those hooks on every forward pass, after walking every module twice:
        12 ms of a 145 ms step for 16 rows of SmolLM2-135M over 4 members (benchmarks/serve_steps.py).
        The layers' mixed-batch computation itself is PEFT's, unchanged."""
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora.model import _adapter_names_pre_forward_hook
        from peft.utils import AuxiliaryTrainingWrapper

        def hook(module, args, kwargs):
            if self._rows is None:
                return args, kwargs
            return _adapter_names_pre_forward_hook(module, args, kwargs, adapter_names=self._rows)

        for handle in self._hooks:
            handle.remove()
        self._hooks = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in self.model.modules()
                       if isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper))]

    @staticmethod
    def verify(name: str, path: Path) -> None:
        """schema.ArtifactError naming the adapter unless its files are whole (llm.models.verify_member)."""
        from palm_tasks.llm.models import verify_member

        key = name.removeprefix("member_").rsplit("_", 1)[0] if name.startswith("member_") else name
        verify_member(path, key)

    @property
    def loaded(self) -> set[str]:
        return set(self.model.peft_config)

    def load(self, adapters: dict[str, Path], verify: bool = True) -> list[str]:
        """Load the adapters not loaded yet (each checked first unless `verify` is false because
        the caller did: a damaged one is an error naming it, before anything changes); returns
        the names loaded."""
        new = {name: path for name, path in adapters.items() if name not in self.loaded}
        for name, path in new.items():
            if verify:
                self.verify(name, path)
        for name, path in new.items():
            self.model.load_adapter(path, adapter_name=name)
        self.model.eval()
        self._hook_layers()  # an adapter may wrap modules no adapter wrapped before
        return list(new)

    def delete(self, names) -> list[str]:
        """Delete these adapters (never the last one); returns the names deleted."""
        gone = []
        for name in names:
            if name in self.loaded and len(self.loaded) > 1:
                self.model.delete_adapter(name)
                gone.append(name)
        self._hook_layers()
        return gone

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation as a member reads it (chat template, generation prompt)."""
        with self._tokenizer_lock:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a plain prompt (a completion's), with the tokenizer's special tokens as a
        completion API adds them."""
        with self._tokenizer_lock:
            return self.tokenizer(text)["input_ids"]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)


def _end_ids(tokenizer, model) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
