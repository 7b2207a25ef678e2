"""The running rows of one model as one left-padded batch: a shared KV cache that rows join and leave at any step.

Each row keeps its own keys and values; rows shorter than the longest are padded on the left and masked out, so one
forward pass decodes a token for every row. Joining pads whichever side is shorter; leaving drops the row and any
columns that became padding for every remaining row.
"""

from __future__ import annotations

from tunesmith.errors import TunesmithError


def new_cache(model):
    """An empty cache for `model`, refused when a layer is not a plain growing one (sliding windows, linear
    attention): padding rows in and out of those is not supported yet."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=_text_config(model))
    odd = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if odd:
        raise TunesmithError(f"the batching engine does not support this model's cache layers ({', '.join(odd)}) yet")
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

    def add(self, cache, length: int, repeats: int = 1) -> None:
        """Append `repeats` rows that share one freshly prefilled `cache` of `length` tokens."""
        import torch

        if repeats > 1:
            cache.batch_repeat_interleave(repeats)
        device = cache.layers[0].keys.device
        mask = torch.ones(repeats, length, dtype=torch.long, device=device)
        positions = torch.full((repeats,), length, dtype=torch.long, device=device)
        if self.cache is None:
            self.cache, self.mask, self.positions = cache, mask, positions
            return
        width = max(self.mask.shape[1], length)
        self._pad_left(width - self.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([mine.keys, _pad_keys(theirs.keys, width - length)])
            mine.values = torch.cat([mine.values, _pad_keys(theirs.values, width - length)])
        self.mask = torch.cat([self.mask, torch.nn.functional.pad(mask, (width - length, 0))])
        self.positions = torch.cat([self.positions, positions])

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order), then drop the columns that are padding for every remaining row."""
        import torch

        if not rows:
            self.cache = self.mask = self.positions = None
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        start = int(self.mask.any(dim=0).long().argmax())
        if start:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
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

    def _pad_left(self, columns: int) -> None:
        import torch

        if columns <= 0:
            return
        for layer in self.cache.layers:
            layer.keys, layer.values = _pad_keys(layer.keys, columns), _pad_keys(layer.values, columns)
        self.mask = torch.nn.functional.pad(self.mask, (columns, 0))


def _pad_keys(tensor, columns: int):
    """[rows, heads, tokens, dim] with `columns` zero tokens in front."""
    import torch

    return torch.nn.functional.pad(tensor, (0, 0, columns, 0)) if columns > 0 else tensor


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config
