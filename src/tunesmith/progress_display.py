"""Progress that shows wherever the output goes.

On a terminal, rich's live bars. In a log file or a pipe (CI, `nohup`, a job runner's log) rich draws nothing until
the end, so a long run looked silent; there each task prints its row as a plain line every `LOG_EVERY_S` seconds
and once more when it finishes.
"""

from __future__ import annotations

import time

from rich.progress import Progress

LOG_EVERY_S = 30.0


class LoggedProgress(Progress):
    """A rich `Progress` that, when its console is not a terminal, logs each task's row as a line now and then."""

    def __init__(self, *columns, log_every_s: float = LOG_EVERY_S, **kwargs):
        super().__init__(*columns, **kwargs)
        self.logging = not self.console.is_terminal
        self.log_every_s = log_every_s
        self._logged: dict = {}  # task id -> (time, completed) of its last line
        if self.logging:
            self.live.transient = True  # the lines are the record: rich's final redraw would repeat them

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._maybe_log(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_log(task_id)

    def stop(self) -> None:
        if self.logging:
            for task in self.tasks:
                if task.completed and self._logged.get(task.id, (0.0, None))[1] != task.completed:
                    self._log(task)
        super().stop()

    def _maybe_log(self, task_id) -> None:
        if not self.logging:
            return
        task = self._tasks[task_id]
        last_time, last_completed = self._logged.get(task_id, (None, None))
        if last_completed == task.completed:
            return
        now = time.monotonic()
        if last_time is None:
            self._logged[task_id] = (now, None)  # the first line comes one interval after the task starts moving
        elif task.finished or now - last_time >= self.log_every_s:
            self._log(task)

    def _log(self, task) -> None:
        self._logged[task.id] = (time.monotonic(), task.completed)
        self.console.print(self.make_tasks_table([task]), soft_wrap=True)
