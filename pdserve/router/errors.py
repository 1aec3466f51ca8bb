"""Errors in OpenAI's shape, the app's exception handlers and the request-body limit.

1. Anything that goes wrong while serving a request becomes an :class:`APIError`
   (:func:`as_api_error`): invalid requests are 400s, backend errors keep their
   status and ``Retry-After``, anything unexpected is logged and becomes a 500.
2. An :class:`APIError` answers ``{"error": {message, type, param, code}}``
   with its HTTP status.
3. :func:`add_exception_handlers` gives Starlette's own errors (unknown route,
   wrong method) and anything uncaught the same shape.
4. :func:`read_body` reads a JSON body of at most ``max_body_bytes`` (else 413).
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdserve.errors import InvalidRequestError
from pdserve.router.backend import BackendError
from pdserve.router.openai_protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    @property
    def type(self) -> str:
        """OpenAI's error type for the status (OpenAI answers a bad API key as an invalid request)."""
        if self.status == 429:
            return "rate_limit_error"
        if self.status >= 500:
            return "server_error"
        return "invalid_request_error"

    def body(self) -> ErrorResponse:
        """The ``{"error": ...}`` body."""
        return ErrorResponse(
            error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        )

    def response(self) -> Response:
        """The whole HTTP answer: status, headers and body."""
        return Response(
            self.body().model_dump_json(), self.status, self.headers, media_type="application/json"
        )


def as_api_error(exc: BaseException, response_id: str) -> APIError:
    """The :class:`APIError` that answers ``exc``; unexpected ones are logged as errors."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, BackendError):
        status = exc.status if 400 <= exc.status < 600 else 500
        headers = None
        if exc.retry_after_s is not None:
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
        return APIError(status, exc.message, code=exc.code, headers=headers)
    logger.error("request %s failed unexpectedly", response_id, exc_info=exc)
    return APIError(500, "internal server error; the request was not completed", code="internal_error")


def add_exception_handlers(app: FastAPI) -> None:
    """Answer Starlette's HTTP errors and anything uncaught in OpenAI's shape."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        else:
            message = f"{exc.detail} ({request.method} {request.url.path})"
        error = APIError(exc.status_code, message, headers=dict(exc.headers) if exc.headers else None)
        return error.response()

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> Response:
        return as_api_error(exc, "-").response()


async def read_body(request: Request, max_body_bytes: int) -> bytes:
    """The request's JSON body; 400 for another content type, 413 past ``max_body_bytes``."""
    content_type = request.headers.get("content-type")
    if content_type is not None:
        media_type = content_type.split(";")[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            raise APIError(400, f"Content-Type must be application/json, got {media_type!r}")
    too_large = APIError(
        413, f"request body is larger than the limit of {max_body_bytes} bytes", code="request_too_large"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body_bytes:
            raise too_large
    return bytes(body)
