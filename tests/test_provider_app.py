"""Every provider through the whole app: real SDK -> fake upstream, events on the SSE wire.

Each test runs for openai, deepseek, gemini and anthropic. The registry builds the real
adapter from ProviderSettings pointing at a fake upstream on loopback; nothing of ours is
patched. Timeouts are short so the failure cases stay fast.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from app.main import create_app
from tests.conftest import make_settings
from tests.upstreams import FakeUpstream, Plan, wait_for
from tests.upstreams.kit import ALL, Kind, next_event, provider_settings, read_sse

Client = TestClient[Any, Any]
Upstream = tuple[Kind, FakeUpstream, TestServer]

# cancel -> upstream disconnect latencies measured here, by provider (reported at the end)
CANCEL_LATENCY_MS: dict[str, float] = {}


@pytest.fixture(params=ALL, ids=lambda k: k.name)
async def upstream(
    request: pytest.FixtureRequest,
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]],
) -> Upstream:
    """A fake upstream of the parametrized provider, running on loopback."""
    kind: Kind = request.param
    fake = kind.fake(key=kind.key, models=(kind.model,))
    server = await aiohttp_server(fake.app())
    return kind, fake, server


@pytest.fixture
def start(
    upstream: Upstream,
    db_path: str,
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
) -> Callable[..., Awaitable[Client]]:
    """Start the app with the provider under test as the default (settings overridable)."""

    async def go(**overrides: Any) -> Client:
        kind, _, server = upstream
        ps = provider_settings(kind, str(server.make_url("/")), **overrides)
        settings = make_settings(
            db_path,
            providers={kind.name: ps},
            default_provider=kind.name,
            streaming={"flush_interval": 0.05},
        )
        return await aiohttp_client(create_app(settings))

    return go


async def send(
    client: Client, content: str = "hi", **extra: Any
) -> tuple[str, list[dict[str, Any]]]:
    """Create a conversation, stream one answer; (conversation id, events)."""
    conv = await (await client.post("/api/v1/conversations", json={})).json()
    resp = await client.post(
        f"/api/v1/conversations/{conv['id']}/stream", json={"content": content, **extra}
    )
    assert resp.status == 200, await resp.text()
    return conv["id"], await read_sse(resp)


async def saved_answer(client: Client, cid: str) -> dict[str, Any]:
    """The stored assistant message of a conversation."""
    conv = await (await client.get(f"/api/v1/conversations/{cid}")).json()
    answer: dict[str, Any] = conv["messages"][-1]
    assert answer["role"] == "assistant"
    return answer


def text_of(events: list[dict[str, Any]]) -> str:
    """The answer text carried by chunk events."""
    return "".join(e["content"] for e in events if e["type"] == "chunk")


def terminal(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The one terminal event, checked to be the last and the only one."""
    ends = [e for e in events if e["type"] in ("end", "error")]
    assert len(ends) == 1, events
    assert events[-1] is ends[0]
    return ends[0]


async def test_normal_stream_with_usage(upstream: Upstream, start: Any) -> None:
    kind, fake, _ = upstream
    client = await start()
    cid, events = await send(client)
    assert [e["type"] for e in events] == ["start"] + ["chunk"] * 4 + ["end"]
    assert text_of(events) == "Hello, world!"
    end = terminal(events)
    assert end["status"] == "complete"
    assert end["finish_reason"] == "stop"
    assert end["usage"] == {"prompt_tokens": 11, "completion_tokens": 4}
    answer = await saved_answer(client, cid)
    assert answer["status"] == "complete"
    assert answer["content"] == "Hello, world!"
    assert answer["usage"] == {"prompt_tokens": 11, "completion_tokens": 4}
    assert answer["provider"] == kind.name and answer["model"] == kind.model
    assert len(fake.records) == 1


async def test_auth_failure_is_not_retried(upstream: Upstream, start: Any) -> None:
    _, fake, _ = upstream
    fake.key = "the-right-key"  # the configured one is wrong now
    client = await start()
    cid, events = await send(client)
    err = terminal(events)
    assert err["type"] == "error"
    assert err["code"] == "auth" and err["retryable"] is False
    assert "rejected the API key" in err["message"]
    assert len(fake.records) == 1
    answer = await saved_answer(client, cid)
    assert answer["status"] == "failed"
    assert answer["error"]["code"] == "auth"


async def test_rate_limit_retry_after_then_success(upstream: Upstream, start: Any) -> None:
    _, fake, _ = upstream
    fake.enqueue(Plan(status=429, error="rate_limit", retry_after="1"), Plan())
    client = await start()
    _, events = await send(client)
    status = [e for e in events if e["type"] == "status"]
    assert len(status) == 1
    assert status[0]["state"] == "retrying" and status[0]["code"] == "rate_limited"
    assert status[0]["delay"] == 1.0
    assert terminal(events)["type"] == "end"
    assert text_of(events) == "Hello, world!"
    assert len(fake.records) == 2
    gap = fake.records[1].started - fake.records[0].started
    assert 0.95 <= gap < 2.0, gap  # Retry-After honoured, not the short backoff


async def test_server_error_then_success(upstream: Upstream, start: Any) -> None:
    _, fake, _ = upstream
    fake.enqueue(Plan(status=500, error="server"), Plan())
    client = await start()
    cid, events = await send(client)
    status = [e for e in events if e["type"] == "status"]
    assert [s["code"] for s in status] == ["upstream_unavailable"]
    assert terminal(events)["type"] == "end"
    assert len(fake.records) == 2
    assert (await saved_answer(client, cid))["content"] == "Hello, world!"


async def test_quota_exhausted_is_final(upstream: Upstream, start: Any) -> None:
    _, fake, _ = upstream
    fake.enqueue(Plan(status=429, error="quota"))
    client = await start()
    _, events = await send(client)
    err = terminal(events)
    assert err["code"] == "quota_exceeded" and err["retryable"] is False
    assert "quota" in err["message"]
    assert len(fake.records) == 1


async def test_hang_before_first_token_times_out(upstream: Upstream, start: Any) -> None:
    _, fake, _ = upstream
    fake.enqueue(Plan(hang=True))
    client = await start(first_token_timeout=0.3, retries=0)
    t0 = time.monotonic()
    cid, events = await send(client)
    elapsed = time.monotonic() - t0
    err = terminal(events)
    assert err["code"] == "timeout" and err["retryable"] is True
    assert err["message"] == "The model did not start answering within 0.3 s."
    assert 0.3 <= elapsed < 1.5
    # giving up closed the upstream request
    await wait_for(lambda: fake.records[0].disconnected is not None)
    assert (await saved_answer(client, cid))["status"] == "failed"


async def test_hang_before_headers_times_out(upstream: Upstream, start: Any) -> None:
    _, fake, _ = upstream
    fake.enqueue(Plan(hang_before_headers=True))
    client = await start(first_token_timeout=0.3, retries=0)
    _, events = await send(client)
    assert terminal(events)["code"] == "timeout"
    await wait_for(lambda: fake.records[0].disconnected is not None)


async def test_stall_mid_stream_keeps_partial(upstream: Upstream, start: Any) -> None:
    _, fake, _ = upstream
    fake.enqueue(Plan(stall_after=2))
    client = await start(idle_timeout=0.3)
    cid, events = await send(client)
    assert text_of(events) == "Hello, "
    err = terminal(events)
    assert err["code"] == "timeout" and err["status"] == "failed"
    assert err["message"] == "The model stopped sending for more than 0.3 s."
    assert len(fake.records) == 1  # tokens went out: never retried
    await wait_for(lambda: fake.records[0].disconnected is not None)
    answer = await saved_answer(client, cid)
    assert answer["status"] == "failed"
    assert answer["content"] == "Hello, "
    assert answer["error"]["code"] == "timeout"


async def test_steady_tokens_outlast_the_idle_timeout(upstream: Upstream, start: Any) -> None:
    """The idle deadline moves with every token: an answer longer than it is not cut."""
    _, fake, _ = upstream
    words = tuple(f"w{i} " for i in range(12))
    fake.enqueue(Plan(text=words, delay=0.05))  # 12 tokens 0.05 s apart: ~0.6 s in all
    client = await start(idle_timeout=0.2, first_token_timeout=0.2, retries=0)
    cid, events = await send(client)
    end = terminal(events)
    assert end["type"] == "end" and end["status"] == "complete", end
    assert text_of(events) == "".join(words)
    assert (await saved_answer(client, cid))["content"] == "".join(words)


async def test_connection_reset_mid_stream_keeps_partial(upstream: Upstream, start: Any) -> None:
    kind, fake, _ = upstream
    fake.enqueue(Plan(reset_after=2, delay=0.01))
    client = await start()
    cid, events = await send(client)
    assert text_of(events) == "Hello, "
    err = terminal(events)
    assert err["code"] == "upstream_unavailable" and err["retryable"] is True
    assert err["message"] == (
        f"The connection to {kind.name} broke off in the middle of the answer."
    )
    assert fake.records[0].reset and len(fake.records) == 1
    answer = await saved_answer(client, cid)
    assert answer["status"] == "failed" and answer["content"] == "Hello, "


async def test_content_filtered_mid_answer(upstream: Upstream, start: Any) -> None:
    kind, fake, _ = upstream
    fake.enqueue(Plan(finish="filtered"))
    client = await start()
    cid, events = await send(client)
    err = terminal(events)
    assert err["code"] == "content_filtered" and err["retryable"] is False
    assert err["message"] == f"{kind.name} declined to answer under its content policy."
    answer = await saved_answer(client, cid)
    assert answer["status"] == "failed"
    assert answer["content"] == text_of(events)


async def test_unknown_model(upstream: Upstream, start: Any) -> None:
    kind, fake, _ = upstream
    client = await start()
    _, events = await send(client, model="no-such-model")
    err = terminal(events)
    assert err["code"] == "not_found" and err["retryable"] is False
    assert (
        err["message"]
        == f"{kind.name} does not know the model 'no-such-model'. Pick another model."
    )
    assert len(fake.records) == 1


async def test_multibyte_utf8_split_across_reads(upstream: Upstream, start: Any) -> None:
    _, fake, _ = upstream
    text = ("Grüße ", "🙂", " naïve ", "日本語")
    fake.enqueue(Plan(text=text, split_utf8=True, split_pause=0.01))
    client = await start()
    cid, events = await send(client)
    assert text_of(events) == "".join(text)
    assert "\ufffd" not in text_of(events)
    assert (await saved_answer(client, cid))["content"] == "".join(text)


async def test_cancel_mid_stream_closes_upstream(upstream: Upstream, start: Any) -> None:
    kind, fake, _ = upstream
    fake.enqueue(Plan(text=tuple(f"w{i} " for i in range(100)), delay=0.02))
    client = await start()
    conv = await (await client.post("/api/v1/conversations", json={})).json()
    resp = await client.post(f"/api/v1/conversations/{conv['id']}/stream", json={"content": "go"})
    start_ev = await next_event(resp)
    while (await next_event(resp))["type"] != "chunk":
        pass
    await next_event(resp)
    t0 = time.monotonic()
    cancel = await client.post(
        f"/api/v1/conversations/{conv['id']}/messages/{start_ev['message_id']}/cancel"
    )
    assert cancel.status == 200
    await wait_for(lambda: fake.records[0].disconnected is not None)
    latency = (fake.records[0].disconnected or 0) - t0
    CANCEL_LATENCY_MS[kind.name] = latency * 1000
    print(f"\ncancel -> upstream disconnect [{kind.name}]: {latency * 1000:.1f} ms")
    assert latency < 0.5
    message = (await cancel.json())["message"]
    assert message["status"] == "cancelled"
    assert message["content"].startswith("w0 w1 ")
    assert fake.records[0].frames_sent < 100


async def test_keys_never_reach_errors_events_or_logs(
    upstream: Upstream, start: Any, caplog: pytest.LogCaptureFixture
) -> None:
    kind, fake, _ = upstream
    caplog.set_level(logging.DEBUG)
    client = await start(retries=0)
    fake.key = "the-right-key"  # the configured key is rejected; the fake echoes it back
    _, events = await send(client)
    assert terminal(events)["code"] == "auth"
    fake.key = kind.key
    fake.enqueue(Plan(status=400, error="echo"))  # an error text quoting the key
    cid, events = await send(client)
    err = terminal(events)
    assert err["code"] == "bad_request"
    assert "***" in err["message"]  # the quoted key was there, and was scrubbed
    answer = await saved_answer(client, cid)
    everything = "\n".join([repr(events), repr(answer), caplog.text])
    for record in fake.records:  # the key really went upstream, and came back
        assert kind.key in repr(record.headers)
    assert kind.key not in everything
    assert kind.key[4:20] not in everything
