"""Text clean-up applied to every field of an example: Unicode NFC, line endings, control characters, edges."""

from __future__ import annotations

import re
import unicodedata

from tunesmith.types import ChatExample, PreferenceExample, UnpairedPreferenceExample

# C0/C1 control characters except tab and newline, plus zero-width and bidi marks that render as nothing.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff\u202a-\u202e]")
TRAILING_SPACE = re.compile(r"[ \t]+\n")
MANY_BLANK_LINES = re.compile(r"\n{3,}")
WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """NFC-normalized text with LF line endings, no control characters, no trailing spaces, trimmed."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = CONTROL.sub("", text)
    text = TRAILING_SPACE.sub("\n", text)
    return MANY_BLANK_LINES.sub("\n\n", text).strip()


def map_texts(example, transform) -> None:
    """Apply `transform` to every text field of an example, in place."""
    for message in example.messages:
        message.content = transform(message.content)
        for call in message.tool_calls or []:  # arguments can carry PII too
            call["function"]["arguments"] = transform(call["function"]["arguments"])
    if isinstance(example, PreferenceExample):
        example.chosen, example.rejected = transform(example.chosen), transform(example.rejected)
    elif isinstance(example, UnpairedPreferenceExample):
        example.completion = transform(example.completion)


def example_texts(example: ChatExample | PreferenceExample | UnpairedPreferenceExample) -> list[str]:
    """Every text field of an example, in a fixed order."""
    texts = [m.content for m in example.messages]
    if isinstance(example, PreferenceExample):
        texts += [example.chosen, example.rejected]
    elif isinstance(example, UnpairedPreferenceExample):
        texts.append(example.completion)
    return texts


def dedup_text(example) -> str:
    """The text duplicates are judged on: roles and contents, case-folded, whitespace collapsed."""
    parts = [f"{m.role}: {m.content}{_calls_text(m)}" for m in example.messages]
    parts += [f"tool: {t['function']['name']}" for t in getattr(example, "tools", None) or []]
    parts += example_texts(example)[len(example.messages):]
    return WHITESPACE.sub(" ", "\n".join(parts).casefold()).strip()


def _calls_text(message) -> str:
    """Tool calls as text, so two examples that call different tools are not duplicates."""
    calls = message.tool_calls or []
    return "".join(f" [{c['function']['name']}({c['function']['arguments']})]" for c in calls)
