"""Issue 7 in-process: continue, idempotent sends, slow readers, storage faults, drain."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from app import flusher as flusher_module
from app import lifecycle
from app.keys import METRICS, SERVICE
from providers.base import ProviderError
from tests.fakes import ScriptedProvider, words
from tests.helpers import new_conversation, read_events, text_of

TEXT = " ".join(f"w{i}" for i in range(40))


async def _conv(client: TestClient[Any, Any], cid: str) -> dict[str, Any]:
    return await (await client.get(f"/api/v1/conversations/{cid}")).json()  # type: ignore[no-any-return]


async def test_continue_after_cancel_appends_only_new_text(
    client: TestClient[Any, Any], fake: ScriptedProvider
) -> None:
    fake.enqueue([("text", "The quick "), ("text", "brown "), ("hang",)])
    cid = await new_conversation(client)
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "q"})
    first = await read_events(resp, limit=3)
    mid = first[0]["message_id"]
    await client.post(f"/api/v1/conversations/{cid}/messages/{mid}/cancel")
    fake.enqueue(words("fox jumps."))
    cont = await client.post(f"/api/v1/conversations/{cid}/messages/{mid}/continue")
    assert cont.status == 200
    events = await read_events(cont)
    assert events[0]["type"] == "start" and events[0]["continued"] is True
    assert events[0]["message_id"] == mid
    assert text_of(events) == "fox jumps."  # only the new text is streamed
    assert events[-1]["status"] == "complete"
    msg = (await _conv(client, cid))["messages"][1]
    assert (msg["content"], msg["status"]) == ("The quick brown fox jumps.", "complete")
    call = fake.calls[-1]
    assert call.options.prefill == "The quick brown "
    assert [m.content for m in call.messages] == ["q"]
    # a complete answer cannot be continued
    again = await client.post(f"/api/v1/conversations/{cid}/messages/{mid}/continue")
    assert again.status == 409


async def test_continue_after_failure_over_websocket(
    client: TestClient[Any, Any], fake: ScriptedProvider
) -> None:
    fake.enqueue([("text", "half "), ("error", ProviderError("upstream_unavailable", "reset"))])
    cid = await new_conversation(client)
    events = await read_events(
        await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "q"})
    )
    mid = events[0]["message_id"]
    assert events[-1]["type"] == "error"
    fake.enqueue(words("and the rest"))
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "continue", "message_id": mid, "request_id": "c1"})
        got = []
        while True:
            ev = json.loads((await ws.receive(timeout=5)).data)
            got.append(ev)
            if ev["type"] in ("end", "error"):
                break
    assert got[0]["request_id"] == "c1"
    assert text_of(got) == "and the rest"
    msg = (await _conv(client, cid))["messages"][1]
    assert msg["content"] == "half and the rest" and msg["status"] == "complete"
    assert msg["error"] is None


async def test_idempotent_send_over_http_and_websocket(
    client: TestClient[Any, Any], fake: ScriptedProvider
) -> None:
    fake.enqueue(words(TEXT, delay=0.01))
    cid = await new_conversation(client)
    body = {"content": "q", "client_message_id": "abc-1"}
    first = await client.post(f"/api/v1/conversations/{cid}/stream", json=body)
    head = await read_events(first, limit=2)
    first.close()  # the client lost the answer and retries the same send
    retry = await client.post(f"/api/v1/conversations/{cid}/stream", json=body)
    assert retry.status == 200
    events = await read_events(retry)
    assert events[0]["message_id"] == head[0]["message_id"]
    assert text_of(events) == TEXT
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "send", "conversation_id": cid, "request_id": "r", **body})
        ev = json.loads((await ws.receive(timeout=5)).data)
        # finished meanwhile but still in memory: the retry replays the same run
        assert ev["type"] == "start" and ev["message_id"] == head[0]["message_id"]
        client.app[SERVICE].runs.clear()  # once forgotten, the retry is told it is a duplicate
        await ws.send_json({"op": "send", "conversation_id": cid, "request_id": "r", **body})
        while ev["type"] != "error":
            ev = json.loads((await ws.receive(timeout=5)).data)
    assert ev["code"] == "duplicate" and ev["message_id"] == head[0]["message_id"]
    assert len(fake.calls) == 1
    assert len((await _conv(client, cid))["messages"]) == 2


async def test_slow_reader_does_not_hold_back_a_fast_one(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider
) -> None:
    client = await aiohttp_client(
        make_app(streaming={"send_timeout": 0.5, "subscriber_lag_limit": 10_000})
    )
    big = "x" * 2000
    # ~1.2 MB; the first sleep keeps the run live until the test has found it
    fake.enqueue([("sleep", 0.3)] + [("text", big) for _ in range(600)] + [("finish", "stop")])
    cid = await new_conversation(client)
    # the slow reader: a raw socket with a tiny receive buffer that never reads
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", client.port))
    req = json.dumps({"content": "q"}).encode()
    slow.sendall(
        f"POST /api/v1/conversations/{cid}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(req)}\r\n\r\n".encode()
        + req
    )
    try:
        service = client.app[SERVICE]
        for _ in range(200):
            if service.live_run(cid) is not None:
                break
            await asyncio.sleep(0.01)
        run = service.live_run(cid)
        assert run is not None
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        fast = await client.get(f"/api/v1/conversations/{cid}/messages/{run.message_id}/stream")
        events = await read_events(fast)
        fast_time = loop.time() - t0
        assert text_of(events) == big * 600
        assert fast_time < 5
        # the slow one was cut after send_timeout; the run itself finished normally
        await asyncio.wait_for(run.wait_finished(), 5)
        assert run.final_status == "complete"
        await asyncio.sleep(0.7)
        assert sum(run.subscribers.values()) == 0
    finally:
        slow.close()
    # ...and a reader cut off can resume without gaps from any seq
    resumed = await client.get(
        f"/api/v1/conversations/{cid}/messages/{run.message_id}/stream",
        headers={"Last-Event-ID": "100"},
    )
    rest = await read_events(resumed)
    assert rest[0]["seq"] == 101 and text_of(rest) == big * (600 - 99)


async def test_flush_failure_is_retried_and_the_stream_goes_on(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider, db_path: str
) -> None:
    client = await aiohttp_client(
        make_app(db_busy_timeout=0.05, streaming={"flush_interval": 0.05})
    )
    fake.enqueue(words(TEXT, delay=0.02))
    cid = await new_conversation(client)
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "q"})
    first = await read_events(resp, limit=2)
    blocker = sqlite3.connect(db_path, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")  # lock the database while the run streams
    try:
        first += await read_events(resp, limit=15)
        service = client.app[SERVICE]
        assert service.flusher.failures > 0  # flushes failed, and were counted...
    finally:
        blocker.rollback()  # ...the lock goes away
        blocker.close()
    rest = await read_events(resp)
    assert text_of(first + rest) == TEXT  # the stream never stopped
    msg = (await _conv(client, cid))["messages"][1]
    assert msg["content"] == TEXT and msg["status"] == "complete"


async def test_final_save_failure_ends_failed_with_a_clear_message(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider, db_path: str
) -> None:
    client = await aiohttp_client(make_app(db_busy_timeout=0.05))
    fake.enqueue([("text", "a "), ("sleep", 0.2), ("text", "b"), ("finish", "stop")])
    cid = await new_conversation(client)
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "q"})
    await read_events(resp, limit=2)
    blocker = sqlite3.connect(db_path, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        rest = await read_events(resp)
    finally:
        blocker.rollback()
        blocker.close()
    assert rest[-1]["type"] == "error" and rest[-1]["code"] == "internal"
    assert "could not be saved" in rest[-1]["message"]
    assert (await client.get("/api/v1/healthz")).status == 200  # the server is fine


async def test_drain_interrupts_live_runs_and_tells_every_client(
    client: TestClient[Any, Any], fake: ScriptedProvider
) -> None:
    fake.enqueue(words("quick one"))
    fake.enqueue([("text", "slow "), ("hang",)])
    c1, c2 = await new_conversation(client), await new_conversation(client)
    sse = await client.post(f"/api/v1/conversations/{c1}/stream", json={"content": "q"})
    ws = await client.ws_connect("/ws")
    await ws.send_json({"op": "send", "request_id": "r", "conversation_id": c2, "content": "q"})
    await ws.receive(timeout=5)
    await ws.receive(timeout=5)
    interrupted = asyncio.ensure_future(lifecycle.drain_and_close(client.app, 0.3))
    sse_events = await read_events(sse)
    assert sse_events[-1]["type"] == "end"  # the quick run finished within the grace
    ws_events = []
    while True:
        msg = await ws.receive(timeout=5)
        if msg.type.name != "TEXT":
            break
        ws_events.append(json.loads(msg.data))
    await interrupted
    assert ws_events[-1]["type"] == "error" and ws_events[-1]["code"] == "shutdown"
    assert ws_events[-1]["retryable"] is True
    assert ws.close_code == 1001
    conv2 = await _conv(client, c2)
    assert conv2["messages"][1]["status"] == "interrupted"
    assert conv2["messages"][1]["content"] == "slow "
    refused = await client.post(f"/api/v1/conversations/{c1}/stream", json={"content": "q"})
    assert refused.status == 503 and (await refused.json())["error"]["retryable"] is True


async def test_locked_database_at_send_is_503_and_stores_nothing(
    aiohttp_client: Any, make_app: Any, db_path: str
) -> None:
    client = await aiohttp_client(make_app(db_busy_timeout=0.05))
    cid = await new_conversation(client)
    blocker = sqlite3.connect(db_path, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "q"})
        assert resp.status == 503
        body = await resp.json()
        assert body["error"]["code"] == "storage_busy" and body["error"]["retryable"] is True
        async with client.ws_connect("/ws") as ws:
            await ws.send_json({"op": "send", "conversation_id": cid, "content": "q"})
            ev = json.loads((await ws.receive(timeout=5)).data)
            assert ev["code"] in ("storage_busy", "not_found")
    finally:
        blocker.rollback()
        blocker.close()
    assert (await _conv(client, cid))["messages"] == []
    assert client.app[SERVICE].live_run(cid) is None


async def test_cancel_landing_during_the_final_save_does_not_hang_the_run(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider, db_path: str
) -> None:
    client = await aiohttp_client(make_app(db_busy_timeout=3.0))
    fake.enqueue([("text", "all "), ("sleep", 0.2), ("text", "done"), ("finish", "stop")])
    cid = await new_conversation(client)
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "q"})
    first = await read_events(resp, limit=2)
    mid = first[0]["message_id"]
    blocker = sqlite3.connect(db_path, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")  # the final save will wait on this lock
    try:
        await asyncio.sleep(0.4)  # the stream is over; the run is saving
        run = client.app[SERVICE].get_run(mid)
        assert run is not None and not run.done
        # the WebSocket cancel needs no database read, so it lands during the save
        ws = await client.ws_connect("/ws")
        await ws.send_json({"op": "cancel", "message_id": mid})
        await asyncio.sleep(0.2)
    finally:
        blocker.rollback()
        blocker.close()
    rest = await asyncio.wait_for(read_events(resp), 5)
    assert rest[-1]["type"] == "end"
    await asyncio.wait_for(run.wait_finished(), 5)
    assert client.app[SERVICE].live_run(cid) is None
    await ws.close()
    msg = (await _conv(client, cid))["messages"][1]
    assert msg["content"] == "all done" and msg["status"] == "complete"


@pytest.mark.parametrize("budget", [3, 2000])
async def test_flushes_stretch_under_load_and_still_save(
    aiohttp_client: Any,
    make_app: Any,
    fake: ScriptedProvider,
    monkeypatch: pytest.MonkeyPatch,
    budget: int,
) -> None:
    """Three answers streaming for ~2 s with a 0.05 s flush interval: with a budget of 3
    answers a second the ticks stretch to 1 s (a few writes, not ~40), and the partial
    text still reaches the database while the answers stream."""
    monkeypatch.setattr(flusher_module, "FLUSH_ROWS_PER_S", budget)
    client = await aiohttp_client(make_app(streaming={"flush_interval": 0.05}))
    registry = client.app[METRICS].registry
    cids = [await new_conversation(client) for _ in range(3)]
    for _ in cids:
        fake.enqueue(words(TEXT, delay=0.05))
    resps = [
        await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "q"})
        for cid in cids
    ]
    assert [r.status for r in resps] == [200] * 3, [await r.text() for r in resps]
    await asyncio.sleep(1.5)
    partial = [(await _conv(client, cid))["messages"][1]["content"] for cid in cids]
    assert all(TEXT.startswith(p) and p for p in partial)  # saved mid-stream, in order
    flushes = registry.get_sample_value("streamchat_db_flush_seconds_count")
    for resp in resps:
        assert text_of(await read_events(resp)) == TEXT
    if budget == 3:
        assert flushes is not None and 1 <= flushes <= 3
    else:
        assert flushes is not None and flushes >= 10
