"""A KV cache layer that appends in place: its keys and values are views of a buffer with room to grow.

transformers' DynamicLayer concatenates the whole cache with every new token, so each decode step copies every
row's keys and values in every layer (a fifth of a decode step at batch 16 on the default model). Here a step writes
only its new token, rows that join are written into free rows (`append_rows`) and the last rows move into the places
of rows that leave (`move_rows`): the batch is copied only when its buffer is full. The layer writes only into a
buffer whose views it handed out itself (the padded batch's own), never into tensors someone assigned to it: the
prefix cache keeps copies of prompts and hands out views of them, which are copied before anything is appended.
"""

from __future__ import annotations

from functools import cache

ROOM_TOKENS = 32
"""Free token columns a new buffer gets beyond what it holds: one copy per this many decode steps at most."""
ROOM_ROWS = 8
"""Free rows (at least; half the rows held when more) a new buffer gets for rows that join later."""


@cache  # one class, so that every cache's layers are of the same type
def growing_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A DynamicLayer whose `update` writes the new tokens into free room instead of concatenating."""

        def lazy_initialization(self, key_states, value_states) -> None:
            super().lazy_initialization(key_states, value_states)
            self._buffers = self._views = None  # (keys buffer, values buffer), the views handed out of them
            self._start = 0  # buffer column where the views begin
            self._rows = 0  # buffer rows the views show (the rest is room for rows that join)

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            held, new = self.get_seq_length(), key_states.shape[-2]
            if not self._owns_views() or self._start + held + new > self._buffers[0].shape[-2]:
                held_part = (self.keys, self.values) if held else (key_states[:, :, :0], value_states[:, :, :0])
                self.stack_rows([held_part], held, extra=new)
            end, rows = self._start + held, slice(0, self._rows)
            self._buffers[0][rows, :, end:end + new] = key_states
            self._buffers[1][rows, :, end:end + new] = value_states
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
            self._rows = len(indices)
            self._show(held)

        def drop_front(self, columns: int) -> None:
            """Forget the first `columns` tokens of every row (columns that became padding for all rows); no copy."""
            if not self._owns_views():
                self.keys, self.values = self.keys[:, :, columns:], self.values[:, :, columns:]
                return
            held = self.get_seq_length()
            self._start += columns
            self._show(held - columns)

        def append_rows(self, keys, values) -> None:
            """Add rows after the last one, right-aligned behind zeros at this layer's length (which they must not
            exceed); written into free rows of the buffer when it has them, so the rows already held are not copied."""
            held, count, tokens = self.get_seq_length(), keys.shape[0], keys.shape[-2]
            if not self._owns_views() or tokens > held or self._rows + count > self._buffers[0].shape[0]:
                self.stack_rows([(self.keys, self.values), (keys, values)], max(held, tokens))
                return
            rows, start = slice(self._rows, self._rows + count), self._start
            for buffer, part in zip(self._buffers, (keys, values)):
                buffer[rows, :, start:start + held - tokens] = 0
                buffer[rows, :, start + held - tokens:start + held] = part
            self._rows += count
            self._show(held)

        def move_rows(self, order: list[int]) -> None:
            """Keep `len(order)` rows, row i taking what row order[i] holds; a row that moves must not be the
            destination of another (the padded batch moves last rows into the places of rows that left)."""
            if not self._owns_views():
                self.batch_select_indices(order)
                return
            held = self.get_seq_length()
            window = slice(self._start, self._start + held)
            for row, source in enumerate(order):
                if row != source:
                    for buffer in self._buffers:
                        buffer[row, :, window] = buffer[source, :, window]
            self._rows = len(order)
            self._show(held)

        def stack_rows(self, parts: list, width: int, extra: int = 0) -> None:
            """Hold the rows of `parts` in this order: (keys, values) of [rows, heads, tokens, dim], or None for one
            row with nothing yet, each right-aligned at `width` tokens behind zeros (left padding, masked out), in one
            new buffer with room (`extra` more columns for tokens about to be appended): joining rows costs one copy
            of the batch, not a copy per pad, concatenation and first append."""
            like_keys, like_values = next(part for part in parts if part is not None)
            if not self.is_initialized:
                self.lazy_initialization(like_keys, like_values)
            counts = [1 if part is None else part[0].shape[0] for part in parts]
            capacity = sum(counts) + max(ROOM_ROWS, sum(counts) // 2)
            buffers = tuple(like.new_empty(capacity, like.shape[1], width + extra + ROOM_TOKENS, like.shape[3])
                            for like in (like_keys, like_values))
            row = 0
            for part, count in zip(parts, counts):
                held = 0 if part is None else part[0].shape[-2]
                for buffer, index in zip(buffers, (0, 1)):
                    buffer[row:row + count, :, :width - held] = 0  # padding must be finite: masked, times zero
                    if held:
                        buffer[row:row + count, :, width - held:width] = part[index]
                row += count
            self._buffers, self._start, self._rows = buffers, 0, sum(counts)
            self._show(width)

        def _show(self, length: int) -> None:
            window = slice(self._start, self._start + length)
            self.keys, self.values = (self._buffers[0][:self._rows, :, window],
                                      self._buffers[1][:self._rows, :, window])
            self._views = (self.keys, self.values)

        def _owns_views(self) -> bool:
            return self._views is not None and self._views[0] is self.keys and self._views[1] is self.values

    return GrowingLayer

