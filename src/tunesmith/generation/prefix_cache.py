"""Prompts that start alike (a shared system prompt, a few-shot preamble) reuse the keys and values already computed
for that start, as vLLM's automatic prefix caching does: only the rest of the prompt is prefilled."""

from __future__ import annotations

from collections import OrderedDict


class PrefixCache:
    """Keys and values of recently prefilled prompts, per (model group, adapter), bounded by a token budget."""

    def __init__(self, max_tokens: int = 8192, min_shared: int = 16):
        self.max_tokens, self.min_shared = max_tokens, min_shared
        self._entries: OrderedDict[tuple, list] = OrderedDict()  # (owner, prompt ids) -> [(keys, values) per layer]
        self._tokens = 0
        self.reused_tokens = 0

    def lookup(self, owner, prompt: list[int], empty_cache) -> int:
        """Fill `empty_cache` with the longest cached start of `prompt` (leaving at least one token to prefill, whose
        logits choose the first answer token); how many tokens it holds (0 when nothing worth reusing)."""
        best, best_key = 0, None
        for key in self._entries:
            if key[0] != owner:
                continue
            shared = _common_prefix(key[1], prompt)
            if shared > best:
                best, best_key = shared, key
        best = min(best, len(prompt) - 1)
        if best < self.min_shared:
            return 0
        self._entries.move_to_end(best_key)
        for layer, (keys, values) in zip(empty_cache.layers, self._entries[best_key]):
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys[:, :, :best], values[:, :, :best]  # views: later growth concatenates
        self.reused_tokens += best
        return best

    def store(self, owner, prompt: list[int], cache) -> None:
        """Remember a freshly prefilled single-row cache (its tensors are never changed in place afterwards)."""
        if len(prompt) < self.min_shared or len(prompt) > self.max_tokens:
            return
        key = (owner, tuple(prompt))
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        self._entries[key] = [(layer.keys, layer.values) for layer in cache.layers]
        self._tokens += len(prompt)
        while self._tokens > self.max_tokens:
            (_, old), _ = self._entries.popitem(last=False)
            self._tokens -= len(old)


def _common_prefix(a: tuple, b: list[int]) -> int:
    limit = min(len(a), len(b))
    for index in range(limit):
        if a[index] != b[index]:
            return index
    return limit
