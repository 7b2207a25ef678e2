"""The OpenAI-compatible HTTP server: thin routes over a `ServingEngine`, errors always in OpenAI's JSON shape."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from tunesmith.serve.answers import (
    ChoiceCollector,
    JobEvents,
    chat_chunks,
    chat_response,
    completion_chunks,
    completion_response,
)
from tunesmith.serve.engine import ServingEngine
from tunesmith.serve.errors import MAX_REQUEST_BYTES, BodySizeLimit, install_error_handlers
from tunesmith.serve.http_protocol import OpenAIErrorH11Protocol
from tunesmith.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList


def build_app(engine: ServingEngine, max_request_bytes: int = MAX_REQUEST_BYTES) -> FastAPI:
    """`/health`, `/v1/models`, `/v1/chat/completions` and `/v1/completions` over `engine`."""
    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "models": engine.list_models()}

    @app.get("/v1/models")
    def list_models() -> ModelList:
        return ModelList(data=engine.model_cards())

    @app.get("/v1/models/{name:path}")
    def show_model(name: str) -> ModelCard:
        engine.check_model(name)
        return next(card for card in engine.model_cards() if card.id == name)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: ChatCompletionRequest, raw: Request):
        plan = await run_in_threadpool(engine.plan_chat, request)  # tokenizing and grammar compiling block
        events = JobEvents.submit(engine, [plan])
        if request.stream:
            return StreamingResponse(chat_chunks(request, events), media_type="text/event-stream")
        collector = ChoiceCollector(request.n)
        await events.collect(collector, raw)
        return chat_response(request, collector, [plan])

    @app.post("/v1/completions", response_model=None)
    async def completions(request: CompletionRequest, raw: Request):
        plans = await run_in_threadpool(engine.plan_completion, request)
        echoes = [_echo(engine, request, plan.prompt_ids) for plan in plans]
        events = JobEvents.submit(engine, plans)
        if request.stream:
            return StreamingResponse(completion_chunks(request, events, echoes), media_type="text/event-stream")
        collector = ChoiceCollector(request.n * len(plans))
        await events.collect(collector, raw)
        return completion_response(request, collector, plans, echoes)

    return app


def _echo(engine: ServingEngine, request: CompletionRequest, prompt_ids: list[int]) -> str:
    if not request.echo:
        return ""
    return engine.check_model(request.model).tokenizer.decode(prompt_ids)


def run_server(references: list[str] | Path | str, host: str = "127.0.0.1", port: int = 8000,
               default_max_tokens: int = 256, log_level: str = "warning", serve_base: bool = True,
               max_batch: int = 32, max_waiting: int = 64, request_timeout: float | None = 600,
               drain_seconds: float = 30, threads: int = 0) -> None:
    """Load the served versions and serve them until SIGTERM/Ctrl-C, which stops taking requests and lets those in
    flight finish for up to `drain_seconds`."""
    import os

    import torch
    import uvicorn

    if not torch.cuda.is_available():
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
        torch.set_num_threads(threads or max(1, cores - 1))

    references = [str(references)] if isinstance(references, (str, Path)) else references
    engine = ServingEngine.from_references(references, serve_base, default_max_tokens=default_max_tokens,
                                           max_batch=max_batch, max_waiting=max_waiting,
                                           request_timeout=request_timeout)
    engine.start()
    print(f"Serving {', '.join(engine.list_models())} at http://{host}:{port}/v1 (OpenAI-compatible)", flush=True)
    for name in engine.list_models():
        if engine.models[name].note:
            print(f"  {name} {engine.models[name].note}", flush=True)
    config = uvicorn.Config(build_app(engine), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=drain_seconds, http=OpenAIErrorH11Protocol)
    try:
        uvicorn.Server(config).run()
    finally:
        engine.stop()
