"""The server's Prometheus metrics: vLLM's names (so dashboards built for vLLM chart tunesmith unchanged) plus
tunesmith's own for routing, canaries, shadows, refusals and per-key tokens. One registry per server."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# vLLM's boundaries (vllm/v1/metrics/loggers.py): the same buckets make quantiles comparable across both servers
TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                               10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                       40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)

REJECTION_REASONS = ("unauthorized", "forbidden_model", "rate_limited_requests", "rate_limited_tokens", "server_busy",
                     "invalid_request", "not_found", "deadline", "shutting_down", "server_error")

CountsByModel = Callable[[], Mapping[str, int]]


class QueueDepthCollector(Collector):
    """Requests running and waiting per model, read from the engine at each scrape so they are never stale."""

    def __init__(self, running_by_model: CountsByModel, waiting_by_model: CountsByModel):
        self.sources = (("vllm:num_requests_running", "Requests being decoded now.", running_by_model),
                        ("vllm:num_requests_waiting", "Requests waiting for a place in the batch.", waiting_by_model))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, documentation, counts_by_model in self.sources:
            family = GaugeMetricFamily(name, documentation, labels=["model_name"])
            for model, count in sorted(counts_by_model().items()):
                family.add_metric([model], count)
            yield family


class ServingMetrics:
    """Every metric the server exposes on /metrics; a registry of its own, so apps in one process never collide."""

    def __init__(self, running_by_model: CountsByModel, waiting_by_model: CountsByModel):
        self.registry = registry = CollectorRegistry()
        registry.register(QueueDepthCollector(running_by_model, waiting_by_model))
        model = ["model_name"]
        self._first_token = Histogram("vllm:time_to_first_token_seconds", "Time to first token in seconds.", model,
                                      buckets=TIME_TO_FIRST_TOKEN_BUCKETS, registry=registry)
        self._inter_token = Histogram("vllm:inter_token_latency_seconds", "Seconds between streamed tokens.", model,
                                      buckets=INTER_TOKEN_BUCKETS, registry=registry)
        # vLLM's older name for the same gaps: many existing dashboards still chart it
        self._per_output_token = Histogram("vllm:time_per_output_token_seconds",
                                           "Seconds between streamed tokens (older name of inter_token_latency).",
                                           model, buckets=INTER_TOKEN_BUCKETS, registry=registry)
        self._e2e = Histogram("vllm:e2e_request_latency_seconds", "Seconds from request to its last token.", model,
                              buckets=REQUEST_LATENCY_BUCKETS, registry=registry)
        self._prompt_tokens = Counter("vllm:prompt_tokens_total", "Prompt tokens processed.", model, registry=registry)
        self._generation_tokens = Counter("vllm:generation_tokens_total", "Tokens generated.", model,
                                          registry=registry)
        self._success = Counter("vllm:request_success_total", "Requests answered, by why generation stopped.",
                                ["model_name", "finished_reason"], registry=registry)
        self._requests = Counter("tunesmith:requests_total", "Model requests answered, by HTTP status.",
                                 ["model_name", "status"], registry=registry)
        self._key_tokens = Counter("tunesmith:key_tokens_total", "Tokens used per API key (kind: prompt|completion).",
                                   ["key", "kind"], registry=registry)
        self._rejected = Counter("tunesmith:requests_rejected_total", "Requests refused, by reason.", ["reason"],
                                 registry=registry)
        for reason in REJECTION_REASONS:  # every reason exists from the start, so rate() and alerts see a zero
            self._rejected.labels(reason)
        route_arm = ["route", "arm"]
        self._routed = Counter("tunesmith:route_requests_total", "Traffic routing decisions, by arm.", route_arm,
                               registry=registry)
        self._canary_share = Gauge("tunesmith:canary_share", "Percent of a route's traffic the arm gets now.",
                                   route_arm, registry=registry)
        self._rollbacks = Counter("tunesmith:canary_rollbacks_total", "Canaries rolled back.", route_arm,
                                  registry=registry)
        self._shadow = Counter("tunesmith:shadow_requests_total", "Requests mirrored to a shadow arm, by outcome.",
                               [*route_arm, "outcome"], registry=registry)
        self._log_errors = Counter("tunesmith:request_log_errors_total", "Request log appends that failed.",
                                   registry=registry)

    def first_token(self, model: str, seconds: float) -> None:
        self._first_token.labels(model).observe(seconds)

    def inter_token(self, model: str, seconds: float) -> None:
        """One gap between two streamed tokens."""
        self._inter_token.labels(model).observe(seconds)
        self._per_output_token.labels(model).observe(seconds)

    def finished(self, model: str, prompt_tokens: int, completion_tokens: int, finish_reason: str | None,
                 e2e_seconds: float, status: int | str, key_name: str | None = None) -> None:
        """A model request answered with `status`; latency and success count only for answers under 400."""
        self._requests.labels(model, str(status)).inc()
        self._prompt_tokens.labels(model).inc(prompt_tokens)
        self._generation_tokens.labels(model).inc(completion_tokens)
        if key_name is not None:
            self._key_tokens.labels(key_name, "prompt").inc(prompt_tokens)
            self._key_tokens.labels(key_name, "completion").inc(completion_tokens)
        if int(status) < 400:
            self._success.labels(model, finish_reason or "unknown").inc()
            self._e2e.labels(model).observe(e2e_seconds)

    def rejected(self, reason: str) -> None:
        if reason not in REJECTION_REASONS:  # a typo here would start a series no dashboard or alert looks at
            raise ValueError(f"unknown rejection reason {reason!r}; known: {', '.join(REJECTION_REASONS)}")
        self._rejected.labels(reason).inc()

    def routed(self, route: str, arm: str) -> None:
        self._routed.labels(route, arm).inc()

    def canary_share(self, route: str, arm: str, percent: float) -> None:
        self._canary_share.labels(route, arm).set(percent)

    def canary_rolled_back(self, route: str, arm: str) -> None:
        self._rollbacks.labels(route, arm).inc()

    def shadow(self, route: str, arm: str, outcome: str) -> None:
        self._shadow.labels(route, arm, outcome).inc()

    def log_error(self) -> None:
        self._log_errors.inc()

    def exposition(self) -> tuple[bytes, str]:
        """The /metrics body in Prometheus' text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
