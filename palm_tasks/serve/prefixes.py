"""Prompt beginnings already encoded, per adapter: automatic prefix caching, as vLLM has it.

Chat requests share long beginnings (SmolLM2's chat template alone puts 26 tokens of system
prompt before every user message), and encoding a prompt costs as much as decoding as many
tokens. The engine keeps, per adapter (a LoRA adapter changes the keys and values), the
key/value states of the prompts it encoded, and a new prompt whose first tokens were seen starts
from them: only the rest is run through the model. Prefixes are matched in blocks of BLOCK
tokens, the longest first; at least the last token of a prompt is always computed (its logits
start the answer). A prefix's states do not depend on what follows it (causal attention), so an
answer is the same with or without the cache (up to a batch's floating-point rounding; tested).

Memory is bounded (params.yaml serve.prefix_cache_mb): the least recently used prompts go first.
Entries are keyed by adapter name, which names the adapter's content (serve/members.py), so an
entry never outlives the weights it was computed with in meaning; a deleted adapter's entries
age out.
"""

from __future__ import annotations

import collections
import itertools

BLOCK = 8  # tokens: prefixes are found at multiples of this


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict = collections.OrderedDict()  # id -> (layers, bytes, index keys)
        self._index: dict[tuple, tuple[int, int]] = {}  # (adapter, first k x BLOCK tokens) -> (entry id, length)
        self._ids = itertools.count()
        self.bytes = 0
        self.hits = self.tokens_saved = 0

    def longest(self, adapter: str, prompt: list[int]) -> tuple[list | None, int]:
        """(per layer (keys, values) of the longest known beginning of `prompt`, its length), the
        states shaped [1, heads, length, head dim]; (None, 0) when none is known."""
        for length in range((len(prompt) - 1) // BLOCK * BLOCK, 0, -BLOCK):
            found = self._index.get((adapter, tuple(prompt[:length])))
            if found is None or found[0] not in self._entries:
                continue
            self._entries.move_to_end(found[0])
            self.hits += 1
            self.tokens_saved += length
            layers = self._entries[found[0]][0]
            return [(k[:, :, :length], v[:, :, :length]) for k, v in layers], length
        return None, 0

    def store(self, adapter: str, prompt: list[int], layers: list) -> None:
        """Keep the states of `prompt` (a multiple of BLOCK tokens; layers as `longest` gives them)."""
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if not prompt or nbytes > self.max_bytes or (adapter, tuple(prompt)) in self._index:
            return
        key = next(self._ids)
        index_keys = [(adapter, tuple(prompt[:length])) for length in range(BLOCK, len(prompt) + 1, BLOCK)]
        for k in index_keys:
            self._index[k] = (key, len(k[1]))
        self._entries[key] = (layers, nbytes, index_keys)
        self.bytes += nbytes
        while self.bytes > self.max_bytes:
            old, (_, size, keys) = self._entries.popitem(last=False)
            self.bytes -= size
            for k in keys:
                if self._index.get(k, (None,))[0] == old:
                    del self._index[k]

    def stats(self) -> dict:
        return {"prompts": len(self._entries), "mib": round(self.bytes / 2**20, 1), "hits": self.hits,
                "tokens_saved": self.tokens_saved}
