"""The Gemini adapter: the real google-genai SDK against a fake streamGenerateContent."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

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
from tests.upstreams import GeminiFake, Plan, wait_for
from tests.upstreams.kit import GEMINI, build, collect, provider_settings

Server = Callable[[web.Application], Awaitable[TestServer]]


@pytest.fixture
async def fake_server(aiohttp_server: Server) -> tuple[GeminiFake, TestServer]:
    """A fake Gemini API on loopback."""
    fake = GeminiFake(key=GEMINI.key, models=(GEMINI.model,))
    return fake, await aiohttp_server(fake.app())


@pytest.fixture
async def provider(fake_server: tuple[GeminiFake, TestServer]) -> AsyncIterator[Provider]:
    """The gemini adapter pointed at the fake."""
    p = build(provider_settings(GEMINI, str(fake_server[1].make_url("/"))))
    yield p
    await p.aclose()


async def test_stream_and_request_shape(
    fake_server: tuple[GeminiFake, TestServer], provider: Provider
) -> None:
    fake, _ = fake_server
    fake.enqueue(Plan(reasoning=("hmm",), text=("Hé", "llo 🙂"), chunk=7, split_utf8=True))
    messages = [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Hi"),
        ChatMessage("assistant", "Hello"),
        ChatMessage("user", "Again"),
    ]
    events = await collect(
        provider, GEMINI.model, messages, GenerateOptions(temperature=0.5, max_tokens=20)
    )
    assert events == [
        ReasoningDelta("hmm"),
        TextDelta("Hé"),
        TextDelta("llo 🙂"),
        Usage(11, 4),
        Finish("stop"),
    ]
    rec = fake.records[0]
    # the API version in the path depends on the SDK release (v1 for google-genai 3.x)
    assert rec.path.endswith(f"/models/{GEMINI.model}:streamGenerateContent")
    assert rec.query == {"alt": "sse"}
    assert rec.headers["x-goog-api-key"] == GEMINI.key
    assert "key" not in rec.query  # the key travels in a header, not the URL
    assert rec.body["systemInstruction"]["parts"] == [{"text": "Be brief."}]
    assert [(c["role"], c["parts"][0]["text"]) for c in rec.body["contents"]] == [
        ("user", "Hi"),
        ("model", "Hello"),
        ("user", "Again"),
    ]
    assert rec.body["generationConfig"]["temperature"] == 0.5
    assert rec.body["generationConfig"]["maxOutputTokens"] == 20


async def test_blocked_prompt_is_content_filtered(
    fake_server: tuple[GeminiFake, TestServer], provider: Provider
) -> None:
    fake, _ = fake_server
    fake.enqueue(Plan(prompt_blocked=True))
    with pytest.raises(ProviderError) as info:
        await collect(provider, GEMINI.model)
    assert info.value.code == "content_filtered" and not info.value.retryable
    assert info.value.message == "gemini blocked this prompt under its content policy."


async def test_safety_stop_keeps_what_came_before(
    fake_server: tuple[GeminiFake, TestServer], provider: Provider
) -> None:
    fake, _ = fake_server
    fake.enqueue(Plan(text=("Once", " upon"), finish="filtered"))  # SAFETY on " upon"
    got = []
    with pytest.raises(ProviderError) as info:
        async for ev in provider.stream(
            [ChatMessage("user", "x")], GEMINI.model, GenerateOptions()
        ):
            got.append(ev)
    assert got == [TextDelta("Once"), TextDelta(" upon")]
    assert info.value.code == "content_filtered"


@pytest.mark.parametrize(
    ("status", "error", "code", "retry_after"),
    [
        (400, "auth", "auth", None),  # Gemini answers a bad key with 400 API_KEY_INVALID
        (401, "unauthenticated", "auth", None),
        (429, "rate_limit", "rate_limited", 2.5),  # RetryInfo.retryDelay
        (429, "quota", "quota_exceeded", None),
        (503, "overloaded", "overloaded", None),
        (400, "context", "context_length", None),
        (500, "server", "upstream_unavailable", None),
    ],
)
async def test_status_errors_map_to_codes(
    fake_server: tuple[GeminiFake, TestServer],
    provider: Provider,
    status: int,
    error: str,
    code: str,
    retry_after: float | None,
) -> None:
    fake, _ = fake_server
    fake.enqueue(Plan(status=status, error=error, retry_after="2.5"))
    with pytest.raises(ProviderError) as info:
        await collect(provider, GEMINI.model)
    assert info.value.code == code
    assert info.value.retry_after == retry_after
    assert len(fake.records) == 1  # the SDK's own retries are off


async def test_error_inside_the_stream(
    fake_server: tuple[GeminiFake, TestServer], provider: Provider
) -> None:
    fake, _ = fake_server
    fake.enqueue(Plan(stream_error_after=1))
    with pytest.raises(ProviderError) as info:
        await collect(provider, GEMINI.model)
    assert info.value.code == "upstream_unavailable"


async def test_key_in_error_text_and_url_is_scrubbed(
    fake_server: tuple[GeminiFake, TestServer], provider: Provider
) -> None:
    fake, _ = fake_server
    fake.enqueue(Plan(status=400, error="echo"))
    with pytest.raises(ProviderError) as info:
        await collect(provider, GEMINI.model)
    assert info.value.code == "bad_request"
    assert GEMINI.key not in info.value.message
    assert "key=***" in info.value.message


async def test_closing_the_stream_at_a_yield_closes_the_upstream(
    fake_server: tuple[GeminiFake, TestServer], provider: Provider
) -> None:
    """The SDK's nested generators would hold the response; our reader task does not."""
    fake, _ = fake_server
    fake.enqueue(Plan(text=tuple(f"t{i} " for i in range(200)), delay=0.01))
    agen = provider.stream([ChatMessage("user", "hi")], GEMINI.model, GenerateOptions())
    assert await anext(agen) == TextDelta("t0 ")  # type: ignore[call-overload]
    t0 = time.monotonic()
    await agen.aclose()  # type: ignore[attr-defined]
    await wait_for(lambda: fake.records[0].disconnected is not None)
    assert (fake.records[0].disconnected or 0) - t0 < 0.5
    assert fake.records[0].frames_sent < 50
