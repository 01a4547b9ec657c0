"""Limits: each one hit and reported (429 + Retry-After, WS rate_limited), nothing stored."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.keys import SERVICE
from app.limits import utc_day
from tests.authkit import add_user, api_key_mode, bearer, limits
from tests.fakes import ScriptedProvider, words
from tests.helpers import new_conversation, read_events, text_of


async def _messages(client: TestClient[Any, Any], cid: str, **kw: Any) -> list[dict[str, Any]]:
    conv = await (await client.get(f"/api/v1/conversations/{cid}", **kw)).json()
    return list(conv["messages"])


async def _ws_until(ws: aiohttp.ClientWebSocketResponse, *types: str) -> list[dict[str, Any]]:
    out = []
    while not out or out[-1]["type"] not in types:
        out.append(json.loads((await ws.receive(timeout=5)).data))
    return out


def _assert_429(resp: aiohttp.ClientResponse, body: dict[str, Any], code: str, limit: str) -> None:
    assert resp.status == 429
    assert body["error"]["code"] == code
    assert body["error"]["limit"] == limit
    retry_after = int(resp.headers["Retry-After"])
    assert retry_after >= 1 and body["error"]["retry_after"] == retry_after


async def test_stream_start_rate_limit(aiohttp_client: Any, make_app: Any) -> None:
    client = await aiohttp_client(make_app(limits=limits(streams_per_minute=6, stream_burst=2)))
    cid = await new_conversation(client)
    for i in range(2):  # the burst
        resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": f"m{i}"})
        assert text_of(await read_events(resp)) == f"You said: m{i}"
    stored = await _messages(client, cid)
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "third"})
    _assert_429(resp, await resp.json(), "rate_limited", "streams_per_minute")
    assert 1 <= int(resp.headers["Retry-After"]) <= 10  # 6 a minute: one token every 10 s
    # the non-streaming send, regenerate and the WebSocket are held to the same bucket
    resp = await client.post(f"/api/v1/conversations/{cid}/messages", json={"content": "x"})
    assert resp.status == 429
    resp = await client.post(f"/api/v1/conversations/{cid}/regenerate")
    assert resp.status == 429
    ws = await client.ws_connect("/ws")
    await ws.send_json({"op": "send", "conversation_id": cid, "content": "x", "request_id": "r1"})
    (event,) = await _ws_until(ws, "error")
    assert event["code"] == "rate_limited" and event["status"] == 429
    assert event["retry_after"] >= 1 and event["request_id"] == "r1"
    await ws.close()
    assert await _messages(client, cid) == stored  # nothing stored for rejected requests


async def test_concurrent_run_cap(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider
) -> None:
    client = await aiohttp_client(make_app(limits=limits(concurrent_runs=1)))
    first, second = await new_conversation(client), await new_conversation(client)
    fake.enqueue([("text", "busy "), ("hang",)])
    ws = await client.ws_connect("/ws")
    await ws.send_json({"op": "send", "conversation_id": first, "content": "long"})
    live_mid = (await _ws_until(ws, "chunk"))[0]["message_id"]

    resp = await client.post(f"/api/v1/conversations/{second}/stream", json={"content": "more"})
    _assert_429(resp, await resp.json(), "rate_limited", "concurrent_runs")
    await ws.send_json({"op": "send", "conversation_id": second, "content": "more"})
    (event,) = await _ws_until(ws, "error")
    assert (event["code"], event["limit"]) == ("rate_limited", "concurrent_runs")
    assert await _messages(client, second) == []
    assert len(fake.calls) == 1

    await ws.send_json({"op": "cancel", "message_id": live_mid})
    await _ws_until(ws, "end")
    await ws.close()
    resp = await client.post(f"/api/v1/conversations/{second}/stream", json={"content": "now"})
    assert text_of(await read_events(resp)) == "You said: now"  # the slot was freed


async def test_failed_start_gives_its_slot_and_token_back(
    aiohttp_client: Any, make_app: Any
) -> None:
    client = await aiohttp_client(
        make_app(limits=limits(concurrent_runs=1, streams_per_minute=1, stream_burst=1))
    )
    cid = await new_conversation(client)
    for _ in range(3):  # regenerate with no user message: 400 after admission
        resp = await client.post(f"/api/v1/conversations/{cid}/regenerate")
        assert resp.status == 400
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "ok"})
    assert text_of(await read_events(resp)) == "You said: ok"


async def test_quota_running_out_mid_stream_keeps_the_text(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider, db_path: str
) -> None:
    client = await aiohttp_client(make_app(limits=limits(tokens_per_day=20)))
    cid = await new_conversation(client)
    fake.enqueue(words(" ".join(f"w{i:02d}" for i in range(50))))  # 50 one-token deltas
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "talk"})
    events = await read_events(resp)
    error = events[-1]
    assert error["type"] == "error" and error["code"] == "quota_exceeded"
    assert error["retryable"] is False and error["retry_after"] >= 1
    text = text_of(events)
    assert text.split() == [f"w{i:02d}" for i in range(20)]  # stopped at the quota
    assert fake.calls[-1].closed_early  # the upstream request was aborted
    answer = (await _messages(client, cid))[-1]
    assert answer["content"] == text  # the text so far is kept
    assert answer["error"]["code"] == "quota_exceeded"
    # a failed run, but not a failure of the provider's
    scrape = await (await client.get("/metrics")).text()
    families = {f.name: f.samples for f in text_string_to_metric_families(scrape)}
    assert [x.labels["code"] for x in families["streamchat_run_errors"]] == ["quota_exceeded"]
    assert families["streamchat_upstream_failures"] == []

    # the next start is refused up front, over REST and WebSocket, and nothing is stored
    stored = await _messages(client, cid)
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "more"})
    _assert_429(resp, await resp.json(), "quota_exceeded", "tokens_per_day")
    ws = await client.ws_connect("/ws")
    await ws.send_json({"op": "send", "conversation_id": cid, "content": "more"})
    (event,) = await _ws_until(ws, "error")
    assert event["code"] == "quota_exceeded" and event["status"] == 429
    await ws.close()
    assert await _messages(client, cid) == stored
    assert len(fake.calls) == 1

    # usage is one row per user and day, saved once per run: it survives a restart
    await client.close()
    with sqlite3.connect(db_path) as db:
        rows = db.execute("SELECT user_id, day, tokens FROM usage_daily").fetchall()
    assert len(rows) == 1 and rows[0][:2] == ("local", utc_day()) and rows[0][2] >= 20
    again = await aiohttp_client(make_app(limits=limits(tokens_per_day=20)))
    resp = await again.post(f"/api/v1/conversations/{cid}/stream", json={"content": "more"})
    assert resp.status == 429


async def test_usage_reported_by_the_upstream_replaces_the_estimate(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider, db_path: str
) -> None:
    client = await aiohttp_client(make_app())
    cid = await new_conversation(client)
    fake.enqueue(words("a b c"))  # usage: 7 prompt + 3 completion tokens
    await read_events(
        await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "q"})
    )
    fake.enqueue([("text", "no usage reported"), ("finish", "stop")])
    await read_events(
        await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "q"})
    )
    limiter = client.app[SERVICE].limiter
    await limiter.close()  # wait for the usage writes
    with sqlite3.connect(db_path) as db:
        (tokens,) = db.execute("SELECT tokens FROM usage_daily").fetchone()
    # 7 + 3 reported; then an estimate: prompt "q", "a b c", "q" (1 each, at least one a
    # message) and the 17 characters of "no usage reported" (4)
    assert tokens == 10 + 3 + 4
    assert limiter.snapshot("local")["tokens_today"] == tokens


async def test_max_tokens_is_clamped_and_the_clamp_reported(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider
) -> None:
    client = await aiohttp_client(make_app(limits=limits(max_tokens=100)))
    cid = await new_conversation(client)
    resp = await client.post(
        f"/api/v1/conversations/{cid}/stream",
        json={"content": "q", "options": {"max_tokens": 5000}},
    )
    events = await read_events(resp)
    (status,) = [e for e in events if e["type"] == "status"]
    assert status["state"] == "clamped"
    assert (status["max_tokens"], status["requested_max_tokens"]) == (100, 5000)
    assert events[0]["type"] == "start" and events[-1]["type"] == "end"
    assert fake.calls[-1].options.max_tokens == 100
    resp = await client.post(
        f"/api/v1/conversations/{cid}/stream", json={"content": "q", "options": {"max_tokens": 50}}
    )
    events = await read_events(resp)
    assert not [e for e in events if e["type"] == "status"]
    assert fake.calls[-1].options.max_tokens == 50
    # the OpenAI-compatible endpoint is clamped the same way
    resp = await client.post(
        "/v1/chat/completions",
        json={
            "model": "fake-1",
            "messages": [{"role": "user", "content": "q"}],
            "max_tokens": 9999,
        },
    )
    assert resp.status == 200
    assert fake.calls[-1].options.max_tokens == 100


async def test_message_length_limit(aiohttp_client: Any, make_app: Any) -> None:
    client = await aiohttp_client(make_app(limits=limits(max_message_chars=10)))
    cid = await new_conversation(client)
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "x" * 11})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["field"] == "content" and "10 characters" in error["message"]
    assert await _messages(client, cid) == []
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "x" * 10})
    assert resp.status == 200
    await resp.read()


async def test_conversation_count_limit(aiohttp_client: Any, make_app: Any) -> None:
    client = await aiohttp_client(make_app(limits=limits(max_conversations=2)))
    await new_conversation(client)
    await new_conversation(client)
    resp = await client.post("/api/v1/conversations", json={})
    assert resp.status == 403
    error = (await resp.json())["error"]
    assert (error["code"], error["limit"]) == ("limit_reached", "max_conversations")
    listing = await (await client.get("/api/v1/conversations")).json()
    assert len(listing["conversations"]) == 2


async def test_request_body_size(aiohttp_client: Any, make_app: Any) -> None:
    client = await aiohttp_client(make_app(limits=limits(max_body_bytes=2048)))
    resp = await client.post("/api/v1/conversations", json={"title": "x" * 4000})
    assert resp.status == 413
    body = await resp.json()
    assert body["error"]["code"] == "too_large"
    listing = await (await client.get("/api/v1/conversations")).json()
    assert listing["conversations"] == []


async def test_websocket_message_too_big_closes_with_1009(
    aiohttp_client: Any, make_app: Any
) -> None:
    client = await aiohttp_client(make_app(limits=limits(ws_max_message_bytes=1024)))
    ws = await client.ws_connect("/ws")
    await ws.send_json({"op": "ping", "pad": "x" * 900})  # under the limit: still answered
    await _ws_until(ws, "pong")
    await ws.send_str(json.dumps({"op": "ping", "pad": "x" * 2000}))
    msg = await ws.receive(timeout=5)
    assert msg.type == aiohttp.WSMsgType.CLOSE
    assert msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    assert (await client.get("/api/v1/healthz")).status == 200


async def test_limits_are_per_user_with_overrides(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider
) -> None:
    client: TestClient[Any, Any] = await aiohttp_client(
        make_app(
            auth=api_key_mode(),
            limits=limits(users={"alice": {"concurrent_runs": 2}}, concurrent_runs=1),
        )
    )
    alice, bob = bearer(await add_user(client, "alice")), bearer(await add_user(client, "bob"))

    async def hang(headers: dict[str, str]) -> int:
        cid = (await (await client.post("/api/v1/conversations", json={}, headers=headers)).json())[
            "id"
        ]
        fake.enqueue([("text", "x "), ("hang",)])
        resp = await client.post(
            f"/api/v1/conversations/{cid}/stream", json={"content": "q"}, headers=headers
        )
        if resp.status == 200:
            await read_events(resp, limit=2)
            resp.close()
        else:
            fake.scripts.pop()
        return resp.status

    assert [await hang(alice) for _ in range(3)] == [200, 200, 429]
    assert [await hang(bob) for _ in range(2)] == [200, 429]  # Alice's runs do not count
    service = client.app[SERVICE]
    for run in [r for r in service.runs.values() if not r.done]:
        await service.cancel(run)


@pytest.mark.parametrize("mode", ["limits", "none"])
async def test_openai_endpoint_is_held_to_the_same_limits(
    aiohttp_client: Any, make_app: Any, mode: str
) -> None:
    lim = limits(streams_per_minute=60, stream_burst=1) if mode == "limits" else limits()
    client = await aiohttp_client(make_app(limits=lim))
    body = {"model": "fake-1", "messages": [{"role": "user", "content": "hi"}]}
    assert (await client.post("/v1/chat/completions", json=body)).status == 200
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == (429 if mode == "limits" else 200)
    if mode == "limits":
        assert int(resp.headers["Retry-After"]) >= 1


async def test_the_daily_quota_resets_at_utc_midnight(aiohttp_client: Any, make_app: Any) -> None:
    client = await aiohttp_client(make_app(limits=limits(tokens_per_day=10)))
    cid = await new_conversation(client)
    limiter = client.app[SERVICE].limiter
    limiter.used["local"] = 10
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "x"})
    assert resp.status == 429
    limiter._day_ends = 0.0  # as if the clock just passed midnight
    limiter.day = "2000-01-01"
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "x"})
    assert resp.status == 200
    await resp.read()
    assert limiter.day == utc_day()


async def test_the_local_user_of_mode_none_takes_its_limits_from_limits_users_local(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider, tmp_path: Any
) -> None:
    """README: in mode none the single user is `local`, so `[limits.users.local]` (read
    from a real TOML file) lifts the default cap for a script on the same machine."""
    from app.settings_load import load_settings

    cfg = tmp_path / "streamchat.toml"
    cfg.write_text("[limits]\nconcurrent_runs = 1\n[limits.users.local]\nconcurrent_runs = 2\n")
    lim = load_settings(env={}, cli={"config": str(cfg)}).limits
    assert (lim.defaults.concurrent_runs, lim.for_user("local").concurrent_runs) == (1, 2)
    client = await aiohttp_client(make_app(limits=lim))
    cids = [await new_conversation(client) for _ in range(3)]
    for _ in range(3):
        fake.enqueue([("text", "busy "), ("hang",)])
    ws = await client.ws_connect("/ws")
    for cid in cids:
        await ws.send_json({"op": "send", "conversation_id": cid, "content": "long"})
    events = await _ws_until(ws, "error")
    while len([e for e in events if e["type"] == "chunk"]) < 2:
        events += await _ws_until(ws, "chunk")
    errors = [e for e in events if e["type"] == "error"]
    assert [(e["code"], e["limit"]) for e in errors] == [("rate_limited", "concurrent_runs")]
    assert len(fake.calls) == 2  # two ran at once: the local user's cap, not the default's
    await ws.close()
