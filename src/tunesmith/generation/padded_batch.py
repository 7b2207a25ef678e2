"""The running rows of one model as one left-padded batch: a shared KV cache that rows join and leave at any step.

Each row keeps its own keys and values; rows shorter than the longest are padded on the left and masked out, so one
forward pass decodes a token for every row. Prompts prefilled together are padded too (a row may then hold padding
between a reused prefix and the rest of its prompt: the mask hides it, positions skip it). Joining pads whichever
side is shorter; a row that leaves gives its place to the last row, and columns that became padding for every
remaining row are dropped.
"""

from __future__ import annotations

from tunesmith.errors import TunesmithError
from tunesmith.generation.growing_cache import growing_layer_class


def new_cache(model):
    """An empty cache for `model`, refused when a layer is not a plain growing one (sliding windows, linear
    attention): padding rows in and out of those is not supported yet."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=_text_config(model))
    odd = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if odd:
        raise TunesmithError(f"the batching engine does not support this model's cache layers ({', '.join(odd)}) yet")
    layer_class = growing_layer_class()
    cache.layers = [layer_class() for _ in cache.layers]
    return cache


class PaddedBatch:
    """KV cache, attention mask and next position of every running row (row order is the caller's row order)."""

    def __init__(self):
        self.cache = None
        self.mask = None       # [rows, width] 1 for real tokens, 0 for left padding
        self.positions = None  # [rows] position id of each row's next token

    @property
    def size(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @classmethod
    def of_prefixes(cls, model, caches: list, lengths: list[int]) -> PaddedBatch:
        """One batch from single-row caches holding `lengths` tokens each (0: an empty cache), left-padded."""
        import torch

        batch = cls()
        width = max(lengths)
        device = next(model.parameters()).device
        batch.mask = torch.stack([torch.nn.functional.pad(torch.ones(n, dtype=torch.long, device=device),
                                                          (width - n, 0)) for n in lengths])
        batch.positions = torch.tensor(lengths, dtype=torch.long, device=device)
        if width == 0:
            batch.cache = new_cache(model)
            return batch
        batch.cache = caches[lengths.index(width)]
        for index, layer in enumerate(batch.cache.layers):
            layer.stack_rows([(cache.layers[index].keys, cache.layers[index].values) if n else None
                              for cache, n in zip(caches, lengths)], width)
        return batch

    def prefill_inputs(self, chunks: list[list[int]], pad_id: int = 0) -> dict:
        """Forward arguments that append each row's `chunks[i]` after what the row holds (left-padded inputs)."""
        import torch

        device, width = self.mask.device, max(len(chunk) for chunk in chunks)
        ids = torch.tensor([[pad_id] * (width - len(c)) + c for c in chunks], dtype=torch.long, device=device)
        new = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunks], dtype=torch.long, device=device)
        steps = torch.arange(width, device=device)[None, :] - (width - torch.tensor([len(c) for c in chunks],
                                                                                    device=device))[:, None]
        positions = (self.positions[:, None] + steps).clamp(min=0)
        self.mask = torch.cat([self.mask, new], dim=1)
        self.positions = self.positions + torch.tensor([len(c) for c in chunks], device=device)
        return {"input_ids": ids, "attention_mask": self.mask, "position_ids": positions,
                "past_key_values": self.cache}

    def row_cache(self, row: int, model):
        """Row `row` alone, its padding removed: a single-row cache for the prefix cache."""
        cache, real = new_cache(model), self.mask[row].bool()
        first = int(real.long().argmax())
        if bool(real[first:].all()):  # padding only in front (the usual case): a plain copy of the rest
            real = slice(first, None)
        for mine, layer in zip(self.cache.layers, cache.layers):
            layer.lazy_initialization(mine.keys, mine.values)
            layer.keys = mine.keys[row:row + 1, :, real].clone()
            layer.values = mine.values[row:row + 1, :, real].clone()
        return cache

    def merge(self, other: PaddedBatch) -> None:
        """Append `other`'s rows (their caches must come from the same model)."""
        import torch

        if other.size == 0:
            return
        if self.cache is None:
            self.cache, self.mask, self.positions = other.cache, other.mask, other.positions
            return
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.append_rows(theirs.keys, theirs.values)  # in free rows when they fit, else one copy of all
        self.mask = torch.cat([_pad_mask(self.mask, width), _pad_mask(other.mask, width)])
        self.positions = torch.cat([self.positions, other.positions])

    def remove(self, leaving: list[int]) -> list[int]:
        """Drop the rows `leaving`; the last rows move into their places, so only moved rows are copied. Returns the
        new row order as old row indices (the caller reorders its own rows the same way)."""
        import torch

        gone = set(leaving)
        if not gone:
            return list(range(self.size))
        size = self.size - len(gone)
        movers = iter([row for row in range(self.size - 1, size - 1, -1) if row not in gone])
        order = [next(movers) if row in gone else row for row in range(size)]
        if not order:
            self.cache = self.mask = self.positions = None
            return order
        for layer in self.cache.layers:
            layer.move_rows(order)
        index = torch.tensor(order, dtype=torch.long, device=self.mask.device)
        self.mask, self.positions = self.mask[index], self.positions[index]
        self._drop_padding_columns()
        return order

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order; a row listed twice is copied), then drop the columns that are padding
        for every remaining row."""
        import torch

        if not rows:
            self.cache = self.mask = self.positions = None
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        self._drop_padding_columns()

    def _drop_padding_columns(self) -> None:
        """Forget the columns that are padding for every row (at the front)."""
        start = int(self.mask.any(dim=0).long().argmax())
        if start:
            for layer in self.cache.layers:
                layer.drop_front(start)
            self.mask = self.mask[:, start:]

    def step_inputs(self) -> dict:
        """Forward arguments for one new token per row (the caller adds `input_ids`)."""
        import torch

        ones = torch.ones(self.size, 1, dtype=torch.long, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        return {"attention_mask": self.mask, "position_ids": self.positions[:, None], "past_key_values": self.cache}

    def advance(self) -> None:
        """After a forward pass: every row is one token longer."""
        self.positions = self.positions + 1


def _pad_mask(mask, width: int):
    """[rows, columns] with zero columns in front up to `width`."""
    import torch

    return torch.nn.functional.pad(mask, (width - mask.shape[1], 0)) if mask.shape[1] < width else mask


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config
