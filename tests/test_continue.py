"""Continue after a crash (fake provider), and continue with the real local model."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from app.keys import STORE
from app.settings import LocalSettings
from app.settings_load import LOCAL_PROVIDER
from tests.fakes import ScriptedProvider, words
from tests.helpers import new_conversation, read_events, text_of


async def test_continue_after_a_crash(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider, db_path: str
) -> None:
    client = await aiohttp_client(make_app())
    cid = await new_conversation(client)
    store = client.app[STORE]
    mid = (
        await store.start_exchange(
            "local", cid, content="count", choose=lambda _: ("fake", "fake-1")
        )
    ).message_id
    await store.flush_contents([("one two ", "", mid)])  # the last flush before the crash
    await client.close()
    with sqlite3.connect(db_path) as raw:  # as if killed: the row is still 'streaming'
        raw.execute("UPDATE messages SET status = 'streaming' WHERE id = ?", (mid,))
    client = await aiohttp_client(make_app())
    # a client that was attached resumes: saved text and a terminal `interrupted` error
    replay = await read_events(
        await client.get(f"/api/v1/conversations/{cid}/messages/{mid}/stream?after=5")
    )
    assert text_of(replay) == "one two "
    assert replay[-1]["type"] == "error" and replay[-1]["code"] == "interrupted"
    fake.enqueue(words("three four"))
    events = await read_events(
        await client.post(f"/api/v1/conversations/{cid}/messages/{mid}/continue")
    )
    assert text_of(events) == "three four"
    conv = await (await client.get(f"/api/v1/conversations/{cid}")).json()
    msg = conv["messages"][1]
    assert (msg["content"], msg["status"]) == ("one two three four", "complete")
    assert fake.calls[0].options.prefill == "one two "


@pytest.mark.local_model
async def test_continue_with_the_local_model(
    aiohttp_client: Any, make_app: Any, db_path: str
) -> None:
    client = await aiohttp_client(
        make_app(
            provider_settings={"local": LOCAL_PROVIDER},
            default_provider="local",
            local=LocalSettings(enabled=True, parallel=1, n_ctx=1024, threads=2),
        )
    )
    cid = await new_conversation(client)
    prompt = {
        "content": "List the planets of the solar system.",
        "options": {"max_tokens": 6, "temperature": 0},
    }
    first = await read_events(await client.post(f"/api/v1/conversations/{cid}/stream", json=prompt))
    assert first[-1]["type"] == "end" and first[-1]["finish_reason"] == "length"
    part = text_of(first)
    assert part
    # a length-limited answer is complete; make it continuable the way a crash would.
    # Through the app's own connection: the server may still be writing (usage) just
    # after the end event, and a second connection's deferred write can get SQLITE_BUSY.
    db = client.app[STORE].db
    await db.execute("UPDATE messages SET status = 'interrupted' WHERE role = 'assistant'")
    await db.commit()
    mid = first[0]["message_id"]
    more = await read_events(
        await client.post(
            f"/api/v1/conversations/{cid}/messages/{mid}/continue",
            json={"options": {"max_tokens": 12, "temperature": 0}},
        )
    )
    assert more[0]["continued"] is True and more[-1]["type"] == "end"
    added = text_of(more)
    assert added and not added.startswith(part)  # true prefill: only the new text streams
    conv = await (await client.get(f"/api/v1/conversations/{cid}")).json()
    assert conv["messages"][1]["content"] == part + added
