"""Traffic routes without a server: weighted splits, sticky callers, shadows, and canaries that step up while healthy
and roll back the moment they are not."""

from __future__ import annotations

from collections import Counter

import pytest
from pydantic import ValidationError

from tunesmith.config import CanaryConfig, RouteConfig, ServeConfig
from tunesmith.errors import TunesmithError
from tunesmith.serve.gateway.canary import CanaryController, Outcome
from tunesmith.serve.gateway.routing import RouteDecision, TrafficRouter

HEALTHY = Outcome(error=False, latency_s=1.0, json_valid=True)


def test_a_split_sends_traffic_by_weight_and_keeps_each_caller_on_one_arm():
    router = TrafficRouter({"orders": RouteConfig(split={"orders@production": 90, "orders@candidate": 10})})
    arms = Counter(router.decide("orders", f"key{n}", None).arm for n in range(4000))
    assert 0.07 < arms["orders@candidate"] / 4000 < 0.13
    for caller in ("key1", "key2", "key3"):
        assert len({router.decide("orders", caller, None).arm for _ in range(20)}) == 1
    assert router.decide("alpha", "key1", None) == router.decide("alpha", "key1", None)
    assert router.decide("alpha", "key1", None).route is None  # a served name is not routed


def test_sticky_by_user_falls_back_to_the_key_and_none_is_random():
    route = RouteConfig(split={"a": 50, "b": 50}, sticky="user")
    router = TrafficRouter({"r": route})
    by_user = {router.decide("r", "same-key", f"user{n}").arm for n in range(50)}
    assert by_user == {"a", "b"}  # one key, many users: both arms
    assert len({router.decide("r", "k", None).arm for _ in range(20)}) == 1
    loose = TrafficRouter({"r": route.model_copy(update={"sticky": "none"})})
    assert {loose.decide("r", "k", "u").arm for _ in range(60)} == {"a", "b"}


def test_shadow_returns_the_primary_and_names_the_shadow():
    decision = TrafficRouter({"r": RouteConfig(primary="a", shadow="b")}).decide("r", None, None)
    assert (decision.arm, decision.shadow, decision.route) == ("a", "b", "r")


def test_route_configs_that_cannot_work_are_refused():
    with pytest.raises(ValidationError, match="exactly one of split, shadow or canary"):
        RouteConfig(split={"a": 1}, primary="a", canary="b")
    with pytest.raises(ValidationError, match="needs a primary"):
        RouteConfig(shadow="b")
    with pytest.raises(ValidationError, match="not all 0"):
        ServeConfig.model_validate({"routes": {"r": {"split": {"a": 0}}}})
    router = TrafficRouter({"r": RouteConfig(split={"a": 1, "ghost": 1})})
    with pytest.raises(TunesmithError, match="ghost is not served"):
        router.check_served(["a", "b"])
    with pytest.raises(TunesmithError, match="served model's name"):
        TrafficRouter({"a": RouteConfig(split={"b": 1})}).check_served(["a", "b"])


def test_a_healthy_canary_steps_up_to_every_share_then_completes():
    canary = CanaryController(CanaryConfig(steps=[5, 25, 100], window=4))
    for _ in range(20):
        canary.record(False, HEALTHY)
    shares, kinds = [canary.share], []
    for _ in range(12):
        change = canary.record(True, HEALTHY)
        if change:
            kinds.append(change.kind)
            shares.append(change.share)
    assert shares == [5, 25, 100, 100] and kinds == ["step", "step", "complete"]
    assert canary.state == "complete" and canary.share == 100


def test_a_canary_that_errors_is_rolled_back_before_its_window_ends():
    canary = CanaryController(CanaryConfig(steps=[10, 100], window=50, max_error_rate_increase=0.02))
    for _ in range(100):
        canary.record(False, HEALTHY)
    changes = [canary.record(True, Outcome(error=True, latency_s=1.0)) for _ in range(3)]
    rollback = next(change for change in changes if change)
    assert rollback.kind == "rollback" and rollback.share == 0 and "error rate" in rollback.reason
    assert changes.index(rollback) == 1  # the second error already breaks the 2% allowance of 50 answers
    assert canary.share == 0 and canary.record(True, HEALTHY) is None  # it stays rolled back


def test_a_slow_canary_is_rolled_back_at_the_end_of_its_window():
    canary = CanaryController(CanaryConfig(steps=[10, 100], window=5, max_p95_latency_ratio=1.5))
    for _ in range(30):
        canary.record(False, HEALTHY)
    changes = [canary.record(True, Outcome(error=False, latency_s=2.0)) for _ in range(5)]
    assert changes[:4] == [None] * 4 and changes[4].kind == "rollback" and "p95 latency" in changes[4].reason


def test_invalid_json_rolls_back_only_when_json_is_judged():
    judged = CanaryController(CanaryConfig(steps=[10, 100], window=10, max_json_validity_drop=0.1))
    unjudged = CanaryController(CanaryConfig(steps=[10, 100], window=10))
    broken = Outcome(error=False, latency_s=1.0, json_valid=False)
    for canary in (judged, unjudged):
        for _ in range(20):
            canary.record(False, HEALTHY)
        for _ in range(3):
            canary.record(True, broken)
    assert judged.state == "rolled_back" and unjudged.state == "running"


def test_canary_decisions_follow_its_share_and_changes_reach_the_listener():
    heard = []
    route = RouteConfig(primary="prod", canary="cand", sticky="none",
                        canary_policy=CanaryConfig(steps=[30, 100], window=3, max_error_rate_increase=0.0))
    router = TrafficRouter({"r": route}, on_change=lambda r, arm, change: heard.append((r, arm, change.kind)))
    arms = Counter(router.decide("r", None, None).arm for _ in range(2000))
    assert 0.25 < arms["cand"] / 2000 < 0.35
    for _ in range(10):
        router.report(RouteDecision("r", "prod", "r"), HEALTHY)
    candidate = RouteDecision("r", "cand", "r")
    router.report(candidate, Outcome(error=True, latency_s=1.0))
    assert heard == [("r", "cand", "rollback")] and router.canary_shares() == {("r", "cand"): 0.0}
    assert {router.decide("r", None, None).arm for _ in range(200)} == {"prod"}


def test_a_restart_resumes_the_recorded_canary_unless_its_candidate_changed():
    route = RouteConfig(primary="prod", canary="cand", canary_policy=CanaryConfig(steps=[5, 25, 100], window=3))
    events = [{"route": "r", "arm": "cand", "version": "orders@2", "kind": "step", "share": 25.0}]
    resumed = TrafficRouter({"r": route})
    assert resumed.resume(events, lambda arm: "orders@2") and resumed.canary_shares() == {("r", "cand"): 25.0}
    moved = TrafficRouter({"r": route})  # the candidate alias now names another version: a fresh canary
    assert moved.resume(events, lambda arm: "orders@3") == [] and moved.canary_shares() == {("r", "cand"): 5.0}
    rolled_back = TrafficRouter({"r": route})
    rolled_back.resume(events + [{**events[0], "kind": "rollback", "share": 0.0}], lambda arm: "orders@2")
    assert rolled_back.canary_shares() == {("r", "cand"): 0.0}
