"""The OpenAI-compatible HTTP server: thin routes over a `ServingEngine`, errors always in OpenAI's JSON shape."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.errors import TunesmithError
from tunesmith.serve.engine import ModelNotFound, ServingEngine
from tunesmith.serve.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    DeltaMessage,
    ErrorDetail,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
    completion_id,
    now,
)


MAX_REQUEST_BYTES = 4 * 2**20


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, max_bytes: int):
        super().__init__(413, f"request body is over the {max_bytes // 2**20} MiB limit; send less text")


class BodySizeLimit:
    """Refuse request bodies over `max_bytes` (413 in OpenAI's error shape) before they are read whole."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = _error_response(413, str(BodyTooLarge(self.max_bytes).detail))
            return await response(scope, receive, send)
        received = 0

        async def counted():  # a chunked body with no length: counted as it arrives
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counted, send)


def build_app(engine: ServingEngine, max_request_bytes: int = MAX_REQUEST_BYTES) -> FastAPI:
    """A FastAPI app serving `/health`, `/v1/models` and `/v1/chat/completions` from `engine`."""
    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, openapi_url=None)
    _install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "models": engine.list_models()}

    @app.get("/v1/models")
    def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=name) for name in engine.list_models()])

    @app.post("/v1/chat/completions", response_model=None)
    def chat_completions(request: ChatCompletionRequest) -> ChatCompletionResponse | StreamingResponse:
        if request.stream:
            deltas = engine.stream(request)  # raises request errors now, while a JSON error can still be sent
            return StreamingResponse(_sse_events(request, deltas), media_type="text/event-stream")
        text, finish_reason, prompt_tokens, completion_tokens = engine.generate(request)
        return ChatCompletionResponse(
            model=request.model,
            choices=[Choice(message=AssistantMessage(content=text), finish_reason=finish_reason)],
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                        total_tokens=prompt_tokens + completion_tokens),
        )

    return app


def _sse_events(request: ChatCompletionRequest, deltas) -> Iterator[str]:
    """`data: {chunk}` events: the role first, then text deltas, then the finish reason, then `[DONE]`."""
    stream_id, created = completion_id(), now()

    def event(delta: DeltaMessage, finish_reason=None, usage=None, choices=True) -> str:
        chunk = ChatCompletionChunk(id=stream_id, created=created, model=request.model, usage=usage,
                                    choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)] if choices else [])
        return f"data: {chunk.model_dump_json()}\n\n"

    yield event(DeltaMessage(role="assistant", content=""))
    try:
        for delta in deltas:
            if delta.text:
                yield event(DeltaMessage(content=delta.text))
            if delta.finish_reason:
                yield event(DeltaMessage(), finish_reason=delta.finish_reason)
                if request.stream_options and request.stream_options.include_usage:
                    usage = Usage(prompt_tokens=delta.prompt_tokens, completion_tokens=delta.completion_tokens,
                                  total_tokens=delta.prompt_tokens + delta.completion_tokens)
                    yield event(DeltaMessage(), usage=usage, choices=False)
    except Exception as exc:  # the status line is already sent, so the error travels as an event
        yield f"data: {_error_body(f'generation failed: {exc}', 'server_error').model_dump_json()}\n\n"
    finally:
        deltas.close()
    yield "data: [DONE]\n\n"


def _error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code))


def _error_response(status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
    return JSONResponse(_error_body(message, kind, param, code).model_dump(), status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as `{"error": {...}}`: bad requests 400, unknown models 404, our bugs 500."""

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(part) for part in first["loc"] if part != "body") or None
        return _error_response(400, f"{param or 'body'}: {first['msg']}", param=param)

    @app.exception_handler(ModelNotFound)
    async def unknown_model(_: Request, exc: ModelNotFound) -> JSONResponse:
        return _error_response(404, str(exc), param="model", code="model_not_found")

    @app.exception_handler(TunesmithError)
    async def bad_request(_: Request, exc: TunesmithError) -> JSONResponse:
        return _error_response(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(exc.status_code, str(exc.detail), kind=kind)

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        return _error_response(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")


def run_server(run_dir: Path | str, host: str = "127.0.0.1", port: int = 8000, default_max_tokens: int = 256,
               log_level: str = "warning") -> None:
    """Load the run's models and serve them until interrupted."""
    import uvicorn

    engine = ServingEngine.from_run_dir(run_dir, default_max_tokens=default_max_tokens)
    print(f"Serving {', '.join(engine.list_models())} at http://{host}:{port}/v1 (OpenAI-compatible)", flush=True)
    uvicorn.run(build_app(engine), host=host, port=port, log_level=log_level)
