"""Every supported input format turned into tunesmith's typed records, with a reason code for each bad row.

SFT: chat `messages` (OpenAI), `prompt`/`completion` (plain or conversational, as TRL defines them), alpaca,
ShareGPT. Preference: TRL `prompt`/`chosen`/`rejected` (explicit or implicit prompt), OpenAI DPO. Unpaired:
`prompt`/`completion`/`label`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.data.readers import iter_records
from tunesmith.data.template import is_trained_turn
from tunesmith.errors import TunesmithError
from tunesmith.types import ChatExample, ChatMessage, PreferenceExample, UnpairedPreferenceExample

REQUIRED_KEYS = {
    "unpaired": {"prompt", "completion", "label"},
    "openai_dpo": {"input", "preferred_output", "non_preferred_output"},
    "preference": {"chosen", "rejected"},
    "chat": {"messages"},
    "sharegpt": {"conversations"},
    "prompt_completion": {"prompt", "completion"},
    "alpaca": {"instruction", "output"},
}
OPTIONAL_KEYS = {
    "unpaired": {"system"}, "openai_dpo": set(), "preference": {"prompt", "system", "rejected_cut"}, "chat": {"tools"},
    "sharegpt": {"system"}, "prompt_completion": {"system"}, "alpaca": {"input", "system"},
}
KIND_OF_FORMAT = {"chat": "sft", "prompt_completion": "sft", "alpaca": "sft", "sharegpt": "sft",
                  "preference": "preference", "openai_dpo": "preference", "unpaired": "unpaired_preference"}
# A record with the keys of both formats of a pair is the first one (a `label` makes prompt/completion unpaired).
MORE_SPECIFIC = {("unpaired", "prompt_completion"), ("unpaired", "preference")}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = {"role", "content", "name", "weight", "tool_calls", "tool_call_id"}
MAX_ERRORS_SHOWN = 5
Example = ChatExample | PreferenceExample | UnpairedPreferenceExample


class RowError(ValueError):
    """A bad row: `reason` is a short code for counting, the message says what and how to fix it."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def detect_format(record: dict) -> str | None:
    """Name of the one format whose required keys the record has; None if none; RowError if several."""
    found = [name for name, keys in REQUIRED_KEYS.items() if keys <= record.keys()]
    found = [name for name in found if not any((other, name) in MORE_SPECIFIC for other in found)]
    if len(found) > 1:
        raise RowError("ambiguous_format", f"ambiguous record: its keys fit both {found[0]} and {found[1]}; "
                                           "set data.format or remove the extra keys")
    return found[0] if found else None


def convert_record(record, fmt: str | None, system_prompt: str | None = None,
                   extra_key: str | None = None) -> tuple[Example, str]:
    """One parsed record as a typed example, and its format; `fmt=None` detects it. Raises RowError."""
    if not isinstance(record, dict):
        raise RowError("not_an_object", f"expected a JSON object, got {type(record).__name__}")
    found = detect_format(record)
    if fmt is None:
        if found is None:
            raise RowError("unknown_format", f"unknown data format (keys: {key_list(record) or 'none'}); "
                           "expected chat 'messages', 'prompt'+'completion', alpaca 'instruction'+'output', "
                           "ShareGPT 'conversations', preference 'chosen'+'rejected', or 'prompt'+'completion'+'label'")
        fmt = found
    elif found != fmt:
        raise RowError("wrong_format", f"record is not in the {fmt} format (keys: {key_list(record)})")
    unknown = record.keys() - REQUIRED_KEYS[fmt] - OPTIONAL_KEYS[fmt] - {extra_key}
    if unknown:
        raise RowError("unknown_key", f"unknown key(s) {key_list(unknown)} for the {fmt} format")
    example = CONVERTERS[fmt](record)
    if system_prompt and example.messages[0].role != "system":
        example.messages.insert(0, ChatMessage(role="system", content=system_prompt))
    return example, fmt


def _chat(record: dict) -> ChatExample:
    messages = parse_messages(record["messages"], "messages")
    check_turn_order(messages, ends_with="assistant")
    tools = parse_tools(record["tools"]) if record.get("tools") is not None else None
    return ChatExample(messages=messages, tools=tools)


def parse_tools(raw) -> list[dict]:
    """OpenAI `tools`: [{type: "function", function: {name, description?, parameters?}}]."""
    if not isinstance(raw, list) or not raw:
        raise RowError("wrong_type", "'tools' must be a non-empty list of {type: function, function: {name, ...}}")
    for index, tool in enumerate(raw):
        named_function(tool, f"tools[{index}]", "parameters")
    return raw


def named_function(item, where: str, detail: str) -> dict:
    """The `function` object of an OpenAI tool or tool call, which must carry a name."""
    function = item.get("function") if isinstance(item, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise RowError("wrong_type", f"{where}: must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                     f"\"{detail}\": ...}}}}")
    return function


def _sharegpt(record: dict) -> ChatExample:
    raw = record["conversations"]
    if not isinstance(raw, list) or not raw:
        raise RowError("wrong_type", "'conversations' must be a non-empty list of {from, value} objects")
    turns = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not {"from", "value"} <= item.keys():
            raise RowError("missing_key", f"conversations[{index}] must be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(item["from"]) if isinstance(item["from"], str) else None
        if role is None:
            raise RowError("unknown_role", f"conversations[{index}].from: unknown speaker {shown(item['from'])} "
                                           f"(known: {', '.join(SHAREGPT_ROLES)})")
        turns.append({"role": role, "content": item["value"]})
    if "system" in record:
        turns.insert(0, {"role": "system", "content": record["system"]})
    messages = parse_messages(turns, "conversations")
    check_turn_order(messages, ends_with="assistant")
    return ChatExample(messages=messages)


def _prompt_completion(record: dict) -> ChatExample:
    prompt = _prompt_messages(record, "prompt")
    completion = record["completion"]
    if isinstance(completion, list):
        answer = parse_messages(completion, "completion")
    else:
        answer = [ChatMessage(role="assistant", content=text_field(completion, "completion"))]
    messages = prompt + answer
    check_turn_order(messages, ends_with="assistant")
    return ChatExample(messages=messages)


def _alpaca(record: dict) -> ChatExample:
    prompt = text_field(record["instruction"], "instruction")
    extra = text_field(record.get("input", ""), "input", allow_empty=True)
    prompt = f"{prompt}\n\n{extra}" if extra else prompt
    return _prompt_completion({"system": record.get("system"), "prompt": prompt, "completion": record["output"]})


def _preference(record: dict) -> PreferenceExample:
    chosen, rejected = record["chosen"], record["rejected"]
    cut = record.get("rejected_cut", False)
    if not isinstance(cut, bool):
        raise RowError("wrong_type", f"'rejected_cut' must be true or false, got {shown(cut)}")
    if "prompt" in record:
        prompt = _prompt_messages(record, "prompt")
        return _pair(prompt, _reply(chosen, "chosen"), _reply(rejected, "rejected"), cut)
    # Implicit prompt (TRL): chosen and rejected are whole conversations that share every turn but the last.
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise RowError("missing_key", "'prompt' is missing: give it, or make chosen/rejected whole conversations")
    chosen_turns, rejected_turns = parse_messages(chosen, "chosen"), parse_messages(rejected, "rejected")
    if chosen_turns[:-1] != rejected_turns[:-1] or len(chosen_turns) < 2:
        raise RowError("turn_order", "implicit prompt: chosen and rejected must share every turn but their last")
    return _pair(chosen_turns[:-1], _reply(chosen[-1:], "chosen"), _reply(rejected[-1:], "rejected"), cut)


def _openai_dpo(record: dict) -> PreferenceExample:
    source = record["input"]
    if not isinstance(source, dict) or "messages" not in source:
        raise RowError("missing_key", "'input' must be an object with 'messages'")
    if source.keys() - {"messages"}:
        raise RowError("unsupported", f"input.{sorted(source.keys() - {'messages'})[0]} is not supported yet; remove it")
    prompt = parse_messages(source["messages"], "input.messages")
    return _pair(prompt, _reply(record["preferred_output"], "preferred_output"),
                 _reply(record["non_preferred_output"], "non_preferred_output"))


def _unpaired(record: dict) -> UnpairedPreferenceExample:
    label = record["label"]
    if not isinstance(label, bool) and label not in (0, 1):
        raise RowError("wrong_type", f"'label' must be true or false, got {shown(label)}")
    prompt = _prompt_messages(record, "prompt")
    check_turn_order(prompt, ends_with="user")
    return UnpairedPreferenceExample(messages=prompt, completion=_reply(record["completion"], "completion"),
                                     label=bool(label))


def _pair(prompt: list[ChatMessage], chosen: str, rejected: str, rejected_cut: bool = False) -> PreferenceExample:
    check_turn_order(prompt, ends_with="user")
    if chosen == rejected:
        raise RowError("chosen_equals_rejected", "chosen and rejected are the same reply; there is no preference to learn")
    if rejected_cut and chosen.startswith(rejected):
        raise RowError("chosen_equals_rejected", "a cut rejected reply that is the start of the chosen one teaches "
                       "nothing; cut it after its first wrong word, or set rejected_cut to false")
    return PreferenceExample(messages=prompt, chosen=chosen, rejected=rejected, rejected_cut=rejected_cut or None)


def _prompt_messages(record: dict, key: str) -> list[ChatMessage]:
    value = record[key]
    system = record.get("system")
    if isinstance(value, list):
        messages = parse_messages(value, key)
    else:
        messages = [ChatMessage(role="user", content=text_field(value, key))]
    if system is not None:
        messages.insert(0, ChatMessage(role="system", content=text_field(system, "system")))
    return messages


def _reply(value, key: str) -> str:
    """A single assistant reply given as text or as a one-message conversational list."""
    if isinstance(value, list):
        messages = parse_messages(value, key)
        if len(messages) != 1 or messages[0].role != "assistant":
            raise RowError("turn_order", f"'{key}' must be one assistant message")
        return messages[0].content
    return text_field(value, key)


def parse_messages(raw, field: str) -> list[ChatMessage]:
    """A list of OpenAI chat messages (`name`, assistant `weight` and `tool_calls`, `tool` turns), checked turn by turn."""
    if not isinstance(raw, list) or not raw:
        raise RowError("wrong_type", f"'{field}' must be a non-empty list of {{role, content}} objects")
    return [parse_message(item, f"{field}[{index}]") for index, item in enumerate(raw)]


def parse_message(item, where: str) -> ChatMessage:
    if not isinstance(item, dict):
        raise RowError("wrong_type", f"{where} must be an object with role and content, got {type(item).__name__}")
    # A null optional field is an absent one (Arrow writes null for a field other rows have); content stays
    # as given, since a null content is only allowed beside tool_calls.
    item = {key: value for key, value in item.items() if value is not None or key == "content"}
    unknown = item.keys() - MESSAGE_KEYS
    if unknown:
        raise RowError("unknown_key", f"{where}: unknown key(s) {key_list(unknown)}")
    if "role" not in item:
        raise RowError("missing_key", f"{where}.role: missing")
    role = item["role"]
    if role not in ROLES:
        raise RowError("unknown_role", f"{where}.role: unknown role {shown(role)} (roles are {', '.join(ROLES)})")
    for key, allowed_on in (("weight", "assistant"), ("tool_calls", "assistant"), ("tool_call_id", "tool")):
        if key in item and role != allowed_on:
            raise RowError("wrong_type", f"{where}.{key}: only allowed on {allowed_on} turns")
    if item.get("weight", 1) not in (0, 1) or isinstance(item.get("weight"), bool):
        raise RowError("wrong_type", f"{where}.weight: must be 0 (context only) or 1 (trained)")
    for key in ("name", "tool_call_id"):
        if key in item and not (isinstance(item[key], str) and item[key].strip()):
            raise RowError("wrong_type", f"{where}.{key}: must be a non-empty string")
    tool_calls = parse_tool_calls(item["tool_calls"], where) if item.get("tool_calls") is not None else None
    content = item.get("content")
    if content is None and tool_calls:
        content = ""  # an assistant turn that only calls tools
    elif "content" not in item:
        raise RowError("missing_key", f"{where}.content: missing")
    elif not isinstance(content, str):
        raise RowError("wrong_type", f"{where}.content: must be a string, got {type(content).__name__}")
    elif not content.strip() and not tool_calls:
        raise RowError("empty_content", f"{where}: empty content")
    return ChatMessage(role=role, content=content, name=item.get("name"), weight=item.get("weight"),
                       tool_calls=tool_calls, tool_call_id=item.get("tool_call_id"))


def parse_tool_calls(raw, where: str) -> list[dict]:
    """OpenAI `tool_calls`: [{id, type: "function", function: {name, arguments}}], arguments as a JSON string."""
    if not isinstance(raw, list) or not raw:
        raise RowError("wrong_type", f"{where}.tool_calls: must be a non-empty list of calls")
    calls = []
    for index, call in enumerate(raw):
        at = f"{where}.tool_calls[{index}]"
        function = named_function(call, at, "arguments")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, dict):
            arguments = json.dumps(arguments, ensure_ascii=False)
        if not isinstance(arguments, str):
            raise RowError("wrong_type", f"{at}.function.arguments: must be a JSON string or object")
        try:
            json.loads(arguments)
        except ValueError:
            raise RowError("wrong_type", f"{at}.function.arguments: not valid JSON") from None
        calls.append({**call, "type": call.get("type", "function"), "function": {**function, "arguments": arguments}})
    return calls


def check_turn_order(messages: list[ChatMessage], ends_with: str) -> None:
    """System first (optional), then user and assistant alternating; an assistant turn that calls tools is
    followed by one or more tool turns, then the assistant again. Ends with `ends_with`."""
    roles = [m.role for m in messages]
    if "system" in roles[1:]:
        raise RowError("turn_order", "a system message may only come first")
    turns = [m for m in messages if m.role != "system"]
    if not turns or turns[0].role != "user":
        raise RowError("turn_order", "the conversation must start with a user turn (after an optional system message)")
    if ends_with == "assistant" and "assistant" not in roles:
        raise RowError("no_assistant_turn", "no assistant turn: there is nothing to learn from this example")
    if ends_with == "assistant" and not any(is_trained_turn(m.as_dict()) for m in messages):
        raise RowError("no_assistant_turn", "every assistant turn has weight 0: there is nothing to learn from this example")
    for number, (before, turn) in enumerate(zip(turns, turns[1:]), start=2):
        called = before.role == "assistant" and bool(before.tool_calls)
        if turn.role == "tool" and not (called or before.role == "tool"):
            raise RowError("turn_order", f"turn {number}: a tool turn must follow an assistant turn with tool_calls")
        if called and turn.role != "tool":
            raise RowError("turn_order", f"turn {number}: the assistant called tools in turn {number - 1}; the tool "
                                         "results must come next")
        if turn.role == before.role and turn.role != "tool":
            raise RowError("turn_order", f"two {turn.role} turns in a row (turn {number}); merge them or add the "
                                         "missing reply")
    if roles[-1] != ends_with:
        what = "the assistant's answer" if ends_with == "assistant" else "the user's turn (the reply is given separately)"
        raise RowError("turn_order", f"the last message must be {what}")


def shown(value, limit: int = 60) -> str:
    """A user's value as it appears in an error message: its repr, cut short."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**40 else f"a {len(str(abs(value)))}-digit number"
    return text if len(text) <= limit else text[:limit] + "..."


def key_list(keys, limit: int = 10) -> str:
    """Keys of a record for an error message: sorted, each cut short, at most `limit` of them."""
    names = sorted(str(key) for key in keys)
    listed = ", ".join(name if len(name) <= 40 else name[:40] + "..." for name in names[:limit])
    return listed + (f" and {len(names) - limit} more" if len(names) > limit else "")


def text_field(value, name: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RowError("wrong_type", f"'{name}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError("empty_content", f"'{name}' is empty")
    return value


CONVERTERS = {"chat": _chat, "sharegpt": _sharegpt, "prompt_completion": _prompt_completion, "alpaca": _alpaca,
              "preference": _preference, "openai_dpo": _openai_dpo, "unpaired": _unpaired}


def read_examples(path: Path, fmt: str = "auto", system_prompt: str | None = None) -> list[Example]:
    """Every example of one data file, all problems reported together with line numbers (strict)."""
    path = Path(path)
    examples, errors = [], []
    detected = None if fmt == "auto" else fmt
    for record in iter_records(path):
        try:
            if record.error:
                raise RowError(*record.error)
            example, detected = convert_record(record.value, detected, system_prompt)
            example.source_line = record.line
            examples.append(example)
        except RowError as exc:
            hint = {"wrong_format": "; keep one format per file" if fmt == "auto" else "; set data.format to the right one"}
            errors.append(f"{path}:{record.line}: {exc}{hint.get(exc.reason, '')}")
    if errors:
        shown = "\n  ".join(errors[:MAX_ERRORS_SHOWN])
        more = f"\n  ... and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise TunesmithError(f"{len(errors)} bad line(s) in {path}:\n  {shown}{more}")
    if not examples:
        raise TunesmithError(f"{path}: no examples found (the file is empty); add one JSON object per line")
    return examples
