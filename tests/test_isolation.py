"""Isolation: another user's ids answer 404 (never 403) on every endpoint and WebSocket op."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from app.keys import SERVICE
from tests.authkit import add_user, api_key_mode, bearer
from tests.fakes import ScriptedProvider
from tests.helpers import read_events

NOWHERE = "f" * 32  # an id that never existed


async def _ws_events(ws: aiohttp.ClientWebSocketResponse, until: str) -> list[dict[str, Any]]:
    events = []
    while True:
        ev = json.loads((await ws.receive(timeout=5)).data)
        events.append(ev)
        if ev["type"] == until:
            return events


@pytest.fixture
async def world(aiohttp_client: Any, make_app: Any, fake: ScriptedProvider) -> dict[str, Any]:
    """Alice with a finished exchange and a live run; Bob with a conversation of his own."""
    client: TestClient[Any, Any] = await aiohttp_client(make_app(auth=api_key_mode()))
    alice = bearer(await add_user(client, "alice"))
    bob = bearer(await add_user(client, "bob"))
    done = (await (await client.post("/api/v1/conversations", json={}, headers=alice)).json())["id"]
    resp = await client.post(
        f"/api/v1/conversations/{done}/stream", json={"content": "secret"}, headers=alice
    )
    events = await read_events(resp)
    done_mid, user_mid = events[0]["message_id"], events[0]["user_message_id"]
    live = (await (await client.post("/api/v1/conversations", json={}, headers=alice)).json())["id"]
    fake.enqueue([("text", "partial "), ("hang",)])
    alice_ws = await client.ws_connect("/ws", headers=alice)
    await alice_ws.send_json({"op": "send", "conversation_id": live, "content": "go"})
    started = await _ws_events(alice_ws, "chunk")
    own = (await (await client.post("/api/v1/conversations", json={}, headers=bob)).json())["id"]
    return {
        "client": client,
        "alice": alice,
        "bob": bob,
        "done": done,
        "done_mid": done_mid,
        "user_mid": user_mid,
        "live": live,
        "live_mid": started[0]["message_id"],
        "bob_cid": own,
        "alice_ws": alice_ws,
    }


async def test_rest_and_sse_answer_404_for_another_users_ids(
    world: dict[str, Any], fake: ScriptedProvider
) -> None:
    c: TestClient[Any, Any] = world["client"]
    bob = world["bob"]
    calls_before = len(fake.calls)
    done, live, own = world["done"], world["live"], world["bob_cid"]
    done_mid, live_mid, user_mid = world["done_mid"], world["live_mid"], world["user_mid"]
    send = {"content": "let me in"}
    attempts: list[tuple[str, str, dict[str, Any] | None]] = []
    for cid in (done, live):
        attempts += [
            ("GET", f"/api/v1/conversations/{cid}", None),
            ("PATCH", f"/api/v1/conversations/{cid}", {"title": "mine now"}),
            ("POST", f"/api/v1/conversations/{cid}/stream", send),
            ("POST", f"/api/v1/conversations/{cid}/messages", send),
            ("POST", f"/api/v1/conversations/{cid}/regenerate", {}),
        ]
    for cid in (done, live, own):  # Alice's conversations, and Bob's own with Alice's ids
        for mid in (done_mid, live_mid, user_mid):
            attempts += [
                ("GET", f"/api/v1/conversations/{cid}/messages/{mid}/stream", None),
                ("GET", f"/api/v1/conversations/{cid}/messages/{mid}/stream?after=1", None),
                ("POST", f"/api/v1/conversations/{cid}/messages/{mid}/cancel", None),
                ("POST", f"/api/v1/conversations/{cid}/messages/{mid}/continue", {}),
                ("DELETE", f"/api/v1/conversations/{cid}/messages/{mid}", None),
            ]
    for cid in (done, live):  # deletes last, so a leak would show in the checks below
        attempts.append(("DELETE", f"/api/v1/conversations/{cid}", None))

    for method, path, body in attempts:
        resp = await c.request(method, path, json=body, headers=bob)
        assert resp.status == 404, (method, path, resp.status, await resp.text())
        error = (await resp.json())["error"]
        assert error["code"] == "not_found"
        # indistinguishable from an id that never existed
        probe = path.replace(done, NOWHERE).replace(live, NOWHERE)
        for mid in (done_mid, live_mid, user_mid):
            probe = probe.replace(mid, NOWHERE)
        same = await c.request(method, probe, json=body, headers=bob)
        assert (same.status, (await same.json())["error"]) == (404, error), (method, path)

    listing = await (await c.get("/api/v1/conversations", headers=bob)).json()
    assert [x["id"] for x in listing["conversations"]] == [own]
    # the OpenAI-compatible endpoint stores into a conversation only if it is the caller's
    resp = await c.post(
        "/v1/chat/completions",
        json={"model": "fake-1", "messages": [{"role": "user", "content": "hi"}]},
        headers={**bob, "X-Conversation-Id": done},
    )
    assert resp.status == 404, await resp.text()

    # Alice's data is untouched and her run still live; no provider call was made for Bob
    assert len(fake.calls) == calls_before
    alice = world["alice"]
    conv = await (await c.get(f"/api/v1/conversations/{done}", headers=alice)).json()
    assert [m["content"] for m in conv["messages"]] == ["secret", "You said: secret"]
    assert conv["title"] == "secret"
    run = c.app[SERVICE].get_run(live_mid)
    assert run is not None and not run.done and not run.cancel_requested
    await world["alice_ws"].close()


async def test_websocket_ops_answer_404_for_another_users_ids(
    world: dict[str, Any], fake: ScriptedProvider
) -> None:
    c: TestClient[Any, Any] = world["client"]
    calls_before = len(fake.calls)
    ws = await c.ws_connect("/ws", headers=world["bob"])
    done_mid, live_mid = world["done_mid"], world["live_mid"]
    ops: list[dict[str, Any]] = [
        {"op": "send", "conversation_id": world["done"], "content": "x"},
        {"op": "send", "conversation_id": world["live"], "content": "x"},
        {"op": "regenerate", "conversation_id": world["done"]},
        {"op": "cancel", "message_id": live_mid},
        {"op": "cancel", "message_id": done_mid},
        {"op": "resume", "message_id": live_mid, "after": 0},
        {"op": "resume", "message_id": done_mid, "after": 0},
        {"op": "resume", "message_id": world["user_mid"], "after": 0},
        {"op": "continue", "message_id": done_mid},
        {"op": "continue", "message_id": live_mid},
    ]
    for i, op in enumerate(ops):
        await ws.send_json({**op, "request_id": f"r{i}"})
        (event,) = await _ws_events(ws, "error")
        assert (event["code"], event["status"]) == ("not_found", 404), (op, event)
        assert event["request_id"] == f"r{i}"
        assert "secret" not in json.dumps(event) and "partial" not in json.dumps(event)
    await ws.send_json({"op": "ping"})
    assert (await _ws_events(ws, "pong"))[-1] == {"type": "pong"}  # nothing else was sent
    await ws.close()

    assert len(fake.calls) == calls_before
    run = c.app[SERVICE].get_run(live_mid)
    assert run is not None and not run.done
    # Alice still follows her own run and can stop it
    alice_ws = world["alice_ws"]
    await alice_ws.send_json({"op": "cancel", "message_id": live_mid})
    end = (await _ws_events(alice_ws, "end"))[-1]
    assert end["status"] == "cancelled"
    await alice_ws.close()
