"""Hostile data (issue 16): each case is one clear message, a reasoned drop, or accepted good data; never a traceback.

One test per reported case; a property test (hypothesis) of hostile rows through the readers, `data inspect` and
a lenient prepare; and a seeded corpus of hostile files in every format through `tunesmith data inspect`.
"""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tunesmith.cli.main import app
from tunesmith.config import load_config, validate_config
from tunesmith.data.formats import read_examples
from tunesmith.data.inspect import inspect_file
from tunesmith.data.prepare import prepare
from tunesmith.data.readers import MAX_ROW_BYTES, iter_records
from tunesmith.errors import TunesmithError

GOOD = [{"messages": [{"role": "user", "content": f"Question number {n}?"},
                      {"role": "assistant", "content": f"Answer number {n}."}]} for n in range(12)]
SURROGATE_ROW = '{"messages": [{"role": "user", "content": "hi \\ud800 there"}, {"role": "assistant", "content": "ok"}]}'
DEEP_TOOLS_ROW = ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], "tools": '
                  '[{"type": "function", "function": {"name": "f", "parameters": ' + '{"a": ' * 800 + "1" + "}" * 800
                  + "}}]}")


def good_lines() -> list[str]:
    return [json.dumps(row) for row in GOOD]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def inspect_cli(path: Path):
    return CliRunner().invoke(app, ["data", "inspect", str(path)], env={"COLUMNS": "300"})


def assert_no_traceback(result) -> None:
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def config_for(tmp_path: Path, model: Path, train: Path, mode: str = "lenient", name: str = "h"):
    return validate_config({"name": name, "base_model": str(model), "output_dir": str(tmp_path / "runs"),
                            "data": {"train": str(train), "mode": mode, "validation_fraction": 0.3}})


def prepare_or_error(config) -> tuple[Path | None, str]:
    """(run_dir, "") or (None, message) for a TunesmithError; any other exception fails the test."""
    try:
        return prepare(config, overwrite=True), ""
    except TunesmithError as exc:
        return None, str(exc)


def checked_accounting(run_dir: Path) -> dict:
    """The manifest's accounting, after checking read = kept + dropped and that dropped.jsonl is UTF-8 JSON lines."""
    accounting = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))["data"]["accounting"]
    assert accounting["read"] == accounting["kept"] + sum(accounting["dropped"].values())
    lines = (run_dir / "data" / "dropped.jsonl").read_bytes().decode("utf-8").splitlines()
    assert len(lines) == sum(accounting["dropped"].values())
    assert all(json.loads(line)["reason"] for line in lines)
    return accounting


def dropped_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "data" / "dropped.jsonl").read_text(encoding="utf-8").splitlines()]


# --- 1. lone surrogates ------------------------------------------------------------------------------------------

def test_lone_surrogates_are_named_in_strict_dropped_in_lenient_and_shown_by_inspect(tmp_path, tiny_model_dir):
    jsonl = write_lines(tmp_path / "s.jsonl", good_lines() + [SURROGATE_ROW])
    array = tmp_path / "s.json"
    array.write_text("[" + ",\n".join(good_lines() + [SURROGATE_ROW]) + "]", encoding="utf-8")
    for path in (jsonl, array):
        result = inspect_cli(path)
        assert_no_traceback(result)
        assert result.exit_code == 0 and "invalid_unicode" in result.output and "\\ud800" in result.output
        run_dir, message = prepare_or_error(config_for(tmp_path, tiny_model_dir, path, mode="strict"))
        assert run_dir is None and f"{path}:13" in message and "lone surrogate \\ud800" in message
        run_dir, _ = prepare_or_error(config_for(tmp_path, tiny_model_dir, path))
        assert checked_accounting(run_dir)["dropped"] == {"invalid_unicode": 1}
        [dropped] = dropped_rows(run_dir)
        assert (dropped["line"], dropped["reason"]) == (13, "invalid_unicode") and "ud800" in dropped["row"]
    not_utf8_name = write_lines(tmp_path / os.fsdecode(b"name\xff.jsonl"), good_lines())  # a surrogate in the path
    assert inspect_cli(not_utf8_name).exit_code == 0
    run_dir, message = prepare_or_error(config_for(tmp_path, tiny_model_dir, not_utf8_name))
    assert run_dir is None and "name\\udcff.jsonl is not valid UTF-8 text" in message


# --- 2. rich markup in user text ---------------------------------------------------------------------------------

def test_markup_in_a_role_a_csv_header_or_a_path_is_printed_as_text(tmp_path, tiny_model_dir):
    folder = tmp_path / "[bold]x[/]"  # the folders "[bold]x[" and "]"
    folder.mkdir(parents=True)
    role = write_lines(folder / "role[x].jsonl", good_lines() + [
        '{"messages": [{"role": "[/]", "content": "hi"}, {"role": "assistant", "content": "ok"}]}'])
    header = folder / "h[red].csv"
    header.write_text("prompt,completion,[/]\nhi,there,x\n", encoding="utf-8")
    for path, problem in ((role, "unknown role '[/]'"), (header, "unknown key(s) [/]")):
        result = inspect_cli(path)
        assert_no_traceback(result)
        assert result.exit_code == 0 and problem in result.output and str(path) in result.output
    config = folder / "c.yaml"
    config.write_text(yaml.safe_dump({"name": "m[/]", "base_model": str(tiny_model_dir), "output_dir": str(folder),
                                      "data": {"train": str(role), "validation_fraction": 0.3}}), encoding="utf-8")
    strict = CliRunner().invoke(app, ["data", "prepare", str(config)], env={"COLUMNS": "300"})
    assert_no_traceback(strict)
    assert strict.exit_code == 2 and "error:" in strict.output and "unknown role '[/]'" in strict.output
    assert f"{role}:13" in strict.output
    lenient = CliRunner().invoke(app, ["data", "prepare", str(config), "data.mode=lenient"], env={"COLUMNS": "300"})
    assert_no_traceback(lenient)
    assert lenient.exit_code == 0 and f"prepared {folder / 'm[/]'}" in lenient.output


# --- 3. deep nesting, huge numbers, damaged Parquet ---------------------------------------------------------------

def test_tools_nested_800_deep_are_a_reasoned_drop_not_a_recursion_error(tmp_path, tiny_model_dir):
    path = write_lines(tmp_path / "deep.jsonl", good_lines() + [DEEP_TOOLS_ROW])
    assert_no_traceback(inspect_cli(path))
    run_dir, message = prepare_or_error(config_for(tmp_path, tiny_model_dir, path, mode="strict"))
    assert run_dir is None and f"{path}:13" in message and "nested more than" in message
    run_dir, _ = prepare_or_error(config_for(tmp_path, tiny_model_dir, path))
    assert checked_accounting(run_dir)["dropped"] == {"too_deep": 1}


def test_a_5000_digit_number_in_a_csv_json_cell_names_the_line_and_column(tmp_path, tiny_model_dir):
    path = tmp_path / "big.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["messages"])
        writer.writerows([json.dumps(row["messages"])] for row in GOOD)
        writer.writerow(['[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "weight": '
                         + "9" * 5000 + "}]"])
    report = inspect_file(path)
    assert report["problems"] == {"invalid_json": 1}
    assert report["first_problems"]["invalid_json"][0].startswith(f"{path}:14: column 'messages': not valid JSON")
    run_dir, message = prepare_or_error(config_for(tmp_path, tiny_model_dir, path, mode="strict"))
    assert run_dir is None and f"{path}:14" in message and "5000 digits" in message


def test_damaged_parquet_files_are_one_clear_error_or_a_reasoned_drop(tmp_path):
    path = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist(GOOD), path)
    original = path.read_bytes()
    outcomes = {"read": 0, "error": 0}
    for seed in range(40):
        rng = random.Random(seed)
        damaged = bytearray(original)
        for _ in range(rng.choice([1, 3, 8])):
            damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        flipped = tmp_path / f"flip{seed}.parquet"
        flipped.write_bytes(bytes(damaged))
        try:
            list(iter_records(flipped))
            outcomes["read"] += 1
        except TunesmithError as exc:
            assert str(exc).startswith(f"{flipped}: ") and "\n" not in str(exc)
            outcomes["error"] += 1
    assert outcomes["error"] > 0
    bad_text = tmp_path / "bad_utf8.parquet"
    pq.write_table(pa.table({"prompt": invalid_utf8_strings([b"first", b"bad \xff\xfe", b"third"]),
                             "completion": ["a", "b", "c"]}), bad_text)
    records = list(iter_records(bad_text))
    assert [r.error[0] if r.error else None for r in records] == [None, "invalid_utf8", None]


def invalid_utf8_strings(values: list[bytes]) -> pa.Array:
    """A string column holding bytes that are not UTF-8 (what a flipped bit in a data page gives)."""
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()),
                                                            pa.py_buffer(b"".join(values))])


# --- 4. a config override that is not YAML ------------------------------------------------------------------------

def test_an_override_that_is_not_yaml_names_the_override(tmp_path, tiny_model_dir):
    train = write_lines(tmp_path / "d.jsonl", good_lines())
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"base_model": str(tiny_model_dir), "data": {"train": str(train)}}), encoding="utf-8")
    for override in ("data.mode=[", "data.mode={a", "seed=" + "9" * 5000):
        with pytest.raises(TunesmithError, match="not valid YAML") as info:
            load_config(config, [override])
        assert str(info.value).startswith(f"override {override[:20]!r}"[:-1])
    result = CliRunner().invoke(app, ["data", "prepare", str(config), "data.mode=["])
    assert_no_traceback(result)
    assert result.exit_code == 2 and "error: override 'data.mode=['" in result.output


# --- 5. good data that was refused --------------------------------------------------------------------------------

def test_csv_text_columns_stay_text_even_when_they_look_like_json(tmp_path):
    completions = ['{"item": "mug", "quantity": 3}', "[1, 2]", "true", "false", "null", "12"]
    path = tmp_path / "pc.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "completion"])
        writer.writerows([f"Extract order {n}", text] for n, text in enumerate(completions))
        writer.writerow(['[{"role": "user", "content": "a conversation"}]', "its answer"])
    examples = read_examples(path)
    assert [e.messages[-1].content for e in examples] == completions + ["its answer"]
    assert examples[-1].messages[0].content == "a conversation"  # a conversation column is still decoded


def test_a_parquet_chat_file_with_name_or_weight_on_one_message_is_read_whole(tmp_path):
    rows = json.loads(json.dumps(GOOD))
    rows[3]["messages"][0]["name"] = "bob"
    rows[5]["messages"][1]["weight"] = 1
    path = tmp_path / "named.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    examples = read_examples(path)
    assert len(examples) == 12 and examples[3].messages[0].name == "bob" and examples[5].messages[1].weight == 1
    assert examples[0].messages[0].name is None and examples[0].messages[1].weight is None


def test_a_large_json_array_streams_and_keeps_a_per_row_limit(tmp_path):
    rows = [{"prompt": f"question {n} " + "p" * 1000, "completion": "c" * 1000} for n in range(8500)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    assert path.stat().st_size > 17 * 10**6
    records = list(iter_records(path))
    assert len(records) == 8500 and not any(r.error for r in records) and records[-1].value == rows[-1]
    huge = tmp_path / "huge_row.json"
    huge.write_text('[{"prompt": "a", "completion": "b"}, {"prompt": "' + "x" * MAX_ROW_BYTES + '", "completion": "c"}, '
                    '{"prompt": "d", "completion": "e"}]', encoding="utf-8")
    assert [r.error[0] if r.error else None for r in iter_records(huge)] == [None, "row_too_large", None]


def test_an_all_dropped_lenient_prepare_points_at_no_deleted_temp_folder(tmp_path, tiny_model_dir):
    path = write_lines(tmp_path / "bad.jsonl", ['{"prompt": 1, "completion": "x"}', "{"])
    run_dir, message = prepare_or_error(config_for(tmp_path, tiny_model_dir, path))
    assert run_dir is None and ".tmp-" not in message and "dropped.jsonl" not in message
    assert f"{path}:1: 'prompt' must be a string" in message and "tunesmith data inspect" in message


# --- 6. two prepares of one run name -------------------------------------------------------------------------------

def test_a_second_prepare_of_a_run_name_is_refused_while_the_first_holds_the_lock(tmp_path, tiny_model_dir):
    config = config_for(tmp_path, tiny_model_dir, write_lines(tmp_path / "d.jsonl", good_lines()), name="same")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from tunesmith.data.run_lock import run_lock\n"
                               "with run_lock(sys.argv[1]):\n    print('locked', flush=True); sys.stdin.read()",
         str(config.run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TunesmithError, match=rf"another prepare of same is running \(pid {holder.pid}\)"):
            prepare(config)
        assert not config.run_dir.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert prepare(config).is_dir()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["same"]  # the lock file is gone too


# --- property test: generated hostile rows --------------------------------------------------------------------------

class Raw(str):
    """JSON text written into a row as is: what json.dumps cannot produce (huge numbers, 900 levels of nesting)."""


RAW_JSON = [Raw("9" * 5000), Raw("-" + "7" * 4400), Raw("1e999"), Raw("NaN"), Raw("[" * 900 + "]" * 900),
            Raw('{"a": ' * 900 + "1" + "}" * 900), Raw('"\\ud800"'), Raw('"ok \\udfff"'), Raw('"\\udc00\\ud800"')]
HOSTILE_TEXT = ["\ud800", "x\udfff", "[/]", "[bold red]x", "[/bold]", "\x00", "\u202e", "<|im_end|>", "a" * 3000, " ",
                "", "{", "[1]", "true", "\U0001d54f", "e\u0301", "\\", '"', "user", "assistant"]
KEYS = ["messages", "role", "content", "prompt", "completion", "chosen", "rejected", "label", "instruction", "output",
        "conversations", "from", "value", "tools", "name", "weight", "tool_calls", "system", "[/]", "\ud800"]


def render(value) -> str:
    """A row as JSON text; Raw pieces go in verbatim, lone surrogates as \\u escapes (as a user's file has them)."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(key)}: {render(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(render(item) for item in value) + "]"
    return json.dumps(value)


TEXT = st.text(max_size=20) | st.sampled_from(HOSTILE_TEXT) | st.builds(str.__add__, st.text(max_size=8),
                                                                         st.sampled_from(HOSTILE_TEXT))
LEAF = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**60) | st.floats() | TEXT
        | st.sampled_from(RAW_JSON))
VALUE = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS) | TEXT,
                                                                                      inner, max_size=4), max_leaves=12)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "[/]"]) | VALUE,
                                 "content": TEXT | VALUE}, optional={"name": VALUE, "weight": VALUE})
ROW = (st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=3)}, optional={"tools": VALUE})
       | st.fixed_dictionaries({"prompt": TEXT | VALUE, "completion": TEXT | VALUE}, optional={"label": VALUE})
       | st.dictionaries(st.sampled_from(KEYS), VALUE, max_size=4) | VALUE)


def write_rows(path: Path, rows: list, container: str) -> Path:
    """`rows` as a .jsonl, .json (array) or .csv file (cells: text as is, anything else as its JSON)."""
    path = path.with_suffix(f".{container}")
    if container == "jsonl":
        path.write_text("".join(render(row) + "\n" for row in rows), encoding="utf-8")
    elif container == "json":
        path.write_text("[" + ",\n".join(render(row) for row in rows) + "]", encoding="utf-8")
    else:
        table = [row if isinstance(row, dict) else {"value": row} for row in rows]
        columns = sorted({str(key) for row in table for key in row}) or ["prompt"]
        cell = lambda value: value if isinstance(value, str) and not isinstance(value, Raw) else render(value)  # noqa: E731
        with path.open("w", newline="", encoding="utf-8", errors="backslashreplace") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            writer.writerows([cell(row.get(column, "")) for column in columns] for row in table)
    return path


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(rows=st.lists(ROW, min_size=1, max_size=6), good=st.integers(0, 12),
       container=st.sampled_from(["jsonl", "json", "csv"]), order=st.randoms(use_true_random=False))
def test_hostile_rows_give_a_clear_error_or_account_for_every_row(tmp_path, tiny_model_dir, rows, good, container, order):
    rows = rows + GOOD[:good]
    order.shuffle(rows)
    path = write_rows(tmp_path / "hostile", rows, container)
    try:
        report = inspect_file(path)
        assert report["rows"] == report["valid"] + sum(report["problems"].values())
        if container != "csv":
            assert report["rows"] == len(rows)
    except TunesmithError:
        report = None
    assert_no_traceback(inspect_cli(path))
    run_dir, message = prepare_or_error(config_for(tmp_path, tiny_model_dir, path))
    if run_dir is None:
        assert message.strip()
    else:
        assert report is not None and checked_accounting(run_dir)["read"] == report["rows"]


# --- corpus: >= 300 generated hostile files through `data inspect` ----------------------------------------------------

def hostile_row(rng: random.Random):
    """One generated hostile row (mostly plausible shapes with a hostile part, sometimes anything)."""
    text = lambda: rng.choice(HOSTILE_TEXT + ["fine text", "Answer."] + RAW_JSON)  # noqa: E731
    shape = rng.randrange(5)
    if shape == 0:
        return {"messages": [{"role": rng.choice(["user", "[/]", "assistant", Raw("9" * 5000)]), "content": text()},
                             {"role": "assistant", "content": text()}]}
    if shape == 1:
        return {"prompt": text(), "completion": text()}
    if shape == 2:
        return {"messages": GOOD[0]["messages"], "tools": [{"type": "function", "function": {
            "name": "f", "parameters": rng.choice(RAW_JSON[4:6] + [Raw('{"a": ' * 50 + "1" + "}" * 50)])}}]}
    if shape == 3:
        return {rng.choice(KEYS): text() for _ in range(rng.randrange(4))}
    return rng.choice([text(), [text()], None, 5, Raw("[" * rng.choice([10, 200, 5000]) + "]" * 10)])


def damaged(raw: bytes, rng: random.Random) -> bytes:
    """A file's bytes after a random accident: truncated, bits flipped, bad UTF-8, NUL bytes, a BOM, CRLF."""
    kind = rng.randrange(8)
    if kind == 0 and raw:
        return raw[:rng.randrange(len(raw))]
    if kind == 1 and raw:
        data = bytearray(raw)
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)
    if kind == 2:
        return raw + b"\xff\xfe garbage \x80\n"
    if kind == 3:
        return raw.replace(b",", b",\x00", 1)
    if kind == 4:
        return b"\xef\xbb\xbf" + raw.replace(b"\n", b"\r\n")
    return raw


def corpus_file(folder: Path, number: int, rng: random.Random) -> Path:
    container = ["jsonl", "json", "csv", "parquet"][number % 4]
    where = rng.choice([folder, folder / "[bold]x[/]", folder / "[/]"])  # a name cannot hold '/', a path can
    name = rng.choice(["f{n}", "[bold]f{n}", "f{n} [link=x]", os.fsdecode(b"f{n}\xff")]).format(n=number)
    path = where / f"{name}.{container}"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [hostile_row(rng) for _ in range(rng.randrange(0, 8))] + GOOD[:rng.randrange(0, 4)]
    if container == "parquet":
        write_parquet(path, rows, rng)
    else:
        write_rows(path, rows, container)
        if rng.random() < 0.2:
            path.write_text(rng.choice(["", "  \n", "42", '{"data": 5}', '{"data": [' + render(rows[:1]) + "]}",
                                        "[" * 3000, render(rows) + " trailing"]), encoding="utf-8")
    if rng.random() < 0.4:
        path.write_bytes(damaged(path.read_bytes(), rng))
    return path


def write_parquet(path: Path, rows: list, rng: random.Random) -> None:
    """Parquet of the Arrow-friendly rows (chat with name/weight here and there, or text columns)."""
    if rng.random() < 0.15:
        path.write_bytes(parquet_bytes(pa.table({"prompt": invalid_utf8_strings([b"ok", b"\xc3\x28 bad"]),
                                                 "completion": ["a", "b"]})))
        return
    chat = json.loads(json.dumps(GOOD[:rng.randrange(1, 8)]))
    for row in chat:
        if rng.random() < 0.3:
            row["messages"][rng.randrange(2)][rng.choice(["name", "weight"])] = rng.choice(["[/]", "bob", 1, 0])
    texts = [{"prompt": rng.choice(HOSTILE_TEXT[2:]), "completion": rng.choice(HOSTILE_TEXT[2:] + ["ok"])}
             for _ in rows] or [{"prompt": "a", "completion": "b"}]
    for candidate in (chat if rng.random() < 0.5 else texts, texts):
        try:
            table = pa.Table.from_pylist(candidate)
            break
        except (pa.ArrowException, ValueError, TypeError):  # values of mixed types in one column
            continue
    path.write_bytes(parquet_bytes(table))  # via bytes: Arrow cannot open a file name that is not UTF-8


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def test_a_corpus_of_300_hostile_files_never_gives_a_traceback_from_data_inspect(tmp_path, tiny_model_dir):
    folder = tmp_path / "corpus"
    folder.mkdir()
    rng = random.Random(16)
    paths = [corpus_file(folder, number, rng) for number in range(320)]
    counts = {"tried": 0, "clean": 0, "clear error": 0, "traceback": 0}
    for path in paths:
        counts["tried"] += 1
        result = inspect_cli(path)
        traceback = "Traceback" in result.output or result.exit_code not in (0, 2) or not (
            result.exception is None or isinstance(result.exception, SystemExit))
        counts["traceback" if traceback else "clean" if result.exit_code == 0 else "clear error"] += 1
        if result.exit_code == 0:
            report = inspect_file(path)
            assert report["rows"] == report["valid"] + sum(report["problems"].values())
        elif not traceback:
            assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    print(f"\nhostile corpus through `data inspect`: {counts}")
    assert counts["tried"] >= 300 and counts["traceback"] == 0, counts
    assert counts["clean"] > 50 and counts["clear error"] > 20, counts
    for path in paths[:12]:  # a lenient prepare of each container type accounts for every row it read
        run_dir, message = prepare_or_error(config_for(tmp_path, tiny_model_dir, path))
        assert run_dir is None and message or checked_accounting(run_dir)
    env = {**os.environ, "COLUMNS": "200"}
    for path in (paths[1], paths[3]):  # the real console entry point, as a user runs it
        done = subprocess.run([sys.executable, "-m", "tunesmith", "data", "inspect", str(path)], capture_output=True,
                              text=True, env=env, timeout=120, errors="replace")
        assert done.returncode in (0, 2) and "Traceback" not in done.stdout + done.stderr, done.stderr
