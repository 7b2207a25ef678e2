"""The gateway's /metrics body: vLLM's and tunesmith's names exactly as dashboards query them, gauges read at
scrape time, one registry per server; the shipped Grafana dashboard and alert rules only use metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tunesmith.serve.gateway.metrics import REJECTION_REASONS, ServingMetrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "tunesmith-serving.json"
ALERTS = DEPLOY / "prometheus" / "tunesmith-alerts.yml"

HISTOGRAMS = ["vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
              "vllm:time_per_output_token_seconds", "vllm:e2e_request_latency_seconds"]
EXPOSED_NAMES = {
    "vllm:num_requests_running", "vllm:num_requests_waiting",
    *(f"{name}{suffix}" for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")),
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
    "tunesmith:route_requests_total", "tunesmith:canary_share", "tunesmith:canary_rollbacks_total",
    "tunesmith:shadow_requests_total", "tunesmith:requests_rejected_total", "tunesmith:key_tokens_total",
    "tunesmith:requests_total", "tunesmith:request_log_errors_total",
}
# a metric name, then the label matchers of its selector when it has them
SELECTOR = re.compile(r"(?<![\w:])((?:vllm|tunesmith):[\w:]+)(?:\{([^}]*)\})?")
LABEL_MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")


def one_of_everything(running: dict | None = None, waiting: dict | None = None) -> ServingMetrics:
    running = {"orders": 2} if running is None else running
    waiting = {"orders": 5} if waiting is None else waiting
    metrics = ServingMetrics(lambda: running, lambda: waiting)
    metrics.first_token("orders", 0.03)
    metrics.inter_token("orders", 0.02)
    metrics.finished("orders", prompt_tokens=7, completion_tokens=3, finish_reason="stop", e2e_seconds=0.4,
                     status=200, key_name="team-a")
    metrics.rejected("rate_limited_tokens")
    metrics.routed("orders", "candidate")
    metrics.canary_share("orders", "candidate", 10)
    metrics.canary_rolled_back("orders", "candidate")
    metrics.shadow("orders", "shadow", "ok")
    metrics.log_error()
    return metrics


def scrape(metrics: ServingMetrics) -> dict[str, list]:
    """Every sample of the exposition by its exact name, as Prometheus would store it."""
    body, _ = metrics.exposition()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list], name: str, **labels) -> float | None:
    matches = [s.value for s in samples.get(name, []) if s.labels == labels]
    return matches[0] if matches else None


def missing_metrics(expressions: list[str], samples: dict[str, list]) -> set[str]:
    """Metric names, and `name{label}` matchers, that the PromQL uses but the exposition does not have."""
    missing = set()
    for expression in expressions:
        for name, matchers in SELECTOR.findall(expression):
            if name not in samples:
                missing.add(name)
                continue
            known_labels = {label for sample in samples[name] for label in sample.labels}
            missing.update(f"{name}{{{label}}}" for label in LABEL_MATCHER.findall(matchers)
                           if label not in known_labels)
    return missing


def dashboard_queries(node) -> list[str]:
    """Every PromQL string in a Grafana dashboard: panel targets and template variable queries."""
    if isinstance(node, list):
        return [query for item in node for query in dashboard_queries(item)]
    if not isinstance(node, dict):
        return []
    found = [text for key, text in node.items() if key in ("expr", "query", "definition") and isinstance(text, str)]
    return found + [query for child in node.values() for query in dashboard_queries(child)]


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_one_call_of_each_method_exposes_every_name_with_its_labels():
    metrics = one_of_everything()
    samples = scrape(metrics)
    assert EXPOSED_NAMES <= set(samples)
    assert metrics.exposition()[1].startswith("text/plain")
    assert value(samples, "vllm:num_requests_running", model_name="orders") == 2
    assert value(samples, "vllm:num_requests_waiting", model_name="orders") == 5
    assert value(samples, "vllm:time_to_first_token_seconds_bucket", model_name="orders", le="0.04") == 1
    assert value(samples, "vllm:time_to_first_token_seconds_bucket", model_name="orders", le="0.02") == 0
    assert value(samples, "vllm:e2e_request_latency_seconds_count", model_name="orders") == 1
    assert value(samples, "vllm:prompt_tokens_total", model_name="orders") == 7
    assert value(samples, "vllm:generation_tokens_total", model_name="orders") == 3
    assert value(samples, "vllm:request_success_total", model_name="orders", finished_reason="stop") == 1
    assert value(samples, "tunesmith:requests_total", model_name="orders", status="200") == 1
    assert value(samples, "tunesmith:key_tokens_total", key="team-a", kind="prompt") == 7
    assert value(samples, "tunesmith:key_tokens_total", key="team-a", kind="completion") == 3
    assert value(samples, "tunesmith:requests_rejected_total", reason="rate_limited_tokens") == 1
    assert value(samples, "tunesmith:route_requests_total", route="orders", arm="candidate") == 1
    assert value(samples, "tunesmith:canary_share", route="orders", arm="candidate") == 10
    assert value(samples, "tunesmith:canary_rollbacks_total", route="orders", arm="candidate") == 1
    assert value(samples, "tunesmith:shadow_requests_total", route="orders", arm="shadow", outcome="ok") == 1
    assert value(samples, "tunesmith:request_log_errors_total") == 1


def test_queue_gauges_show_the_engine_as_it_is_at_each_scrape():
    running, waiting = {"orders": 1}, {}
    metrics = ServingMetrics(lambda: running, lambda: waiting)
    assert value(scrape(metrics), "vllm:num_requests_running", model_name="orders") == 1
    running.update(orders=4, chat=1)
    waiting["orders"] = 9
    samples = scrape(metrics)
    assert value(samples, "vllm:num_requests_running", model_name="orders") == 4
    assert value(samples, "vllm:num_requests_running", model_name="chat") == 1
    assert value(samples, "vllm:num_requests_waiting", model_name="orders") == 9


def test_each_token_gap_is_observed_under_the_new_and_the_old_vllm_name():
    metrics = one_of_everything()
    metrics.inter_token("orders", 0.3)
    samples = scrape(metrics)
    for name in ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"):
        assert value(samples, f"{name}_count", model_name="orders") == 2
        assert value(samples, f"{name}_sum", model_name="orders") == pytest.approx(0.32)


def test_a_failed_request_counts_by_status_but_not_as_a_success_or_a_latency():
    metrics = ServingMetrics(dict, dict)
    metrics.finished("orders", prompt_tokens=5, completion_tokens=0, finish_reason=None, e2e_seconds=2.0, status=500)
    samples = scrape(metrics)
    assert value(samples, "tunesmith:requests_total", model_name="orders", status="500") == 1
    assert value(samples, "vllm:prompt_tokens_total", model_name="orders") == 5
    assert "vllm:request_success_total" not in samples and "vllm:e2e_request_latency_seconds_count" not in samples
    assert "tunesmith:key_tokens_total" not in samples  # no key given: nothing charged to one


def test_every_rejection_reason_starts_at_zero_and_an_unknown_one_is_our_bug():
    metrics = ServingMetrics(dict, dict)
    samples = scrape(metrics)
    assert {s.labels["reason"]: s.value for s in samples["tunesmith:requests_rejected_total"]} == {
        reason: 0 for reason in REJECTION_REASONS}
    with pytest.raises(ValueError, match="rate_limited_requests"):
        metrics.rejected("rate_limit")


def test_two_servers_in_one_process_keep_their_own_counts():
    first, second = one_of_everything(), ServingMetrics(lambda: {"chat": 3}, dict)
    second.finished("chat", prompt_tokens=1, completion_tokens=1, finish_reason="length", e2e_seconds=0.1, status=200)
    assert value(scrape(first), "vllm:prompt_tokens_total", model_name="orders") == 7
    assert value(scrape(second), "vllm:prompt_tokens_total", model_name="orders") is None
    assert value(scrape(second), "vllm:num_requests_running", model_name="chat") == 3


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_shipped_dashboard_and_alerts_query_only_metrics_the_server_exposes(source):
    if source == "dashboard":
        expressions = dashboard_queries(json.loads(DASHBOARD.read_text(encoding="utf-8")))
    else:
        expressions = [rule["expr"] for rule in alert_rules()]
    used = {name for expression in expressions for name, _ in SELECTOR.findall(expression)}
    assert len(used) >= (12 if source == "dashboard" else 6)
    assert missing_metrics(expressions, scrape(one_of_everything())) == set()


def test_the_checker_reports_a_misspelled_metric_or_label():
    samples = scrape(one_of_everything())
    assert missing_metrics(['rate(vllm:prompt_token_total[5m])'], samples) == {"vllm:prompt_token_total"}
    assert missing_metrics(['sum(tunesmith:requests_total{model="a", status=~"5.."})'], samples) == {
        "tunesmith:requests_total{model}"}
    assert missing_metrics(['histogram_quantile(0.9, rate(vllm:e2e_request_latency_seconds[5m]))'], samples) == {
        "vllm:e2e_request_latency_seconds"}  # a histogram is only queryable through _bucket/_sum/_count


def test_alert_file_is_prometheus_rule_groups():
    rules = alert_rules()
    assert len({rule["alert"] for rule in rules}) == len(rules) >= 6
    for rule in rules:
        assert rule["expr"].strip() and re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("page", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_dashboard_is_importable_with_a_prometheus_input_and_a_model_variable():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["schemaVersion"] >= 36 and [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["model_name"]
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    assert all(panel["datasource"]["uid"] == "${DS_PROMETHEUS}" and panel["targets"] for panel in panels)
