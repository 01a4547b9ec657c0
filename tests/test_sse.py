"""SSE on the wire: exact frames, hostile text, resume with Last-Event-ID, heartbeat, 503."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp_sse import EventSourceResponse

from app.keys import DISCONNECTS, SERVICE
from tests.fakes import ScriptedProvider, words
from tests.helpers import ProductionServer, new_conversation, parse_frames, read_events, text_of

TEXT = " ".join(f"tok{i}" for i in range(30))


async def test_exact_frames(client: TestClient[Any, Any], fake: ScriptedProvider) -> None:
    fake.enqueue([("text", "Hel"), ("text", "lo"), ("usage", 3, 2), ("finish", "stop")])
    cid = await new_conversation(client)
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "hi"})
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Accel-Buffering"] == "no"
    raw = await resp.text()
    start = json.loads(raw.split("\n")[1][6:])
    mid, umid = start["message_id"], start["user_message_id"]
    expected = (
        "id: 1\ndata: "
        + json.dumps(
            {
                "type": "start",
                "conversation_id": cid,
                "message_id": mid,
                "user_message_id": umid,
                "provider": "fake",
                "model": "fake-1",
                "seq": 1,
            },
            separators=(",", ":"),
        )
        + "\n\n"
        + f'id: 2\ndata: {{"type":"chunk","message_id":"{mid}","content":"Hel","seq":2}}\n\n'
        + f'id: 3\ndata: {{"type":"chunk","message_id":"{mid}","content":"lo","seq":3}}\n\n'
    )
    assert raw.startswith(expected)
    frames = parse_frames(raw)
    end = frames[-1][1]
    assert frames[-1][0] == 4 and end["type"] == "end" and end["seq"] == 4
    assert end["usage"] == {"prompt_tokens": 3, "completion_tokens": 2}
    assert raw.endswith("\n\n") and raw.count("\n\n") == 4


async def test_hostile_model_text_stays_one_event(
    client: TestClient[Any, Any], fake: ScriptedProvider
) -> None:
    nasty = ["a\n\ndata: x", "\r", "b\r\nid: 99\n", "event: end\n\n", "é😀\u2028"]
    fake.enqueue([("text", t) for t in nasty] + [("finish", "stop")])
    cid = await new_conversation(client)
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "hi"})
    raw = await resp.text()
    frames = parse_frames(raw)
    assert [seq for seq, _ in frames] == list(range(1, len(nasty) + 3))
    chunks = [ev["content"] for _, ev in frames if ev["type"] == "chunk"]
    assert chunks == nasty


async def test_resume_from_the_middle_of_a_live_run_gets_every_token_once(
    client: TestClient[Any, Any], fake: ScriptedProvider
) -> None:
    fake.enqueue(words(TEXT, delay=0.02))
    cid = await new_conversation(client)
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "x"})
    first = await read_events(resp, limit=8)
    resp.close()  # connection lost mid-run
    mid = first[0]["message_id"]
    last_id = first[-1]["seq"]
    resumed = await client.get(
        f"/api/v1/conversations/{cid}/messages/{mid}/stream",
        headers={"Last-Event-ID": str(last_id)},
    )
    assert resumed.status == 200
    rest = await read_events(resumed)
    assert rest[0]["seq"] == last_id + 1
    seqs = [e["seq"] for e in first + rest]
    assert seqs == list(range(1, len(seqs) + 1))
    assert text_of(first + rest) == TEXT
    assert rest[-1]["type"] == "end"
    # ?after= works the same and a second live subscriber sees the same events
    again = await client.get(f"/api/v1/conversations/{cid}/messages/{mid}/stream?after=0")
    assert text_of(await read_events(again)) == TEXT


async def test_two_subscribers_get_identical_events(
    client: TestClient[Any, Any], fake: ScriptedProvider
) -> None:
    fake.enqueue(words(TEXT, delay=0.01))
    cid = await new_conversation(client)
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "x"})
    first = await read_events(resp, limit=1)
    mid = first[0]["message_id"]
    other = await client.get(f"/api/v1/conversations/{cid}/messages/{mid}/stream")
    a, b = await asyncio.gather(read_events(resp), read_events(other))
    assert first + a == b


async def test_finished_message_replays_start_chunk_end(
    client: TestClient[Any, Any], fake: ScriptedProvider
) -> None:
    fake.enqueue(words(TEXT))
    cid = await new_conversation(client)
    events = await read_events(
        await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "x"})
    )
    mid = events[0]["message_id"]
    # forget the in-memory log to force the stored replay
    from app.keys import SERVICE

    client.app[SERVICE].runs.pop(mid)
    resp = await client.get(f"/api/v1/conversations/{cid}/messages/{mid}/stream")
    replay = await read_events(resp)
    assert [e["type"] for e in replay] == ["start", "chunk", "end"]
    assert replay[0]["replay"] is True
    assert replay[1]["content"] == TEXT
    assert replay[2]["status"] == "complete"


async def test_heartbeat_comment_while_waiting(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider
) -> None:
    client = await aiohttp_client(make_app(streaming={"heartbeat": 0.1, "status_interval": 0.15}))
    fake.enqueue([("sleep", 0.5), ("text", "late"), ("finish", "stop")])
    cid = await new_conversation(client)
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "x"})
    raw = await resp.text()
    assert ": ping\n\n" in raw
    frames = parse_frames(raw)
    statuses = [ev for _, ev in frames if ev["type"] == "status"]
    assert statuses and statuses[0]["state"] == "waiting"
    assert text_of([ev for _, ev in frames]) == "late"


async def test_only_a_quiet_stream_is_pinged_and_no_stream_holds_a_ping_task(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider
) -> None:
    """Heartbeats come from one task for the server (app/heartbeat.py), not a task per
    response, and only to a subscriber that has waited most of `heartbeat` with nothing
    to write: a stream busy with tokens gets none."""
    client = await aiohttp_client(make_app(streaming={"heartbeat": 0.3}))
    busy = " ".join(f"b{i}" for i in range(15))
    quiet = [("sleep", 1.2), ("text", " late"), ("finish", "stop")]
    fake.enqueue(words(busy, delay=0.02, finish="")[:-2] + quiet)  # (no usage, no finish)
    cid = await new_conversation(client)
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "x"})
    raw = ""
    while ": ping" not in raw:  # bounded by the test timeout; the quiet part is 1.2 s
        raw += (await resp.content.readany()).decode()
    pingers = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__.endswith("._ping")]
    assert pingers == []  # the stream is open and quiet: aiohttp-sse would have one here
    raw += await resp.text()
    before_quiet, _, during_quiet = raw.partition(": ping\n\n")
    assert text_of([ev for _, ev in parse_frames(before_quiet)]) == busy
    assert ": ping" not in before_quiet
    assert during_quiet.count(": ping\n\n") >= 2  # about every 0.3 s over 1.2 s
    assert text_of([ev for _, ev in parse_frames(raw)]) == busy + " late"


async def test_streaming_disabled_is_503_but_blocking_send_works(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider
) -> None:
    client = await aiohttp_client(make_app(streaming={"enabled": False}))
    cid = await new_conversation(client)
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "x"})
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "streaming_disabled"
    ws = await client.get("/ws")
    assert ws.status == 503
    ok = await client.post(f"/api/v1/conversations/{cid}/messages", json={"content": "x"})
    assert ok.status == 200
    assert (await ok.json())["message"]["content"] == "You said: x"
    conv = await (await client.get(f"/api/v1/conversations/{cid}")).json()
    assert len(conv["messages"]) == 2  # the refused stream stored nothing


@pytest.mark.parametrize("cancels_handler", [False, True], ids=["production", "cancelling"])
async def test_client_gone_before_the_answer_starts_is_no_error(
    make_app: Callable[..., web.Application],
    fake: ScriptedProvider,
    caplog: pytest.LogCaptureFixture,
    cancels_handler: bool,
) -> None:
    """A client that sends and resets at once: its run still answers and saves, and nothing
    is logged as an error (at 10,000 streams, clients that gave up did exactly this). With
    handler cancellation (aiohttp's TestServer) the start is cancelled mid-write; without
    (web.run_app) the response's headers meet a closed transport."""
    fake.enqueue([("text", "still "), ("text", "here"), ("finish", "stop")])
    server = TestServer(make_app()) if cancels_handler else ProductionServer(make_app())
    async with TestClient(server) as client:
        cid = await new_conversation(client)
        body = json.dumps({"content": "hi"}).encode()
        head = (
            f"POST /api/v1/conversations/{cid}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        sock = socket.create_connection(("127.0.0.1", client.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.sendall(head + body)
        sock.close()  # RST: gone before the handler could send headers
        messages: list[dict[str, Any]] = []
        for _ in range(200):  # bounded: 10 s
            resp = await client.get(f"/api/v1/conversations/{cid}")
            messages = (await resp.json())["messages"]
            if len(messages) == 2 and messages[1]["status"] == "complete":
                break
            await asyncio.sleep(0.05)
        assert [m["content"] for m in messages] == ["hi", "still here"]
        assert [m["status"] for m in messages] == ["complete", "complete"]
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("on_disconnect", ["cancel", "continue"])
async def test_a_client_leaving_a_quiet_stream_is_noticed_without_a_write(
    make_app: Callable[..., web.Application], fake: ScriptedProvider, on_disconnect: str
) -> None:
    """The run goes quiet (a slow provider; the heartbeat is 15 s away) and the client
    closes: the server must notice without writing. It stops counting the subscriber,
    and with on_disconnect = "cancel" stops the provider, within the watch's poll."""
    fake.enqueue([("text", "first "), ("sleep", 30.0), ("text", "late"), ("finish", "stop")])
    app = make_app(streaming={"on_disconnect": on_disconnect})
    async with TestClient(ProductionServer(app)) as client:
        cid = await new_conversation(client)
        resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "x"})
        events = await read_events(resp, limit=2)  # start, then "first "
        assert events[-1]["type"] == "chunk"
        service = client.app[SERVICE]
        run = service.get_run(events[0]["message_id"])
        assert run is not None and sum(run.subscribers.values()) == 1
        loop = asyncio.get_running_loop()
        resp.close()
        closed = loop.time()
        if on_disconnect == "cancel":
            await asyncio.wait_for(run.wait_finished(), 5)
            assert fake.calls[0].closed_early is True
            conv = await (await client.get(f"/api/v1/conversations/{cid}")).json()
            assert conv["messages"][1]["status"] == "cancelled"
            assert conv["messages"][1]["content"] == "first "
        else:
            for _ in range(250):  # bounded: 5 s
                if not sum(run.subscribers.values()):
                    break
                await asyncio.sleep(0.02)
            assert sum(run.subscribers.values()) == 0 and not run.done  # the run goes on
        assert loop.time() - closed < 2.0  # the watch polls every 0.25 s; a write is 15+ s away
        assert len(client.app[DISCONNECTS]) == 0


async def test_finished_streams_leave_no_reference_cycles(
    client: TestClient[Any, Any], fake: ScriptedProvider
) -> None:
    """A stream's objects are freed by reference counting as it ends. aiohttp-sse's
    cancelled ping task kept a cycle through each response (app/sse_response.py), and
    at 100 concurrent streams collecting those cycles stalled the server 10-70 ms."""
    cid = await new_conversation(client)
    fake.enqueue(words("one two three"))
    fake.enqueue(words("four five"))
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # the collector keeps what it finds, for us to look at
    try:
        resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "x"})
        assert text_of(await read_events(resp)) == "one two three"
        v1 = await client.post(
            "/v1/chat/completions",
            json={
                "model": "fake-1",
                "messages": [{"role": "user", "content": "y"}],
                "stream": True,
            },
        )
        assert "four" in await v1.text()
        await asyncio.sleep(0.1)  # the handlers return and their responses are released
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, EventSourceResponse)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []
