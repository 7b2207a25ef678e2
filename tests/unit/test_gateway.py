"""The gateway in front of a real server on two tiny fine-tuned versions: API keys on every protected path, rate
limits, usage, Prometheus metrics, the request log, split/shadow/canary routes (a canary that breaks JSON is rolled
back by itself), and a request log that survives a SIGKILL of the server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import yaml
from conftest import serving_on_loopback

from tunesmith.config import RouteConfig
from tunesmith.request_log import RequestLogWriter, read_request_log
from tunesmith.serve.app import build_app
from tunesmith.serve.engine import ServingEngine
from tunesmith.serve.gateway.gateway import ROUTE_EVENTS_FILE, Gateway
from tunesmith.serve.gateway.keys import KeyStore
from tunesmith.serve.gateway.routing import TrafficRouter

PROMPT = [{"role": "user", "content": "Send 3 blue mug to Denver (ref 7)"}]


@pytest.fixture(scope="module")
def runs(two_versions):
    return two_versions


@pytest.fixture(scope="module")
def engine(runs):
    return ServingEngine.from_references([str(run) for run in runs], default_max_tokens=8)


def _served(engine, tmp_path, routes=None, keys=True, **settings):
    """A server behind a gateway with its own key store and request log under `tmp_path`."""
    store = KeyStore(tmp_path / "keys.sqlite") if keys else None
    log = RequestLogWriter(tmp_path / "log", content=settings.pop("content", "full"))
    gateway = Gateway(engine, store, TrafficRouter(routes or {}), log, **settings)
    return store, gateway, serving_on_loopback(build_app(engine, gateway=gateway))


def _client(url, key="none"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def test_with_keys_every_path_but_health_needs_a_valid_one(engine, tmp_path):
    store, gateway, serving = _served(engine, tmp_path)
    _, team_key = store.create("team-a", models=["alpha"])
    _, admin_key = store.create("ops", admin=True)
    with serving as url:
        for path, method in (("/v1/models", "GET"), ("/v1/models/alpha", "GET"), ("/metrics", "GET"),
                             ("/v1/chat/completions", "POST"), ("/v1/completions", "POST"),
                             ("/admin/models", "GET"), ("/no/such/path", "GET")):
            for headers in ({}, {"Authorization": "Bearer tsk-aaaaaaaa-wrong"}, {"Authorization": team_key}):
                reply = httpx.request(method, url + path, headers=headers, json={})
                assert reply.status_code == 401, (path, headers)
                assert reply.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/health").status_code == 200
        admin_only = httpx.get(f"{url}/admin/models", headers={"Authorization": f"Bearer {team_key}"})
        assert admin_only.status_code == 403 and admin_only.json()["error"]["type"] == "permission_error"
        with pytest.raises(openai.AuthenticationError):
            _client(url, "tsk-nope").models.list()
        team = _client(url, team_key)
        assert [m.id for m in team.models.list()] == ["alpha"]  # only what the key may call
        reply = team.chat.completions.create(model="alpha", messages=PROMPT, max_tokens=4)
        assert reply.choices[0].message.content is not None
        with pytest.raises(openai.PermissionDeniedError, match="may not use model 'beta'"):
            team.chat.completions.create(model="beta", messages=PROMPT, max_tokens=4)
        assert len(_client(url, admin_key).models.list().data) == 3
        assert b"vllm:e2e_request_latency_seconds" in httpx.get(
            f"{url}/metrics", headers={"Authorization": f"Bearer {admin_key}"}).content
        store.revoke("team-a")
        with pytest.raises(openai.AuthenticationError):
            team.models.list()  # a revoked key stops working at once


def test_rate_limits_answer_429_with_retry_after_and_usage_is_counted(engine, tmp_path):
    store, _, serving = _served(engine, tmp_path)
    _, key = store.create("small", rpm=2)
    with serving as url:
        client = _client(url, key)
        replies = [client.chat.completions.create(model="alpha", messages=PROMPT, max_tokens=5) for _ in range(2)]
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(model="alpha", messages=PROMPT, max_tokens=5)
        assert int(refused.value.response.headers["retry-after"]) >= 1
        assert refused.value.response.json()["error"]["code"] == "rate_limit_requests"
        metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}).text
    [row] = store.usage()
    assert (row.key_name, row.model, row.requests) == ("small", "alpha", 2)
    assert row.prompt_tokens == sum(r.usage.prompt_tokens for r in replies)
    assert row.completion_tokens == sum(r.usage.completion_tokens for r in replies)
    assert 'tunesmith:requests_rejected_total{reason="rate_limited_requests"} 1.0' in metrics
    assert 'tunesmith:key_tokens_total{key="small",kind="completion"}' in metrics


def test_metrics_count_what_was_answered_and_can_be_public(engine, tmp_path):
    _, _, serving = _served(engine, tmp_path, keys=False, metrics_public=True)
    with serving as url:
        client = _client(url)
        client.chat.completions.create(model="beta", messages=PROMPT, max_tokens=6)
        list(client.chat.completions.create(model="beta", messages=PROMPT, max_tokens=6, stream=True))
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gamma", messages=PROMPT)
        text = httpx.get(f"{url}/metrics").text
    assert 'vllm:e2e_request_latency_seconds_count{model_name="beta"} 2.0' in text
    assert 'vllm:time_to_first_token_seconds_count{model_name="beta"} 2.0' in text
    assert 'vllm:num_requests_running{model_name="beta"} 0.0' in text
    assert 'tunesmith:requests_rejected_total{reason="not_found"} 1.0' in text
    generated = next(line for line in text.splitlines() if line.startswith('vllm:generation_tokens_total{model_name="beta"}'))
    assert float(generated.split()[-1]) > 2


def test_every_request_and_answer_is_in_the_log_streamed_or_not(engine, tmp_path):
    store, _, serving = _served(engine, tmp_path, content="redacted")
    key, secret = store.create("logger")
    with serving as url:
        client = _client(url, secret)
        whole = client.chat.completions.create(model="alpha", user="u-1", max_tokens=5, messages=[
            {"role": "user", "content": "mail me at jane@example.com"}])
        streamed = list(client.chat.completions.create(model="beta", messages=PROMPT, max_tokens=5, stream=True))
        text = client.completions.create(model="alpha", prompt="Order 5 pens", max_tokens=3)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gamma", messages=PROMPT, max_tokens=5)
    records = {record.id: record for record in read_request_log(tmp_path / "log")}
    first = records[whole.id]
    assert (first.key_id, first.user, first.model, first.served, first.status) == (key.key_id, "u-1", "alpha", "alpha", 200)
    assert first.messages[0]["content"] == "mail me at [EMAIL]" and first.content == "redacted"
    assert first.answers == [whole.choices[0].message.content] and first.completion_tokens == whole.usage.completion_tokens
    assert first.ttft_s is not None and first.latency_s >= first.ttft_s
    stream_record = records[streamed[0].id]
    assert stream_record.answers[0] == "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert records[text.id].endpoint == "completions" and records[text.id].prompt == "Order 5 pens"
    [refused] = [r for r in records.values() if r.status == 404]
    assert refused.model == "gamma" and "not found" in refused.error and refused.answers == []


def test_a_split_route_answers_under_its_public_name_and_logs_the_arm(engine, tmp_path):
    routes = {"orders": RouteConfig(split={"alpha": 50, "beta": 50}, sticky="user")}
    _, _, serving = _served(engine, tmp_path, routes, keys=False)
    with serving as url:
        client = _client(url)
        assert "orders" in [m.id for m in client.models.list()]
        replies = [client.chat.completions.create(model="orders", messages=PROMPT, max_tokens=3, user=f"user{n % 8}")
                   for n in range(16)]
        metrics = httpx.get(f"{url}/metrics").text
    assert {reply.model for reply in replies} == {"orders"}
    records = {record.id: record for record in read_request_log(tmp_path / "log")}
    arm_of_user = {}
    for n, reply in enumerate(replies):
        record = records[reply.id]
        assert record.route == "orders" and record.served == record.arm
        assert arm_of_user.setdefault(record.user, record.arm) == record.arm  # sticky per user
    assert set(arm_of_user.values()) == {"alpha", "beta"}
    assert 'tunesmith:route_requests_total{arm="alpha",route="orders"}' in metrics


def test_shadow_answers_are_logged_but_never_returned(engine, tmp_path):
    routes = {"orders": RouteConfig(primary="alpha", shadow="beta")}
    _, _, serving = _served(engine, tmp_path, routes, keys=False)
    request = dict(messages=PROMPT, max_tokens=6)
    with serving as url:
        client = _client(url)
        alpha = client.chat.completions.create(model="alpha", **request).choices[0].message.content
        beta = client.chat.completions.create(model="beta", **request).choices[0].message.content
        assert alpha != beta
        routed = client.chat.completions.create(model="orders", **request)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(r.shadow for r in read_request_log(tmp_path / "log")):
            time.sleep(0.1)
    assert routed.choices[0].message.content == alpha
    shadows = [r for r in read_request_log(tmp_path / "log") if r.shadow]
    assert [(r.served, r.route, r.answers, r.status) for r in shadows] == [("beta", "orders", [beta], 200)]


def test_a_canary_that_breaks_json_is_rolled_back_within_its_window(engine, tmp_path, monkeypatch):
    """alpha (production) answers digits, a valid JSON number; beta (the candidate) answers letters."""
    group = engine.models["alpha"].route.group
    tokenizer = engine.models["alpha"].tokenizer
    favourite = {engine.models["alpha"].route.adapter: tokenizer.convert_tokens_to_ids("7"),
                 engine.models["beta"].route.adapter: tokenizer.convert_tokens_to_ids("x")}
    forward = group.forward

    def biased(input_ids, adapters, **kwargs):
        output = forward(input_ids, adapters, **kwargs)
        for row, adapter in enumerate(adapters):
            if adapter in favourite:
                output.logits[row, :, favourite[adapter]] += 1e4
        return output

    monkeypatch.setattr(group, "forward", biased)
    policy = {"steps": [50, 100], "window": 10, "max_json_validity_drop": 0.1}
    routes = {"orders": RouteConfig(primary="alpha", canary="beta", sticky="none", canary_policy=policy)}
    _, gateway, serving = _served(engine, tmp_path, routes, keys=False)
    with serving as url:
        client = _client(url)
        answers = [client.chat.completions.create(model="orders", messages=PROMPT, max_tokens=3)
                   for _ in range(30)]
        metrics = httpx.get(f"{url}/metrics").text
    records = [r for r in read_request_log(tmp_path / "log") if r.route == "orders"]
    candidate = [r for r in records if r.arm == "beta"]
    assert all(r.status == 200 for r in records) and len(answers) == 30
    assert {r.answers[0] for r in candidate} == {"xxx"} and not any(r.json_valid for r in candidate)
    assert 1 < len(candidate) <= 10  # rolled back before the window of 10 candidate answers was even full
    last_candidate = max(records.index(r) for r in candidate)
    assert all(r.arm == "alpha" for r in records[last_candidate + 1:]) and len(records) - last_candidate > 5
    events = [json.loads(line) for line in (tmp_path / "log" / ROUTE_EVENTS_FILE).read_text().splitlines()]
    assert [(e["kind"], e["arm"], e["share"]) for e in events] == [("rollback", "beta", 0.0)]
    assert "not valid JSON" in events[0]["reason"]
    assert 'tunesmith:canary_share{arm="beta",route="orders"} 0.0' in metrics
    assert 'tunesmith:canary_rollbacks_total{arm="beta",route="orders"} 1.0' in metrics
    restarted = Gateway(engine, None, TrafficRouter(routes), RequestLogWriter(tmp_path / "log"))
    assert restarted.router.canary_shares() == {("orders", "beta"): 0.0}  # a restart does not retry a rolled-back canary


def test_the_request_log_survives_a_sigkill_with_every_answered_request(runs, tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"serve": {"models": [str(runs[0])], "port": port, "serve_base": False,
                                                "request_log": str(tmp_path / "log"), "reload_seconds": 0}}))
    server = subprocess.Popen([sys.executable, "-m", "tunesmith", "serve", "--config", str(config)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})
    answered, stop = [], threading.Event()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)

        def caller():
            while not stop.is_set():
                try:
                    reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                                       json={"model": "alpha", "messages": PROMPT, "max_tokens": 4})
                except httpx.HTTPError:
                    return
                if reply.status_code == 200:
                    answered.append(reply.json()["id"])

        threads = [threading.Thread(target=caller) for _ in range(4)]
        for thread in threads:
            thread.start()
        while len(answered) < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.send_signal(signal.SIGKILL)
        stop.set()
        for thread in threads:
            thread.join()
    finally:
        if server.poll() is None:
            server.kill()
    logged = {record.id for record in read_request_log(tmp_path / "log")}
    assert len(answered) >= 12 and set(answered) <= logged


def test_without_keys_the_server_stays_on_loopback_and_says_so():
    from tunesmith.serve.app import listen_host

    host, warning = listen_host("0.0.0.0", keys_required=False)
    assert host == "127.0.0.1" and "No API key exists" in warning and "0.0.0.0" in warning
    assert listen_host("0.0.0.0", keys_required=True) == ("0.0.0.0", None)
    assert listen_host("127.0.0.1", keys_required=False) == ("127.0.0.1", None)


def test_cors_is_off_unless_origins_are_configured(engine):
    from fastapi.testclient import TestClient

    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    closed = TestClient(build_app(engine)).options("/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in closed.headers
    app = build_app(engine, cors_origins=["https://app.example"])
    opened = TestClient(app).options("/v1/chat/completions", headers=preflight)
    assert opened.status_code == 200 and opened.headers["access-control-allow-origin"] == "https://app.example"
    other = TestClient(app).options("/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_feedback_is_taken_only_for_answers_the_key_got_and_lands_beside_the_log(engine, tmp_path):
    from tunesmith.request_log import read_feedback

    store, _, serving = _served(engine, tmp_path, content="redacted")
    _, mine = store.create("mine")
    _, theirs = store.create("theirs")
    with serving as url:
        reply = _client(url, mine).chat.completions.create(model="alpha", messages=PROMPT, max_tokens=3)
        body = {"completion_id": reply.id, "rating": "negative", "corrected": '{"item": "mug"} mail a@b.org',
                "comment": "wrong item"}
        sent = httpx.post(f"{url}/v1/feedback", json=body, headers={"Authorization": f"Bearer {mine}"})
        stolen = httpx.post(f"{url}/v1/feedback", json=body, headers={"Authorization": f"Bearer {theirs}"})
        unknown = httpx.post(f"{url}/v1/feedback", json={**body, "completion_id": "chatcmpl-nope"},
                             headers={"Authorization": f"Bearer {mine}"})
        bad = httpx.post(f"{url}/v1/feedback", json={**body, "rating": "great"},
                         headers={"Authorization": f"Bearer {mine}"})
        anonymous = httpx.post(f"{url}/v1/feedback", json=body)
    assert sent.status_code == 200 and sent.json()["object"] == "feedback"
    assert (stolen.status_code, unknown.status_code, bad.status_code, anonymous.status_code) == (404, 404, 400, 401)
    [record] = read_feedback(tmp_path / "log")
    assert (record.completion_id, record.rating, record.comment) == (reply.id, "negative", "wrong item")
    assert record.corrected == '{"item": "mug"} mail [EMAIL]'  # the log's redaction applies to feedback too
