"""The fine-tuning queue: a background thread that starts up to `concurrency` runner processes, copies what they
write (events, checkpoints, the result) into the store, and stops them when a caller cancels or pauses a job.

Nothing lives only in memory: a job's status, its runner's pid and how far its files were read are in the store,
so a server that restarts (even after SIGKILL) stops any runner it left behind and resumes the job from its
newest checkpoint.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel, ValidationError

from tunesmith.config import JobsConfig
from tunesmith.errors import TunesmithError
from tunesmith.jobs.protocol import JobCreate
from tunesmith.jobs.records import CheckpointLine, Hyperparameters, JobEventLine, JobResult, JobSpec
from tunesmith.jobs.store import JobRecord, JobStore
from tunesmith.models import DEFAULT_MODEL_NAME
from tunesmith.registry.run_dir import write_text_atomic

RUNNER_MODULE = [sys.executable, "-m", "tunesmith.jobs.runner"]
MAX_CRASHES = 3
"""Runner exits without a result, not asked for, before the job fails (a bug that repeats is not retried forever)."""
STOPPED_EXIT_CODES = (143, 130, -signal.SIGTERM, -signal.SIGINT)
"""A runner stopped by SIGTERM or SIGINT (it saved a checkpoint): resumed, not counted as a crash."""
LOG_TAIL_CHARS = 600

_log = logging.getLogger(__name__)


class ModelReady(NamedTuple):
    """A model a job made, to be served: its name, what to load (NAME@VERSION or an adapter folder), and the key id
    that owns it (None: a server without keys), the only caller that may use it."""

    name: str
    reference: str
    owner: str | None


class InvalidJobRequest(TunesmithError):
    """A job the server cannot take, with OpenAI's `param` and `code` for the error body."""

    def __init__(self, message: str, param: str, code: str):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class _Runner:
    process: subprocess.Popen
    terminated_at: float | None = None
    progress_origin: tuple[float, int] | None = None
    """(time, step) of the first metrics line this process wrote, to estimate the finish from."""


class JobsService:
    """Creates jobs for callers and runs the queue; `start()` once the server is up, `stop()` when it shuts down."""

    def __init__(self, store: JobStore, settings: JobsConfig,
                 on_model_ready: Callable[[ModelReady], None] = lambda ready: None,
                 runner_command: list[str] | None = None, poll_seconds: float = 0.5, stop_grace_seconds: float = 20):
        self.store, self.settings = store, settings
        self.on_model_ready = on_model_ready
        self.runner_command = list(runner_command or RUNNER_MODULE)
        self.poll_seconds, self.stop_grace_seconds = poll_seconds, stop_grace_seconds
        self._runners: dict[str, _Runner] = {}
        self._wake, self._stopping = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._queue_lock = None

    @property
    def max_file_bytes(self) -> int:
        return self.settings.max_file_mb * 2**20

    def bases(self) -> dict[str, str]:
        """The models a job may name -> what tunesmith's config takes as `base_model`."""
        return {DEFAULT_MODEL_NAME: "default", **self.settings.models}

    # --- what callers ask ---------------------------------------------------------------------------------------

    def create_job(self, owner: str | None, owner_name: str | None, request: JobCreate) -> JobRecord:
        """Check the base model and files, then record the job (`validating_files`; the queue takes it from there)."""
        bases = self.bases()
        if request.model not in bases:
            raise InvalidJobRequest(f"model {request.model!r} cannot be fine-tuned here; known bases: "
                                    f"{', '.join(bases)} (add more under serve.jobs.models)", "model",
                                    "model_not_available")
        for param in ("training_file", "validation_file"):
            file_id = getattr(request, param)
            if file_id is None:
                continue
            record = self.store.get_file(owner, file_id)
            if record is None:
                raise InvalidJobRequest(f"{param} {file_id!r}: no such file for this API key; upload it with "
                                        "files.create(purpose='fine-tune')", param, "invalid_file")
            if record.purpose != "fine-tune":
                raise InvalidJobRequest(f"{param} {file_id!r} has purpose {record.purpose!r}; upload the data "
                                        "with purpose 'fine-tune'", param, "invalid_file_purpose")
        job = self.store.add_job(
            owner, owner_name, request.model, bases[request.model], request.training_file, request.validation_file,
            request.method_type(), request.chosen_hyperparameters().model_dump(), request.suffix,
            request.seed if request.seed is not None else random.randrange(2**31), request.metadata)
        self._wake.set()
        return job

    def cancel(self, job_id: str) -> JobRecord:
        return self._apply(job_id, "cancel", "Job cancelled")

    def pause(self, job_id: str) -> JobRecord:
        if job_id in self._runners:  # its runner saves a checkpoint after the step in flight, then stops
            return self._apply(job_id, "pause", "Pause requested: the job stops after its current step and a "
                                                "checkpoint; resume it to continue from there")
        return self._apply(job_id, "pause", "Job paused; resume it to continue from its newest checkpoint")

    def resume(self, job_id: str) -> JobRecord:
        return self._apply(job_id, "resume", "Job resumed; it continues from its newest checkpoint when it starts")

    def _apply(self, job_id: str, action, message: str) -> JobRecord:
        job = self.store.request(job_id, action)
        self._note(job_id, message)
        self._wake.set()  # a runner to stop, or a slot to fill, now rather than at the next poll
        return job

    def models_ready(self) -> list[ModelReady]:
        """Every succeeded job's model and every checkpoint, for a server that starts."""
        finished = [ModelReady(job.fine_tuned_model, job.registry_reference, job.owner)
                    for job in self.store.succeeded_jobs() if job.registry_reference]
        return finished + [ModelReady(c.fine_tuned_model_checkpoint, c.path, self.store.job(c.job_id).owner)
                           for c in self.store.all_checkpoints()]

    # --- the queue ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Take the queue (one server per jobs folder), stop runners a dead server left, and start the thread."""
        lock_path = self.store.root / "supervisor.lock"
        self._queue_lock = open(lock_path, "a")
        try:
            fcntl.flock(self._queue_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._queue_lock.close()
            raise TunesmithError(f"another tunesmith server runs the fine-tuning queue in {self.store.root}; stop it, "
                                 "or set serve.jobs.enabled: false for this one") from None
        self._recover()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="tunesmith-jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread; running jobs get SIGTERM (they checkpoint) and go back to the queue for the next start."""
        if self._thread is None:
            return
        self._stopping.set()
        self._wake.set()
        self._thread.join()
        self._thread = None
        for runner in self._runners.values():
            _signal_group(runner.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_seconds
        for job_id, runner in list(self._runners.items()):
            try:
                runner.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(runner.process.pid, signal.SIGKILL)
                runner.process.wait()
            self._finish(job_id, runner, server_stopping=True)
        self._runners.clear()
        self._queue_lock.close()  # releases the flock

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._tick()
            except Exception:  # a bug here must not stop every later job
                _log.exception("the fine-tuning queue failed a round; it tries again")
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def _tick(self) -> None:
        for job in self.store.jobs_to_supervise():
            if job.status == "validating_files":
                self._check_files(job)
        for job_id, runner in list(self._runners.items()):
            self._stop_if_asked(job_id, runner)
            self._copy_progress(job_id, runner)
            if runner.process.poll() is not None:
                del self._runners[job_id]
                self._finish(job_id, runner)
        while len(self._runners) < self.settings.concurrency and not self._stopping.is_set():
            job = self.store.claim_next_queued(exclude=self._runners)
            if job is None:
                break
            self._launch(job)

    def _check_files(self, job: JobRecord) -> None:
        """The files still exist (their content is the runner's to check): validating_files -> queued."""
        missing = [file_id for file_id in (job.training_file, job.validation_file)
                   if file_id and not self.store.file_path(file_id).is_file()]
        if missing:
            error = {"code": "invalid_file", "message": f"file {missing[0]} was deleted before the job started; "
                                                        "upload it again and create a new job", "param": None}
            if self.store.update_job(job.id, when_status="validating_files", status="failed", error=error,
                                     finished_at=int(time.time())):
                self._note(job.id, error["message"], level="error")
        elif self.store.update_job(job.id, when_status="validating_files", status="queued"):
            self._note(job.id, "Files found, moving job to queued state (their rows are checked when it starts)")

    def _launch(self, job: JobRecord) -> None:
        job_dir = self.store.job_dir(job.id)
        job_dir.mkdir(parents=True, exist_ok=True)
        if (job_dir / "result.json").exists():  # it ended for good while nobody watched
            self._publish_result(job)
            return
        spec = JobSpec(job_id=job.id, owner=job.owner, owner_name=job.owner_name, model=job.model,
                       base_model=job.base_model, method=job.method,
                       hyperparameters=Hyperparameters(**job.hyperparameters),
                       training_file=str(self.store.file_path(job.training_file).resolve()),
                       validation_file=(str(self.store.file_path(job.validation_file).resolve())
                                        if job.validation_file else None),
                       suffix=job.suffix, seed=job.seed, fine_tuned_model=job.planned_model)
        write_text_atomic(job_dir / "job.json", spec.model_dump_json(indent=2) + "\n")
        try:
            with open(job_dir / "runner.log", "ab") as log:
                process = subprocess.Popen([*self.runner_command, str(job_dir)], stdin=subprocess.DEVNULL,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            self._fail(job.id, f"the runner could not start ({' '.join(self.runner_command)}: {exc})")
            return
        self.store.update_job(job.id, pid=process.pid)
        self._runners[job.id] = _Runner(process)  # the runner itself says it started (or from which step)

    def _stop_if_asked(self, job_id: str, runner: _Runner) -> None:
        """SIGTERM a runner whose job was cancelled or paused; SIGKILL it if it has not exited within the grace."""
        if runner.terminated_at is None:
            if self.store.job(job_id).status != "running":
                _signal_group(runner.process.pid, signal.SIGTERM)
                runner.terminated_at = time.monotonic()
        elif time.monotonic() - runner.terminated_at > self.stop_grace_seconds:
            _signal_group(runner.process.pid, signal.SIGKILL)

    # --- what runners write ---------------------------------------------------------------------------------------

    def _copy_progress(self, job_id: str, runner: _Runner | None) -> None:
        """Copy new complete lines of events.jsonl and checkpoints.jsonl into the store."""
        job, job_dir = self.store.job(job_id), self.store.job_dir(job_id)
        for line, read_to in _new_lines(job_dir / "events.jsonl", job.events_read, JobEventLine):
            self.store.add_event(job_id, line, read_to=read_to)
            if line.type == "metrics" and line.data:
                self._note_progress(job_id, line.data, runner)
        for line, read_to in _new_lines(job_dir / "checkpoints.jsonl", job.checkpoints_read, CheckpointLine):
            self.store.add_checkpoint(job_id, line, read_to=read_to)
            self._announce(job_id, line.fine_tuned_model_checkpoint, line.path)

    def _note_progress(self, job_id: str, data: dict, runner: _Runner | None) -> None:
        changes, step, total = {}, data.get("step"), data.get("total_steps")
        if isinstance(data.get("trained_tokens"), int):
            changes["trained_tokens"] = data["trained_tokens"]
        if runner is not None and isinstance(step, int) and isinstance(total, int):
            now = time.time()
            if runner.progress_origin is None:
                runner.progress_origin = (now, step)
            started, first_step = runner.progress_origin
            if step > first_step:
                changes["estimated_finish"] = int(now + (now - started) / (step - first_step) * max(0, total - step))
        if changes:
            self.store.update_job(job_id, when_status="running", **changes)

    def _finish(self, job_id: str, runner: _Runner, server_stopping: bool = False) -> None:
        """The runner exited: publish its result, or leave the job as the caller asked, or resume it."""
        self._copy_progress(job_id, None)
        job = self.store.job(job_id)
        code = runner.process.returncode
        if job.status != "running":  # cancelled or paused (or resumed already): the caller decided
            if job.status == "paused":  # noted before the pid goes, which is when a watcher sees it stopped
                self._note(job_id, "Job paused" + (" at its newest checkpoint" if code in STOPPED_EXIT_CODES else
                                                   f" (its runner exited with code {code})"))
            self.store.update_job(job_id, pid=None)
        elif (self.store.job_dir(job_id) / "result.json").exists():
            self._publish_result(job)
        elif server_stopping or code in STOPPED_EXIT_CODES:
            self.store.update_job(job_id, when_status="running", status="queued", pid=None)
            self._note(job_id, "The runner was stopped; the job resumes from its newest checkpoint")
        elif job.crashes + 1 >= MAX_CRASHES:
            self._fail(job_id, f"the runner stopped without a result {MAX_CRASHES} times (last exit code {code}); "
                               f"end of its log ({self.store.job_dir(job_id) / 'runner.log'}): "
                               f"{_log_tail(self.store.job_dir(job_id) / 'runner.log')}")
        else:
            self.store.update_job(job_id, when_status="running", status="queued", pid=None, crashes=job.crashes + 1)
            self._note(job_id, f"The runner exited with code {code} without a result; resuming from the newest "
                               f"checkpoint (attempt {job.crashes + 2} of {MAX_CRASHES})", level="warn")

    def _publish_result(self, job: JobRecord) -> None:
        job_dir = self.store.job_dir(job.id)
        try:
            result = JobResult.model_validate_json((job_dir / "result.json").read_bytes())
        except (OSError, ValidationError) as exc:
            self._fail(job.id, f"the runner's result {job_dir / 'result.json'} is unreadable: {exc}")
            return
        result_files = [self._add_result_file(job, Path(path)) for path in result.result_files if Path(path).is_file()]
        finished = {"pid": None, "finished_at": int(time.time()), "estimated_finish": None,
                    "result_files": result_files}
        if result.trained_tokens is not None:
            finished["trained_tokens"] = result.trained_tokens
        if result.status == "failed":
            error = result.error.model_dump() if result.error else {"code": "training_failed", "param": None,
                                                                    "message": "the runner reported a failure"}
            self.store.update_job(job.id, when_status="running", status="failed", error=error, **finished)
            return  # the runner's own events say why
        name = result.fine_tuned_model or job.planned_model
        if self.store.job(job.id).status != "running":
            return
        if result.registry_reference:  # served before the job says succeeded: a client that sees it can chat
            self._announce(job.id, name, result.registry_reference)
        self.store.update_job(job.id, when_status="running", status="succeeded", fine_tuned_model=name,
                              registry_reference=result.registry_reference, **finished)

    def _add_result_file(self, job: JobRecord, path: Path) -> str:
        with open(path, "rb") as source:
            return self.store.add_file(job.owner, path.name, "fine-tune-results", source, max_bytes=None).id

    def _announce(self, job_id: str, name: str, reference: str) -> None:
        """Tell the server a model is ready to serve; its failure is the job's warning, not the queue's crash."""
        try:
            self.on_model_ready(ModelReady(name, reference, self.store.job(job_id).owner))
        except Exception as exc:
            _log.exception("serving %s (%s) failed", name, reference)
            self._note(job_id, f"{name} is ready but the server could not load it ({exc}); load {reference} "
                               "yourself", level="warn")

    def _fail(self, job_id: str, message: str) -> None:
        error = {"code": "training_failed", "message": message, "param": None}
        self.store.update_job(job_id, status="failed", error=error, pid=None, finished_at=int(time.time()),
                              estimated_finish=None)
        self._note(job_id, f"Fine-tuning job failed: {message}", level="error")

    def _note(self, job_id: str, message: str, level: str = "info") -> None:
        self.store.add_event(job_id, JobEventLine(created_at=int(time.time()), level=level, message=message))

    # --- a server that died -------------------------------------------------------------------------------------

    def _recover(self) -> None:
        """With the queue lock held, every runner on record was left by a dead server: stop it, resume its job."""
        for job in self.store.jobs_to_supervise():
            job_dir = self.store.job_dir(job.id)
            if job.pid is not None and _is_runner_of(job.pid, job_dir):
                _signal_group(job.pid, signal.SIGTERM)
                deadline = time.monotonic() + self.stop_grace_seconds
                while _is_runner_of(job.pid, job_dir) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if _is_runner_of(job.pid, job_dir):
                    _signal_group(job.pid, signal.SIGKILL)
            self._copy_progress(job.id, None)
            if job.status == "running":
                self.store.update_job(job.id, status="queued", pid=None)
                self._note(job.id, "The server restarted; the job resumes from its newest checkpoint")
            elif job.pid is not None:
                self.store.update_job(job.id, pid=None)


def _new_lines(path: Path, offset: int, record_type: type[BaseModel]):
    """(record, position after it) for each complete line after `offset`; an unreadable line is skipped."""
    try:
        with open(path, "rb") as source:
            source.seek(offset)
            data = source.read()
    except FileNotFoundError:
        return
    for raw in data.split(b"\n")[:-1]:  # the last piece is empty or a line still being written
        offset += len(raw) + 1
        try:
            yield record_type.model_validate_json(raw), offset
        except ValidationError as exc:
            _log.warning("%s: skipped a line at byte %d that does not parse: %s", path, offset, exc)


def _is_runner_of(pid: int, job_dir: Path) -> bool:
    """Whether `pid` is alive and runs `job_dir` (not a program the system gave the pid to since, nor a zombie)."""
    if not Path("/proc/self").exists():  # macOS: the pid alone must do
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    try:
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(job_dir).encode() in command_line.split(b"\0")


def _signal_group(pid: int, signal_number: int) -> None:
    """Signal the runner and every process it started (it leads its own session and group)."""
    try:
        os.killpg(pid, signal_number)
    except (ProcessLookupError, PermissionError):
        pass


def _log_tail(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return "(no log)"
    return " ".join(text[-LOG_TAIL_CHARS:].split()) or "(empty)"
