"""REST API: conversations CRUD, pagination, and precise errors that store nothing."""

from __future__ import annotations

import io
import sqlite3
from typing import Any

from aiohttp.test_utils import TestClient

from tests.fakes import ScriptedProvider
from tests.helpers import new_conversation, read_events


async def test_conversation_crud_and_pagination(client: TestClient[Any, Any]) -> None:
    ids = [await new_conversation(client, title=f"c{i}") for i in range(5)]
    page1 = await (await client.get("/api/v1/conversations?limit=2")).json()
    assert [c["id"] for c in page1["conversations"]] == ids[::-1][:2]
    assert page1["next_offset"] == 2
    page3 = await (await client.get("/api/v1/conversations?limit=2&offset=4")).json()
    assert [c["id"] for c in page3["conversations"]] == [ids[0]] and page3["next_offset"] is None
    resp = await client.patch(f"/api/v1/conversations/{ids[0]}", json={"title": "renamed"})
    assert resp.status == 200 and (await resp.json())["title"] == "renamed"
    first = await (await client.get("/api/v1/conversations?limit=1")).json()
    assert first["conversations"][0]["id"] == ids[-1]  # renaming does not reorder
    assert (await client.delete(f"/api/v1/conversations/{ids[0]}")).status == 204
    assert (await client.get(f"/api/v1/conversations/{ids[0]}")).status == 404


async def test_bad_input_statuses_and_messages(client: TestClient[Any, Any], db_path: str) -> None:
    cid = await new_conversation(client)
    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("POST", f"/api/v1/conversations/{cid}/stream", {"data": "x"}, 415, "application/json"),
        (
            "POST",
            f"/api/v1/conversations/{cid}/stream",
            {"data": "{", "ct": 1},
            400,
            "not valid JSON",
        ),
        ("POST", f"/api/v1/conversations/{cid}/stream", {"json": []}, 400, "JSON object"),
        ("POST", f"/api/v1/conversations/{cid}/stream", {"json": {}}, 400, "'content' is required"),
        ("POST", f"/api/v1/conversations/{cid}/stream", {"json": {"content": " "}}, 400, "empty"),
        (
            "POST",
            f"/api/v1/conversations/{cid}/stream",
            {"json": {"content": "x", "x": 1}},
            400,
            "Unknown field 'x'",
        ),
        (
            "POST",
            f"/api/v1/conversations/{cid}/stream",
            {"json": {"content": "x", "options": {"temperature": 9}}},
            400,
            "options.temperature",
        ),
        (
            "POST",
            f"/api/v1/conversations/{cid}/stream",
            {"json": {"content": "x", "provider": "nope"}},
            400,
            "Unknown provider",
        ),
        (
            "POST",
            "/api/v1/conversations/zzz/stream",
            {"json": {"content": "x"}},
            404,
            "No such conversation",
        ),
        (
            "POST",
            f"/api/v1/conversations/{'0' * 32}/stream",
            {"json": {"content": "x"}},
            404,
            "No such",
        ),
        (
            "GET",
            f"/api/v1/conversations/{cid}/messages/{'0' * 32}/stream",
            {},
            404,
            "No such message",
        ),
        (
            "GET",
            f"/api/v1/conversations/{cid}/messages/{'0' * 32}/stream?after=x",
            {},
            400,
            "integer",
        ),
        (
            "POST",
            f"/api/v1/conversations/{cid}/messages/{'0' * 32}/cancel",
            {},
            404,
            "No such message",
        ),
        ("PATCH", f"/api/v1/conversations/{cid}", {"json": {}}, 400, "Nothing to change"),
        (
            "PATCH",
            f"/api/v1/conversations/{cid}",
            {"json": {"title": 5}},
            400,
            "'title' must be a string",
        ),
        ("GET", "/api/v1/conversations?limit=0", {}, 400, "'limit'"),
        ("POST", f"/api/v1/conversations/{cid}/stream", {"big": 1}, 413, "too large"),
        ("GET", "/api/v1/nothing-here", {}, 404, ""),
    ]
    for method, url, kw, status, needle in cases:
        if "big" in kw:
            big = b'{"content": "' + b"x" * 1_200_000 + b'"}'
            kw = {"data": io.BytesIO(big), "headers": {"Content-Type": "application/json"}}
        if "ct" in kw:
            kw = {"data": kw["data"], "headers": {"Content-Type": "application/json"}}
        resp = await client.request(method, url, **kw)
        body = await resp.text()
        assert resp.status == status, (method, url, resp.status, body)
        assert resp.content_type == "application/json", body
        assert needle in body, (needle, body)
        assert "Traceback" not in body
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("SELECT COUNT(*) FROM messages").fetchone() == (0,)


async def test_providers_and_health(client: TestClient[Any, Any]) -> None:
    body = await (await client.get("/api/v1/providers")).json()
    assert body["default"] == "fake"
    fake = next(p for p in body["providers"] if p["name"] == "fake")
    assert fake["available"] and fake["models"] == ["fake-1", "fake-2"]
    assert (await client.get("/api/v1/healthz")).status == 200


async def test_model_choice_is_passed_and_stored(
    client: TestClient[Any, Any], fake: ScriptedProvider
) -> None:
    cid = await new_conversation(client, provider="fake", model="fake-2")
    events = await read_events(
        await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "x"})
    )
    assert events[0]["model"] == "fake-2" and fake.calls[0].model == "fake-2"


async def test_security_headers_on_page_and_api(client: TestClient[Any, Any]) -> None:
    for path in ("/", "/api/v1/healthz"):
        resp = await client.get(path)
        assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Server"] == "streamchat"
