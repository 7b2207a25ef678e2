"""Showing a user which tokens of an example are trained, so the loss mask can be checked by eye."""

from __future__ import annotations

from rich.text import Text

from tunesmith.data.template import IGNORE_INDEX, tokenize_example


def masked_example_text(tokenizer, messages: list[dict], max_length: int, tools: list[dict] | None = None) -> Text:
    """The rendered example, trained tokens in bold green on a dark background, the rest dimmed."""
    example = tokenize_example(tokenizer, messages, max_length, tools)
    text = Text()
    for token_id, label in zip(example.input_ids, example.labels):
        piece = tokenizer.decode([token_id])
        text.append(piece, style="bold green on grey11" if label != IGNORE_INDEX else "dim")
    return text


def mask_legend(tokenizer, messages: list[dict], max_length: int, tools: list[dict] | None = None) -> str:
    """One line of counts: tokens in total, tokens trained, and the last trained token."""
    example = tokenize_example(tokenizer, messages, max_length, tools)
    trained = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    last = repr(tokenizer.decode(trained[-1:])) if trained else "none"
    return f"{len(example.input_ids)} tokens, {len(trained)} trained; last trained token: {last}"
