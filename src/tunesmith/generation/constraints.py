"""Constrained decoding with llguidance: an answer that must parse as JSON, or match a JSON schema, token by token.

The grammar masks every token that could not continue a valid answer, and the end-of-turn token until the answer
is complete, so a finished constrained answer always parses and matches (`length` is the one way out: an answer cut
by `max_tokens` is incomplete, and says so by its finish reason).
"""

from __future__ import annotations

from typing import Callable

from tunesmith.errors import TunesmithError


class GrammarCompiler:
    """Compiles JSON schemas for one tokenizer (and the model's vocabulary size) into matcher factories."""

    def __init__(self, hf_tokenizer, vocab_size: int):
        import llguidance.hf

        self._tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size)
        self.vocab_size = vocab_size

    def json_schema(self, schema: dict, where: str = "response_format.json_schema.schema") -> Callable[[], object]:
        """A factory of fresh matchers for `schema`; a schema llguidance cannot compile is a TunesmithError."""
        from llguidance import LLMatcher

        try:
            grammar = LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
            problem = LLMatcher.validate_grammar(grammar, self._tokenizer)
        except (TypeError, ValueError) as exc:
            problem = str(exc)
        if problem:
            first = problem.strip().splitlines()[0][:300]
            raise TunesmithError(f"{where}: the schema cannot be enforced ({first}); fix or simplify it")
        tokenizer = self._tokenizer
        return lambda: LLMatcher(tokenizer, grammar)

    def any_json_object(self) -> Callable[[], object]:
        return self.json_schema({"type": "object"}, where="response_format")


def mask_logits(logits, matchers: list) -> None:
    """Set every token a row's matcher forbids to -inf, in place (rows without a matcher untouched)."""
    import llguidance.torch as lt
    import torch

    rows = [row for row, matcher in enumerate(matchers) if matcher is not None]
    if not rows:
        return
    bitmask = lt.allocate_token_bitmask(len(rows), logits.shape[-1])
    for slot, row in enumerate(rows):
        lt.fill_next_token_bitmask(matchers[row], bitmask, slot)
    # Unpacked with plain torch ops: llguidance's own helper compiles a kernel with torch.compile on first use.
    bits = torch.arange(32, dtype=torch.int32)
    allowed = ((bitmask[:, :, None] >> bits) & 1).bool().reshape(len(rows), -1)[:, :logits.shape[-1]]
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed.to(logits.device), float("-inf"))
