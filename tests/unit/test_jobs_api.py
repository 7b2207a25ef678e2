"""OpenAI's fine-tuning API, driven by the official `openai` client against the jobs routes on loopback, with a
fake runner that follows the job folder contract (events, a checkpoint, a result; SIGTERM saves and exits)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import serving_on_loopback
from fastapi import FastAPI, Request

from tunesmith.config import JobsConfig
from tunesmith.jobs.routes import jobs_router
from tunesmith.jobs.store import JobStore
from tunesmith.jobs.supervisor import MAX_CRASHES, JobsService
from tunesmith.serve.errors import install_error_handlers
from tunesmith.serve.gateway.keys import ApiKey

KEYS = {"key-a": ApiKey("aaaa1111", "alice", (), None, None, False, "2026-01-01"),
        "key-b": ApiKey("bbbb2222", "bob", (), None, None, False, "2026-01-01")}
FAKE_RUNNER = r'''
"""Stand-in for tunesmith.jobs.runner: n_epochs steps (one metrics event each), a checkpoint at step 2, then a
result; its progress survives a restart; the suffix picks a misbehaviour."""
import json, os, signal, sys, time
from pathlib import Path

job_dir = Path(sys.argv[1])
spec = json.loads((job_dir / "job.json").read_text())
stopping = []
signal.signal(signal.SIGTERM, signal.SIG_IGN if spec["suffix"] == "stubborn" else lambda *_: stopping.append(1))
run = job_dir / "run"
run.mkdir(exist_ok=True)
progress = run / "step"
step = int(progress.read_text()) if progress.exists() else 0
total = spec["hyperparameters"]["n_epochs"]
with open(run / "starts", "a") as starts:
    starts.write(f"{os.getpid()} {step}\n")
attempt = len((run / "starts").read_text().splitlines())


def append(name, record):
    with open(job_dir / name, "a") as out:
        out.write(json.dumps(record) + "\n")


def finish(record):
    (job_dir / "result.tmp").write_text(json.dumps(record))
    os.replace(job_dir / "result.tmp", job_dir / "result.json")
    sys.exit(0)


if spec["suffix"] == "broken":
    append("events.jsonl", {"created_at": int(time.time()), "level": "error",
                            "message": "Fine-tuning job failed: line 1: no `messages`"})
    finish({"status": "failed", "error": {"code": "invalid_training_file", "param": "training_file",
                                          "message": "line 1: no `messages`"}})
append("events.jsonl", {"created_at": int(time.time()), "message": "Fine-tuning job started"})
while step < total:
    if stopping:
        sys.exit(143)
    if spec["suffix"] == "always-crash" or (spec["suffix"] == "crash-once" and attempt == 1 and step == 2):
        print("boom: the fake runner crashed", file=sys.stderr)
        sys.exit(1)
    time.sleep(float(os.environ.get("FAKE_STEP_SECONDS", "0.01")))
    step += 1
    progress.write_text(str(step))
    append("events.jsonl", {"created_at": int(time.time()), "type": "metrics", "message": f"Step {step}/{total}",
                            "data": {"step": step, "total_steps": total, "train_loss": 1 / step,
                                     "trained_tokens": 100 * step}})
    if step == 2:
        (run / "checkpoint-2").mkdir(exist_ok=True)
        append("checkpoints.jsonl", {"created_at": int(time.time()), "step_number": 2,
                                     "path": str(run / "checkpoint-2"),
                                     "metrics": {"step": 2, "train_loss": 0.5, "valid_loss": 0.625, "other": 1},
                                     "fine_tuned_model_checkpoint": spec["fine_tuned_model"] + ":ckpt-step-2"})
append("events.jsonl", {"created_at": int(time.time()), "message": "New fine-tuned model created: "
                                                                     + spec["fine_tuned_model"]})
append("events.jsonl", {"created_at": int(time.time()), "message": "The job has successfully completed"})
(run / "step_metrics.csv").write_text("step,train_loss\n" + "".join(f"{n},{1 / n}\n" for n in range(1, total + 1)))
finish({"status": "succeeded", "fine_tuned_model": spec["fine_tuned_model"], "trained_tokens": 100 * total,
        "registry_reference": f"{spec['job_id']}@1", "result_files": [str(run / "step_metrics.csv")]})
'''
SERVER_THAT_DIES = """
import sys, time
from pathlib import Path
from tunesmith.config import JobsConfig
from tunesmith.jobs.store import JobStore
from tunesmith.jobs.supervisor import JobsService
JobsService(JobStore(Path(sys.argv[1])), JobsConfig(), runner_command=sys.argv[2:], poll_seconds=0.05).start()
time.sleep(600)
"""


def wait_for(check, timeout: float = 30):
    """Poll `check` until it returns something true (the timeout only keeps a broken feature from hanging)."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"gave up waiting for {check}"
        time.sleep(0.05)
    return value


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"  # a zombie is gone too
    except FileNotFoundError:
        return True


def app_with_keys(service: JobsService) -> FastAPI:
    """The jobs routes behind a stand-in for the gateway's key check: `Bearer key-a`/`key-b`, anything else none."""
    app = FastAPI()
    install_error_handlers(app)

    @app.middleware("http")
    async def who_calls(request: Request, call_next):
        key = KEYS.get(request.headers.get("authorization", "").removeprefix("Bearer "))
        if key is not None:
            request.state.api_key = key
        return await call_next(request)

    app.include_router(jobs_router(service))
    return app


@pytest.fixture
def runner_command(tmp_path) -> list[str]:
    script = tmp_path / "fake_runner.py"
    script.write_text(FAKE_RUNNER, encoding="utf-8")
    return [sys.executable, str(script)]


@pytest.fixture
def ready_models() -> list:
    return []


@pytest.fixture
def make_service(isolated_home, runner_command, ready_models):
    made = []

    def make() -> JobsService:
        service = JobsService(JobStore(isolated_home), JobsConfig(concurrency=2, max_file_mb=1,
                                                                  models={"tiny-base": "/models/tiny"}),
                              on_model_ready=lambda ready: ready_models.append((ready.name, ready.reference)),
                              runner_command=runner_command, poll_seconds=0.05, stop_grace_seconds=1)
        made.append(service)
        return service

    yield make
    for service in made:
        service.stop()
        service.store.close()


@pytest.fixture
def service(make_service) -> JobsService:
    started = make_service()
    started.start()
    return started


@pytest.fixture
def server(service):
    with serving_on_loopback(app_with_keys(service)) as url:
        yield url


def client_for(url: str, key: str = "key-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


@pytest.fixture
def alice(server) -> openai.OpenAI:
    return client_for(server)


@pytest.fixture
def bob(server) -> openai.OpenAI:
    return client_for(server, "key-b")


def upload(client: openai.OpenAI, text: str = '{"messages": []}\n', name: str = "train.jsonl") -> str:
    return client.files.create(file=(name, text.encode()), purpose="fine-tune").id


def create_job(client: openai.OpenAI, steps: int = 4, suffix: str | None = None, **extra):
    return client.fine_tuning.jobs.create(model="SmolLM2-135M-Instruct", training_file=upload(client), suffix=suffix,
                                          method={"type": "supervised",
                                                  "supervised": {"hyperparameters": {"n_epochs": steps}}}, **extra)


def finished(client: openai.OpenAI, job_id: str, status: str = "succeeded"):
    job = wait_for(lambda: (job := client.fine_tuning.jobs.retrieve(job_id)).status in
                   ("succeeded", "failed", "cancelled") and job)
    assert job.status == status, job
    return job


def runner_starts(store: JobStore, job_id: str) -> list[tuple[int, int]]:
    """(pid, step it started at) of every runner process the job had."""
    starts = store.job_dir(job_id) / "run" / "starts"
    return [tuple(map(int, line.split())) for line in starts.read_text().splitlines()] if starts.exists() else []


def steps_done(store: JobStore, job_id: str) -> int:
    progress = store.job_dir(job_id) / "run" / "step"
    return int(progress.read_text() or 0) if progress.exists() else 0


# --- files ---------------------------------------------------------------------------------------------------------


def test_files_upload_list_page_read_and_delete(alice, service, server):
    ids = [upload(alice, f'{{"n": {n}}}\n', f"part-{n}.jsonl") for n in range(3)]
    first_page = alice.files.list(limit=2)
    assert [f.id for f in first_page.data] == ids[:0:-1] and first_page.has_more
    assert [f.id for f in alice.files.list(limit=2)] == ids[::-1]  # the client follows `after` to the last page
    assert [f.id for f in alice.files.list(order="asc")] == ids
    assert not list(alice.files.list(purpose="fine-tune-results"))
    raw = httpx.get(f"{server}/v1/files", params={"limit": 1, "after": ids[2]},
                    headers={"Authorization": "Bearer key-a"}).json()
    assert (raw["object"], raw["first_id"], raw["last_id"], raw["has_more"]) == ("list", ids[1], ids[1], True)

    file = alice.files.retrieve(ids[1])
    assert (file.filename, file.bytes, file.purpose, file.status, file.object) == (
        "part-1.jsonl", 9, "fine-tune", "processed", "file")
    assert alice.files.content(ids[1]).read() == b'{"n": 1}\n'
    deleted = alice.files.delete(ids[1])
    assert (deleted.id, deleted.deleted) == (ids[1], True)
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(ids[1])
    assert not service.store.file_path(ids[1]).exists()


def test_uploads_over_the_limit_or_for_other_purposes_are_refused(alice, service):
    with pytest.raises(openai.BadRequestError, match="serve.jobs.max_file_mb"):
        upload(alice, "x" * (2**20 + 1))
    with pytest.raises(openai.BadRequestError, match="purpose='fine-tune'"):
        alice.files.create(file=("batch.jsonl", b"{}\n"), purpose="batch")
    assert not list(alice.files.list()) and not list(service.store.files_dir.iterdir())  # no temp left behind


# --- a job's life --------------------------------------------------------------------------------------------------


def test_a_job_succeeds_with_events_checkpoints_a_result_file_and_a_served_model(alice, service, ready_models):
    created = create_job(alice, steps=4, suffix="orders", seed=7, metadata={"team": "search"})
    assert (created.status, created.seed, created.fine_tuned_model, created.metadata) == (
        "validating_files", 7, None, {"team": "search"})
    assert created.method.supervised.hyperparameters.n_epochs == 4 and created.hyperparameters.batch_size == "auto"

    job = finished(alice, created.id)
    name = f"ft:SmolLM2-135M-Instruct:alice:orders:{created.id.removeprefix('ftjob-')}"
    assert (job.fine_tuned_model, job.trained_tokens, job.estimated_finish) == (name, 400, None)
    assert job.finished_at >= job.created_at and len(job.result_files) == 1
    result = alice.files.retrieve(job.result_files[0])
    assert (result.purpose, result.filename) == ("fine-tune-results", "step_metrics.csv")
    assert alice.files.content(result.id).read().startswith(b"step,train_loss\n1,1.0\n")

    events = list(alice.fine_tuning.jobs.list_events(created.id, limit=3))  # newest first, three to a page
    messages = [event.message for event in reversed(events)]
    assert messages == [f"Created fine-tuning job: {created.id}", f"Validating training file: {created.training_file}",
                        "Files found, moving job to queued state (their rows are checked when it starts)",
                        "Fine-tuning job started",
                        "Step 1/4", "Step 2/4", "Step 3/4", "Step 4/4", f"New fine-tuned model created: {name}",
                        "The job has successfully completed"]
    metrics = [event for event in events if event.type == "metrics"]
    assert metrics[0].data["step"] == 4 and metrics[0].object == "fine_tuning.job.event"

    (checkpoint,) = alice.fine_tuning.jobs.checkpoints.list(created.id)
    assert (checkpoint.step_number, checkpoint.fine_tuning_job_id, checkpoint.fine_tuned_model_checkpoint) == (
        2, created.id, f"{name}:ckpt-step-2")
    assert (checkpoint.metrics.train_loss, checkpoint.metrics.valid_loss) == (0.5, 0.625)
    assert checkpoint.id.startswith("ftckpt-")
    checkpoint_dir = str(service.store.job_dir(created.id) / "run" / "checkpoint-2")
    served = [(f"{name}:ckpt-step-2", checkpoint_dir), (name, f"{created.id}@1")]
    assert ready_models == served and sorted(m[:2] for m in service.models_ready()) == sorted(served)


def test_a_failed_run_reports_the_runners_error(alice):
    job = finished(alice, create_job(alice, suffix="broken").id, "failed")
    assert (job.error.code, job.error.param, job.fine_tuned_model) == ("invalid_training_file", "training_file", None)
    errors = [e.message for e in alice.fine_tuning.jobs.list_events(job.id) if e.level == "error"]
    assert errors == ["Fine-tuning job failed: line 1: no `messages`"]


def test_a_crashed_runner_is_restarted_and_resumes_until_the_crashes_repeat(alice, service):
    job = finished(alice, create_job(alice, steps=4, suffix="crash-once").id)
    assert [step for _, step in runner_starts(service.store, job.id)] == [0, 2]
    assert any(e.level == "warn" and "exited with code 1" in e.message
               for e in alice.fine_tuning.jobs.list_events(job.id))

    hopeless = finished(alice, create_job(alice, suffix="always-crash").id, "failed")
    assert len(runner_starts(service.store, hopeless.id)) == MAX_CRASHES
    assert hopeless.error.code == "training_failed" and "boom: the fake runner crashed" in hopeless.error.message


# --- cancel, pause, resume -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [None, "stubborn"])
def test_cancel_stops_the_runner_within_seconds(alice, service, monkeypatch, suffix):
    """A runner that ignores SIGTERM ("stubborn") is killed once the grace period is over."""
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.1")
    job = create_job(alice, steps=50, suffix=suffix)
    pid = wait_for(lambda: service.store.job(job.id).pid)
    wait_for(lambda: steps_done(service.store, job.id) >= 1)
    assert alice.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    wait_for(lambda: gone(pid) and service.store.job(job.id).pid is None, timeout=10)
    job = alice.fine_tuning.jobs.retrieve(job.id)
    assert (job.status, job.fine_tuned_model) == ("cancelled", None) and job.finished_at is not None
    assert steps_done(service.store, job.id) < 50
    with pytest.raises(openai.BadRequestError, match="only .* jobs can be cancelled"):
        alice.fine_tuning.jobs.cancel(job.id)


def test_pause_keeps_the_progress_and_resume_continues_from_it(alice, service, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.05")
    job = create_job(alice, steps=12)
    wait_for(lambda: steps_done(service.store, job.id) >= 3)
    assert alice.fine_tuning.jobs.pause(job.id).status == "paused"
    (pid, _), = runner_starts(service.store, job.id)
    wait_for(lambda: gone(pid) and service.store.job(job.id).pid is None)
    stopped_at = steps_done(service.store, job.id)
    assert alice.fine_tuning.jobs.retrieve(job.id).status == "paused" and stopped_at < 12
    messages = [event.message for event in reversed(list(alice.fine_tuning.jobs.list_events(job.id, limit=100)))]
    requested = next(i for i, m in enumerate(messages) if m.startswith("Pause requested"))
    assert messages.index("Job paused at its newest checkpoint") > requested  # said when it is true, not before

    assert alice.fine_tuning.jobs.resume(job.id).status == "queued"
    finished(alice, job.id)
    assert [step for _, step in runner_starts(service.store, job.id)] == [0, stopped_at]
    with pytest.raises(openai.BadRequestError, match="only paused jobs can be resumed"):
        alice.fine_tuning.jobs.resume(job.id)


# --- restarts ------------------------------------------------------------------------------------------------------


def test_a_stopped_service_leaves_the_job_queued_and_the_next_one_finishes_it(make_service, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.05")
    first = make_service()
    first.start()
    file = first.store.add_file(None, "train.jsonl", "fine-tune", open(os.devnull, "rb"), None)
    job = first.store.add_job(None, None, "SmolLM2-135M-Instruct", "default", file.id,
                              hyperparameters={"n_epochs": 12})
    wait_for(lambda: steps_done(first.store, job.id) >= 3)
    first.stop()
    assert first.store.job(job.id).status == "queued"

    second = make_service()
    second.start()
    wait_for(lambda: second.store.job(job.id).status == "succeeded")
    (_, zero), (_, resumed_at) = runner_starts(second.store, job.id)
    assert zero == 0 and resumed_at >= 3


def test_a_killed_server_loses_nothing(make_service, runner_command, isolated_home, monkeypatch):
    """The server dies by SIGKILL mid-job; its runner lives on. The next server stops it and resumes the job."""
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.05")
    store = JobStore(isolated_home)
    file = store.add_file("aaaa1111", "train.jsonl", "fine-tune", open(os.devnull, "rb"), None)
    job = store.add_job("aaaa1111", "alice", "SmolLM2-135M-Instruct", "default", file.id,
                        hyperparameters={"n_epochs": 12})
    dying = subprocess.Popen([sys.executable, "-c", SERVER_THAT_DIES, str(isolated_home), *runner_command])
    try:
        wait_for(lambda: store.job(job.id).pid and steps_done(store, job.id) >= 3)
    finally:
        dying.send_signal(signal.SIGKILL)
        dying.wait()
    orphan = store.job(job.id).pid
    assert not gone(orphan) and store.job(job.id).status == "running"

    service = make_service()
    service.start()
    assert gone(orphan)  # stopped before anything else runs the job
    wait_for(lambda: service.store.job(job.id).status == "succeeded")
    assert [pid for pid, _ in runner_starts(service.store, job.id)][:1] == [orphan]
    assert len(runner_starts(service.store, job.id)) == 2
    assert service.models_ready()[0][:2] == (service.store.job(job.id).fine_tuned_model, f"{job.id}@1")
    store.close()


# --- who sees what -------------------------------------------------------------------------------------------------


def test_one_key_cannot_see_or_touch_another_keys_files_and_jobs(alice, bob, server):
    file_id = upload(alice)
    job = create_job(alice, steps=2)
    anonymous = client_for(server, "no-such-key")
    for other in (bob, anonymous):
        assert not list(other.files.list()) and not list(other.fine_tuning.jobs.list())
        for call in (lambda: other.files.retrieve(file_id), lambda: other.files.content(file_id),
                     lambda: other.files.delete(file_id), lambda: other.fine_tuning.jobs.retrieve(job.id),
                     lambda: other.fine_tuning.jobs.cancel(job.id), lambda: other.fine_tuning.jobs.pause(job.id),
                     lambda: list(other.fine_tuning.jobs.list_events(job.id)),
                     lambda: list(other.fine_tuning.jobs.checkpoints.list(job.id))):
            with pytest.raises(openai.NotFoundError):
                call()
        with pytest.raises(openai.BadRequestError) as refused:
            other.fine_tuning.jobs.create(model="SmolLM2-135M-Instruct", training_file=file_id)
        assert refused.value.body["param"] == "training_file"
    assert finished(alice, job.id).fine_tuned_model.startswith("ft:SmolLM2-135M-Instruct:alice::")
    assert alice.files.retrieve(file_id).id == file_id


def test_jobs_list_pages_newest_first_and_filters_by_metadata(alice, server):
    teams = ["x", "y", "x", None, "x"]
    ids = [create_job(alice, steps=1, metadata={"team": team} if team else None).id for team in teams]
    first_page = alice.fine_tuning.jobs.list(limit=2)
    assert [job.id for job in first_page.data] == ids[:2:-1] and first_page.has_more
    assert [job.id for job in alice.fine_tuning.jobs.list(limit=2)] == ids[::-1]
    assert [job.id for job in alice.fine_tuning.jobs.list(metadata={"team": "x"})] == [ids[4], ids[2], ids[0]]
    assert not list(alice.fine_tuning.jobs.list(metadata={"team": "z"}))
    raw = httpx.get(f"{server}/v1/fine_tuning/jobs", params={"metadata": "null"},
                    headers={"Authorization": "Bearer key-a"}).json()
    assert [job["id"] for job in raw["data"]] == [ids[3]] and raw["has_more"] is False


# --- bad requests --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, param, words", [
    ({"model": "gpt-4o-mini"}, "model", "known bases: SmolLM2-135M-Instruct, tiny-base"),
    ({"training_file": "file-000000000000000000000000"}, "training_file", "no such file"),
    ({"suffix": "no spaces please"}, "suffix", "letters, digits"),
    ({"metadata": {str(n): "v" for n in range(17)}}, "metadata", "at most 16"),
    ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, "integrations", "no integrations"),
    ({"method": {"type": "reinforcement"}}, "method.type", "supervised or dpo"),
    ({"method": {"type": "dpo", "supervised": {}}}, "method", "put them under `dpo`"),
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", "use a number from 1 up to 50"),
    ({"hyperparameters": {"n_epochs": 2}, "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}}},
     None, "in `method` only"),
    ({"training_epochs": 3}, None, "unknown field(s) training_epochs"),
])
def test_bad_job_requests_get_a_400_in_openais_shape(alice, server, change, param, words):
    body = {"model": "SmolLM2-135M-Instruct", "training_file": upload(alice), **change}
    reply = httpx.post(f"{server}/v1/fine_tuning/jobs", json=body, headers={"Authorization": "Bearer key-a"})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and words in error["message"]
    assert not list(alice.fine_tuning.jobs.list())


def test_a_result_file_cannot_train_and_an_unknown_model_names_its_code(alice):
    job = finished(alice, create_job(alice, steps=1).id)
    with pytest.raises(openai.BadRequestError, match="purpose 'fine-tune-results'"):
        alice.fine_tuning.jobs.create(model="SmolLM2-135M-Instruct", training_file=job.result_files[0])
    with pytest.raises(openai.BadRequestError) as refused:
        alice.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=job.training_file)
    assert refused.value.code == "model_not_available"


def test_a_dpo_job_keeps_its_method_and_beta(alice, service):
    job = alice.fine_tuning.jobs.create(model="tiny-base", training_file=upload(alice), method={
        "type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 1}}})
    assert (job.method.type, job.method.dpo.hyperparameters.beta, job.model) == ("dpo", 0.25, "tiny-base")
    spec_path = service.store.job_dir(job.id) / "job.json"
    spec = json.loads(wait_for(lambda: spec_path.exists() and spec_path.read_text()))
    assert (spec["method"], spec["base_model"], spec["hyperparameters"]["beta"]) == ("dpo", "/models/tiny", 0.25)
