"""The OpenAI-compatible adapter (openai and the deepseek preset): real SDK, fake upstream."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from app.main import create_app
from app.settings import LocalSettings
from providers.base import (
    ChatMessage,
    Finish,
    GenerateOptions,
    Provider,
    ProviderError,
    ReasoningDelta,
    TextDelta,
    Usage,
)
from providers.local import LocalProvider
from tests.conftest import make_settings
from tests.helpers import no_free_descriptors
from tests.upstreams import OpenAIFake, Plan, wait_for
from tests.upstreams.kit import DEEPSEEK, OPENAI, build, collect, provider_settings, read_sse

Server = Callable[[web.Application], Awaitable[TestServer]]


@pytest.fixture
async def fake_server(aiohttp_server: Server) -> tuple[OpenAIFake, TestServer]:
    """A fake OpenAI server on loopback."""
    fake = OpenAIFake(key=OPENAI.key)
    return fake, await aiohttp_server(fake.app())


@pytest.fixture
async def provider(fake_server: tuple[OpenAIFake, TestServer]) -> AsyncIterator[Provider]:
    """The openai adapter pointed at the fake."""
    p = build(provider_settings(OPENAI, str(fake_server[1].make_url("/"))))
    yield p
    await p.aclose()


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
async def test_frames_split_at_awkward_boundaries(
    fake_server: tuple[OpenAIFake, TestServer], provider: Provider, chunk: int
) -> None:
    """Pieces of 1, 3, 7 and 64 bytes cut `data: `, JSON, `\\n\\n` and characters apart."""
    fake, _ = fake_server
    text = ("Hé", "llo,\n\n", "data: x", " wörld 🙂")
    fake.enqueue(Plan(text=text, chunk=chunk, split_pause=0.001 if chunk > 2 else 0.0))
    events = await collect(provider, OPENAI.model)
    assert events == [
        *(TextDelta(t) for t in text),
        Finish("stop"),
        Usage(11, 4),
    ]


async def test_request_asks_for_usage_and_carries_the_prompt(
    fake_server: tuple[OpenAIFake, TestServer], provider: Provider
) -> None:
    fake, _ = fake_server
    messages = [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Hi"),
        ChatMessage("assistant", "Hello"),
        ChatMessage("user", "Again"),
    ]
    await collect(provider, OPENAI.model, messages, GenerateOptions(temperature=0.2, max_tokens=9))
    body = fake.records[0].body
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["model"] == OPENAI.model
    assert body["messages"] == [{"role": m.role, "content": m.content} for m in messages]
    assert body["temperature"] == 0.2 and body["max_tokens"] == 9
    assert fake.records[0].headers["Authorization"] == f"Bearer {OPENAI.key}"
    # the SDK's platform and attempt headers stay home: the provider learns no OS,
    # architecture or Python version (and the open request holds 8 headers fewer)
    sent = {name.lower() for name in fake.records[0].headers}
    assert not {name for name in sent if name.startswith("x-stainless")}, sent
    assert {"authorization", "content-type", "user-agent"} <= sent


async def test_closing_the_stream_closes_the_upstream_connection(
    fake_server: tuple[OpenAIFake, TestServer], provider: Provider
) -> None:
    fake, _ = fake_server
    fake.enqueue(Plan(text=tuple(f"t{i} " for i in range(200)), delay=0.01))
    agen = provider.stream([ChatMessage("user", "hi")], OPENAI.model, GenerateOptions())
    assert await anext(agen) == TextDelta("t0 ")  # type: ignore[call-overload]
    t0 = time.monotonic()
    await agen.aclose()  # type: ignore[attr-defined]
    await wait_for(lambda: fake.records[0].disconnected is not None)
    assert (fake.records[0].disconnected or 0) - t0 < 0.5
    assert fake.records[0].frames_sent < 50


async def test_error_object_inside_the_stream(
    fake_server: tuple[OpenAIFake, TestServer], provider: Provider
) -> None:
    fake, _ = fake_server
    fake.enqueue(Plan(stream_error_after=2))
    got: list[Any] = []
    with pytest.raises(ProviderError) as info:
        async for ev in provider.stream(
            [ChatMessage("user", "hi")], OPENAI.model, GenerateOptions()
        ):
            got.append(ev)
    assert got == [TextDelta("Hello"), TextDelta(", ")]
    assert info.value.code == "upstream_unavailable" and info.value.retryable


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [
        (400, "context", "context_length"),
        (400, "filtered", "content_filtered"),
        (503, "overloaded", "overloaded"),
        (402, "quota", "quota_exceeded"),
    ],
)
async def test_status_errors_map_to_codes(
    fake_server: tuple[OpenAIFake, TestServer],
    provider: Provider,
    status: int,
    error: str,
    code: str,
) -> None:
    fake, _ = fake_server
    fake.enqueue(Plan(status=status, error=error))
    with pytest.raises(ProviderError) as info:
        await collect(provider, OPENAI.model)
    assert info.value.code == code


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
async def test_connection_refused_is_upstream_unavailable(
    unused_tcp_port: int, caplog: pytest.LogCaptureFixture, http2: bool
) -> None:
    p = build(provider_settings(OPENAI, f"http://127.0.0.1:{unused_tcp_port}/", http2=http2))
    try:
        with pytest.raises(ProviderError) as info:
            await collect(p, OPENAI.model)
    finally:
        await p.aclose()
    assert info.value.code == "upstream_unavailable"
    assert info.value.message == "Could not reach openai."
    # the operator's log says what happened underneath, without the key
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("openai: connection failed: ") for m in logged), logged
    assert any("refused" in m.lower() or "Connect call failed" in m for m in logged), logged
    assert OPENAI.key not in caplog.text


async def test_out_of_file_descriptors_is_this_servers_fault_not_the_providers(
    fake_server: tuple[OpenAIFake, TestServer], provider: Provider, caplog: pytest.LogCaptureFixture
) -> None:
    """At the open-files limit the SDK cannot open a socket to the provider: the answer
    fails as `overloaded` (retryable, in a while) naming this server, not as the provider
    being unreachable, and the operator's log says which limit to raise, once. The same
    over HTTP/2 (`http2 = true`), in the same burst."""
    over_h2 = build(provider_settings(OPENAI, str(fake_server[1].make_url("/")), http2=True))
    errors = []
    with no_free_descriptors() as lowest_free:
        for p in (provider, provider, over_h2, over_h2):
            with pytest.raises(ProviderError) as info:
                await collect(p, OPENAI.model)
            errors.append(info.value)
    await over_h2.aclose()
    for err in errors:
        assert err.code == "overloaded" and err.retryable and err.retry_after == 5.0
        assert err.message == (
            "This server has too many connections open to reach openai right now. "
            "Try again shortly."
        )
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(logged) == 1, logged  # one line for a burst
    assert logged[0].startswith(
        f"out of file descriptors: this process's open-files limit ({lowest_free})"
    )


# -- DeepSeek: the OpenAI-compatible adapter with reasoning_content ----------------------


async def test_deepseek_reasoning_content_becomes_reasoning(aiohttp_server: Server) -> None:
    fake = OpenAIFake(key=DEEPSEEK.key)
    server = await aiohttp_server(fake.app())
    p = build(provider_settings(DEEPSEEK, str(server.make_url("/"))))
    fake.enqueue(Plan(reasoning=("Think", "ing…"), text=("42",), chunk=4, split_utf8=True))
    try:
        events = await collect(p, DEEPSEEK.model)
    finally:
        await p.aclose()
    assert events == [
        ReasoningDelta("Think"),
        ReasoningDelta("ing…"),
        TextDelta("42"),
        Finish("stop"),
        Usage(11, 4),
    ]
    assert fake.records[0].path == "/chat/completions"  # DeepSeek's base URL has no /v1


async def test_deepseek_reasoning_is_stored_apart_and_never_sent_back(
    aiohttp_server: Server,
    aiohttp_client: Callable[[web.Application], Awaitable[TestClient[Any, Any]]],
    db_path: str,
) -> None:
    fake = OpenAIFake(key=DEEPSEEK.key)
    server = await aiohttp_server(fake.app())
    ps = provider_settings(DEEPSEEK, str(server.make_url("/")))
    settings = make_settings(db_path, providers={"deepseek": ps}, default_provider="deepseek")
    client = await aiohttp_client(create_app(settings))
    fake.enqueue(Plan(reasoning=("SECRET-THOUGHT ", "more"), text=("The answer.",)), Plan())
    conv = await (await client.post("/api/v1/conversations", json={})).json()
    url = f"/api/v1/conversations/{conv['id']}/stream"
    events = await read_sse(await client.post(url, json={"content": "q1"}))
    assert [e["content"] for e in events if e["type"] == "reasoning"] == ["SECRET-THOUGHT ", "more"]
    assert [e["content"] for e in events if e["type"] == "chunk"] == ["The answer."]
    stored = await (await client.get(f"/api/v1/conversations/{conv['id']}")).json()
    answer = stored["messages"][-1]
    assert answer["content"] == "The answer."
    assert answer["reasoning"] == "SECRET-THOUGHT more"
    await read_sse(await client.post(url, json={"content": "q2"}))
    second = fake.records[1].body["messages"]
    assert second == [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "The answer."},
        {"role": "user", "content": "q2"},
    ]
    assert "SECRET-THOUGHT" not in repr(fake.records[1].body)


async def test_local_adapter_opens_a_connection_per_request(
    fake_server: tuple[OpenAIFake, TestServer], provider: Provider
) -> None:
    """The openai adapter keeps its connection alive; the local one (llama.cpp in-process,
    which may close an idle connection as it is reused) opens a new one each time."""
    fake, server = fake_server
    settings = provider_settings(OPENAI, str(server.make_url("/")), name="local", kind="local")
    local = LocalProvider(settings, str(server.make_url("")).rstrip("/"), LocalSettings())
    try:
        for p in (provider, provider, provider, local, local, local):
            fake.enqueue(Plan(text=("hi",)))
            assert TextDelta("hi") in await collect(p, OPENAI.model)
    finally:
        await local.aclose()
    kept, fresh = [r.peer for r in fake.records[:3]], [r.peer for r in fake.records[3:]]
    assert None not in kept + fresh
    assert len(set(kept)) == 1  # one keep-alive connection for three requests
    assert len(set(fresh)) == 3 and not set(fresh) & set(kept)
