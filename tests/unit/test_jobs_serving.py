"""OpenAI's fine-tuning flow, unchanged but for `base_url`, against a real server with the real runner on a tiny
model: upload, create, poll to `succeeded`, events, checkpoints, then chat with the `ft:` model on the same server,
which only the key that trained it can see."""

from __future__ import annotations

import io
import json
import time

import openai
import pytest
from conftest import make_trained_run, order_rows, serving_on_loopback

from tunesmith.cli.serve_command import fine_tuning_api
from tunesmith.config import JobsConfig
from tunesmith.request_log import RequestLogWriter
from tunesmith.serve.app import build_app
from tunesmith.serve.engine import ServingEngine
from tunesmith.serve.gateway.gateway import Gateway
from tunesmith.serve.gateway.keys import KeyStore

PROMPT = [{"role": "user", "content": "Send 2 red hat to Oslo (ref 3)"}]


@pytest.fixture
def server(tmp_path, tiny_model_dir):
    """A server of one tiny version, with keys for two teams and the fine-tuning API (the tiny base as `tiny`)."""
    run = make_trained_run(tmp_path / "alpha", tiny_model_dir, "alpha", seed=1, steps=2)
    engine = ServingEngine.from_references([str(run)], default_max_tokens=8)
    keys = KeyStore(tmp_path / "keys.sqlite")
    team_keys = [keys.create(name)[1] for name in ("team-a", "team-b")]
    gateway = Gateway(engine, keys, request_log=RequestLogWriter(tmp_path / "log"))
    extension = fine_tuning_api(JobsConfig(models={"tiny": str(tiny_model_dir)}))(engine, gateway)
    try:
        with serving_on_loopback(build_app(engine, gateway=gateway, extension=extension)) as url:
            yield [openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) for key in team_keys]
    finally:
        extension.stop()
        engine.stop()


def test_upload_train_poll_and_chat_with_the_result_like_openai(server):
    client, other = server
    rows = "".join(json.dumps(row) + "\n" for row in order_rows(24))
    training = client.files.create(file=("orders.jsonl", io.BytesIO(rows.encode())), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny", training_file=training.id, suffix="orders", seed=7,
                                         method={"type": "supervised",
                                                 "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}})
    assert job.status in ("validating_files", "queued")
    deadline = time.monotonic() + 600
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(1)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model.startswith("ft:tiny:team-a:orders:") and job.trained_tokens > 0

    messages = [event.message for event in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert "Fine-tuning job started" in messages and "The job has successfully completed" in messages
    assert any(event.type == "metrics" for event in client.fine_tuning.jobs.list_events(job.id, limit=100))
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert checkpoints and all(c.fine_tuned_model_checkpoint.startswith(job.fine_tuned_model) for c in checkpoints)
    metrics_file = client.files.content(job.result_files[0]).read().decode()
    assert metrics_file.startswith("step,train_loss")

    assert job.fine_tuned_model in [model.id for model in client.models.list()]
    reply = client.chat.completions.create(model=job.fine_tuned_model, messages=PROMPT, max_tokens=5)
    assert reply.model == job.fine_tuned_model and reply.usage.completion_tokens > 0
    last = max(checkpoints, key=lambda c: c.step_number)  # the final checkpoint is the trained adapter itself
    at_checkpoint = client.chat.completions.create(model=last.fine_tuned_model_checkpoint, messages=PROMPT,
                                                   max_tokens=5, temperature=0)
    final = client.chat.completions.create(model=job.fine_tuned_model, messages=PROMPT, max_tokens=5, temperature=0)
    assert at_checkpoint.choices[0].message.content == final.choices[0].message.content

    # Another key sees none of it: not the file, not the job, not the model.
    assert job.fine_tuned_model not in [model.id for model in other.models.list()]
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(model=job.fine_tuned_model, messages=PROMPT, max_tokens=5)
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(training.id)
    assert list(other.fine_tuning.jobs.list()) == []


def test_a_second_server_on_one_home_serves_chat_and_leaves_the_job_queue_to_the_first(capsys):
    first = fine_tuning_api(JobsConfig())(None, None)  # a fresh home: no earlier models to load
    try:
        second = fine_tuning_api(JobsConfig())(None, None)
        assert first.routers and second.routers == []
        assert "Fine-tuning API off in this server" in capsys.readouterr().out
    finally:
        first.stop()
