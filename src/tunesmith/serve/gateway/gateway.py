"""The gateway in front of the engine: who may call (API keys), how much (rate limits, usage), where a request goes
(traffic routes), and what is kept of it (metrics, the request log, route events)."""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import threading
import uuid
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path

from fastapi import Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.config import ServeConfig
from tunesmith.errors import TunesmithError
from tunesmith.records import FeedbackRecord
from tunesmith.request_log import append_feedback, read_request_log, redact_texts, utc_timestamp
from tunesmith.serve.engine import ModelNotFound, ServingEngine
from tunesmith.serve.errors import ModelNotAllowed, error_response
from tunesmith.serve.gateway.canary import CanaryChange
from tunesmith.serve.gateway.exchange import Exchange
from tunesmith.serve.gateway.keys import ApiKey, KeyStore, model_allowed
from tunesmith.serve.gateway.metrics import ServingMetrics
from tunesmith.serve.gateway.rate_limits import RateLimiter
from tunesmith.serve.gateway.routing import RouteDecision, TrafficRouter
from tunesmith.serve.protocol import FeedbackRequest

ROUTE_EVENTS_FILE = "route-events.jsonl"
ANSWERS_REMEMBERED = 200_000
"""Answer ids kept in memory for feedback checks; older ones are looked up in the request log."""
_UNKNOWN = object()


class Gateway:
    """Keys, limits, routes, metrics and the request log for one server; every part optional but metrics."""

    def __init__(self, engine: ServingEngine, keys: KeyStore | None = None, router: TrafficRouter | None = None,
                 request_log=None, metrics_public: bool = False):
        self.engine, self.keys, self.request_log = engine, keys, request_log
        self.router = router or TrafficRouter({})
        self.router.on_change = self._canary_changed
        self.router.check_served(engine.list_models())
        if request_log is not None:
            for line in self.router.resume(_route_events(Path(request_log.directory)), self._version_label):
                print(line, flush=True)
        self.metrics = ServingMetrics(lambda: _by_served_name(engine, 'running'), lambda: _by_served_name(engine, 'waiting'))
        for (route, arm), share in self.router.canary_shares().items():
            self.metrics.canary_share(route, arm, share)
        self.limiter = RateLimiter()
        self.metrics_public = metrics_public
        self._background: set[asyncio.Task] = set()  # shadow answers still running (held so they are not collected)
        self._events_lock = threading.Lock()
        self.answered: OrderedDict[str, str | None] = OrderedDict()  # recent answer ids -> the key that got them
        self.owners: dict[str, str | None] = {}
        """Served names that belong to one API key id (models its fine-tuning jobs made)."""

    @classmethod
    def from_settings(cls, engine: ServingEngine, settings: ServeConfig) -> Gateway:
        from tunesmith.request_log import RequestLogWriter, default_request_log_dir

        log = RequestLogWriter(settings.request_log or default_request_log_dir(), settings.log_max_mb * 2**20,
                               settings.log_content)
        return cls(engine, KeyStore(settings.keys_file), TrafficRouter(settings.routes), log,
                   settings.metrics_public)

    # --- who may call ----------------------------------------------------------------------------------------

    def keys_required(self) -> bool:
        return self.keys is not None and self.keys.has_active_keys()

    def key_of(self, raw: Request) -> ApiKey | None:
        return getattr(raw.state, "api_key", None)

    # --- one request -----------------------------------------------------------------------------------------

    def open(self, raw: Request, request, endpoint: str) -> Exchange:
        """Route the request and check that its key may use what it asked for (ModelNotAllowed otherwise)."""
        key = self.key_of(raw)
        if not self.may_see(key, request.model):
            raise ModelNotFound(request.model, self.visible_models(key))
        decision = self.router.decide(request.model, key.key_id if key else None, request.user)
        if key is not None and self.owners.get(request.model) != key.key_id:
            served = self.router.routes[request.model].arms() if decision.route else []
            if not model_allowed(key, request.model, served):
                raise ModelNotAllowed(key.name, request.model)
        if decision.route:
            self.metrics.routed(decision.route, decision.arm)
        return Exchange(self, key, request, endpoint, decision)

    def admit(self, exchange: Exchange, plans: list) -> None:
        """Count the request against its key's limits (RateLimited when over)."""
        exchange.plans = plans
        if exchange.key is not None:
            self.limiter.admit(exchange.key, sum(len(plan.prompt_ids) for plan in plans))

    def shadow(self, exchange: Exchange, plan_answer) -> None:
        """Answer the request on the route's shadow arm too, in the background; only the log sees that answer."""
        decision = exchange.decision
        if decision.shadow is None:
            return
        shadow = Exchange(self, exchange.key, exchange.request, exchange.endpoint,
                          RouteDecision(decision.model, decision.shadow, decision.route), shadow=True)
        task = asyncio.create_task(plan_answer(shadow))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def persist(self, record, key: ApiKey | None, prompt_tokens: int, completion_tokens: int) -> None:
        """The request log line and the key's usage (called in a worker thread; both are disk writes)."""
        if self.request_log is not None:
            if not record.shadow and record.status == 200:
                self.answered[record.id] = record.key_id
                while len(self.answered) > ANSWERS_REMEMBERED:
                    self.answered.popitem(last=False)
            try:
                self.request_log.append(record)
            except Exception as exc:  # the answer still goes out; the gap is counted and said
                self.metrics.log_error()
                print(f"request log: could not append {record.id}: {exc}", flush=True)
        if key is not None and not record.shadow and record.status == 200:
            try:
                self.keys.record_usage(key.key_id, record.model, prompt_tokens, completion_tokens)
            except Exception as exc:  # a store locked for long by the CLI: the answer still goes out
                print(f"usage: could not record {record.id} for key {key.name}: {exc}", flush=True)

    async def record_feedback(self, key: ApiKey | None, request: FeedbackRequest) -> FeedbackRecord:
        """Append a verdict on a logged answer; an answer this key did not get (or never logged) is a 404."""
        if self.request_log is None:
            raise TunesmithError("this server keeps no request log, so it takes no feedback; set serve.request_log")
        owner = self.answered.get(request.completion_id, _UNKNOWN)
        if owner is _UNKNOWN:  # older than this server's memory: look in the log itself
            owner = await asyncio.to_thread(_owner_in_log, self.request_log.directory, request.completion_id)
        if owner is _UNKNOWN or (key is not None and owner != key.key_id):
            raise StarletteHTTPException(404, f"completion_id {request.completion_id!r}: no answer with that id "
                                              "was logged for this API key; send the `id` of a response you got")
        record = FeedbackRecord(id=f"fb-{uuid.uuid4().hex}", time=utc_timestamp(), completion_id=request.completion_id,
                                key_id=key.key_id if key else None, rating=request.rating,
                                corrected=request.corrected, comment=request.comment)
        if self.request_log.content == "redacted":
            record = record.model_copy(update={"corrected": redact_texts(record.corrected),
                                               "comment": redact_texts(record.comment)})
        await asyncio.to_thread(append_feedback, self.request_log.directory, record)
        return record

    def close(self) -> None:
        if self.request_log is not None:
            self.request_log.close()

    def _version_label(self, served: str) -> str | None:
        """`model@version` behind a served name (what a recorded canary judged), None outside the registry."""
        model, version = self.version_of(served)
        return f"{model}@{version}" if model else None

    def version_of(self, served: str) -> tuple[str | None, str | None]:
        version_of = getattr(self.engine, "served_version", None)
        return version_of(served) if version_of else (None, None)

    # --- routes ----------------------------------------------------------------------------------------------

    def may_see(self, key: ApiKey | None, name: str) -> bool:
        """A model a fine-tuning job made belongs to the key that made it: to others it does not exist."""
        return name not in self.owners or self.owners[name] == (key.key_id if key else None)

    def visible_models(self, key: ApiKey | None) -> list[str]:
        """Served names and route names this key may call."""
        names = [name for name in self.engine.list_models() + list(self.router.routes) if self.may_see(key, name)]
        if key is None:
            return names
        return [name for name in names if self.owners.get(name) == key.key_id
                or model_allowed(key, name, self.router.routes[name].arms() if name in self.router.routes else [])]

    def _canary_changed(self, route: str, arm: str, change: CanaryChange) -> None:
        self.metrics.canary_share(route, arm, change.share)
        if change.kind == "rollback":
            self.metrics.canary_rolled_back(route, arm)
        event = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "route": route, "arm": arm,
                 "version": self._version_label(arm), "kind": change.kind, "share": change.share,
                 "reason": change.reason, "evidence": change.evidence}
        print(f"route {route}: canary {arm} {change.kind}: {change.reason}", flush=True)
        if self.request_log is not None:
            with self._events_lock, open(Path(self.request_log.directory) / ROUTE_EVENTS_FILE, "a",
                                         encoding="utf-8") as out:
                out.write(json.dumps(event) + "\n")
                out.flush()
                os.fsync(out.fileno())


def _route_events(directory: Path) -> list[dict]:
    """The recorded canary changes, oldest first (a line cut by a crash is skipped)."""
    path = directory / ROUTE_EVENTS_FILE
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def _owner_in_log(directory: Path, completion_id: str):
    """The key id that got `completion_id`, from the request log (slow: only for answers older than memory)."""
    for record in read_request_log(directory):
        if record.id == completion_id and record.status == 200 and not record.shadow:
            return record.key_id
    return _UNKNOWN


def _by_served_name(engine: ServingEngine, which: str) -> dict[str, int]:
    """Requests running or waiting per served name (idle ones at 0, so dashboards list every model)."""
    counts = dict.fromkeys(engine.list_models(), 0)
    served_as: dict[str, str] = {}
    for served, engine_name in sorted(engine.names.items()):  # a version served under two names counts once
        served_as.setdefault(engine_name, served)
    for engine_name, count in getattr(engine.batching, f"{which}_by_model")().items():
        if engine_name in served_as:
            counts[served_as[engine_name]] += count
    return counts


class KeyCheck:
    """ASGI middleware: with active keys, every path but /health needs `Authorization: Bearer <key>` (/metrics too,
    unless public), and /admin needs an admin key. Missing or wrong keys get 401, non-admin keys on /admin 403."""

    def __init__(self, app, gateway: Gateway):
        self.app, self.gateway = app, gateway

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health" or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        if scope["path"] == "/metrics" and self.gateway.metrics_public:
            return await self.app(scope, receive, send)
        if not self.gateway.keys_required():
            return await self.app(scope, receive, send)
        presented = _bearer(dict(scope.get("headers") or []).get(b"authorization", b""))
        key = self.gateway.keys.authenticate(presented) if presented else None
        if key is None:
            self.gateway.metrics.rejected("unauthorized")
            message = ("invalid API key" if presented else
                       "missing API key: send `Authorization: Bearer tsk-...` (create one with `tunesmith keys create`)")
            response = error_response(401, message, kind="authentication_error", code="invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        if scope["path"].startswith("/admin") and not key.admin:
            self.gateway.metrics.rejected("unauthorized")
            response = error_response(403, f"API key {key.name!r} has no admin scope; create one with "
                                           "`tunesmith keys create --admin`", kind="permission_error")
            return await response(scope, receive, send)
        scope.setdefault("state", {})["api_key"] = key
        await self.app(scope, receive, send)


def _bearer(header: bytes) -> str | None:
    scheme, _, value = header.decode("latin-1").partition(" ")
    if not hmac.compare_digest(scheme.lower().encode(), b"bearer") or not value.strip():
        return None
    return value.strip()
