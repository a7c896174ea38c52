"""Every failure as OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``.

Mapping: kvruntime's ``BadRequest`` (bad messages, sampling values, an over-long prompt) and
request validation (pydantic's 422) -> 400; an unknown model or route -> 404; a body over the
server's limit -> 413 (``BodyLimit``, before anything parses it); ``Overloaded`` and other
capacity errors -> 503 with ``Retry-After``; anything unexpected -> 500, logged, and the
server keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvruntime.errors import BadRequest, CapacityError, KVRuntimeError

log = logging.getLogger(__name__)


class APIError(KVRuntimeError):
    """An error the server answers with a given status, OpenAI ``type``, ``param`` and ``code``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code


class ClientGone(KVRuntimeError):
    """Raised inside a streaming turn's token callback once the client has disconnected; it
    stops decoding early (the turn is abandoned and not recorded)."""


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def to_api_error(exc: BaseException) -> APIError:
    """The API error for any exception raised while serving a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, BadRequest):
        return APIError(400, str(exc), code=getattr(exc, "code", None))
    if isinstance(exc, CapacityError):
        return APIError(503, str(exc), type="server_error", code="overloaded")
    log.exception("unexpected error while serving a request", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}", type="server_error")


def error_response(err: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status == 503 else None
    body = error_body(err.message, err.type, err.param, err.code)
    return JSONResponse(body, status_code=err.status, headers=headers)


def validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    """One readable sentence (and the first bad field) from pydantic's error list."""
    parts, param = [], None
    for e in errors[:3]:
        if e.get("type") == "json_invalid":
            return f"the request body is not valid JSON: {e.get('ctx', {}).get('error', '')}", None
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        param = param or (loc[0] if loc else None)
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request", param


def body_too_large(max_bytes: int) -> APIError:
    return APIError(
        413,
        f"the request body is larger than this server's limit of {max_bytes} bytes",
        code="request_too_large",
    )


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 before anything
    parses it: at once when its Content-Length says so, else as soon as the streamed body
    passes the limit (the route's read raises; the error handlers answer)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            await error_response(body_too_large(limit))(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # FastAPI lets an HTTPException through its body parsing
                    raise HTTPException(413, body_too_large(limit).message)
            return message

        await self.app(scope, limited, send)


def install_error_handlers(app: FastAPI) -> None:
    async def on_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc.errors())
        return error_response(APIError(400, message, param=param, code="invalid_value"))

    async def on_http(_request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        code = "request_too_large" if exc.status_code == 413 else None
        err = APIError(exc.status_code, str(exc.detail), type=kind, code=code)
        resp = error_response(err)
        if exc.headers:
            resp.headers.update(exc.headers)
        return resp

    async def on_error(_request: Request, exc: Exception) -> JSONResponse:
        return error_response(to_api_error(exc))

    app.add_exception_handler(RequestValidationError, on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, on_http)  # type: ignore[arg-type]
    app.add_exception_handler(KVRuntimeError, on_error)
    app.add_exception_handler(Exception, on_error)
