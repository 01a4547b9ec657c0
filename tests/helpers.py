"""Small helpers for reading SSE and driving the API in tests."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import resource
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer

from app.logging_setup import configure_logging

_BUFFERS: weakref.WeakKeyDictionary[ClientResponse, bytearray] = weakref.WeakKeyDictionary()


async def new_conversation(client: TestClient[Any, Any], **fields: Any) -> str:
    """Create a conversation and return its id."""
    resp = await client.post("/api/v1/conversations", json=fields)
    assert resp.status == 201, await resp.text()
    return str((await resp.json())["id"])


def parse_frames(raw: str) -> list[tuple[int, dict[str, Any]]]:
    """Split an SSE body into (id, event) pairs, asserting each frame is exactly id + one data."""
    out = []
    for frame in raw.split("\n\n"):
        if not frame or frame.startswith(":"):
            continue
        lines = frame.split("\n")
        assert len(lines) == 2, f"frame is not exactly id + data: {frame!r}"
        assert lines[0].startswith("id: ") and lines[1].startswith("data: "), frame
        out.append((int(lines[0][4:]), json.loads(lines[1][6:])))
    return out


async def iter_events(resp: ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """Yield SSE events as they arrive.

    Bytes read past the last event taken stay with the response, so a reader that
    stops early (read_events with a limit) and reads again later misses nothing.
    """
    buf = _BUFFERS.setdefault(resp, bytearray())
    while True:
        while (end := buf.find(b"\n\n")) >= 0:
            frame = bytes(buf[: end + 2])
            del buf[: end + 2]
            for _, ev in parse_frames(frame.decode()):
                yield ev
        chunk = await resp.content.readany()
        if not chunk:
            return
        buf += chunk


async def read_events(resp: ClientResponse, limit: int | None = None) -> list[dict[str, Any]]:
    """Read SSE events until the stream ends or `limit` events arrived."""
    events: list[dict[str, Any]] = []
    async for ev in iter_events(resp):
        events.append(ev)
        if limit is not None and len(events) >= limit:
            break
    return events


def text_of(events: list[dict[str, Any]]) -> str:
    """The concatenated chunk contents."""
    return "".join(e["content"] for e in events if e["type"] == "chunk")


class ProductionServer(TestServer):
    """A TestServer that, like web.run_app, does not cancel a handler when its client leaves
    (aiohttp's TestServer does), so disconnects are tested the way they happen in production."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        kwargs["handler_cancellation"] = False
        return web.AppRunner(self.app, **kwargs)


def captured_logs(fmt: str, level: str = "INFO") -> Iterator[io.StringIO]:
    """Configure logging as run.py does, into a buffer in `fmt`; restore it all after."""
    root, hpack = logging.getLogger(), logging.getLogger("hpack")
    saved, saved_level, hpack_level = list(root.handlers), root.level, hpack.level
    buf = io.StringIO()
    configure_logging(level, fmt, buf)
    try:
        yield buf
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved:
            root.addHandler(h)
        root.setLevel(saved_level)
        hpack.setLevel(hpack_level)


@contextlib.contextmanager
def no_free_descriptors() -> Iterator[int]:
    """Lower the open-files limit to the lowest free descriptor, so the next socket fails
    with EMFILE; yield that limit, and restore it after."""
    lowest_free = os.dup(0)  # the kernel hands out the lowest free descriptor
    os.close(lowest_free)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        yield lowest_free
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
