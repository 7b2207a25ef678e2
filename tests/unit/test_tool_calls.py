"""OpenAI chat extras survive the data stage: `name`, `weight: 0` context turns, tool calls and tool results."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tunesmith.data.clean import dedup_text, map_texts
from tunesmith.data.formats import RowError, convert_record
from tunesmith.data.pii import redact
from tunesmith.data.split import content_hash
from tunesmith.data.template import IGNORE_INDEX, generation_prompt_ids, tokenize_example
from tunesmith.errors import TunesmithError
from tunesmith.models import load_tokenizer

# ChatML that writes the speaker's name and each tool call, as tool-aware templates (Qwen, Llama 3.1) do.
TOOL_TEMPLATE = (
    "{% if tools %}{{ '<tools>' }}{% for t in tools %}{{ t['function']['name'] + ';' }}{% endfor %}{{ '</tools>\n' }}"
    "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] }}{% if m['name'] is defined %} {{ m['name'] }}{% endif %}"
    "{{ '\n' + m['content'] }}{% if m['tool_calls'] is defined %}{% for c in m['tool_calls'] %}"
    "{{ '<call>' + c['function']['name'] + c['function']['arguments'] + '</call>' }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "order_status", "arguments": {"order": "A-17", "email": "ana@example.com"}}}
TOOLS = [{"type": "function", "function": {"name": "order_status", "parameters": {"type": "object"}}}]
TOOL_CHAT = {"tools": TOOLS, "messages": [
    {"role": "system", "content": "You track orders."},
    {"role": "user", "content": "Where is order A-17?", "name": "ana"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "shipped on Monday"},
    {"role": "assistant", "content": "It shipped on Monday."},
]}


def trained_text(tokenizer, example) -> str:
    tokens = tokenize_example(tokenizer, example.message_dicts(), max_length=4096, tools=example.tools)
    return tokenizer.decode([t for t, label in zip(tokens.input_ids, tokens.labels) if label != IGNORE_INDEX])


def test_names_tool_calls_and_tool_results_are_kept():
    example, fmt = convert_record(TOOL_CHAT, None)
    assert fmt == "chat"
    user, call, result = example.messages[1], example.messages[2], example.messages[3]
    assert user.name == "ana"
    assert call.content == "" and call.tool_calls[0]["function"]["name"] == "order_status"
    # Arguments given as an object become the JSON string OpenAI sends, so templates render them verbatim.
    assert json.loads(call.tool_calls[0]["function"]["arguments"]) == CALL["function"]["arguments"]
    assert (result.role, result.tool_call_id) == ("tool", "call_1")
    assert example.reference() == "It shipped on Monday."


def test_tool_calls_are_trained_and_tool_results_are_not(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = TOOL_TEMPLATE
    example, _ = convert_record(TOOL_CHAT, None)
    trained = trained_text(tokenizer, example)
    assert "<call>order_status" in trained and "It shipped on Monday." in trained
    assert "shipped on Monday<" not in trained.replace("It shipped on Monday.", "")  # the tool's result is context
    assert "Where is order" not in trained


def test_tool_definitions_reach_the_prompt_in_training_and_at_inference(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = TOOL_TEMPLATE
    example, _ = convert_record(TOOL_CHAT, None)
    assert example.tools == TOOLS
    tokens = tokenize_example(tokenizer, example.message_dicts(), max_length=4096, tools=example.tools)
    prompt = generation_prompt_ids(tokenizer, example.prompt_messages(), example.tools)
    assert "<tools>order_status;</tools>" in tokenizer.decode(prompt)
    assert tokens.input_ids[:len(prompt)] == prompt  # the model trains on the prompt it will be served
    other = convert_record({**TOOL_CHAT, "tools": [{"type": "function", "function": {"name": "refund"}}]}, None)[0]
    assert content_hash(example) != content_hash(other) and dedup_text(example) != dedup_text(other)


@pytest.mark.parametrize("record, message", [
    ({**TOOL_CHAT, "tools": None}, "drops tool calls"),
    (TOOL_CHAT, "ignores `tools`"),
])
def test_a_template_that_drops_tools_is_refused_not_trained_on_silence(tiny_model_dir, record, message):
    tokenizer = load_tokenizer(tiny_model_dir)  # plain ChatML: renders content only
    example, _ = convert_record(record, None)
    with pytest.raises(TunesmithError, match=message):
        tokenize_example(tokenizer, example.message_dicts(), max_length=4096, tools=example.tools)


def test_weight_zero_turns_are_context_only(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    example, _ = convert_record({"messages": [
        {"role": "user", "content": "Say one."}, {"role": "assistant", "content": "ONE wrong", "weight": 0},
        {"role": "user", "content": "Again."}, {"role": "assistant", "content": "one", "weight": 1}]}, None)
    tokens = tokenize_example(tokenizer, example.message_dicts(), max_length=4096)
    assert "ONE wrong" in tokenizer.decode(tokens.input_ids)
    assert trained_text(tokenizer, example) == "one<|im_end|>"


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "x", "tool_call_id": "c"},
      {"role": "assistant", "content": "b"}], "must follow an assistant turn with tool_calls"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [CALL]},
      {"role": "assistant", "content": "b"}], "tool results must come next"),
    ([{"role": "user", "content": "a", "tool_call_id": "c"}, {"role": "assistant", "content": "b"}],
     "only allowed on tool turns"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 2}], "must be 0"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None,
      "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{not json"}}]}], "not valid JSON"),
])
def test_malformed_tool_turns_say_what_is_wrong(messages, message):
    with pytest.raises(RowError, match=message):
        convert_record({"messages": messages}, None)


def test_a_tool_definition_without_a_name_is_a_clear_row_error():
    with pytest.raises(RowError, match=r"tools\[0\]: must be"):
        convert_record({**TOOL_CHAT, "tools": [{"type": "function", "function": {"parameters": {}}}]}, None)


def test_tool_calls_count_for_dedup_and_pii_redaction():
    example, _ = convert_record(TOOL_CHAT, None)
    other = json.loads(json.dumps(TOOL_CHAT).replace("order_status", "cancel_order"))
    assert dedup_text(example) != dedup_text(convert_record(other, None)[0])
    counts = Counter()
    map_texts(example, lambda text: redact(text, counts))
    arguments = json.loads(example.messages[2].tool_calls[0]["function"]["arguments"])
    assert "ana@example.com" not in arguments["email"] and counts
