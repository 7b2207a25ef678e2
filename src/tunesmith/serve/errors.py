"""Every error leaves the server in OpenAI's shape, `{"error": {message, type, param, code}}`: bad requests 4xx,
a full queue 429 with Retry-After, shutting down or overdue 503, our own bugs 500."""

from __future__ import annotations

from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.errors import TunesmithError
from tunesmith.generation.engine import EngineBusy, EngineClosed
from tunesmith.serve.engine import GenerationFailed, ModelNotFound
from tunesmith.serve.gateway.rate_limits import RateLimited
from tunesmith.serve.protocol import ErrorDetail, ErrorResponse

MAX_REQUEST_BYTES = 4 * 2**20


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, max_bytes: int):
        super().__init__(413, f"request body is over the {max_bytes // 2**20} MiB limit; send less text")


class BodySizeLimit:
    """Refuse request bodies over `max_bytes` (413 in OpenAI's error shape) before they are read whole."""

    def __init__(self, app, max_bytes: int, larger: dict[str, int] | None = None):
        self.app, self.max_bytes = app, max_bytes
        self.larger = larger or {}
        """Paths whose bodies may be larger (file uploads), and their limit."""

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.larger.get(scope["path"], self.max_bytes)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            response = error_response(413, str(BodyTooLarge(limit).detail))
            return await response(scope, receive, send)
        received = 0

        async def counted():  # a chunked body with no length: counted as it arrives
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted, send)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code))


def error_response(status: int, message: str, kind: str = "invalid_request_error", param=None, code=None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code).model_dump(), status_code=status, headers=headers)


class ModelNotAllowed(TunesmithError):
    """The caller's API key may not use the model it named (a 403)."""

    def __init__(self, key_name: str, model: str):
        super().__init__(f"API key {key_name!r} may not use model {model!r}; ask for a key that allows it "
                         "(`tunesmith keys create --models ...`)")


def error_of(exc: Exception) -> tuple[JSONResponse, str]:
    """The OpenAI-shaped response for an exception, and the rejection reason that metrics count it under."""
    if isinstance(exc, RequestValidationError):
        message, param = validation_message(exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"})
        return error_response(400, message, param=param), "invalid_request"
    if isinstance(exc, ModelNotFound):
        return error_response(404, str(exc), param="model", code="model_not_found"), "not_found"
    if isinstance(exc, ModelNotAllowed):
        return error_response(403, str(exc), kind="permission_error", param="model",
                              code="model_not_allowed"), "forbidden_model"
    if isinstance(exc, RateLimited):
        return error_response(429, str(exc), kind="rate_limit_error", code=f"rate_limit_{exc.limit}",
                              headers={"Retry-After": str(exc.retry_after)}), f"rate_limited_{exc.limit}"
    if isinstance(exc, EngineBusy):
        return error_response(429, str(exc), kind="rate_limit_error", code="server_busy",
                              headers={"Retry-After": str(exc.retry_after)}), "server_busy"
    if isinstance(exc, EngineClosed):
        return error_response(503, str(exc), kind="server_error", code="shutting_down"), "shutting_down"
    if isinstance(exc, GenerationFailed):
        if exc.reason == "deadline":
            return error_response(503, str(exc), kind="server_error", code="deadline_exceeded",
                                  headers={"Retry-After": "5"}), "deadline"
        return error_response(500, str(exc), kind="server_error"), "server_error"
    if isinstance(exc, TunesmithError):  # one may carry OpenAI's `param` and `code` for the body
        return (error_response(400, str(exc), param=getattr(exc, "param", None), code=getattr(exc, "code", None)),
                "invalid_request")
    if isinstance(exc, StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        reason = "not_found" if exc.status_code == 404 else "invalid_request"
        return error_response(exc.status_code, str(exc.detail), kind=kind), reason
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error"), "server_error"


def validation_message(error: dict) -> tuple[str, str | None]:
    """What a request validation error says to the caller, and the request field (`param`) it concerns."""
    loc, kind = tuple(error.get("loc") or ()), error.get("type")
    if kind == "json_invalid":  # FastAPI puts the decoder's character offset where a field name would be
        where = f" at character {loc[1]}" if len(loc) > 1 else ""
        reason = (error.get("ctx") or {}).get("error", "cannot be decoded")
        return f"the request body is not valid JSON{where}: {reason}; send one JSON object", None
    if kind == "missing" and loc == ("body",):
        return "the request body is empty; send one JSON object", None
    param = ".".join(str(part) for part in loc if part != "body") or None
    if kind == "extra_forbidden":  # the name is the caller's text: quoted, and cut short if it is long
        name = param if len(param) <= 100 else param[:100] + "..."
        return f"unknown parameter {name!r}: this server does not take it; leave it out", name
    message = str(error.get("msg", "invalid request")).removeprefix("Value error, ")
    return f"{param or 'body'}: {message}", param


def install_error_handlers(app: FastAPI, on_error: Callable[[str], None] = lambda reason: None) -> None:
    """Every exception becomes its OpenAI-shaped response; `on_error` hears the reason (for metrics)."""

    async def handle(_: Request, exc: Exception) -> JSONResponse:
        response, reason = error_of(exc)
        on_error(reason)
        return response

    for kind in (RequestValidationError, TunesmithError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, handle)
