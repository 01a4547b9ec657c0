"""Small helpers for reading SSE and driving the API in tests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient


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
    """Yield SSE events as they arrive."""
    buf = b""
    async for chunk in resp.content.iter_any():
        buf += chunk
        while b"\n\n" in buf:
            frame, buf = buf.split(b"\n\n", 1)
            for _, ev in parse_frames(frame.decode() + "\n\n"):
                yield ev


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
