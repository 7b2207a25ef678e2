"""Every error leaves the server in OpenAI's shape, `{"error": {message, type, param, code}}`: bad requests 4xx,
a full queue 429 with Retry-After, shutting down or overdue 503, our own bugs 500."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.errors import TunesmithError
from tunesmith.generation.engine import EngineBusy, EngineClosed
from tunesmith.serve.engine import GenerationFailed, ModelNotFound
from tunesmith.serve.protocol import ErrorDetail, ErrorResponse

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
            response = error_response(413, str(BodyTooLarge(self.max_bytes).detail))
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


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code))


def error_response(status: int, message: str, kind: str = "invalid_request_error", param=None, code=None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code).model_dump(), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(part) for part in first["loc"] if part != "body") or None
        return error_response(400, f"{param or 'body'}: {first['msg']}", param=param)

    @app.exception_handler(ModelNotFound)
    async def unknown_model(_: Request, exc: ModelNotFound) -> JSONResponse:
        return error_response(404, str(exc), param="model", code="model_not_found")

    @app.exception_handler(EngineBusy)
    async def busy(_: Request, exc: EngineBusy) -> JSONResponse:
        return error_response(429, str(exc), kind="rate_limit_error", code="server_busy",
                              headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(EngineClosed)
    async def closing(_: Request, exc: EngineClosed) -> JSONResponse:
        return error_response(503, str(exc), kind="server_error", code="shutting_down")

    @app.exception_handler(GenerationFailed)
    async def failed(_: Request, exc: GenerationFailed) -> JSONResponse:
        if exc.reason == "deadline":
            return error_response(503, str(exc), kind="server_error", code="deadline_exceeded",
                                  headers={"Retry-After": "5"})
        return error_response(500, str(exc), kind="server_error")

    @app.exception_handler(TunesmithError)
    async def bad_request(_: Request, exc: TunesmithError) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind=kind)

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")
