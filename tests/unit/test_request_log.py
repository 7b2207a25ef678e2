"""The request log: durable appends, content policies, rotation, filters, damaged files, and `tunesmith logs`."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunesmith import request_log
from tunesmith.cli.logs_command import logs_app
from tunesmith.data.formats import read_examples
from tunesmith.errors import TunesmithError
from tunesmith.records import RequestLogRecord
from tunesmith.request_log import (
    RequestLogWriter,
    default_request_log_dir,
    parse_since,
    read_request_log,
    request_log_files,
    utc_timestamp,
)

START = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)


def chat_record(number: int, **fields) -> RequestLogRecord:
    values = {
        "id": f"chatcmpl-{number}", "time": utc_timestamp(START + timedelta(minutes=number)), "endpoint": "chat",
        "model": "orders", "served": "orders@production", "registry_model": "orders", "registry_version": "3",
        "messages": [{"role": "user", "content": f"Send {number} mugs to Oslo"}],
        "answers": [json.dumps({"item": "mug", "quantity": number})], "prompt_tokens": 9, "completion_tokens": 7,
        "latency_s": 0.25, "finish_reason": "stop", "status": 200,
    }
    return RequestLogRecord(**{**values, **fields})


def completion_record(number: int, **fields) -> RequestLogRecord:
    values = {"id": f"cmpl-{number}", "endpoint": "completions", "messages": None, "prompt": f"Order {number}:",
              "answers": [f" {number} lamps"]}
    return chat_record(number, **{**values, **fields})


def write_log(directory: Path, records, **options) -> Path:
    with RequestLogWriter(directory, **options) as writer:
        for record in records:
            writer.append(record)
    return directory


def invoke(args: list[str]):
    return CliRunner(env={"COLUMNS": "300"}).invoke(logs_app, args)


def test_records_come_back_as_written_in_order(tmp_path):
    records = [chat_record(n, key_id="k1", key_name="ci", user="u-7", shadow=n == 2, ttft_s=0.01) for n in range(3)]
    write_log(tmp_path / "log", records)
    assert list(read_request_log(tmp_path / "log")) == records
    assert default_request_log_dir() == Path(tmp_path / "home" / "requests")


def test_redacted_content_keeps_no_raw_pii_in_the_file(tmp_path):
    record = chat_record(1, messages=[{"role": "user", "content": "Mail jane.doe@example.com the invoice"}],
                         answers=["Sent to jane.doe@example.com"])
    write_log(tmp_path, [record, completion_record(2, prompt="Call jane.doe@example.com:")], content="redacted")
    raw = (tmp_path / "requests.jsonl").read_bytes()
    assert b"jane.doe@example.com" not in raw
    chat, completion = read_request_log(tmp_path)
    assert chat.messages[0]["content"] == "Mail [EMAIL] the invoice" and chat.answers == ["Sent to [EMAIL]"]
    assert completion.prompt == "Call [EMAIL]:"
    assert {chat.content, completion.content} == {"redacted"}
    assert record.messages[0]["content"].startswith("Mail jane")  # the caller's record is left alone


def test_content_none_keeps_the_numbers_but_no_text(tmp_path):
    write_log(tmp_path, [chat_record(1)], content="none")
    (kept,) = read_request_log(tmp_path)
    assert (kept.messages, kept.prompt, kept.answers, kept.content) == (None, None, [], "none")
    assert (kept.prompt_tokens, kept.status, kept.served) == (9, 200, "orders@production")
    assert b"mugs" not in (tmp_path / "requests.jsonl").read_bytes()


def test_rotation_by_size_keeps_every_record_in_order(tmp_path):
    records = [chat_record(n) for n in range(30)]
    line_bytes = len(records[0].model_dump_json()) + 1
    write_log(tmp_path, records, max_bytes=line_bytes * 4)
    files = request_log_files(tmp_path)
    assert len(files) >= 7 and files[-1].name == "requests.jsonl"
    assert all(path.stat().st_size <= line_bytes * 4 for path in files)
    assert [r.id for r in read_request_log(tmp_path)] == [r.id for r in records]


def test_a_rotation_while_a_reader_starts_shows_each_record_once(tmp_path, monkeypatch):
    line_bytes = len(chat_record(0).model_dump_json()) + 1
    writer = RequestLogWriter(tmp_path, max_bytes=line_bytes * 3)
    for n in range(3):
        writer.append(chat_record(n))
    list_rotated = request_log._rotated_files

    def rotate_then_list(directory):
        writer.append(chat_record(3))  # the active file is full: this append rotates it first
        return list_rotated(directory)

    monkeypatch.setattr(request_log, "_rotated_files", rotate_then_list)
    assert [r.id for r in read_request_log(tmp_path)] == ["chatcmpl-0", "chatcmpl-1", "chatcmpl-2"]
    monkeypatch.undo()
    writer.close()
    assert [r.id for r in read_request_log(tmp_path)] == [f"chatcmpl-{n}" for n in range(4)]


def test_two_writers_on_one_directory_rotate_without_losing_or_mixing_lines(tmp_path):
    """Two writers (as two server processes would) share the directory's lock; threads share a writer's."""
    first, second = RequestLogWriter(tmp_path, max_bytes=2000), RequestLogWriter(tmp_path, max_bytes=2000)

    def append_many(writer, start):
        for n in range(start, start + 25):
            writer.append(chat_record(n))

    threads = [threading.Thread(target=append_many, args=(writer, start))
               for writer, start in ((first, 0), (first, 25), (second, 50), (second, 75))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first.close(), second.close()
    assert sorted(r.id for r in read_request_log(tmp_path)) == sorted(f"chatcmpl-{n}" for n in range(100))
    assert len(request_log_files(tmp_path)) > 2


def test_since_and_model_filters(tmp_path):
    write_log(tmp_path, [chat_record(0), chat_record(10, model="support", served="support@candidate",
                                                     registry_model="support"), chat_record(20)])
    since = START + timedelta(minutes=10)
    assert [r.id for r in read_request_log(tmp_path, since=since)] == ["chatcmpl-10", "chatcmpl-20"]
    naive = since.replace(tzinfo=None)  # taken as UTC
    assert [r.id for r in read_request_log(tmp_path, since=naive)] == ["chatcmpl-10", "chatcmpl-20"]
    for name in ("support", "support@candidate"):
        assert [r.id for r in read_request_log(tmp_path, model=name)] == ["chatcmpl-10"]
    assert [r.id for r in read_request_log(tmp_path, since=since, model="orders")] == ["chatcmpl-20"]


def test_since_takes_dates_times_and_ages():
    now = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("24h", now) == now - timedelta(hours=24)
    assert parse_since("2026-11-01") == datetime(2026, 11, 1, tzinfo=timezone.utc)
    assert parse_since("2026-11-01T08:00:00+02:00") == datetime(2026, 11, 1, 6, tzinfo=timezone.utc)
    with pytest.raises(TunesmithError, match="--since 'last week'"):
        parse_since("last week")


def test_a_line_cut_by_a_crash_is_skipped_and_the_next_writer_starts_clean(tmp_path):
    write_log(tmp_path, [chat_record(1)])
    with (tmp_path / "requests.jsonl").open("ab") as handle:
        handle.write(b'{"version": 1, "id": "chatcmpl-cut", "ti')
    assert [r.id for r in read_request_log(tmp_path)] == ["chatcmpl-1"]
    write_log(tmp_path, [chat_record(2)])
    assert [r.id for r in read_request_log(tmp_path)] == ["chatcmpl-1", "chatcmpl-2"]
    assert b"chatcmpl-cut" not in (tmp_path / "requests.jsonl").read_bytes()


def test_a_failed_append_leaves_no_half_line_behind(tmp_path, monkeypatch):
    writer = RequestLogWriter(tmp_path)
    writer.append(chat_record(1))

    def disk_full_half_way(fd, data):
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(request_log, "_write_all", disk_full_half_way)
    with pytest.raises(OSError):
        writer.append(chat_record(2))
    monkeypatch.undo()
    writer.append(chat_record(3))
    writer.close()
    assert [r.id for r in read_request_log(tmp_path)] == ["chatcmpl-1", "chatcmpl-3"]


def test_a_bad_line_in_the_middle_names_file_and_line(tmp_path):
    write_log(tmp_path, [chat_record(1)])
    with (tmp_path / "requests.jsonl").open("ab") as handle:
        handle.write(b"not json\n")
    write_log(tmp_path, [chat_record(2)])
    with pytest.raises(TunesmithError, match=r"requests\.jsonl:2: not a request log record"):
        list(read_request_log(tmp_path))


def test_a_record_missing_a_field_or_from_a_newer_tunesmith_is_refused(tmp_path):
    (tmp_path / "requests.jsonl").write_text(json.dumps({**chat_record(1).model_dump(), "version": 2}) + "\n")
    with pytest.raises(TunesmithError, match=r"requests\.jsonl:1: request log version 2 .* upgrade tunesmith"):
        list(read_request_log(tmp_path))
    incomplete = {key: value for key, value in chat_record(1).model_dump().items() if key != "served"}
    (tmp_path / "requests.jsonl").write_text(json.dumps(incomplete) + "\n" + chat_record(2).model_dump_json() + "\n")
    with pytest.raises(TunesmithError, match=r"requests\.jsonl:1: not a request log record \(served: Field required"):
        list(read_request_log(tmp_path))


CRASHING_WRITER = """
import sys
from tunesmith.records import RequestLogRecord
from tunesmith.request_log import RequestLogWriter
writer = RequestLogWriter(sys.argv[1], max_bytes=3000)
for n in range(100000):
    writer.append(RequestLogRecord(id=f"r-{n}", time="2026-11-30T12:00:00.000Z", endpoint="chat", model="m",
                                   served="m@1", messages=[{"role": "user", "content": "hi " * 20}],
                                   answers=["ok"], latency_s=0.1, status=200))
    print(f"r-{n}", flush=True)
"""


def test_every_acknowledged_append_survives_a_kill(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", CRASHING_WRITER, str(tmp_path)], stdout=subprocess.PIPE,
                               text=True)
    printed = []
    try:
        while len(printed) < 60:
            line = process.stdout.readline()
            assert line, "the writer exited before appending 60 records"
            printed.append(line.strip())
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    logged = [record.id for record in read_request_log(tmp_path)]
    assert printed == logged[:len(printed)]
    assert len(request_log_files(tmp_path)) > 1  # it rotated while being killed at some point


def test_export_writes_chat_data_the_data_stage_reads(tmp_path):
    write_log(tmp_path / "log", [
        chat_record(1, messages=[{"role": "system", "content": "Extract orders."},
                                 {"role": "user", "content": "Send 1 mug to Oslo", "name": "alice"}]),
        chat_record(2, status=500, error="engine failed", answers=[]),
        chat_record(3, status=429, error="queue full"),
        chat_record(4, shadow=True, served="orders@candidate"),
        chat_record(5, messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Prefix"}]),
        completion_record(6),
    ])
    (tmp_path / "none").mkdir()
    write_log(tmp_path / "none", [chat_record(7)], content="none")
    out = tmp_path / "train.jsonl"
    result = invoke(["export", "--out", str(out), "--dir", str(tmp_path / "log")])
    assert result.exit_code == 0, result.output
    assert "wrote 2 examples (1 completions as chat turns)" in result.output
    assert "skipped 4: 2 failed, 1 shadow, 1 turn_order" in result.output
    examples = read_examples(out)
    assert [m.role for m in examples[0].messages] == ["system", "user", "assistant"]
    assert examples[0].messages[1].name == "alice" and examples[0].messages[-1].content == chat_record(1).answers[0]
    assert [(m.role, m.content) for m in examples[1].messages] == [("user", "Order 6:"), ("assistant", " 6 lamps")]
    assert "messages" in json.loads(out.read_text().splitlines()[1])  # one format per file

    result = invoke(["export", "--out", str(out), "--dir", str(tmp_path / "log"),
                                           "--include-shadow", "--include-failed"])
    assert "wrote 4 examples" in result.output and "skipped 2: 1 no_answer, 1 turn_order" in result.output
    assert len(read_examples(out)) == 4

    result = invoke(["export", "--out", str(out), "--dir", str(tmp_path / "none")])
    assert result.exit_code == 2 and "nothing to export" in result.output and "1 content_none" in result.output
    assert len(read_examples(out)) == 4  # the earlier export is left whole


def test_export_of_completions_alone_writes_prompt_completion_rows(tmp_path):
    other = chat_record(9, model="other", served="other@1", registry_model=None)
    write_log(tmp_path / "log", [completion_record(n) for n in range(3)] + [other])
    out = tmp_path / "train.jsonl"
    result = invoke(["export", "--out", str(out), "--dir", str(tmp_path / "log"),
                                           "--model", "orders", "--since", "2026-11-30T12:01:00Z"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"prompt": "Order 1:", "completion": " 1 lamps"}, {"prompt": "Order 2:", "completion": " 2 lamps"}]
    assert len(read_examples(out)) == 2


def test_export_and_tail_errors_are_one_line(tmp_path):
    missing = tmp_path / "nowhere"
    result = invoke(["export", "--out", str(tmp_path / "x.jsonl"), "--dir", str(missing)])
    assert result.exit_code == 2 and "no request log in" in result.output and not (tmp_path / "x.jsonl").exists()
    result = invoke(["export", "--out", str(tmp_path / "x.jsonl"), "--since", "yesterday"])
    assert result.exit_code == 2 and "--since 'yesterday'" in result.output
    assert list(tmp_path.glob(".x.jsonl*")) == []


def test_tail_shows_the_last_requests(tmp_path):
    write_log(default_request_log_dir(), [chat_record(n, key_name=f"key-{n}", arm="b" if n % 2 else "a")
                                          for n in range(30)])
    result = invoke(["tail", "-n", "3"])
    assert result.exit_code == 0, result.output
    assert "key-29" in result.output and "key-27" in result.output and "key-26" not in result.output
    assert "9+7" in result.output and "0.25s" in result.output
