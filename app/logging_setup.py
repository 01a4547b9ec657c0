"""Logging: text or JSON lines, and a request id on every line logged while serving a request.

The id lives in a ContextVar set by `bind_request_id` (from the outermost middleware).
asyncio copies the context into tasks created during the request, so a run started by a
request logs with that request's id to its end, even after the client has gone.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from contextvars import ContextVar, Token
from typing import TextIO

import orjson
from aiohttp import web

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")
# ...and on the request, for on_response_prepare (which may run after the middleware)
REQUEST_ID_KEY = web.RequestKey("request_id", str)
HEADER = "X-Request-ID"
# A client-supplied id is kept (so a proxy's id follows the request) only when it is tame.
_CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"

# Line breaks and other control characters in a text message (a model name a client chose,
# an upstream's error text) are escaped, so no value can forge a log line of its own.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F) if c != 0x09}
_CONTROL.update({0x2028: "\\u2028", 0x2029: "\\u2029"})


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every record as `request_id`."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate; never drops a record."""
        record.request_id = REQUEST_ID.get()
        return True


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT with the message kept on one line (a traceback still follows it)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        """Escape control characters in the message before formatting it."""
        record.message = record.message.translate(_CONTROL)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, request_id, message (and exc)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as compact JSON."""
        out = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


def configure_logging(level: str, fmt: str, stream: TextIO | None = None) -> logging.Handler:
    """Configure the root logger (UTC times, stderr) as text or JSON; called once by run.py."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    formatter = JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT)
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # hpack (HTTP/2 header compression) logs every header it encodes at DEBUG: header
    # values (provider keys among them) stay out of the log even at log_level = DEBUG
    logging.getLogger("hpack").setLevel(max(root.level, logging.INFO))
    return handler


# Request ids need to be unique, not secret: a random per-process prefix and a counter.
# (uuid4 reads the OS entropy source, a system call on every request.)
_ID_PREFIX = os.urandom(4).hex()
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    """A short id, unique within this process and very likely across restarts."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFF:08x}"


def bind_request_id(request: web.Request) -> Token[str]:
    """Bind the request's id (the client's X-Request-ID if tame, else a new one).

    Called by the outermost middleware (app/errors.py), which resets the returned token
    when the request ends.
    """
    given = request.headers.get(HEADER, "")
    rid = given if _CLIENT_ID_RE.match(given) else new_request_id()
    request[REQUEST_ID_KEY] = rid
    return REQUEST_ID.set(rid)


async def request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: echo the id, so a user can quote it in a bug report."""
    rid = request.get(REQUEST_ID_KEY)
    if rid is not None:
        response.headers[HEADER] = rid
