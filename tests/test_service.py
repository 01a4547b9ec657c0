"""The streaming service with a scripted fake provider: seq, terminal, flush, disconnect, cancel."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

from aiohttp.test_utils import TestClient

from app.keys import SERVICE, STORE
from providers.base import ProviderError
from tests.fakes import ScriptedProvider, fallback_settings, words
from tests.helpers import iter_events, new_conversation, read_events, text_of

TEXT = " ".join(f"w{i}" for i in range(40))


async def test_sequence_numbers_and_one_terminal_event(
    client: TestClient[Any, Any], fake: ScriptedProvider
) -> None:
    fake.enqueue(words("a b c d"))
    cid = await new_conversation(client)
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "x"})
    events = await read_events(resp)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["type"] for e in events] == ["start", "chunk", "chunk", "chunk", "chunk", "end"]
    assert sum(e["type"] in ("end", "error") for e in events) == 1
    end = events[-1]
    assert end["status"] == "complete" and end["finish_reason"] == "stop"
    assert end["usage"] == {"prompt_tokens": 7, "completion_tokens": 4}
    conv = await (await client.get(f"/api/v1/conversations/{cid}")).json()
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
    assert conv["messages"][1]["content"] == "a b c d"
    assert conv["messages"][1]["status"] == "complete"
    assert conv["title"] == "x"


async def test_failure_mid_stream_keeps_partial_text(
    client: TestClient[Any, Any], fake: ScriptedProvider
) -> None:
    fake.enqueue(
        [("text", "part one "), ("error", ProviderError("upstream_unavailable", "dropped"))]
    )
    cid = await new_conversation(client)
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "x"})
    events = await read_events(resp)
    assert [e["type"] for e in events] == ["start", "chunk", "error"]
    assert events[-1]["code"] == "upstream_unavailable" and events[-1]["retryable"] is True
    conv = await (await client.get(f"/api/v1/conversations/{cid}")).json()
    msg = conv["messages"][1]
    assert (msg["status"], msg["content"]) == ("failed", "part one ")
    assert msg["error"]["code"] == "upstream_unavailable"


async def test_flush_cadence_is_time_based_not_per_token(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider, db_path: str
) -> None:
    client = await aiohttp_client(make_app(streaming={"flush_interval": 0.1}))
    statements: list[str] = []
    await client.app[STORE].db.set_trace_callback(statements.append)
    fake.enqueue(words(TEXT, delay=0.02))  # 40 tokens over ~0.8 s
    cid = await new_conversation(client)
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "x"})
    seen_partial = []
    events = []
    async for ev in iter_events(resp):
        events.append(ev)
        if ev["type"] == "chunk" and ev["seq"] in (20, 30):
            with sqlite3.connect(db_path) as raw:
                (content,) = raw.execute(
                    "SELECT content FROM messages WHERE role = 'assistant'"
                ).fetchone()
            seen_partial.append(content)
    # the trace shows statements with their parameters expanded
    flushes = [
        s
        for s in statements
        if s.startswith("UPDATE messages SET content =") and s.endswith("AND status = 'streaming'")
    ]
    assert text_of(events) == TEXT
    # ~0.8 s at 0.1 s per flush: about 8 writes for 40 tokens, never one per token
    assert 3 <= len(flushes) <= 12, len(flushes)
    # partial text was on disk while streaming, and it was a prefix of the answer
    assert any(seen_partial) and all(TEXT.startswith(p) for p in seen_partial)


async def test_run_continues_when_the_client_disconnects(
    client: TestClient[Any, Any], fake: ScriptedProvider
) -> None:
    fake.enqueue(words(TEXT, delay=0.01))
    cid = await new_conversation(client)
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "x"})
    first = await read_events(resp, limit=3)
    resp.close()  # the client goes away mid-stream
    mid = first[0]["message_id"]
    service = client.app[SERVICE]
    run = service.get_run(mid)
    assert run is not None
    await asyncio.wait_for(run.wait_finished(), 5)
    conv = await (await client.get(f"/api/v1/conversations/{cid}")).json()
    assert conv["messages"][1]["status"] == "complete"
    assert conv["messages"][1]["content"] == TEXT
    assert fake.calls[0].closed_early is False


async def test_on_disconnect_cancel_stops_the_provider(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider
) -> None:
    client = await aiohttp_client(make_app(streaming={"on_disconnect": "cancel"}))
    fake.enqueue(words(TEXT, delay=0.02))
    cid = await new_conversation(client)
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "x"})
    first = await read_events(resp, limit=3)
    resp.close()
    run = client.app[SERVICE].get_run(first[0]["message_id"])
    assert run is not None
    await asyncio.wait_for(run.wait_finished(), 5)
    assert fake.calls[0].closed_early is True
    conv = await (await client.get(f"/api/v1/conversations/{cid}")).json()
    msg = conv["messages"][1]
    assert msg["status"] == "cancelled"
    assert TEXT.startswith(msg["content"]) and msg["content"]


async def test_cancel_saves_partial_and_aborts_upstream(
    client: TestClient[Any, Any], fake: ScriptedProvider
) -> None:
    fake.enqueue(words(TEXT, delay=0.02))
    cid = await new_conversation(client)
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "x"})
    first = await read_events(resp, limit=4)
    mid = first[0]["message_id"]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    cancel = await client.post(f"/api/v1/conversations/{cid}/messages/{mid}/cancel")
    assert cancel.status == 200
    final = (await cancel.json())["message"]
    assert final["status"] == "cancelled"
    assert fake.calls[0].closed_early
    assert fake.calls[0].ended is not None
    rest = await read_events(resp)
    assert rest[-1]["type"] == "end" and rest[-1]["status"] == "cancelled"
    streamed = text_of(first + rest)
    assert final["content"] == streamed and TEXT.startswith(streamed)
    assert loop.time() - t0 < 1.0
    # cancelling a finished message is harmless and returns its final state
    again = await client.post(f"/api/v1/conversations/{cid}/messages/{mid}/cancel")
    assert (await again.json())["message"]["status"] == "cancelled"


async def test_second_send_while_live_is_409_with_live_id(
    client: TestClient[Any, Any], fake: ScriptedProvider
) -> None:
    fake.enqueue([("text", "a"), ("hang",)])
    cid = await new_conversation(client)
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "x"})
    first = await read_events(resp, limit=2)
    second = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "y"})
    assert second.status == 409
    body = await second.json()
    assert body["error"]["message_id"] == first[0]["message_id"]
    conv = await (await client.get(f"/api/v1/conversations/{cid}")).json()
    assert len(conv["messages"]) == 2  # nothing stored for the rejected send
    assert conv["live_message_id"] == first[0]["message_id"]
    await client.post(f"/api/v1/conversations/{cid}/messages/{first[0]['message_id']}/cancel")


async def test_crash_recovery_marks_streaming_as_interrupted(
    aiohttp_client: Any, make_app: Any, db_path: str
) -> None:
    client = await aiohttp_client(make_app())
    cid = await new_conversation(client)
    store = client.app[STORE]
    mid = (
        await store.start_exchange("local", cid, content="q", choose=lambda _: ("fake", "fake-1"))
    ).message_id
    await store.flush_contents([("saved so far", "", mid)])
    await client.close()  # the row stays 'streaming' as if the process had died
    with sqlite3.connect(db_path) as raw:
        raw.execute("UPDATE messages SET status = 'streaming' WHERE id = ?", (mid,))
    client2 = await aiohttp_client(make_app())
    conv = await (await client2.get(f"/api/v1/conversations/{cid}")).json()
    msg = conv["messages"][1]
    assert (msg["status"], msg["content"]) == ("interrupted", "saved so far")
    assert msg["error"]["code"] == "interrupted"


async def test_history_is_sent_with_system_prompt_and_cancelled_partials(
    client: TestClient[Any, Any], fake: ScriptedProvider
) -> None:
    cid = await new_conversation(client, system_prompt="Be brief.")
    fake.enqueue(words("first answer"))
    await read_events(
        await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "one"})
    )
    fake.enqueue([("text", "partial"), ("hang",)])
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "two"})
    first = await read_events(resp, limit=2)
    await client.post(f"/api/v1/conversations/{cid}/messages/{first[0]['message_id']}/cancel")
    fake.enqueue(words("ok"))
    await read_events(
        await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "three"})
    )
    sent = [(m.role, m.content) for m in fake.calls[-1].messages]
    assert sent == [
        ("system", "Be brief."),
        ("user", "one"),
        ("assistant", "first answer"),
        ("user", "two"),
        ("assistant", "partial"),
        ("user", "three"),
    ]


async def test_history_is_trimmed_to_budget(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider
) -> None:
    client = await aiohttp_client(make_app(streaming={"history_budget": 50}))
    cid = await new_conversation(client)
    for i in range(4):
        fake.enqueue(words("y" * 20))
        await read_events(
            await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": f"{i}" * 20})
        )
    sent = fake.calls[-1].messages
    assert sent[-1].content == "3" * 20
    assert sum(len(m.content) for m in sent) <= 50
    assert sent[0].role == "user"


async def test_non_streaming_send_returns_the_complete_message(
    client: TestClient[Any, Any], fake: ScriptedProvider
) -> None:
    fake.enqueue(words("all at once"))
    cid = await new_conversation(client)
    resp = await client.post(f"/api/v1/conversations/{cid}/messages", json={"content": "q"})
    assert resp.status == 200
    body = await resp.json()
    assert body["message"]["content"] == "all at once"
    assert body["message"]["status"] == "complete"
    assert body["message"]["metrics"]["ttft_ms"] is not None


async def test_regenerate_replaces_the_last_answer(
    client: TestClient[Any, Any], fake: ScriptedProvider
) -> None:
    cid = await new_conversation(client)
    fake.enqueue(words("first"))
    await read_events(
        await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "q"})
    )
    fake.enqueue(words("second"))
    events = await read_events(await client.post(f"/api/v1/conversations/{cid}/regenerate"))
    assert text_of(events) == "second"
    conv = await (await client.get(f"/api/v1/conversations/{cid}")).json()
    assert [(m["role"], m["content"]) for m in conv["messages"]] == [
        ("user", "q"),
        ("assistant", "second"),
    ]
    assert [m.content for m in fake.calls[-1].messages] == ["q"]


async def test_fallback_is_announced_and_recorded(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider
) -> None:
    backup = ScriptedProvider(name="backup", models=("b-1",))
    client = await aiohttp_client(
        make_app(providers={"backup": backup}, provider_settings=fallback_settings(retries=0))
    )
    fake.enqueue([("error", ProviderError("upstream_unavailable", "down"))])
    backup.enqueue(words("from backup"))
    cid = await new_conversation(client)
    events = await read_events(
        await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "x"})
    )
    status = [e for e in events if e["type"] == "status"]
    assert status and status[0]["state"] == "fallback"
    assert (status[0]["from"], status[0]["to"]) == ("fake", "backup")
    assert text_of(events) == "from backup"
    msg = (await (await client.get(f"/api/v1/conversations/{cid}")).json())["messages"][1]
    assert (msg["provider"], msg["model"], msg["status"]) == ("backup", "b-1", "complete")
