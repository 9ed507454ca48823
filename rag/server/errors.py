"""Every failure in the API's own error shape, mapped once for the whole app.

    OpenAI routes:    {"error": {"message", "type", "param", "code"}}
    Anthropic routes: {"type": "error", "error": {"type", "message"}}   (paths under /v1/messages)

Routes raise `APIError` (or let a known exception through); FastAPI's validation errors, unknown
paths and unexpected exceptions are converted here, so no client ever sees FastAPI's own shapes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

ANTHROPIC_PREFIX = "/v1/messages"

# HTTP status -> Anthropic's error type (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}
# HTTP status -> OpenAI's error type.
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


@dataclass
class APIError(Exception):
    """A failure to report to the client; `type` defaults from the status."""

    status_code: int
    message: str
    param: str | None = None
    code: str | None = None
    type: str | None = None

    def __str__(self) -> str:
        return self.message


def openai_type(status_code: int) -> str:
    if status_code >= 500:
        return "server_error"
    return _OPENAI_TYPES.get(status_code, "invalid_request_error")


def anthropic_type(status_code: int) -> str:
    return _ANTHROPIC_TYPES.get(
        status_code, "api_error" if status_code >= 500 else "invalid_request_error"
    )


def error_body(path: str, error: APIError) -> dict:
    """The JSON body for `error` on a route under `path` (also used inside SSE streams)."""
    if path.startswith(ANTHROPIC_PREFIX):
        kind = error.type if error.type in _ANTHROPIC_TYPES.values() else None
        return {
            "type": "error",
            "error": {"type": kind or anthropic_type(error.status_code), "message": error.message},
        }
    return {
        "error": {
            "message": error.message,
            "type": error.type or openai_type(error.status_code),
            "param": error.param,
            "code": error.code,
        }
    }


def error_response(request: Request, error: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status_code == 401 else None
    return JSONResponse(
        error_body(request.url.path, error), status_code=error.status_code, headers=headers
    )


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """FastAPI's error list -> one readable sentence and the offending parameter."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path", "header"):  # where it was, not which field
        loc = loc[1:]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    message = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{param}: {message}{more}" if param else f"{message}{more}"), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(request, APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return error_response(request, APIError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request, APIError(500, f"internal error: {type(exc).__name__}"))
