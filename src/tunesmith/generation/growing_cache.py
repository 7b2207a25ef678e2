"""A KV cache layer that appends in place: its keys and values are views of a buffer with room to grow.

transformers' DynamicLayer concatenates the whole cache with every new token, so each decode step copies every
row's keys and values in every layer (a fifth of a decode step at batch 16 on the default model). Here a step writes
only its new token; the buffer is copied when it is full, when rows leave (`batch_select_indices`, room included),
or when someone replaced `keys`/`values` (the padded batch pads and merges by assigning new tensors, and the prefix
cache hands out views of stored prompts): the layer only writes into a buffer whose views it handed out itself, and
only past their end, so a view someone kept is never changed under its holder.
"""

from __future__ import annotations

from functools import cache

ROOM_TOKENS = 32
"""Free token columns a new buffer gets beyond what it holds: one copy per this many decode steps at most."""


@cache  # one class, so that every cache's layers are of the same type
def growing_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A DynamicLayer whose `update` writes the new tokens into free room instead of concatenating."""

        def lazy_initialization(self, key_states, value_states) -> None:
            super().lazy_initialization(key_states, value_states)
            self._buffers = self._views = None  # (keys buffer, values buffer), the views handed out of them
            self._start = 0  # buffer column where the views begin

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            held, new = self.get_seq_length(), key_states.shape[-2]
            if not self._owns_views() or self._start + held + new > self._buffers[0].shape[-2]:
                self._buffers = (_with_room(self.keys, key_states, held), _with_room(self.values, value_states, held))
                self._start = 0
            end = self._start + held
            self._buffers[0][:, :, end:end + new] = key_states
            self._buffers[1][:, :, end:end + new] = value_states
            self._show(held + new)
            return self.keys, self.values

        def batch_select_indices(self, indices) -> None:
            """Keep the rows `indices` (a row may repeat), room and all, so the next step still appends in place."""
            if self.get_seq_length() == 0:
                return
            if not self._owns_views():
                super().batch_select_indices(indices)
                return
            held = self.get_seq_length()
            self._buffers = (self._buffers[0][indices], self._buffers[1][indices])
            self._show(held)

        def drop_front(self, columns: int) -> None:
            """Forget the first `columns` tokens of every row (columns that became padding for all rows); no copy."""
            if not self._owns_views():
                self.keys, self.values = self.keys[:, :, columns:], self.values[:, :, columns:]
                return
            held = self.get_seq_length()
            self._start += columns
            self._show(held - columns)

        def stack_rows(self, parts: list, width: int) -> None:
            """Hold the rows of `parts` in this order: (keys, values) of [rows, heads, tokens, dim], or None for one
            row with nothing yet, each right-aligned at `width` tokens behind zeros (left padding, masked out), in one
            new buffer with room: joining rows costs one copy of the batch, not a copy per pad, concatenation and
            first append."""
            like_keys, like_values = next(part for part in parts if part is not None)
            counts = [1 if part is None else part[0].shape[0] for part in parts]
            buffers = tuple(like.new_empty(sum(counts), like.shape[1], width + ROOM_TOKENS, like.shape[3])
                            for like in (like_keys, like_values))
            row = 0
            for part, count in zip(parts, counts):
                held = 0 if part is None else part[0].shape[-2]
                for buffer, index in zip(buffers, (0, 1)):
                    buffer[row:row + count, :, :width - held] = 0  # padding must be finite: masked, times zero
                    if held:
                        buffer[row:row + count, :, width - held:width] = part[index]
                row += count
            self._buffers, self._start = buffers, 0
            self._show(width)

        def _show(self, length: int) -> None:
            window = slice(self._start, self._start + length)
            self.keys, self.values = self._buffers[0][:, :, window], self._buffers[1][:, :, window]
            self._views = (self.keys, self.values)

        def _owns_views(self) -> bool:
            return self._views is not None and self._views[0] is self.keys and self._views[1] is self.values

    return GrowingLayer


def _with_room(held, new, length: int):
    """A buffer for `length` held tokens plus `new` and ROOM_TOKENS more, the held ones copied in."""
    rows, heads, _, dim = new.shape
    buffer = new.new_empty(rows, heads, length + new.shape[-2] + ROOM_TOKENS, dim)
    if length:
        buffer[:, :, :length] = held
    return buffer
