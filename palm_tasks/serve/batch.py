"""The rows of the engine's batch as the model sees them: one key/value cache, an attention mask,
each row's next position and its last logits.

The cache is transformers' DynamicCache with the rows right-aligned: rows that join are padded
on the left to the batch's length (or the batch to theirs), the attention mask hides the
padding, and each row's position ids count only its own tokens, so a row computes what it would
alone. Columns that every row pads are dropped when rows leave. Only full-attention cache layers
can be re-aligned so (a sliding-window layer keeps only its window): other models are refused.
"""

from __future__ import annotations


class Batch:
    """`forward(input_ids, mask, positions, cache, adapters, keep)` -> logits runs the model."""

    def __init__(self, forward, device, config):
        self.forward, self.device, self.config = forward, device, config  # config: the model's
        self.cache = self.mask = self.positions = self.logits = None

    def __len__(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def prefill(self, prompts: list[list[int]], adapters: list[str], pad_id: int, prefix: list | None = None,
                prefix_length: int = 0):
        """Encode prompts (left-padded, one adapter each) in one forward pass: a part to `add`.
        With `prefix` (per layer (keys, values) of the first prefix_length tokens of every row,
        serve/prefixes.py), `prompts` are what follows it; the padding then lies between the two,
        which the attention mask and the positions account for."""
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), prefix_length + width), dtype=torch.long)
        mask[:, :prefix_length] = 1
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, prefix_length + width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, prefix_length:]  # count real tokens only
        cache = self.new_cache()
        for i, (keys, values) in enumerate(prefix or []):
            cache.update(keys, values, i)
        logits = self.forward(ids, mask, positions, cache, adapters, 1)[:, -1]
        return cache, mask, positions[:, -1] + 1, logits

    @staticmethod
    def row_states(part, row: int, length: int) -> list:
        """Per layer (keys, values) of the first `length` real tokens of a prefilled part's row."""
        cache, mask = part[0], part[1]
        columns = mask[row].nonzero().squeeze(-1)[:length]
        return [(layer.keys[row:row + 1, :, columns], layer.values[row:row + 1, :, columns]) for layer in cache.layers]

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def add(self, part, index) -> None:
        """Rows `index` of a prefilled part (cache, mask, positions, logits) join the batch at its
        end; the shorter side is padded on the left."""
        import torch

        cache, mask, positions, logits = part
        select(cache, index)
        mask, positions, logits = mask[index], positions[index], logits[index]
        if self.cache is None:
            check_layers(cache)
            self.cache, self.mask, self.positions, self.logits = cache, mask, positions, logits
            return
        width, new = self.mask.shape[1], mask.shape[1]
        if new < width:
            pad_left(cache, width - new)
            mask = torch.nn.functional.pad(mask, (width - new, 0))
        elif new > width:
            pad_left(self.cache, new - width)
            self.mask = torch.nn.functional.pad(self.mask, (new - width, 0))
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        self.mask = torch.cat([self.mask, mask])
        self.positions = torch.cat([self.positions, positions])
        self.logits = torch.cat([self.logits, logits])

    def keep(self, keep: list[int]) -> None:
        """Only the rows `keep` stay; columns that every remaining row pads are dropped."""
        import torch

        if not keep:
            self.cache = self.mask = self.positions = self.logits = None
            return
        index = torch.tensor(keep, device=self.device)
        select(self.cache, index)
        self.mask, self.positions, self.logits = self.mask[index], self.positions[index], self.logits[index]
        unused = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-padding columns
        if unused:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
            self.mask = self.mask[:, unused:]

    def step(self, tokens, adapters: list[str]) -> None:
        """Feed each row its token (tokens[i]) with its adapter; the logits of the next token."""
        import torch

        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.logits = self.forward(tokens[:, None], self.mask, self.positions[:, None], self.cache, adapters, 1)[:, -1]
        self.positions = self.positions + 1


def select(cache, index) -> None:
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[index], layer.values[index]


def pad_left(cache, n: int) -> None:
    import torch

    for layer in cache.layers:
        layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, n, 0))
        layer.values = torch.nn.functional.pad(layer.values, (0, 0, n, 0))


def check_layers(cache) -> None:
    from transformers.cache_utils import DynamicLayer

    kinds = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if kinds:
        raise NotImplementedError(f"continuous batching needs full-attention cache layers; this model has "
                                  f"{', '.join(sorted(kinds))}")
