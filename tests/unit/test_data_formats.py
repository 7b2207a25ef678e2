"""Every supported format and container file becomes the same typed records; ambiguous and mixed input is named."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import write_jsonl

from tunesmith.data.formats import RowError, convert_record, read_examples
from tunesmith.errors import TunesmithError
from tunesmith.types import ChatExample, PreferenceExample, UnpairedPreferenceExample

CANONICAL = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
             {"role": "assistant", "content": "Paris."}]
PROMPT = [{"role": "user", "content": "Capital of France?"}]


def dicts(messages) -> list[dict]:
    return [m.as_dict() for m in messages]


@pytest.mark.parametrize("record", [
    {"messages": CANONICAL},
    {"system": "Be brief.", "prompt": "Capital of France?", "completion": "Paris."},
    {"prompt": CANONICAL[:2], "completion": CANONICAL[2:]},
    {"system": "Be brief.", "instruction": "Capital of France?", "output": "Paris."},
    {"system": "Be brief.", "conversations": [{"from": "human", "value": "Capital of France?"},
                                              {"from": "gpt", "value": "Paris."}]},
], ids=["openai-chat", "prompt-completion", "conversational-prompt-completion", "alpaca", "sharegpt"])
def test_every_sft_format_becomes_the_same_chat_example(record):
    example, _ = convert_record(record, None)
    assert isinstance(example, ChatExample) and dicts(example.messages) == CANONICAL


@pytest.mark.parametrize("record, fmt", [
    ({"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}, "preference"),
    ({"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "Paris."}],
      "rejected": [{"role": "assistant", "content": "Lyon."}]}, "preference"),
    ({"chosen": PROMPT + [{"role": "assistant", "content": "Paris."}],
      "rejected": PROMPT + [{"role": "assistant", "content": "Lyon."}]}, "preference"),
    ({"input": {"messages": PROMPT}, "preferred_output": [{"role": "assistant", "content": "Paris."}],
      "non_preferred_output": [{"role": "assistant", "content": "Lyon."}]}, "openai_dpo"),
], ids=["explicit", "explicit-conversational", "implicit-prompt", "openai-dpo"])
def test_every_preference_format_becomes_the_same_pair(record, fmt):
    example, found = convert_record(record, None)
    assert found == fmt and isinstance(example, PreferenceExample)
    assert (dicts(example.messages), example.chosen, example.rejected) == (PROMPT, "Paris.", "Lyon.")


def test_unpaired_preference_wins_over_prompt_completion_because_of_its_label():
    example, fmt = convert_record({"prompt": "Capital of France?", "completion": "Lyon.", "label": False}, None)
    assert fmt == "unpaired" and isinstance(example, UnpairedPreferenceExample)
    assert (dicts(example.messages), example.completion, example.label) == (PROMPT, "Lyon.", False)


@pytest.mark.parametrize("record, reason", [
    ({"messages": CANONICAL, "prompt": "a", "completion": "b"}, "ambiguous_format"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen_equals_rejected"),
    ({"prompt": "q", "chosen": "Oslo.", "rejected": "Osl", "rejected_cut": True}, "chosen_equals_rejected"),
    ({"prompt": "q", "chosen": "Oslo.", "rejected": "Osaka", "rejected_cut": "yes"}, "wrong_type"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}, "turn_order"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "turn_order"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]},
     "no_assistant_turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "tool_calls": []}]},
     "wrong_type"),
    ({"conversations": [{"from": "robot", "value": "a"}]}, "unknown_role"),
    ({"prompt": "a", "completion": "b", "label": "maybe"}, "wrong_type"),
    ({"messages": [{"role": "user"}]}, "missing_key"),
])
def test_bad_records_carry_a_reason_code(record, reason):
    with pytest.raises(RowError) as info:
        convert_record(record, None)
    assert info.value.reason == reason


def rows_for_files() -> list[dict]:
    return [{"prompt": f"Question {n}?", "completion": f"Answer {n}."} for n in range(5)]


def test_json_csv_parquet_and_saved_dataset_files_read_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = rows_for_files()
    expected = [dicts(e.messages) for e in read_examples(write_jsonl(tmp_path / "d.jsonl", rows))]
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    with (tmp_path / "d.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for name in ("d.json", "d.csv", "d.parquet", "saved"):
        examples = read_examples(tmp_path / name)
        assert [dicts(e.messages) for e in examples] == expected, name
    assert [e.source_line for e in read_examples(tmp_path / "d.csv")] == [2, 3, 4, 5, 6]  # the header is line 1


def test_csv_cells_holding_json_messages_are_decoded(tmp_path):
    path = tmp_path / "chat.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["messages"])
        writer.writerow([json.dumps(CANONICAL)])
    [example] = read_examples(path)
    assert dicts(example.messages) == CANONICAL


def test_a_mixed_file_names_the_lines_of_each_format(tmp_path, tiny_model_dir):
    from tunesmith.config import validate_config
    from tunesmith.data.prepare import prepare

    rows = [{"messages": CANONICAL}] * 2 + [{"prompt": "a b c", "completion": "d"}] + [{"messages": CANONICAL[1:]}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    config = validate_config({"base_model": str(tiny_model_dir), "output_dir": str(tmp_path / "runs"),
                              "data": {"train": str(path), "mode": "lenient"}})
    with pytest.raises(TunesmithError) as info:
        prepare(config)
    assert "mixed formats (chat on line(s) 1, 2, 4; prompt_completion on line(s) 3)" in str(info.value)


def test_unknown_file_type_and_a_folder_that_is_not_a_dataset_are_clear_errors(tmp_path):
    (tmp_path / "d.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(TunesmithError, match="unknown file type .txt"):
        read_examples(tmp_path / "d.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(TunesmithError, match="not a saved Hugging Face dataset"):
        read_examples(tmp_path / "folder")


def test_a_pair_without_rejected_cut_is_stored_and_hashed_as_before_the_field_existed():
    # The split and the data hash come from the stored record: an unflagged pair must not gain a key.
    from tunesmith.data.split import content_hash

    plain, _ = convert_record({"prompt": "q", "chosen": "Oslo.", "rejected": "Osaka."}, None)
    stated, _ = convert_record({"prompt": "q", "chosen": "Oslo.", "rejected": "Osaka.", "rejected_cut": False}, None)
    cut, _ = convert_record({"prompt": "q", "chosen": "Oslo.", "rejected": "Osaka", "rejected_cut": True}, None)
    assert "rejected_cut" not in plain.model_dump(exclude_none=True)
    assert content_hash(plain) == content_hash(stated) != content_hash(cut.model_copy(update={"rejected": "Osaka."}))
