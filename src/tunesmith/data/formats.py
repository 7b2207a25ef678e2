"""Reading JSONL training data in chat, prompt/completion and alpaca formats, with file:line errors."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from tunesmith.errors import TunesmithError
from tunesmith.types import ChatExample, ChatMessage

FORMAT_KEYS = {
    "chat": {"messages"},
    "prompt_completion": {"prompt", "completion"},
    "alpaca": {"instruction", "output"},
}
OPTIONAL_KEYS = {"chat": set(), "prompt_completion": {"system"}, "alpaca": {"input", "system"}}
MAX_ERRORS_SHOWN = 5


def detect_format(record: dict) -> str | None:
    """Name of the format whose required keys the record has, or None."""
    for name, keys in FORMAT_KEYS.items():
        if keys <= record.keys():
            return name
    return None


def read_examples(path: Path, fmt: str = "auto", system_prompt: str | None = None) -> list[ChatExample]:
    """Every example of a JSONL file as chat messages; all problems reported together with line numbers."""
    path = Path(path)
    if not path.is_file():
        raise TunesmithError(f"data file not found: {path} (check data.train / data.validation in the config)")
    examples, errors = [], []
    detected = None if fmt == "auto" else fmt
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8").lstrip("\ufeff").strip()
                if not line:
                    continue
                example, detected = _parse_line(line, detected, fmt == "auto", system_prompt)
                example.source_line = line_no
                examples.append(example)
            except UnicodeDecodeError as exc:
                errors.append(f"{path}:{line_no}: not valid UTF-8 text (byte {exc.start + 1}); re-save the file as UTF-8")
            except ValueError as exc:
                errors.append(f"{path}:{line_no}: {exc}")
    if errors:
        shown = "\n  ".join(errors[:MAX_ERRORS_SHOWN])
        more = f"\n  ... and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise TunesmithError(f"{len(errors)} bad line(s) in {path}:\n  {shown}{more}")
    if not examples:
        raise TunesmithError(f"{path}: no examples found (the file is empty); add one JSON object per line")
    return examples


def _parse_line(line: str, detected: str | None, auto: bool, system_prompt: str | None) -> tuple[ChatExample, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply to be a training example") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    found = detect_format(record)
    if detected is None:
        if found is None:
            raise ValueError(
                f"unknown data format (keys: {', '.join(sorted(record)) or 'none'}); expected chat 'messages', "
                "'prompt'+'completion', or alpaca 'instruction'+'output'"
            )
        detected = found
    elif found != detected:
        how = "set data.format to the right one" if not auto else "keep one format per file"
        raise ValueError(f"record is not in the {detected} format (keys: {', '.join(sorted(record))}); {how}")
    return _to_chat(record, detected, system_prompt), detected


def _to_chat(record: dict, fmt: str, system_prompt: str | None) -> ChatExample:
    unknown = record.keys() - FORMAT_KEYS[fmt] - OPTIONAL_KEYS[fmt]
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))} for the {fmt} format")
    if fmt == "chat":
        messages = _chat_messages(record["messages"])
    elif fmt == "prompt_completion":
        messages = _pair(record.get("system"), record["prompt"], record["completion"], ("prompt", "completion"))
    else:
        prompt = _text(record["instruction"], "instruction")
        extra = _text(record.get("input", ""), "input", allow_empty=True)
        prompt = f"{prompt}\n\n{extra}" if extra else prompt
        messages = _pair(record.get("system"), prompt, record["output"], ("instruction", "output"))
    if system_prompt and messages[0].role != "system":
        messages.insert(0, ChatMessage(role="system", content=system_prompt))
    return ChatExample(messages=messages)


def _pair(system, prompt, answer, names: tuple[str, str]) -> list[ChatMessage]:
    messages = [ChatMessage(role="system", content=_text(system, "system"))] if system is not None else []
    messages.append(ChatMessage(role="user", content=_text(prompt, names[0])))
    messages.append(ChatMessage(role="assistant", content=_text(answer, names[1])))
    return messages


def _chat_messages(raw) -> list[ChatMessage]:
    if not isinstance(raw, list) or not raw:
        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    messages = []
    for index, item in enumerate(raw):
        try:
            message = ChatMessage.model_validate(item)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "message"
            raise ValueError(f"messages[{index}].{field}: {err['msg']} (roles are system, user, assistant)") from None
        if not message.content.strip():
            raise ValueError(f"messages[{index}]: empty content")
        messages.append(message)
    _check_turn_order(messages)
    return messages


def _check_turn_order(messages: list[ChatMessage]) -> None:
    roles = [m.role for m in messages]
    if "system" in roles[1:]:
        raise ValueError("a system message may only come first")
    if [r for r in roles if r != "system"][:1] != ["user"]:
        raise ValueError("the conversation must start with a user turn (after an optional system message)")
    if "assistant" not in roles:
        raise ValueError("no assistant turn: there is nothing to learn from this example")
    if roles[-1] != "assistant":
        raise ValueError("the last message must be the assistant's answer")


def _text(value, name: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"'{name}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"'{name}' is empty")
    return value
