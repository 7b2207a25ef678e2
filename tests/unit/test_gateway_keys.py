"""API keys (only salted hashes stored, revokes seen by a running server within a second), model patterns,
per-key rate limits on a fake clock, usage per key/model/day, and the `tunesmith keys` CLI."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from datetime import date, datetime, timedelta, timezone

import pytest
from typer.testing import CliRunner

from tunesmith.cli.keys_command import keys_app
from tunesmith.errors import TunesmithError
from tunesmith.serve.gateway.keys import ApiKey, KeyStore, default_keys_path, model_allowed
from tunesmith.serve.gateway.rate_limits import RateLimited, RateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limited_key(rpm: int | None = None, tpm: int | None = None) -> ApiKey:
    return ApiKey("abcd1234", "team-a", (), rpm, tpm, False, "2024-05-01T00:00:00+00:00")


def test_a_created_key_authenticates_and_near_misses_do_not(tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite")
    key, full = store.create("team-a", models=["orders@*"], rpm=60)
    other, other_full = store.create("team-b")
    assert full.startswith(f"tsk-{key.key_id}-") and len(key.key_id) == 8
    assert store.authenticate(full) == key and store.authenticate(other_full) == other
    secret = full.split("-", 2)[2]
    assert store.authenticate(full[:-1] + ("a" if full[-1] != "a" else "b")) is None  # wrong secret
    assert store.authenticate(f"tsk-{other.key_id}-{secret}") is None  # a secret under another key's id
    assert store.authenticate(f"tsk-zzzzzzzz-{secret}") is None  # unknown id
    for malformed in ("", "tsk-", full.removeprefix("tsk-"), f"tsk-{key.key_id}", f"tsk-{key.key_id}-", "Bearer " + full):
        assert store.authenticate(malformed) is None
    assert store.revoke("team-a").revoked and store.authenticate(full) is None
    assert store.authenticate(other_full) == other and store.has_active_keys()


def test_only_a_salted_hash_of_the_secret_reaches_the_file(tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite")
    key, full = store.create("team-a")
    secret = full.split("-", 2)[2]
    stored = b"".join(path.read_bytes() for path in tmp_path.iterdir())  # the database and its WAL
    assert key.key_id.encode() in stored and secret.encode() not in stored and full.encode() not in stored
    with sqlite3.connect(tmp_path / "keys.sqlite") as db:
        salt, secret_hash = db.execute("SELECT salt, secret_hash FROM keys WHERE key_id = ?", (key.key_id,)).fetchone()
    assert len(salt) == 16 and secret_hash == hashlib.sha256(salt + secret.encode()).digest()


def test_a_revoke_by_another_process_takes_effect_within_the_refresh_interval(tmp_path):
    clock = FakeClock()
    server = KeyStore(tmp_path / "keys.sqlite", clock=clock)
    assert not server.has_active_keys()
    cli = KeyStore(tmp_path / "keys.sqlite")
    key, full = cli.create("team-a")
    assert not server.has_active_keys()  # the server's copy is still fresh
    clock.now += 1.0
    assert server.has_active_keys() and server.authenticate(full) == key
    cli.revoke(key.key_id)
    clock.now += 0.5
    assert server.authenticate(full) == key  # cached for up to a second ...
    clock.now += 0.5
    assert server.authenticate(full) is None  # ... then refused


def test_names_are_unique_among_active_keys_and_bad_input_is_one_clear_error(tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite")
    first, _ = store.create("team-a")
    with pytest.raises(TunesmithError, match="'team-a' is taken by an active key"):
        store.create("team-a")
    store.revoke("team-a")
    second, _ = store.create("team-a")  # a revoked key's name is free again
    assert [k.key_id for k in store.list()] == [second.key_id]
    assert {k.key_id for k in store.list(include_revoked=True)} == {first.key_id, second.key_id}
    with pytest.raises(TunesmithError, match=r"already revoked"):
        store.revoke(first.key_id)
    with pytest.raises(TunesmithError, match=rf"no key named or with id 'team-x'; active keys: team-a \({second.key_id}\)"):
        store.revoke("team-x")
    for kwargs, message in (({"name": "team a"}, "key name 'team a'"), ({"name": "t", "rpm": 0}, "--rpm 0"),
                            ({"name": "t", "tpm": -5}, "--tpm -5"), ({"name": "t", "models": [""]}, "--models")):
        with pytest.raises(TunesmithError, match=message):
            store.create(**kwargs)


def test_the_store_lives_in_the_tunesmith_home_and_refuses_a_file_that_is_not_one(isolated_home, tmp_path):
    assert KeyStore().path == default_keys_path() == isolated_home / "gateway" / "keys.sqlite"
    assert default_keys_path().is_file()
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(TunesmithError, match="junk.sqlite: cannot open it"):
        KeyStore(junk)


def test_model_patterns():
    def key(*patterns: str) -> ApiKey:
        return ApiKey("abcd1234", "k", patterns, None, None, False, "")

    assert model_allowed(key(), "anything")
    assert model_allowed(key("orders@*"), "orders@production") and not model_allowed(key("orders@*"), "orders")
    assert model_allowed(key("orders", "orders@*"), "orders") and not model_allowed(key("orders"), "Orders")
    # A route name the patterns do not cover is allowed when every version it serves is covered.
    assert model_allowed(key("orders@*"), "orders", served=["orders@3", "orders@4"])
    assert not model_allowed(key("orders@*"), "orders", served=["orders@3", "invoices@1"])
    assert not model_allowed(key("orders@*"), "orders", served=[])


def test_requests_per_minute_slide_with_the_clock():
    clock = FakeClock()
    limiter, key = RateLimiter(clock), limited_key(rpm=2)
    limiter.admit(key, 10)
    clock.now += 20
    limiter.admit(key, 10)
    with pytest.raises(RateLimited) as refused:
        limiter.admit(key, 10)
    assert (refused.value.limit, refused.value.retry_after) == ("requests", 40)
    assert str(refused.value) == "key team-a: 2 requests per minute used; retry in 40 s"
    clock.now += 39.5
    assert pytest.raises(RateLimited, limiter.admit, key, 10).value.retry_after == 1  # never 0
    clock.now += 0.5  # the first request has left the window
    limiter.admit(key, 10)
    unlimited = limited_key()
    for _ in range(1000):
        limiter.admit(unlimited, 10**6)


def test_tokens_per_minute_count_prompts_and_completions():
    clock = FakeClock()
    limiter, key = RateLimiter(clock), limited_key(tpm=100)
    limiter.admit(key, 30)
    limiter.spend(key, 20)
    clock.now += 10
    limiter.admit(key, 40)
    with pytest.raises(RateLimited) as refused:
        limiter.admit(key, 20)  # 90 used + 20 > 100; the first 30 leave at 60 s, 50 s from now
    assert (refused.value.limit, refused.value.retry_after) == ("tokens", 50)
    assert "90 of 100 tokens per minute used" in str(refused.value)
    limiter.admit(key, 10)  # a refused request counted nothing; this one fits exactly
    with pytest.raises(RateLimited) as too_big:
        limiter.admit(key, 101)
    assert too_big.value.retry_after == 60 and "101 prompt tokens exceed the key's 100 tokens per minute" in str(too_big.value)
    clock.now += 60
    limiter.admit(key, 100)


def test_the_limiter_forgets_idle_keys():
    clock = FakeClock()
    limiter = RateLimiter(clock)
    for n in range(50):
        limiter.admit(ApiKey(f"key{n:05d}", f"k{n}", (), 5, 100, False, ""), 1)
    clock.now += 61
    limiter.admit(limited_key(rpm=5), 1)
    assert len(limiter._windows) == 1


def test_usage_accumulates_per_key_model_and_utc_day(tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite")
    a, _ = store.create("team-a")
    b, _ = store.create("team-b")
    day_one = datetime(2024, 5, 1, 23, 30, tzinfo=timezone.utc)
    store.record_usage(a.key_id, "orders@1", 10, 5, when=day_one)
    store.record_usage(a.key_id, "orders@1", 7, 3, when=day_one)
    store.record_usage(a.key_id, "orders@1", 1, 1, when=datetime.fromisoformat("2024-05-01T20:00:00-05:00"))  # May 2 UTC
    store.record_usage(b.key_id, "base", 2, 2, when=day_one)
    rows = [(r.day, r.key_name, r.model, r.requests, r.prompt_tokens, r.completion_tokens) for r in store.usage()]
    assert rows == [("2024-05-01", "team-a", "orders@1", 2, 17, 8), ("2024-05-01", "team-b", "base", 1, 2, 2),
                    ("2024-05-02", "team-a", "orders@1", 1, 1, 1)]
    assert [r.day for r in store.usage(since=date(2024, 5, 2))] == ["2024-05-02"]
    assert {r.key_id for r in store.usage(key="team-b")} == {b.key_id}
    with pytest.raises(TunesmithError, match="known keys: team-a, team-b"):
        store.usage(key="team-c")


def test_usage_from_many_threads_adds_up(tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite")
    key, full = store.create("team-a")

    def serve_requests() -> None:
        for _ in range(25):
            assert store.authenticate(full) == key
            store.record_usage(key.key_id, "orders", 2, 3)

    threads = [threading.Thread(target=serve_requests) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    [row] = store.usage()
    assert (row.requests, row.prompt_tokens, row.completion_tokens) == (200, 400, 600)


def test_cli_create_list_revoke_and_usage():
    cli = CliRunner()
    created = cli.invoke(keys_app, ["create", "--name", "team-a", "--models", "orders@*", "--models", "base",
                                    "--rpm", "60", "--tpm", "5000"])
    assert created.exit_code == 0, created.output
    full = created.stdout.strip()  # the key alone on stdout, for KEY=$(tunesmith keys create ...)
    assert created.stdout == full + "\n" and full.startswith("tsk-") and " " not in full
    assert "cannot be shown again" in created.stderr and "needs nothing more" in created.stderr
    store = KeyStore()
    key = store.authenticate(full)
    assert key.models == ("orders@*", "base") and (key.rpm, key.tpm, key.admin) == (60, 5000, False)

    listed = cli.invoke(keys_app, ["list"])
    assert "team-a" in listed.output and key.key_id in listed.output and "orders@*, base" in listed.output
    assert full.split("-", 2)[2][:12] not in listed.output

    store.record_usage(key.key_id, "orders@1", 1200, 34, when=datetime(2024, 5, 1, tzinfo=timezone.utc))
    store.record_usage(key.key_id, "base", 800, 66, when=datetime(2024, 5, 2, tzinfo=timezone.utc))
    table = cli.invoke(keys_app, ["usage"]).output
    total_line = next(line for line in table.splitlines() if "total" in line)
    assert "orders@1" in table and [cell.strip() for cell in total_line.split("│")[-4:-1]] == ["2", "2,000", "100"]
    as_json = json.loads(cli.invoke(keys_app, ["usage", "--since", "2024-05-02", "--json"]).output)
    assert as_json == [{"key_name": "team-a", "key_id": key.key_id, "model": "base", "day": "2024-05-02",
                        "requests": 1, "prompt_tokens": 800, "completion_tokens": 66}]
    # Ages read as `logs export --since` reads them: 2d is the day before yesterday, and all of it counts.
    today = datetime.now(timezone.utc)
    store.record_usage(key.key_id, "base", 10, 1, when=today - timedelta(days=2))
    store.record_usage(key.key_id, "base", 10, 1, when=today - timedelta(days=3))
    recent = json.loads(cli.invoke(keys_app, ["usage", "--since", "2d", "--json"]).output)
    assert [row["day"] for row in recent] == [(today - timedelta(days=2)).date().isoformat()]

    revoked = cli.invoke(keys_app, ["revoke", "team-a"])
    assert revoked.exit_code == 0 and f"revoked key team-a ({key.key_id})" in revoked.output
    assert "no API keys" in cli.invoke(keys_app, ["list"]).output
    assert "team-a" in cli.invoke(keys_app, ["list", "--all"]).output


def test_cli_bad_input_is_a_tunesmith_error():
    cli = CliRunner()
    for args, message in ((["usage", "--since", "May 1"], "--since 'May 1': not a date or an age"),
                          (["revoke", "nobody"], "no key named or with id 'nobody'"),
                          (["create", "--name", "team-a", "--rpm", "0"], "--rpm 0")):
        result = cli.invoke(keys_app, args)
        assert isinstance(result.exception, TunesmithError) and message in str(result.exception)
