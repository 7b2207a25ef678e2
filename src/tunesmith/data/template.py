"""Applying the model's chat template and marking which tokens are trained.

Trained tokens are the assistant turns *including* the end-of-turn token the template writes after
them (so the model learns to stop), and nothing else: not the system/user turns, not the template's
role headers, not the whitespace after the end-of-turn token, not padding.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from tunesmith.errors import TunesmithError

IGNORE_INDEX = -100


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)

    @property
    def trained_ids(self) -> list[int]:
        """The ids of the trained tokens (the assistant answers and their end-of-turn), in order."""
        return [token for token, label in zip(self.input_ids, self.labels) if label != IGNORE_INDEX]


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
    """The conversation (and the tools it may call) as text, exactly as the model's chat template writes it.

    `weight` is tunesmith's, not the template's, so it is left out.
    """
    messages = [{key: value for key, value in m.items() if key != "weight"} for m in messages]
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def is_trained_turn(message: dict) -> bool:
    """Assistant turns are trained unless they carry `weight: 0` (kept as context only)."""
    return message["role"] == "assistant" and message.get("weight", 1) != 0


def check_tool_calls_rendered(message: dict, rendered_turn: str) -> None:
    """A template that silently drops tool calls would train the model to answer with nothing: refuse it."""
    for call in message.get("tool_calls") or []:
        if call["function"]["name"] not in rendered_turn:
            raise TunesmithError(
                f"the model's chat template drops tool calls (the call to {call['function']['name']!r} is missing "
                "from the rendered turn); use a base model whose chat template supports tools, or remove the "
                "tool turns from the data")


def template_fingerprint(tokenizer) -> str:
    """Short hash of the chat template; training, evaluation and serving must agree on it."""
    return hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest()[:16]


def assistant_char_spans(tokenizer, messages: list[dict],
                         tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text and the character spans of each trained assistant answer plus its end-of-turn marker."""
    text = render(tokenizer, messages, tools=tools)
    missing = [t["function"]["name"] for t in tools or [] if t["function"]["name"] not in text]
    if missing:
        raise TunesmithError(f"the model's chat template ignores `tools` (the definition of {missing[0]!r} is not in "
                             "the rendered example); use a base model whose chat template supports tools, or drop "
                             "the `tools` field")
    spans = []
    for index, message in enumerate(messages):
        if not is_trained_turn(message):
            continue
        prefix = render(tokenizer, messages[:index], add_generation_prompt=True, tools=tools)
        upto = render(tokenizer, messages[: index + 1], tools=tools)
        if not (text.startswith(upto) and upto.startswith(prefix)):
            raise TunesmithError(
                "the chat template does not render conversations prefix by prefix, so assistant turns "
                "cannot be located; use a model whose template appends turns in order"
            )
        end = len(upto.rstrip())  # the newline after the end-of-turn token is template glue, not output
        check_tool_calls_rendered(message, upto[len(prefix):end])
        spans.append((len(prefix), end))
    return text, spans


def tokenize_example(tokenizer, messages: list[dict], max_length: int,
                     tools: list[dict] | None = None) -> TokenizedExample:
    """Token ids and labels with everything but the assistant answers (and their end-of-turn) masked."""
    text, spans = assistant_char_spans(tokenizer, messages, tools)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for position, (start, end) in enumerate(encoded["offset_mapping"]):
        if end > start and any(start < e and end > s for s, e in spans):
            labels[position] = ids[position]
    return TokenizedExample(input_ids=ids[:max_length], labels=labels[:max_length])


def end_of_turn_token_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the EOS token plus the template's own end-of-turn token."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    trained = tokenize_example(tokenizer, probe, max_length=10_000).trained_ids
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if trained and trained[-1] in tokenizer.all_special_ids:
        stops.add(trained[-1])
    return sorted(stops)


def generation_prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Prompt token ids for generation, ending with the template's assistant header.

    User text is data: a message that spells a control token (`<|im_end|>`) gets it as plain text, never as the
    control token, so it cannot forge a turn. Other prompts tokenize exactly as training did (the whole text)."""
    text = render(tokenizer, messages, add_generation_prompt=True, tools=tools)
    if not any(_spells_special_token(tokenizer, m.get("content")) for m in messages):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    markers = [f"\u27e6tunesmith-content-{index}\u27e7" for index in range(len(messages))]
    marked = [{**m, "content": marker} if isinstance(m.get("content"), str) else m for m, marker in zip(messages, markers)]
    template_text = render(tokenizer, marked, add_generation_prompt=True, tools=tools)
    ids: list[int] = []
    for piece in re.split(f"({'|'.join(map(re.escape, markers))})", template_text):
        if piece in markers:
            content = messages[markers.index(piece)]["content"]
            ids += tokenizer(content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def _spells_special_token(tokenizer, content) -> bool:
    if not isinstance(content, str) or "<" not in content and "[" not in content:
        return False
    specials = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return any(token and token in content for token in specials)
