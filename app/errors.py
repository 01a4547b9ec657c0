"""JSON errors for the HTTP API, and the middleware that guarantees no traceback leaks."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from app.logging_setup import REQUEST_ID, bind_request_id

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An error answered as `{"error": {"code", "message", ...}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        """The JSON body of the error answer."""
        return {"error": {"code": self.code, "message": self.message, **self.extra}}

    def response(self) -> web.Response:
        """The error as an aiohttp response."""
        return web.json_response(self.body(), status=self.status, headers=self.headers)

    def openai_body(self) -> dict[str, Any]:
        """The error in OpenAI's shape, for the OpenAI-compatible API under /v1/."""
        etype = self.extra.get("type") or _OPENAI_TYPES.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error"
        )
        return {
            "error": {
                "message": self.message,
                "type": etype,
                "param": self.extra.get("field"),
                "code": self.code,
            }
        }

    def response_for(self, request: web.Request) -> web.Response:
        """The error as a response: OpenAI's error shape under /v1/, ours elsewhere."""
        if request.path.startswith("/v1/"):
            return web.json_response(self.openai_body(), status=self.status, headers=self.headers)
        return self.response()


# OpenAI error `type` by HTTP status (the /v1/ API); anything else 4xx is invalid_request_error
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def not_found(what: str = "conversation") -> ApiError:
    """A 404 that says what was not found."""
    return ApiError(404, "not_found", f"No such {what}.")


_HTTP_CODES = {
    400: "bad_request",
    401: "auth",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
}


Admit = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


def request_middleware(admit: Admit) -> Middleware:
    """The app's one middleware: bind the request id, `admit` the request (auth: an early
    response, an ApiError or None), run the handler; turn ApiError and aiohttp's HTTP
    errors into JSON, and hide the rest.

    One middleware for all of it: a streaming request holds each middleware's frame for
    as long as it streams, times every open stream. The id stays bound until the error,
    if any, is logged.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        token = bind_request_id(request)
        try:
            early = await admit(request)
            # (a response's truthiness is its state dict's: compare with None)
            return early if early is not None else await handler(request)
        except ApiError as exc:
            return exc.response_for(request)
        except web.HTTPException as exc:
            if exc.status < 400 or not request.path.startswith(("/api/", "/v1/", "/ws")):
                raise
            message = exc.text or exc.reason
            if exc.status == 413:
                message = "The request body is too large."
            return ApiError(
                exc.status, _HTTP_CODES.get(exc.status, "error"), message or exc.reason
            ).response_for(request)
        except sqlite3.OperationalError as exc:
            log.error("database error on %s %s: %s", request.method, request.path, exc)
            return ApiError(
                503, "storage_busy", "The database is busy; try again shortly.", retryable=True
            ).response_for(request)
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return ApiError(500, "internal", "Internal server error.").response_for(request)
        finally:
            REQUEST_ID.reset(token)

    return middleware
