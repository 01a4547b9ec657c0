"""A canary provider key never shows in a response, a log line, the page or the database.

The fake upstream below is the worst case: it echoes the key it was sent into its error
bodies and headers (as real APIs do: "Incorrect API key provided: sk-..."), answers
401/429/500, sends garbage instead of a stream, or drops the connection mid-answer.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from app.limits import UNLIMITED
from app.main import create_app
from app.settings import ProviderSettings, Secret
from tests.conftest import make_settings
from tests.helpers import new_conversation

CANARIES = {
    "openai": "sk-canary-5d1e8b7a93c04f26b1a8",
    "anthropic": "sk-ant-canary-0c9f7e3b2a6d4e18",
    "gemini": "AIzaCanary3b7e1d9c5a2f4e6b8d0c1a3f5e",
}
MODES = ["401", "429", "500", "400-echo", "garbage", "html", "drop"]


class EchoingUpstream:
    """Answers every request according to `mode`, quoting the key it received."""

    def __init__(self) -> None:
        self.mode = "401"
        self.keys_seen: set[str] = set()

    def _key(self, request: web.Request) -> str:
        auth = request.headers.get("Authorization", "").removeprefix("Bearer ")
        key = (
            auth
            or request.headers.get("x-api-key", "")
            or request.headers.get("x-goog-api-key", "")
            or request.query.get("key", "")
        )
        self.keys_seen.add(key)
        return key

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Every path: the configured failure, with the key in it."""
        key = self._key(request)
        await request.read()
        error = {"error": {"message": f"Incorrect API key provided: {key}", "type": "x"}}
        if self.mode == "401":
            return web.json_response(error, status=401)
        if self.mode == "429":
            error["error"]["message"] = f"Rate limit for key {key}; slow down"
            return web.json_response(error, status=429, headers={"Retry-After": "0"})
        if self.mode == "500":
            return web.Response(status=500, text=f"Traceback: bad key={key} Bearer {key}")
        if self.mode == "400-echo":
            error["error"]["message"] = f"API key not valid. Please pass a valid API key: {key}"
            return web.json_response(error, status=400)
        if self.mode == "html":
            return web.Response(
                text=f"<html>proxy login for {key}</html>", content_type="text/html"
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if self.mode == "garbage":
            await resp.write(f"data: {{not json {key}\n\n".encode() + b"\xff\xfe\x00garbage\n\n")
            return resp
        # drop: half a frame, then the connection goes away
        await resp.write(f'data: {{"choices": [{{"delta": {{"content": "{key}'.encode())
        assert request.transport is not None
        request.transport.close()
        return resp


@pytest.fixture
async def upstream(aiohttp_server: Any) -> tuple[EchoingUpstream, str]:
    """The echoing fake on 127.0.0.1, and its URL."""
    fake = EchoingUpstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    server: TestServer = await aiohttp_server(app, host="127.0.0.1")
    return fake, str(server.make_url("")).rstrip("/")


def _providers(url: str) -> dict[str, ProviderSettings]:
    out = {}
    for kind, canary in CANARIES.items():
        out[kind] = ProviderSettings(
            name=kind,
            kind=kind,
            base_url=url + ("/v1" if kind == "openai" else ""),
            api_key=Secret(canary),
            models=(f"{kind}-model",),
            default_model=f"{kind}-model",
            connect_timeout=2.0,
            first_token_timeout=1.0,
            idle_timeout=0.5,
            total_timeout=5.0,
            retries=0,
        )
    return out


async def _everything(client: TestClient[Any, Any], provider: str) -> list[str]:
    """Drive every path an upstream error can take to a client; return what they saw."""
    seen: list[str] = []
    cid = await new_conversation(client, provider=provider)
    body = {"content": "hello", "provider": provider}
    for path in (f"/api/v1/conversations/{cid}/stream", f"/api/v1/conversations/{cid}/messages"):
        resp = await client.post(path, json=body)
        seen.append(await resp.text())
        seen.append(json.dumps(dict(resp.headers)))
    resp = await client.post(f"/api/v1/conversations/{cid}/regenerate", json={})
    seen.append(await resp.text())
    ws = await client.ws_connect("/ws")
    await ws.send_json({"op": "send", "conversation_id": cid, "content": "again"})
    while True:
        msg = await ws.receive(timeout=10)
        assert msg.type == aiohttp.WSMsgType.TEXT
        seen.append(msg.data)
        if json.loads(msg.data)["type"] in ("end", "error"):
            break
    await ws.close()
    for stream in (False, True):
        resp = await client.post(
            "/v1/chat/completions",
            json={
                "model": f"{provider}/{provider}-model",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": stream,
            },
        )
        seen.append(await resp.text())
    for path in (
        f"/api/v1/conversations/{cid}",
        "/api/v1/conversations",
        "/api/v1/providers",
        "/v1/models",
        "/api/v1/openapi.json",
        "/api/v1/session",
        "/",
    ):
        resp = await client.get(path)
        seen.append(await resp.text())
    return seen


@pytest.mark.parametrize("mode", MODES)
async def test_canary_key_never_leaks(
    aiohttp_client: Any,
    upstream: tuple[EchoingUpstream, str],
    caplog: pytest.LogCaptureFixture,
    db_path: str,
    mode: str,
) -> None:
    fake, url = upstream
    fake.mode = mode
    caplog.set_level(logging.DEBUG)  # the strictest case: every logger, every level
    settings = make_settings(db_path, providers=_providers(url), limits=UNLIMITED)
    client = await aiohttp_client(create_app(settings))
    seen: list[str] = []
    for provider in CANARIES:
        seen += await _everything(client, provider)
    await client.close()

    assert {c for c in CANARIES.values() if c in fake.keys_seen} == set(CANARIES.values())
    everything = "\n".join(seen)
    assert "error" in everything  # the failures did reach the clients...
    with sqlite3.connect(db_path) as db:
        stored = "\n".join(db.iterdump())
    logs = caplog.text + "\n".join(str(r.args) for r in caplog.records)
    for canary in CANARIES.values():
        assert canary not in everything  # ...without the key
        assert canary not in logs
        assert canary not in stored
        assert canary[:12] not in everything + logs + stored  # not even a recognisable part


async def test_a_request_cannot_choose_where_the_key_is_sent(
    aiohttp_client: Any, make_app: Any
) -> None:
    client = await aiohttp_client(make_app())
    cid = await new_conversation(client)
    url = "http://127.0.0.1:9/steal"
    for path, body, field in (
        (f"/api/v1/conversations/{cid}/stream", {"content": "x", "base_url": url}, "base_url"),
        (
            f"/api/v1/conversations/{cid}/stream",
            {"content": "x", "options": {"base_url": url}},
            "options.base_url",
        ),
        ("/api/v1/conversations", {"base_url": url}, "base_url"),
        (
            "/v1/chat/completions",
            {"model": "fake-1", "messages": [{"role": "user", "content": "x"}], "base_url": url},
            "base_url",
        ),
    ):
        resp = await client.post(path, json=body)
        assert resp.status == 400, path
        error = (await resp.json())["error"]
        assert error.get("field", error.get("param")) == field  # OpenAI's shape under /v1/
