"""WebSocket: many runs per socket, cancel aborts upstream, resume, bad messages, fan-out."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from aiohttp import ClientWebSocketResponse, WSMsgType
from aiohttp.test_utils import TestClient

from tests.fakes import ScriptedProvider, words
from tests.helpers import new_conversation

TEXT = " ".join(f"t{i}" for i in range(30))


async def recv(ws: ClientWebSocketResponse) -> dict[str, Any]:
    """One JSON message from the socket (5 s at most)."""
    msg = await ws.receive(timeout=5.0)
    assert msg.type == WSMsgType.TEXT, msg
    return json.loads(msg.data)  # type: ignore[no-any-return]


async def collect_until_terminal(
    ws: ClientWebSocketResponse, message_ids: set[str] | None = None, count: int = 1
) -> list[dict[str, Any]]:
    """Read events until `count` terminal events arrived (bounded by the recv timeout)."""
    events: list[dict[str, Any]] = []
    done = 0
    while done < count:
        ev = await recv(ws)
        events.append(ev)
        if ev["type"] in ("end", "error") and "message_id" in ev:
            done += 1
    return events


async def test_two_runs_on_one_socket(client: TestClient[Any, Any], fake: ScriptedProvider) -> None:
    fake.enqueue(words("alpha beta gamma delta", delay=0.01))
    fake.enqueue(words("one two three four", delay=0.01))
    c1, c2 = await new_conversation(client), await new_conversation(client)
    async with client.ws_connect("/ws") as ws:
        await ws.send_json(
            {"op": "send", "request_id": "r1", "conversation_id": c1, "content": "a"}
        )
        await ws.send_json(
            {"op": "send", "request_id": "r2", "conversation_id": c2, "content": "b"}
        )
        events = await collect_until_terminal(ws, count=2)
    starts = {e["request_id"]: e for e in events if e["type"] == "start"}
    assert set(starts) == {"r1", "r2"}
    by_mid: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_mid.setdefault(e["message_id"], []).append(e)
    texts = {
        starts[r]["conversation_id"]: "".join(
            e["content"] for e in by_mid[starts[r]["message_id"]] if e["type"] == "chunk"
        )
        for r in starts
    }
    assert texts == {c1: "alpha beta gamma delta", c2: "one two three four"}
    for evs in by_mid.values():
        assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1))


async def test_cancel_mid_stream_aborts_the_upstream(
    client: TestClient[Any, Any], fake: ScriptedProvider
) -> None:
    fake.enqueue(words(TEXT, delay=0.05))
    cid = await new_conversation(client)
    async with client.ws_connect("/ws") as ws:
        await ws.send_json(
            {"op": "send", "request_id": "r", "conversation_id": cid, "content": "x"}
        )
        start = await recv(ws)
        await recv(ws)
        await recv(ws)
        t0 = asyncio.get_running_loop().time()
        await ws.send_json({"op": "cancel", "message_id": start["message_id"]})
        rest = await collect_until_terminal(ws)
    call = fake.calls[0]
    assert call.closed_early and call.ended is not None
    assert call.ended - t0 < 0.5  # the provider stream was closed promptly
    assert rest[-1]["type"] == "end" and rest[-1]["status"] == "cancelled"
    conv = await (await client.get(f"/api/v1/conversations/{cid}")).json()
    assert conv["messages"][1]["status"] == "cancelled"


async def test_resume_on_a_new_socket(client: TestClient[Any, Any], fake: ScriptedProvider) -> None:
    fake.enqueue(words(TEXT, delay=0.02))
    cid = await new_conversation(client)
    async with client.ws_connect("/ws") as ws:
        await ws.send_json(
            {"op": "send", "request_id": "r", "conversation_id": cid, "content": "x"}
        )
        got = [await recv(ws) for _ in range(6)]
    mid = got[0]["message_id"]
    async with client.ws_connect("/ws") as ws2:
        await ws2.send_json({"op": "resume", "message_id": mid, "after": got[-1]["seq"]})
        rest = await collect_until_terminal(ws2)
    allev = got + rest
    assert [e["seq"] for e in allev] == list(range(1, len(allev) + 1))
    assert "".join(e["content"] for e in allev if e["type"] == "chunk") == TEXT
    # a finished message resumes as a replay
    async with client.ws_connect("/ws") as ws3:
        from app.keys import SERVICE

        client.app[SERVICE].runs.pop(mid)
        await ws3.send_json({"op": "resume", "message_id": mid, "after": 0})
        replay = await collect_until_terminal(ws3)
    assert [e["type"] for e in replay] == ["start", "chunk", "end"]
    assert replay[1]["content"] == TEXT


async def test_fan_out_to_two_sockets(client: TestClient[Any, Any], fake: ScriptedProvider) -> None:
    fake.enqueue(words(TEXT, delay=0.01))
    cid = await new_conversation(client)
    async with client.ws_connect("/ws") as a, client.ws_connect("/ws") as b:
        await a.send_json({"op": "send", "request_id": "r", "conversation_id": cid, "content": "x"})
        start = await recv(a)
        await b.send_json({"op": "resume", "message_id": start["message_id"], "after": 0})
        ea, eb = await asyncio.gather(collect_until_terminal(a), collect_until_terminal(b))
    assert [start, *ea] == eb


async def test_bad_messages_get_errors_and_the_socket_stays_open(
    client: TestClient[Any, Any], fake: ScriptedProvider
) -> None:
    cid = await new_conversation(client)
    bad: list[tuple[Any, str]] = [
        ("not json", "bad_request"),
        ("[1,2]", "bad_request"),
        ({"op": "fly"}, "bad_request"),
        ({"op": "send", "conversation_id": cid}, "bad_request"),
        ({"op": "send", "conversation_id": cid, "content": 5}, "bad_request"),
        ({"op": "send", "conversation_id": cid, "content": "x", "extra": 1}, "bad_request"),
        ({"op": "send", "conversation_id": "nope", "content": "x"}, "not_found"),
        ({"op": "cancel", "message_id": "0" * 32}, "not_found"),
        ({"op": "resume", "message_id": "0" * 32, "after": 0}, "not_found"),
        ({"op": "resume", "message_id": "0" * 32, "after": -1}, "bad_request"),
    ]
    async with client.ws_connect("/ws") as ws:
        for payload, code in bad:
            if isinstance(payload, str):
                await ws.send_str(payload)
            else:
                await ws.send_json(payload)
            ev = await recv(ws)
            assert ev["type"] == "error" and ev["code"] == code, (payload, ev)
            assert "Traceback" not in ev["message"]
        await ws.send_bytes(b"\x00\x01")
        assert (await recv(ws))["code"] == "bad_request"
        await ws.send_json({"op": "ping"})
        assert await recv(ws) == {"type": "pong"}
    conv = await (await client.get(f"/api/v1/conversations/{cid}")).json()
    assert conv["messages"] == []


async def test_409_over_websocket_names_the_live_message(
    client: TestClient[Any, Any], fake: ScriptedProvider
) -> None:
    fake.enqueue([("text", "a"), ("hang",)])
    cid = await new_conversation(client)
    async with client.ws_connect("/ws") as ws:
        await ws.send_json(
            {"op": "send", "request_id": "1", "conversation_id": cid, "content": "x"}
        )
        start = await recv(ws)
        await recv(ws)
        await ws.send_json(
            {"op": "send", "request_id": "2", "conversation_id": cid, "content": "y"}
        )
        err = await recv(ws)
        assert err["type"] == "error" and err["code"] == "conflict"
        assert err["message_id"] == start["message_id"] and err["request_id"] == "2"
        await ws.send_json({"op": "cancel", "message_id": start["message_id"]})
        await collect_until_terminal(ws)


async def test_a_socket_that_stops_answering_pings_is_closed_and_its_run_goes_on(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider
) -> None:
    """Ping frames follow `streaming.heartbeat`, like SSE's `: ping`. A client that never
    answers them (a dead peer) is closed after half an interval more; its run goes on and
    a new socket resumes it. A client that answers stays open through many intervals."""
    client = await aiohttp_client(make_app(streaming={"heartbeat": 0.3}))
    fake.enqueue([("sleep", 1.5), ("text", "late"), ("finish", "stop")])
    cid = await new_conversation(client)
    loop = asyncio.get_running_loop()
    async with client.ws_connect("/ws") as alive:
        # aiohttp's client answers pings while something reads the socket
        answering = asyncio.create_task(alive.receive(timeout=5.0))
        async with client.ws_connect("/ws", autoping=False) as dead:
            opened = loop.time()
            await dead.send_json(
                {"op": "send", "request_id": "r", "conversation_id": cid, "content": "x"}
            )
            start = await recv(dead)
            kinds = []
            while True:
                msg = await dead.receive(timeout=2.0)
                kinds.append(msg.type)
                if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                    break
            closed_after = loop.time() - opened
        assert WSMsgType.PING in kinds  # the old fixed 30 s interval sent none in time
        assert 0.3 <= closed_after < 1.2, closed_after  # ping at 0.3 s, no pong by 0.45 s
        assert fake.calls[-1].ended is None  # the run does not depend on its socket
        await asyncio.sleep(0.6)  # two more intervals on the socket that answers
        assert not answering.done() and not alive.closed
        answering.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await answering
        await alive.send_json({"op": "resume", "message_id": start["message_id"], "after": 0})
        events = await collect_until_terminal(alive)
    assert "".join(e["content"] for e in events if e["type"] == "chunk") == "late"
    assert events[-1]["status"] == "complete"
