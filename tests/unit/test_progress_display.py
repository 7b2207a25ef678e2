"""Progress written to a log (not a terminal) shows as plain lines while the work runs, not only at the end."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import MofNCompleteColumn, TextColumn

from tunesmith.progress_display import LoggedProgress


def _run(console: Console, log_every_s: float) -> str:
    with LoggedProgress(TextColumn("train"), MofNCompleteColumn(), console=console, log_every_s=log_every_s) as bar:
        task = bar.add_task("train", total=10)
        for step in range(10):
            bar.update(task, completed=step + 1)
            if step == 4:
                midway = console.file.getvalue()
    return midway, console.file.getvalue()


def test_a_log_gets_lines_while_the_task_runs_and_its_last_state_once():
    midway, log = _run(Console(file=io.StringIO(), force_terminal=False, width=100), log_every_s=0)
    assert "4/10" in midway and "5/10" in midway  # written while the work ran, not at the end
    assert log.count("10/10") == 1
    assert "\x1b[" not in log  # plain lines: no cursor movement


def test_a_log_line_waits_for_its_interval():
    midway, log = _run(Console(file=io.StringIO(), force_terminal=False, width=100), log_every_s=3600)
    assert midway == ""
    assert log.count("/10") == 1 and "10/10" in log  # the finished task still says where it ended


def test_a_terminal_gets_the_live_bar_only():
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    with LoggedProgress(TextColumn("train"), MofNCompleteColumn(), console=console, log_every_s=0) as bar:
        task = bar.add_task("train", total=3)
        for step in range(3):
            bar.update(task, completed=step + 1)
    assert not bar.logging and bar._logged == {}
