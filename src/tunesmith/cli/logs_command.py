"""`tunesmith logs export | tail`: turn the server's request log into training data, or show its last requests.

Export writes the data stage's chat format (`{"messages": [...request..., assistant answer]}`), one format per
file since the data stage refuses mixed files: completions become `{"prompt", "completion"}` when the export
holds nothing else, chat turns (which the data stage reads the same way) otherwise.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import typer

from tunesmith.cli.data_commands import user_errors

logs_app = typer.Typer(help="The server's request log: export it as training data, show the last requests.",
                       no_args_is_help=True)
LogDir = Annotated[Optional[Path], typer.Option("--dir", help="Request log folder (default: TUNESMITH_HOME/requests).")]
MESSAGE_KEYS = ("role", "content", "name")


@dataclass
class ExportCounts:
    chat: int = 0
    completions: int = 0
    skipped: Counter = field(default_factory=Counter)
    """Records left out, by reason: failed, shadow, content_none, no_answer, or the data stage's reason code."""

    @property
    def written(self) -> int:
        return self.chat + self.completions


@logs_app.command()
def export(
    out: Annotated[Path, typer.Option("--out", help="Training data file to write (.jsonl).")],
    directory: LogDir = None,
    since: Annotated[Optional[str], typer.Option(help="Only requests since: 2026-11-01, 7d, 24h or 30m.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Only this model (asked-for, served or registry name).")] = None,
    include_failed: Annotated[bool, typer.Option("--include-failed", help="Also requests not answered 200.")] = False,
    include_shadow: Annotated[bool, typer.Option("--include-shadow", help="Also shadow answers.")] = False,
) -> None:
    """Write logged requests and their answers as chat training data that `tunesmith data prepare` reads."""
    from tunesmith.cli.output import console, plain
    from tunesmith.request_log import default_request_log_dir, parse_since, read_request_log

    with user_errors():
        log_dir = directory or default_request_log_dir()
        records = read_request_log(log_dir, since=parse_since(since) if since else None, model=model)
        counts = export_training_data(records, out, include_failed, include_shadow, log_dir)
    written = f"wrote {counts.written} examples to "
    if counts.completions and counts.chat:
        written = f"wrote {counts.written} examples ({counts.completions} completions as chat turns) to "
    console.print(plain(written + f"{out}{_skipped_text(counts.skipped)}"))


def export_training_data(records: Iterable, out: Path, include_failed: bool = False, include_shadow: bool = False,
                         log_dir: Path | None = None) -> ExportCounts:
    """Write the trainable records to `out` (atomically) in the data stage's format; what was written and skipped."""
    from tunesmith.errors import TunesmithError
    from tunesmith.registry.run_dir import staged_text_file

    counts = ExportCounts()
    with staged_text_file(Path(out)) as chat_rows, tempfile.TemporaryFile("w+", encoding="utf-8") as completion_rows:
        for record in records:
            row, reason = _checked_row(record, include_failed, include_shadow)
            if reason:
                counts.skipped[reason] += 1
            elif "prompt" in row:
                completion_rows.write(json.dumps(row, ensure_ascii=False) + "\n")
                counts.completions += 1
            else:
                chat_rows.write(json.dumps(row, ensure_ascii=False) + "\n")
                counts.chat += 1
        if not counts.written:
            raise TunesmithError(f"nothing to export from the request log in {log_dir or 'the records given'}"
                                 f"{_skipped_text(counts.skipped) or ' (no records matched)'}; widen --since or "
                                 "--model, or add --include-failed / --include-shadow")
        completion_rows.seek(0)
        for line in completion_rows:
            if counts.chat:
                line = json.dumps(_as_chat(json.loads(line)), ensure_ascii=False) + "\n"
            chat_rows.write(line)
    return counts


def training_row(record) -> dict:
    """A logged request and its first answer as one data-stage row (chat, or prompt/completion)."""
    if record.endpoint == "completions":
        return {"prompt": record.prompt, "completion": record.answers[0]}
    messages = [{key: message.get(key) for key in MESSAGE_KEYS if message.get(key) is not None or key == "content"}
                for message in record.messages or []]
    return {"messages": messages + [{"role": "assistant", "content": record.answers[0]}]}


def _checked_row(record, include_failed: bool, include_shadow: bool) -> tuple[dict | None, str | None]:
    """The record's training row, or why it is left out (the data stage's own checks included)."""
    from tunesmith.data.formats import RowError, convert_record
    from tunesmith.data.readers import value_problem

    if record.status != 200 and not include_failed:
        return None, "failed"
    if record.shadow and not include_shadow:
        return None, "shadow"
    if record.content == "none":
        return None, "content_none"
    if not record.answers or (record.prompt if record.endpoint == "completions" else record.messages) is None:
        return None, "no_answer"
    row = training_row(record)
    try:
        problem = value_problem(row)
        if problem:
            raise RowError(*problem)
        convert_record(row, None)
    except RowError as exc:
        return None, exc.reason
    return row, None


def _as_chat(row: dict) -> dict:
    """A plain prompt/completion row as the chat turns the data stage makes of it."""
    return {"messages": [{"role": "user", "content": row["prompt"]},
                         {"role": "assistant", "content": row["completion"]}]}


def _skipped_text(skipped: Counter) -> str:
    if not skipped:
        return ""
    reasons = ", ".join(f"{count} {reason}" for reason, count in skipped.most_common())
    return f"; skipped {sum(skipped.values())}: {reasons}"


@logs_app.command()
def tail(
    directory: LogDir = None,
    count: Annotated[int, typer.Option("-n", help="How many of the last requests to show.")] = 20,
) -> None:
    """Show the last requests: time, key, model, served version, arm, status, tokens, latency."""
    from collections import deque

    from rich.table import Table

    from tunesmith.cli.output import console, plain
    from tunesmith.request_log import default_request_log_dir, read_request_log

    with user_errors():
        log_dir = directory or default_request_log_dir()
        last = deque(read_request_log(log_dir), maxlen=max(count, 0))
    table = Table("time", "key", "model", "served", "arm", "status", "tokens", "latency",
                  title=plain(f"last {len(last)} requests in {log_dir}"))
    for record in last:
        served = record.served + (" (shadow)" if record.shadow else "")
        table.add_row(record.time, plain(record.key_name or record.key_id or "-"), plain(record.model), plain(served),
                      plain(record.arm or "-"), str(record.status),
                      f"{record.prompt_tokens}+{record.completion_tokens}", f"{record.latency_s:.2f}s")
    console.print(table)
