"""The Anthropic adapter: the real anthropic SDK against a fake /v1/messages event stream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from app.main import create_app
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
from tests.conftest import make_settings
from tests.upstreams import AnthropicFake, Plan, wait_for
from tests.upstreams.kit import ANTHROPIC, build, collect, provider_settings, read_sse

Server = Callable[[web.Application], Awaitable[TestServer]]


@pytest.fixture
async def fake_server(aiohttp_server: Server) -> tuple[AnthropicFake, TestServer]:
    """A fake Anthropic API on loopback."""
    fake = AnthropicFake(key=ANTHROPIC.key, models=(ANTHROPIC.model,))
    return fake, await aiohttp_server(fake.app())


@pytest.fixture
async def provider(fake_server: tuple[AnthropicFake, TestServer]) -> AsyncIterator[Provider]:
    """The anthropic adapter pointed at the fake."""
    p = build(provider_settings(ANTHROPIC, str(fake_server[1].make_url("/"))))
    yield p
    await p.aclose()


async def test_typed_events_with_ping_and_unknown_types(
    fake_server: tuple[AnthropicFake, TestServer], provider: Provider
) -> None:
    """The fake sends ping twice and an event type the SDK has never heard of."""
    fake, _ = fake_server
    fake.enqueue(Plan(reasoning=("so",), text=("Hé", "llo 🙂"), chunk=6, split_utf8=True))
    events = await collect(provider, ANTHROPIC.model)
    assert events == [
        ReasoningDelta("so"),
        TextDelta("Hé"),
        TextDelta("llo 🙂"),
        Usage(11, 4),
        Finish("stop"),
    ]


async def test_system_prompt_goes_to_system_and_turns_alternate(
    fake_server: tuple[AnthropicFake, TestServer], provider: Provider
) -> None:
    fake, _ = fake_server
    messages = [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Hi"),
        ChatMessage("user", "Anyone?"),  # an answer in between was empty and skipped
        ChatMessage("assistant", "Hello"),
        ChatMessage("user", "Again"),
    ]
    await collect(provider, ANTHROPIC.model, messages, GenerateOptions(stop=("END",)))
    body = fake.records[0].body
    assert body["system"] == "Be brief."
    assert body["messages"] == [
        {"role": "user", "content": "Hi\n\nAnyone?"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Again"},
    ]
    assert body["max_tokens"] == 4096 and body["stream"] is True
    assert body["stop_sequences"] == ["END"]


async def test_prefill_continues_a_trailing_assistant_turn(
    fake_server: tuple[AnthropicFake, TestServer], provider: Provider
) -> None:
    fake, _ = fake_server
    await collect(
        provider,
        ANTHROPIC.model,
        [ChatMessage("user", "Tell a story")],
        GenerateOptions(prefill="Once upon a time "),
    )
    assert fake.records[0].body["messages"][-1] == {
        "role": "assistant",
        "content": "Once upon a time",  # the API rejects trailing whitespace here
    }


async def test_overloaded_error_event_mid_stream(
    fake_server: tuple[AnthropicFake, TestServer], provider: Provider
) -> None:
    fake, _ = fake_server
    fake.enqueue(Plan(stream_error_after=2))
    got: list[Any] = []
    with pytest.raises(ProviderError) as info:
        async for ev in provider.stream(
            [ChatMessage("user", "x")], ANTHROPIC.model, GenerateOptions()
        ):
            got.append(ev)
    assert got == [TextDelta("Hello"), TextDelta(", ")]
    assert info.value.code == "overloaded" and info.value.retryable is True
    assert info.value.message == "anthropic is overloaded right now. Try again shortly."


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [
        (529, "overloaded", "overloaded"),
        (400, "credit", "quota_exceeded"),
        (400, "context", "context_length"),
        (500, "server", "upstream_unavailable"),
    ],
)
async def test_status_errors_map_to_codes(
    fake_server: tuple[AnthropicFake, TestServer],
    provider: Provider,
    status: int,
    error: str,
    code: str,
) -> None:
    fake, _ = fake_server
    fake.enqueue(Plan(status=status, error=error))
    with pytest.raises(ProviderError) as info:
        await collect(provider, ANTHROPIC.model)
    assert info.value.code == code
    assert len(fake.records) == 1  # the SDK's own retries are off


async def test_refusal_is_content_filtered(
    fake_server: tuple[AnthropicFake, TestServer], provider: Provider
) -> None:
    fake, _ = fake_server
    fake.enqueue(Plan(text=("I",), finish="filtered"))
    with pytest.raises(ProviderError) as info:
        await collect(provider, ANTHROPIC.model)
    assert info.value.code == "content_filtered"


async def test_closing_the_stream_closes_the_upstream_connection(
    fake_server: tuple[AnthropicFake, TestServer], provider: Provider
) -> None:
    fake, _ = fake_server
    fake.enqueue(Plan(text=tuple(f"t{i} " for i in range(200)), delay=0.01))
    agen = provider.stream([ChatMessage("user", "hi")], ANTHROPIC.model, GenerateOptions())
    assert await anext(agen) == TextDelta("t0 ")  # type: ignore[call-overload]
    t0 = time.monotonic()
    await agen.aclose()  # type: ignore[attr-defined]
    await wait_for(lambda: fake.records[0].disconnected is not None)
    assert (fake.records[0].disconnected or 0) - t0 < 0.5


async def test_overloaded_before_first_token_is_retried_after_it_is_not(
    aiohttp_server: Server,
    aiohttp_client: Callable[[web.Application], Awaitable[TestClient[Any, Any]]],
    db_path: str,
) -> None:
    """Through the app: the same overloaded event is retried only while nothing went out."""
    fake = AnthropicFake(key=ANTHROPIC.key)
    server = await aiohttp_server(fake.app())
    ps = provider_settings(ANTHROPIC, str(server.make_url("/")))
    settings = make_settings(db_path, providers={"anthropic": ps}, default_provider="anthropic")
    client = await aiohttp_client(create_app(settings))
    conv = await (await client.post("/api/v1/conversations", json={})).json()
    url = f"/api/v1/conversations/{conv['id']}/stream"

    fake.enqueue(Plan(stream_error_after=0), Plan())
    events = await read_sse(await client.post(url, json={"content": "a"}))
    assert [e["type"] for e in events if e["type"] in ("status", "end", "error")] == [
        "status",
        "end",
    ]
    assert len(fake.records) == 2

    fake.enqueue(Plan(stream_error_after=2), Plan())
    events = await read_sse(await client.post(url, json={"content": "b"}))
    assert events[-1]["type"] == "error" and events[-1]["code"] == "overloaded"
    assert [e["type"] for e in events].count("error") == 1
    assert "status" not in [e["type"] for e in events]
    assert len(fake.records) == 3
    stored = await (await client.get(f"/api/v1/conversations/{conv['id']}")).json()
    assert stored["messages"][-1]["status"] == "failed"
    assert stored["messages"][-1]["content"] == "Hello, "
