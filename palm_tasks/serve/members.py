"""The members in memory: one base model with every member's LoRA adapter as a named adapter.

Adapters are named by member key and content (`member_<key>_<sha256 of the weights>`), so two
portfolio versions that share a member share its adapter, and a member key whose files changed
is loaded again under a new name. `forward` runs a batch whose rows are for different members.
When every row is for one member it takes PEFT's plain path with that adapter active. Otherwise
every LoRA layer adds all loaded adapters' low-rank products at once, side by side, with each row
masked to its own member's columns (`_StackedLoRA`): two matrix products per layer whatever the
number of members, where PEFT's mixed-adapter batch (`adapter_names`) runs a gather, two products
and a scatter per member. Adapters are added and deleted while others answer, between two steps
of the engine (serve/engine.py), which owns the model. `palm generate`, `palm serve` and the load
benchmark all answer through the engine.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from palm_tasks.hashing import files_sha256

if TYPE_CHECKING:
    import torch


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
        self._signatures: dict[tuple[str, ...], _StackedLoRA] = {}  # adapters of a layer -> one such layer
        self._row_masks: dict[tuple[str, ...], torch.Tensor] = {}  # the same -> this pass's row mask
        self.load({name: adapters[name] for name in rest}, verify=False)
        self.end_ids = _end_ids(self.tokenizer, self.model)

    def forward(self, adapters: list[str], **inputs):
        """The model's output for a batch whose row i is for the adapter adapters[i]."""
        if len(set(adapters)) == 1:  # one member: PEFT's plain path, the adapter active
            if self.model.active_adapter != adapters[0]:
                self.model.set_adapter(adapters[0])
            return self.model(**inputs)
        self._rows = ["__base__"] * len(adapters)  # PEFT's name for "no adapter": each layer runs its base only
        self._row_masks = {names: stack.row_mask(adapters) for names, stack in self._signatures.items()}
        try:
            return self.model(**inputs)
        finally:
            self._rows = None
            self._row_masks = {}

    def _hook_layers(self) -> None:
        """Stack every LoRA layer's adapters (`_StackedLoRA`) and register, once, the two hooks of a
        mixed batch on each layer: before it, PEFT's own `_adapter_names_pre_forward_hook` with
        every row on the base (the layer computes its base layer only); after it, the stacked
        low-rank products added with each row's mask. `model(..., adapter_names=)` would register
        and remove PEFT's hooks on every forward pass, after walking every module twice."""
        from peft.tuners.lora import Linear, LoraLayer
        from peft.tuners.lora.model import _adapter_names_pre_forward_hook
        from peft.utils import AuxiliaryTrainingWrapper

        def before(module, args, kwargs):
            if self._rows is None:
                return args, kwargs
            return _adapter_names_pre_forward_hook(module, args, kwargs, adapter_names=self._rows)

        def after(module, args, kwargs, output):
            if self._rows is None:
                return output
            stack = stacks[module]
            x = args[0] if args else kwargs["x"]
            return output + stack.delta(x, self._row_masks[stack.names]).to(output.dtype)

        stacks, signatures = {}, {}  # built before the old hooks go: a refusal leaves them serving
        for name, module in self.model.named_modules():
            if isinstance(module, AuxiliaryTrainingWrapper) or (
                    isinstance(module, LoraLayer) and (type(module) is not Linear or module.lora_variant)):
                kind = ", ".join(type(v).__name__ for v in getattr(module, "lora_variant", {}).values())
                raise ValueError(f"{name}: palm serve batches members whose adapters are plain LoRA on linear "
                                 f"layers (as palm trains them), not {kind or type(module).__name__}")
            if isinstance(module, Linear) and module.lora_A:
                stacks[module] = _StackedLoRA(module)
                signatures.setdefault(stacks[module].names, stacks[module])
        for handle in self._hooks:
            handle.remove()
        self._signatures = signatures
        self._hooks = [handle for module in stacks for handle in (
            module.register_forward_pre_hook(before, with_kwargs=True),
            module.register_forward_hook(after, with_kwargs=True))]

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
        try:
            self._hook_layers()  # an adapter may wrap modules no adapter wrapped before
        except ValueError:  # an adapter the mixed step cannot batch: the model as it was, and say so
            for name in new:
                self.model.delete_adapter(name)
            raise
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


class _StackedLoRA:
    """One LoRA layer's adapters side by side: A = [A_1; ...; A_n] (rank-sum x in) and
    B = [s_1 B_1, ..., s_n B_n] (out x rank-sum), s_i the adapter's scaling. A row x for member i
    gets B (m_i * (A x)) = s_i B_i A_i x, where the mask m_i is 1 on member i's columns and 0
    elsewhere: the layer's LoRA output for member i, for every row in two matrix products."""

    def __init__(self, layer):
        import torch

        self.names = tuple(layer.lora_A)  # the adapters that target this layer, in loading order
        with torch.no_grad():
            self.a = torch.cat([layer.lora_A[n].weight for n in self.names], dim=0)
            self.b = torch.cat([layer.lora_B[n].weight * layer.scaling[n] for n in self.names], dim=1)
        self.columns, start = {}, 0
        for name in self.names:
            rank = layer.lora_A[name].weight.shape[0]
            self.columns[name] = slice(start, start + rank)
            start += rank

    def row_mask(self, adapters: list[str]) -> torch.Tensor:
        """(rows, 1, rank-sum): row i is 1 on the columns of adapters[i] (0 everywhere for an
        adapter that does not target this layer)."""
        import torch

        mask = torch.zeros(len(adapters), 1, self.a.shape[0], dtype=self.a.dtype, device=self.a.device)
        for row, name in enumerate(adapters):
            if name in self.columns:
                mask[row, 0, self.columns[name]] = 1
        return mask

    def delta(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Each row's LoRA output under its own adapter: x (rows, tokens, in) -> (rows, tokens, out)."""
        from torch.nn.functional import linear

        low = linear(x.to(self.a.dtype), self.a) * mask
        return linear(low, self.b)


def _end_ids(tokenizer, model) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
