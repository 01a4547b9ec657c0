"""The smallest end-to-end check: create a conversation and stream an answer over SSE."""

from __future__ import annotations

import json
from typing import Any

from aiohttp.test_utils import TestClient


async def test_stream_roundtrip(client: TestClient[Any, Any]) -> None:
    conv = await (await client.post("/api/v1/conversations", json={})).json()
    resp = await client.post(f"/api/v1/conversations/{conv['id']}/stream", json={"content": "hi"})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    body = await resp.text()
    events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]
    assert events[0]["type"] == "start"
    assert events[-1]["type"] == "end"
    text = "".join(e["content"] for e in events if e["type"] == "chunk")
    assert text == "You said: hi"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
