"""Reading JSONL data: every input format becomes the same chat messages; bad lines are reported as path:line."""

from __future__ import annotations

import json
import re

import pytest
from conftest import order_rows, write_jsonl

from tunesmith.data.formats import read_examples
from tunesmith.errors import TunesmithError

CANONICAL = [
    {"role": "system", "content": "You extract orders."},
    {"role": "user", "content": "Send 3 blue mugs to Denver"},
    {"role": "assistant", "content": '{"item": "mug"}'},
]
GOOD = {"prompt": "Send 3 blue mugs to Denver", "completion": '{"item": "mug"}'}


def as_dicts(example) -> list[dict]:
    return [m.as_dict() for m in example.messages]


def read_error(path, **kwargs) -> str:
    with pytest.raises(TunesmithError) as info:
        read_examples(path, **kwargs)
    return str(info.value)


def write_lines(path, lines: list) -> object:
    """One line per item: dicts/lists are JSON-encoded, strings are written as-is."""
    text = "".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines)
    path.write_text(text, encoding="utf-8")
    return path


# --- every format becomes the same canonical messages -------------------------------------------------------------


@pytest.mark.parametrize("record", [
    {"messages": CANONICAL},
    {"system": "You extract orders.", "prompt": "Send 3 blue mugs to Denver", "completion": '{"item": "mug"}'},
    {"system": "You extract orders.", "instruction": "Send 3 blue mugs to Denver", "output": '{"item": "mug"}'},
    {"system": "You extract orders.", "instruction": "Send 3 blue mugs to Denver", "input": "",
     "output": '{"item": "mug"}'},
], ids=["chat", "prompt_completion", "alpaca", "alpaca-empty-input"])
def test_every_format_becomes_the_same_messages(tmp_path, record):
    [example] = read_examples(write_jsonl(tmp_path / "d.jsonl", [record]))
    assert as_dicts(example) == CANONICAL
    assert example.reference() == '{"item": "mug"}'


def test_multi_turn_chat_keeps_every_turn_in_order(tmp_path):
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Order 2 lamps"},
        {"role": "assistant", "content": "Done."},
    ]
    [example] = read_examples(write_jsonl(tmp_path / "d.jsonl", [{"messages": turns}]))
    assert as_dicts(example) == turns
    assert example.prompt_messages() == turns[:-1]


def test_alpaca_input_is_appended_after_a_blank_line(tmp_path):
    row = {"instruction": "Extract the order.", "input": "3 blue mugs to Denver", "output": "{}"}
    [example] = read_examples(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert as_dicts(example) == [
        {"role": "user", "content": "Extract the order.\n\n3 blue mugs to Denver"},
        {"role": "assistant", "content": "{}"},
    ]


def test_explicit_format_reads_matching_data(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Say hi", "output": "hi"}])
    [example] = read_examples(path, fmt="alpaca")
    assert as_dicts(example) == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]


# --- system_prompt ---------------------------------------------------------------------------------------------------


def test_system_prompt_is_prepended_only_where_no_system_message_exists(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CANONICAL}, {"messages": CANONICAL[1:]}])
    own, missing = read_examples(path, system_prompt="DEFAULT")
    assert as_dicts(own) == CANONICAL
    assert as_dicts(missing) == [{"role": "system", "content": "DEFAULT"}, *CANONICAL[1:]]

    path = write_jsonl(tmp_path / "pc.jsonl", [GOOD, {"system": "Own system.", **GOOD}])
    missing, own = read_examples(path, system_prompt="DEFAULT")
    assert [(m.role, m.content) for m in missing.messages][0] == ("system", "DEFAULT")
    assert [m.content for m in own.messages if m.role == "system"] == ["Own system."]

    [alpaca] = read_examples(write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi", "output": "hi"}]),
                             system_prompt="DEFAULT")
    assert as_dicts(alpaca) == [{"role": "system", "content": "DEFAULT"}, {"role": "user", "content": "Say hi"},
                                {"role": "assistant", "content": "hi"}]


def test_without_system_prompt_no_system_message_is_added(tmp_path):
    [example] = read_examples(write_jsonl(tmp_path / "d.jsonl", [GOOD]))
    assert [m.role for m in example.messages] == ["user", "assistant"]


# --- line numbers, BOM, CRLF -----------------------------------------------------------------------------------------


def test_source_line_is_one_based_and_counts_blank_lines(tmp_path):
    lines = [GOOD, "", "   ", {**GOOD, "prompt": "second"}, "", {**GOOD, "prompt": "third"}]
    path = write_lines(tmp_path / "d.jsonl", lines)
    examples = read_examples(path)
    assert [e.source_line for e in examples] == [1, 4, 6]
    assert [e.messages[0].content for e in examples] == [GOOD["prompt"], "second", "third"]


def test_bom_on_the_first_line_and_crlf_line_endings_are_accepted(tmp_path):
    rows = order_rows(3)
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps(r).encode() + b"\r\n" for r in rows))
    examples = read_examples(path)
    assert [as_dicts(e) for e in examples] == [r["messages"] for r in rows]
    assert [e.source_line for e in examples] == [1, 2, 3]
    assert not any(m.content.endswith("\r") for e in examples for m in e.messages)


def test_reads_many_rows(tmp_path):
    rows = order_rows(50)
    examples = read_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [as_dicts(e) for e in examples] == [r["messages"] for r in rows]


# --- errors: each names path:line and says how to fix it -------------------------------------------------------------

CHAT_OK = order_rows(1)[0]
ALPACA_OK = {"instruction": "Say hi", "output": "hi"}


def chat(*turns) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


@pytest.mark.parametrize("bad_line, hint", [
    ('{"prompt": "a", "completion": ', "not valid JSON"),
    ('[{"prompt": "a", "completion": "b"}]', "expected a JSON object, got list"),
    ('"just a string"', "expected a JSON object, got str"),
    ({"prompt": "a", "completion": "b", "extra": 1}, "unknown key(s) extra for the prompt_completion format"),
    ({"messages": CHAT_OK["messages"], "id": 7}, "unknown key(s) id for the chat format"),
    (chat(("user", "hi"), ("robot", "beep")), "messages[1].role"),
    (chat(("user", "hi"), ("assistant", "  ")), "messages[1]: empty content"),
    (chat(("system", "s"), ("user", "hi")), "no assistant turn"),
    (chat(("user", "hi"), ("assistant", "a"), ("user", "more?")), "the last message must be the assistant's answer"),
    (chat(("assistant", "a"), ("user", "hi"), ("assistant", "b")), "must start with a user turn"),
    (chat(("system", "s"), ("assistant", "a")), "must start with a user turn"),
    (chat(("user", "hi"), ("system", "s"), ("assistant", "a")), "a system message may only come first"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}, "messages[0].content"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"prompt": 5, "completion": "b"}, "'prompt' must be a string, got int"),
    ({"prompt": "a", "completion": ""}, "'completion' is empty"),
    ({"instruction": "a", "input": ["x"], "output": "b"}, "'input' must be a string, got list"),
], ids=["truncated-json", "array", "string", "pc-extra-key", "chat-extra-key", "unknown-role",
        "empty-content", "no-assistant", "last-not-assistant", "starts-with-assistant", "system-then-assistant",
        "system-not-first", "content-int", "empty-messages", "prompt-int", "empty-completion", "input-list"])
def test_bad_line_is_reported_with_path_line_and_hint(tmp_path, bad_line, hint):
    # Neighbours in the same format, so only the bad line itself can be the problem.
    keys = bad_line.keys() if isinstance(bad_line, dict) else ()
    neighbour = CHAT_OK if "messages" in keys else ALPACA_OK if "instruction" in keys else GOOD
    path = write_lines(tmp_path / "d.jsonl", [neighbour, "", bad_line, neighbour])
    message = read_error(path)
    assert f"{path}:3: " in message
    assert hint in message
    assert "1 bad line(s)" in message


def test_unknown_format_lists_the_keys_and_the_known_formats(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ["", "", {"question": "a", "answer": "b"}, GOOD])
    message = read_error(path)
    assert f"{path}:3: unknown data format (keys: answer, question)" in message
    assert "'prompt'+'completion'" in message and "alpaca 'instruction'+'output'" in message


def test_truncated_json_on_line_3_names_line_3(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD, GOOD, json.dumps(GOOD)[:-5], GOOD])
    message = read_error(path)
    assert f"{path}:3: not valid JSON" in message
    assert f"{path}:1" not in message and f"{path}:4" not in message


def test_content_of_wrong_type_is_not_coerced(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": 12},
                                                            {"role": "assistant", "content": "ok"}]}])
    message = read_error(path)
    assert f"{path}:1: messages[0].content" in message
    assert "string" in message


def test_mixed_formats_report_the_line_of_the_second_format(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [CHAT_OK, CHAT_OK, GOOD, CHAT_OK])
    message = read_error(path)
    assert f"{path}:3: record is not in the chat format" in message
    assert "keep one format per file" in message
    assert f"{path}:4" not in message


def test_explicit_format_rejects_data_of_another_format(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [CHAT_OK, CHAT_OK])
    message = read_error(path, fmt="alpaca")
    assert f"{path}:1: record is not in the alpaca format" in message
    assert f"{path}:2: record is not in the alpaca format" in message
    assert "set data.format" in message


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("", encoding="utf-8")
    assert "no examples found" in read_error(path)
    path.write_text("\n  \n\n", encoding="utf-8")
    assert "no examples found" in read_error(path)


def test_missing_file_is_an_error(tmp_path):
    path = tmp_path / "nope.jsonl"
    message = read_error(path)
    assert "data file not found" in message and str(path) in message


def test_invalid_utf8_is_an_error_that_mentions_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9", "completion": "b"}\n')
    message = read_error(path)
    assert "UTF-8" in message
    assert f"{path}:1:" in message


def test_invalid_utf8_names_the_line_with_the_bad_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = (json.dumps(GOOD) + "\n").encode()
    path.write_bytes(good * 3 + b'{"prompt": "caf\xe9", "completion": "b"}\n')
    assert f"{path}:4:" in read_error(path)


def test_many_bad_lines_show_the_count_and_at_most_five(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD] + ["{broken"] * 8 + [GOOD])
    message = read_error(path)
    assert message.startswith(f"8 bad line(s) in {path}")
    reported = re.findall(rf"{re.escape(str(path))}:(\d+): not valid JSON", message)
    assert reported == ["2", "3", "4", "5", "6"]
    assert message.rstrip().endswith("... and 3 more")


def test_exactly_five_bad_lines_have_no_more_marker(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ["{broken"] * 5)
    message = read_error(path)
    assert message.startswith("5 bad line(s)")
    assert "more" not in message


# --- odd text never escapes as anything but TunesmithError -----------------------------------------------------------
# (hypothesis is not installed in this venv, so these are hand-picked hostile lines instead of a property test.)


@pytest.mark.parametrize("line", [
    "\x00", "null", "1e999", "NaN", "{}", "[]", '""', "\u2028", '{"a":', "}{", "1" * 5000, '"\\ud800"',
    '{"messages": "hi"}', '{"messages": [1, 2]}', '{"messages": [{}]}', '{"messages": null}',
    '{"prompt": null, "completion": null}', '{"instruction": {}, "output": []}',
    '{"prompt": "a", "completion": "b", "system": 3}', '{"messages": [{"role": "user", "content": "a", "x": 1}]}',
])
def test_hostile_lines_raise_only_tunesmith_error(tmp_path, line):
    path = tmp_path / "odd.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(TunesmithError):
        read_examples(path)


def test_deeply_nested_json_is_a_tunesmith_error(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text("[" * 100_000 + "\n", encoding="utf-8")
    with pytest.raises(TunesmithError):
        read_examples(path)
