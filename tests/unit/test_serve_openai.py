"""Two fine-tuned versions on one shared tiny base, served together: the OpenAI surface the official client calls
(n, logprobs, json_schema, text completions), mixed batches, freed slots, a full queue, a graceful drain."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jsonschema
import pytest
from conftest import serving_on_loopback

from tunesmith.machine import cpu_supports_bf16
from tunesmith.serve.app import build_app
from tunesmith.serve.engine import ServingEngine
from tunesmith.serve.protocol import ChatCompletionRequest

PROMPT = [{"role": "user", "content": "Send 3 blue mug to Denver (ref 7)"}]
SCHEMA = {"type": "object", "properties": {"item": {"enum": ["mug", "hat"]}, "quantity": {"type": "integer", "minimum": 1, "maximum": 99}},
          "required": ["item", "quantity"], "additionalProperties": False}


@pytest.fixture(scope="module")
def runs(two_versions):
    return two_versions


@pytest.fixture(scope="module")
def engine(runs):
    return ServingEngine.from_references([str(run) for run in runs], default_max_tokens=16)


def test_versions_share_one_base_and_list_it_as_their_parent(client, engine, tiny_model_dir):
    cards = {model.id: model for model in client.models.list()}
    assert list(cards) == ["alpha", "beta", tiny_model_dir.name]
    assert cards["alpha"].parent == cards["beta"].parent == tiny_model_dir.name and cards[tiny_model_dir.name].parent is None
    groups = {id(engine.models[name].route.group.model) for name in cards}
    assert len(groups) == 1  # one copy of the base carries both adapters


def test_rows_of_different_versions_in_one_batch_answer_as_they_do_alone(engine, tiny_model_dir):
    names = ["alpha", "beta", tiny_model_dir.name]
    requests = [ChatCompletionRequest(model=name, messages=PROMPT, max_tokens=10) for name in names]
    alone = [engine.generate(request).text for request in requests]
    assert len(set(alone)) == 3  # the versions really differ
    streams = [engine.stream(request) for request in requests * 3]  # nine rows decoded together
    together = ["".join(delta.text for delta in stream) for stream in streams]
    assert together == alone * 3


def test_n_choices_with_a_seed_repeat_and_differ(client):
    request = dict(model="alpha", messages=PROMPT, max_tokens=8, temperature=1.5, seed=11, n=3)
    first, again = (client.chat.completions.create(**request) for _ in range(2))
    texts = [choice.message.content for choice in first.choices]
    assert [choice.index for choice in first.choices] == [0, 1, 2]
    assert texts == [choice.message.content for choice in again.choices] and len(set(texts)) > 1
    assert first.usage.completion_tokens > len(texts)


def test_logprobs_come_back_for_every_token_with_ranked_alternatives(client):
    reply = client.chat.completions.create(model="beta", messages=PROMPT, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert content and len(content) <= reply.usage.completion_tokens
    for entry in content:
        ranked = [alt.logprob for alt in entry.top_logprobs]
        assert len(ranked) == 3 and ranked == sorted(ranked, reverse=True)
        assert entry.logprob == pytest.approx(ranked[0], abs=1e-4)  # greedy picks the most likely token


def test_json_schema_answers_always_parse_and_match(client):
    """The tiny model cannot write JSON on its own: under `strict` json_schema every answer still validates."""
    for seed in range(4):
        reply = client.chat.completions.create(
            model="alpha", messages=PROMPT, max_tokens=40, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "order", "schema": SCHEMA, "strict": True}})
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    anything = client.chat.completions.create(model="beta", messages=PROMPT, max_tokens=40,
                                              response_format={"type": "json_object"})
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(anything.choices[0].message.content), dict)


def test_text_completions_take_text_or_token_ids_and_stream_usage(client, engine):
    whole = client.completions.create(model="alpha", prompt="Order 5 pens", max_tokens=6, temperature=0, echo=True)
    assert whole.object == "text_completion" and whole.choices[0].text.startswith("Order 5 pens")
    ids = engine.models["alpha"].tokenizer("Order 5 pens", split_special_tokens=True)["input_ids"]
    by_ids = client.completions.create(model="alpha", prompt=ids, max_tokens=6, temperature=0)
    assert "Order 5 pens" + by_ids.choices[0].text == whole.choices[0].text
    chunks = list(client.completions.create(model="alpha", prompt=["a", "b"], max_tokens=4, stream=True,
                                            stream_options={"include_usage": True}, logprobs=2))
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    assert chunks[-1].usage.completion_tokens > 0 and not chunks[-1].choices
    spelled = client.completions.create(model="alpha", prompt="<|im_end|>", max_tokens=1)
    assert spelled.usage.prompt_tokens > 1  # user text spelling a control token stays text


def test_clients_that_walk_away_mid_stream_free_their_slots(server_url, engine):
    body = {"model": "beta", "messages": PROMPT, "max_tokens": 400, "stream": True}
    for _ in range(6):
        with httpx.stream("POST", f"{server_url}/v1/chat/completions", json=body, timeout=30) as response:
            next(response.iter_lines())  # the role chunk arrived; then the client hangs up
    deadline = time.monotonic() + 20
    while engine.batching.running and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.batching.running == 0 and engine.batching.waiting == 0
    assert httpx.post(f"{server_url}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2}).status_code == 200


def test_a_full_queue_answers_429_with_retry_after(runs):
    engine = ServingEngine.from_references([str(runs[0])], serve_base=False, max_batch=1, max_waiting=1)
    statuses, headers = [], []
    with serving_on_loopback(build_app(engine)) as url:
        def one():
            reply = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                               json={"model": "alpha", "messages": PROMPT, "max_tokens": 300})
            statuses.append(reply.status_code)
            headers.append(reply.headers.get("retry-after"))

        threads = [threading.Thread(target=one) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
    assert all(int(h) >= 1 for s, h in zip(statuses, headers) if s == 429)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_sigterm_finishes_the_streams_in_flight_then_exits(runs):
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tunesmith", "serve", str(runs[0]), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = {"model": "alpha", "messages": PROMPT, "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            first = next(lines)
            server.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert first.startswith("data: ") and rest[-1] == "data: [DONE]"
        finish = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in rest[:-1]
                  if json.loads(line[6:]).get("choices")]
        assert finish[-1] in {"stop", "length"}  # the answer ran to its end, not cut by the shutdown
        assert server.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
        assert "Traceback" not in server.stderr.read()
        expected = "bf16" if cpu_supports_bf16() else "fp32"  # serve.precision auto: bf16 where the CPU has it
        assert f"computing in {expected} on cpu" in server.stdout.read()
    finally:
        if server.poll() is None:
            server.kill()


def test_every_way_of_mixing_adapters_computes_the_same_update(engine, monkeypatch):
    """Sibling layers' updates together, each layer's own dense product over all adapters masked per row, and
    per-row gathers (many adapters): the same logits, and the same as each row alone."""
    import torch

    from tunesmith.generation import multi_lora
    from tunesmith.generation.sibling_lora import group_siblings, ungroup_siblings

    group = engine.models["alpha"].route.group
    ids = torch.tensor([[5, 6, 7]] * 3)
    names = [engine.models["alpha"].route.adapter, None, engine.models["beta"].route.adapter]

    def logits_of(rows_names, rows_ids):
        group.adapter_rows.select(rows_names, rows_ids.device)
        return group.model(input_ids=rows_ids).logits

    with torch.inference_mode():
        assert group_siblings(group.model, group.adapter_rows) > 0
        siblings = logits_of(names, ids)
        alone = torch.stack([logits_of([name], ids[:1])[0] for name in names])
        ungroup_siblings(group.model)
        each_layer = logits_of(names, ids)
        monkeypatch.setattr(multi_lora, "DENSE_MIX_COLUMNS", 0)
        gathered = logits_of(names, ids)
        monkeypatch.undo()
        group_siblings(group.model, group.adapter_rows)
    torch.testing.assert_close(siblings, each_layer, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(siblings, gathered, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(siblings, alone, rtol=1e-4, atol=1e-4)
    assert (siblings[0] - siblings[1]).abs().max() > 1e-3  # the adapter changed row 0
    assert (siblings[2] - siblings[1]).abs().max() > 1e-3


def test_hostile_text_completion_requests_get_no_5xx_and_leave_no_stuck_slot(server_url, engine):
    """Each request replaces one field of a valid text completion with a generated hostile value."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from test_serve import hostile_values

    fields = ["model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stop", "seed", "logprobs",
              "echo", "best_of", "suffix", "logit_bias", "stream_options", "user"]
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=server_url, timeout=60) as http:
        @settings(max_examples=400, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(field=st.sampled_from(fields), value=hostile_values())
        def one_request(field, value):
            body = {"model": "alpha", "prompt": "Order 5 pens", "max_tokens": 2, field: value}
            if isinstance(body.get("max_tokens"), int):
                body["max_tokens"] = min(body["max_tokens"], 8)
            reply = http.post("/v1/completions", content=json.dumps(body, ensure_ascii=True),
                              headers={"content-type": "application/json"})
            statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
            assert reply.status_code < 500, (field, value, reply.text[:300])
            if reply.status_code >= 400:
                assert set(reply.json()["error"]) >= {"message", "type"}

        one_request()
    print(f"hostile completion statuses: {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= 400 and 200 in statuses and 400 in statuses
    deadline = time.monotonic() + 10
    while engine.batching.running and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.batching.running == 0 and engine.batching.waiting == 0


def test_a_dora_version_decodes_on_its_own_copy_and_answers_like_peft(runs, tiny_config):
    """peft cannot mix DoRA rows with others: that version gets a base copy of its own, said at start, and its
    logits are peft's."""
    import torch

    from tunesmith.config import load_config
    from tunesmith.data.prepare import prepare
    from tunesmith.models import load_with_adapter
    from tunesmith.registry.run import Run
    from tunesmith.train.sft import train_sft

    config = load_config(tiny_config, ["name=dora", "train.adapter=dora", "train.max_steps=3"])
    dora_dir = prepare(config)
    train_sft(dora_dir, config)
    engine = ServingEngine.from_references([str(runs[0]), str(dora_dir)])
    dora, alpha = engine.models["dora"], engine.models["alpha"]
    assert "DoRA" in dora.note and dora.route.group is not alpha.route.group and dora.parent == alpha.parent
    ids = torch.tensor([[5, 6, 7, 8]])
    run = Run.open(dora_dir)
    with torch.inference_mode():
        expected = load_with_adapter(run.base_source, run.weights_dir)(input_ids=ids).logits
        got = dora.route.group.forward(ids, [None]).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    reply = engine.generate(ChatCompletionRequest(model="dora", messages=PROMPT, max_tokens=4))
    assert reply.completion_tokens >= 1


def test_serve_without_anything_to_serve_or_with_a_bad_setting_is_one_clear_error(tmp_path):
    def serve(*args):
        return subprocess.run([sys.executable, "-m", "tunesmith", "serve", *args], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)

    nothing = serve()
    assert nothing.returncode == 2 and "nothing to serve" in nothing.stderr + nothing.stdout
    config = tmp_path / "serve.yaml"
    config.write_text("serve: {max_batch: 0}\n", encoding="utf-8")
    bad = serve("--config", str(config), "somewhere")
    assert bad.returncode == 2 and "serve.max_batch" in bad.stderr + bad.stdout
    assert "Traceback" not in nothing.stderr + bad.stderr
