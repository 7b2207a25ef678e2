"""The OpenAI-compatible HTTP server: thin routes over a `ServingEngine`, errors always in OpenAI's JSON shape."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse

from tunesmith.config import ServeConfig
from tunesmith.errors import TunesmithError
from tunesmith.generation.requests import GenerationRequest
from tunesmith.machine import set_cpu_threads
from tunesmith.serve.answers import (
    ChoiceCollector,
    JobEvents,
    chat_chunks,
    chat_response,
    completion_chunks,
    completion_response,
)
from tunesmith.serve.admin_routes import admin_router
from tunesmith.serve.engine import ModelNotFound, ServingEngine
from tunesmith.serve.errors import MAX_REQUEST_BYTES, BodySizeLimit, install_error_handlers
from tunesmith.serve.gateway.exchange import Exchange
from tunesmith.serve.gateway.gateway import Gateway, KeyCheck
from tunesmith.serve.hot_reload import start_alias_watcher
from tunesmith.serve.http_protocol import OpenAIErrorH11Protocol
from tunesmith.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    FeedbackResponse,
    ModelCard,
    ModelList,
)
from tunesmith.serve.targets import resolve_targets


def build_app(engine: ServingEngine, max_request_bytes: int = MAX_REQUEST_BYTES, gateway: Gateway | None = None,
              cors_origins: list[str] | tuple[str, ...] = (), extension: ServerExtension | None = None) -> FastAPI:
    """`/health`, `/metrics`, `/v1/models`, `/v1/chat/completions` and `/v1/completions` over `engine`, behind
    `gateway` (keys, limits, routes, request log; without one: no keys, no log, metrics only)."""
    gateway = gateway or Gateway(engine)
    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app, gateway.metrics.rejected)
    larger = extension.larger_bodies if extension else {}
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes, larger=larger)
    app.add_middleware(KeyCheck, gateway=gateway)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.state.gateway = gateway
    app.include_router(admin_router(engine))
    for router in extension.routers if extension else []:
        app.include_router(router)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "models": engine.list_models()}

    @app.get("/metrics")
    def metrics() -> Response:
        body, content_type = gateway.metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    def list_models(raw: Request) -> ModelList:
        visible = set(gateway.visible_models(gateway.key_of(raw)))
        return ModelList(data=[card for card in _model_cards(engine, gateway) if card.id in visible])

    @app.get("/v1/models/{name:path}")
    def show_model(name: str, raw: Request) -> ModelCard:
        visible = gateway.visible_models(gateway.key_of(raw))
        card = next((card for card in _model_cards(engine, gateway) if card.id == name and name in visible), None)
        if card is None:
            raise ModelNotFound(name, visible)
        return card

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: ChatCompletionRequest, raw: Request):
        def plan(exchange: Exchange) -> list[GenerationRequest]:
            return [engine.plan_chat(_routed(request, exchange))]

        exchange = gateway.open(raw, request, "chat")
        async with exchange.recording_failures():
            plans = await run_in_threadpool(plan, exchange)  # tokenizing and grammar compiling block
            events = _submit(engine, gateway, exchange, plans, plan)
            if request.stream:
                return _streamed(exchange, chat_chunks(request, events, stream_id=exchange.id))
            collector = ChoiceCollector(request.n)
            await events.collect(collector, raw)
        return await exchange.answered(chat_response(request, collector, plans))

    @app.post("/v1/completions", response_model=None)
    async def completions(request: CompletionRequest, raw: Request):
        def plan(exchange: Exchange) -> list[GenerationRequest]:
            return engine.plan_completion(_routed(request, exchange))

        exchange = gateway.open(raw, request, "completions")
        async with exchange.recording_failures():
            plans = await run_in_threadpool(plan, exchange)
            echoes = [_echo(engine, exchange.served, request, p.prompt_ids) for p in plans]
            events = _submit(engine, gateway, exchange, plans, plan)
            if request.stream:
                return _streamed(exchange, completion_chunks(request, events, echoes, stream_id=exchange.id))
            collector = ChoiceCollector(request.n * len(plans))
            await events.collect(collector, raw)
        return await exchange.answered(completion_response(request, collector, plans, echoes))

    @app.post("/v1/feedback")
    async def feedback(request: FeedbackRequest, raw: Request) -> FeedbackResponse:
        record = await gateway.record_feedback(gateway.key_of(raw), request)
        return FeedbackResponse(id=record.id, completion_id=record.completion_id, rating=record.rating)

    return app


def _routed(request, exchange: Exchange):
    """The request as the engine plans it: for the served name the route chose (answers keep the asked name)."""
    return request if exchange.served == request.model else request.model_copy(update={"model": exchange.served})


def _submit(engine: ServingEngine, gateway: Gateway, exchange: Exchange, plans: list[GenerationRequest],
            plan: Callable[[Exchange], list[GenerationRequest]]) -> JobEvents:
    """Count the request against its key's limits, queue it, and start the route's shadow answer if it has one."""
    gateway.admit(exchange, plans)
    events = JobEvents.submit(engine, plans, watch=exchange)
    gateway.shadow(exchange, lambda shadow: _shadow_answer(engine, shadow, plan))
    return events


def _streamed(exchange: Exchange, chunks) -> StreamingResponse:
    return StreamingResponse(exchange.logged_stream(chunks), media_type="text/event-stream")


async def _shadow_answer(engine: ServingEngine, exchange: Exchange, plan) -> None:
    """The shadow arm's whole answer, recorded through its own exchange only (its failures are never the caller's)."""
    async with exchange.recording_failures(reraise=False):
        exchange.plans = await run_in_threadpool(plan, exchange)
        async for _ in JobEvents.submit(engine, exchange.plans, watch=exchange).updates():
            pass
        await exchange.finish()


def _model_cards(engine: ServingEngine, gateway: Gateway) -> list[ModelCard]:
    """Served models, then each traffic route (listed as its primary or first arm's model)."""
    cards = engine.model_cards()
    by_id = {card.id: card for card in cards}
    for name, route in gateway.router.routes.items():
        first = by_id[route.arms()[0]]
        cards.append(ModelCard(id=name, parent=first.parent, root=first.root, max_model_len=first.max_model_len))
    return cards


def _echo(engine: ServingEngine, served: str, request: CompletionRequest, prompt_ids: list[int]) -> str:
    if not request.echo:
        return ""
    return engine.check_model(served).tokenizer.decode(prompt_ids)


@dataclass
class ServerExtension:
    """What a server carries beside chat (the fine-tuning API): routes, bodies it lets be larger (path -> bytes),
    and what runs with the server (`stop` is called on the way out)."""

    routers: list = field(default_factory=list)
    larger_bodies: dict[str, int] = field(default_factory=dict)
    stop: Callable[[], None] = lambda: None


def run_server(references: list[str] | Path | str, settings: ServeConfig | None = None, serve_base: bool = True,
               log_level: str = "warning",
               extend: Callable[[ServingEngine, Gateway], ServerExtension] | None = None,
               untrained_as_base: bool = False) -> None:
    """Load the served versions and serve them behind the gateway until SIGTERM/Ctrl-C, which stops taking requests
    and lets those in flight finish for up to `settings.drain_seconds`. An untrained run is refused, unless
    `untrained_as_base` (the user asked for bases): then its base is served alone."""
    import torch
    import uvicorn

    from tunesmith.serve.gateway.keys import KeyStore

    settings = settings or ServeConfig()
    references = [str(references)] if isinstance(references, (str, Path)) else list(references)
    targets = resolve_targets(references)
    named = {target.name for target in targets}  # route arms not served yet are registry references to add
    unserved = list(dict.fromkeys(arm for route in settings.routes.values() for arm in route.arms() if arm not in named))
    targets += resolve_targets(unserved) if unserved else []
    untrained = next((target for target in targets if not target.run.is_trained), None)
    if untrained is not None and not untrained_as_base:
        raise TunesmithError(f"{untrained.run_dir} has not been trained yet; run `tunesmith train {untrained.run_dir}` "
                             "first, or pass --base to serve its base model alone")
    # Where to listen is settled, and checked free, before the models load: a taken port fails in a second.
    keys = KeyStore(settings.keys_file)
    try:
        host, warning = listen_host(settings.host, keys.has_active_keys())
    finally:
        keys.close()
    check_can_listen(host, settings.port)
    if warning:
        print(warning, flush=True)
    if not torch.cuda.is_available():
        set_cpu_threads(settings.threads)
    engine = ServingEngine.from_targets(targets, serve_base, precision=settings.precision,
                                        default_max_tokens=settings.max_new_tokens,
                                        max_batch=settings.max_batch, max_waiting=settings.max_waiting,
                                        request_timeout=settings.request_timeout)
    gateway = Gateway.from_settings(engine, settings)
    engine.start()
    extension = extend(engine, gateway) if extend else ServerExtension()
    stop_watching = start_alias_watcher(engine, settings.reload_seconds) if settings.reload_seconds else None
    print(f"Serving {', '.join(gateway.visible_models(None))} at http://{host}:{settings.port}/v1 "
          f"(OpenAI-compatible; API keys {'required' if gateway.keys_required() else 'off'}; request log in "
          f"{gateway.request_log.directory})", flush=True)
    precision = "bf16" if engine.loader.dtype == torch.bfloat16 else "fp32"
    print(f"  computing in {precision} on {engine.loader.device} with {torch.get_num_threads()} threads "
          f"(serve.precision: {settings.precision}, serve.threads: {settings.threads or 'every core'})", flush=True)
    for name in engine.list_models():
        if engine.models[name].note:
            print(f"  {name} {engine.models[name].note}", flush=True)
    app = build_app(engine, gateway=gateway, cors_origins=settings.cors_origins, extension=extension)
    config = uvicorn.Config(app, host=host, port=settings.port, log_level=log_level,
                            timeout_graceful_shutdown=settings.drain_seconds, http=OpenAIErrorH11Protocol)
    try:
        uvicorn.Server(config).run()
    finally:
        if stop_watching:
            stop_watching()
        extension.stop()
        engine.stop()
        gateway.close()


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def listen_host(host: str, keys_required: bool) -> tuple[str, str | None]:
    """Where to listen: without any API key only loopback, whatever was asked (and a line that says so)."""
    if keys_required or host in LOOPBACK:
        return host, None
    return "127.0.0.1", (f"No API key exists, so the server listens on 127.0.0.1 only, not {host}: create one with "
                         "`tunesmith keys create --name NAME` to serve other machines.")


def check_can_listen(host: str, port: int) -> None:
    """Bind `host:port` for a moment, as uvicorn will, so that a taken port or a foreign address is one clear line
    now rather than a traceback after the models have loaded."""
    import errno
    import socket

    check_port_number(port)
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
            probe.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise TunesmithError(f"port {port} on {host} is already in use: stop the other server or pass "
                                 "--port N") from None
        if exc.errno == errno.EACCES:
            raise TunesmithError(f"port {port} on {host} needs administrator rights: pass --port with a number "
                                 "above 1023, such as 8000") from None
        raise TunesmithError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): pass --host with an address "
                             "of this machine, such as 127.0.0.1") from None


def check_port_number(port: int) -> None:
    """Refuse a port no socket can have before anything slow starts (models load for half a minute)."""
    if not 1 <= port <= 65535:
        raise TunesmithError(f"port {port} is out of range: pass --port (or set serve.port to) a number from 1 to "
                             "65535, such as 8000")
