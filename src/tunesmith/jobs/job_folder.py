"""What a job's runner writes into the job folder: events and checkpoint lines (appended, fsync'd), the result."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tunesmith.jobs.records import CheckpointLine, JobError, JobEventLine, JobResult, JobSpec
from tunesmith.registry.run_dir import write_json_atomic

JOB_FILE, EVENTS_FILE, CHECKPOINTS_FILE, RESULT_FILE = "job.json", "events.jsonl", "checkpoints.jsonl", "result.json"
RUN_DIR = "run"


class JobFailed(Exception):
    """The job cannot succeed for a reason the client can fix; `error` is what result.json reports."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.error = JobError(code=code, message=message, param=param)


class JobFolder:
    """One job's folder (layout in jobs.records): reads the spec, appends events and checkpoints, writes the result."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    @property
    def run_dir(self) -> Path:
        return self.directory / RUN_DIR

    def spec(self) -> JobSpec:
        return JobSpec.model_validate_json((self.directory / JOB_FILE).read_text(encoding="utf-8"))

    def event(self, message: str, level: str = "info") -> None:
        self._append(EVENTS_FILE, JobEventLine(created_at=int(time.time()), level=level, message=message))

    def metrics(self, data: dict) -> None:
        """A metrics event as OpenAI words it: `Step 3/40: training loss=1.2345`."""
        message = f"Step {data['step']}/{data.get('total_steps', '?')}"
        if data.get("train_loss") is not None:
            message += f": training loss={data['train_loss']:.4f}"
        self._append(EVENTS_FILE, JobEventLine(created_at=int(time.time()), message=message, type="metrics",
                                               data=data))

    def checkpoint(self, line: CheckpointLine) -> None:
        self._append(CHECKPOINTS_FILE, line)

    def reported_checkpoint_steps(self) -> set[int]:
        """Steps whose checkpoint an earlier attempt of this job already reported."""
        path = self.directory / CHECKPOINTS_FILE
        if not path.is_file():
            return set()
        lines = path.read_text(encoding="utf-8").splitlines()
        return {CheckpointLine.model_validate_json(line).step_number for line in lines if line.strip()}

    def finish(self, result: JobResult) -> None:
        write_json_atomic(self.directory / RESULT_FILE, result.model_dump(mode="json"))

    def _append(self, name: str, record) -> None:
        # One whole line per write, fsync'd: a reader tailing the file never sees a record twice or half of one.
        with (self.directory / name).open("a", encoding="utf-8") as handle:
            handle.write(record.model_dump_json(exclude_none=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
