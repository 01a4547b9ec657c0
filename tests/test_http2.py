"""`http2 = true`: the openai adapter over HTTP/2 (providers/http2.py), against hypercorn.

The server side is hypercorn, an HTTP/2 implementation that is not ours, relaying to the
usual fake (tests/upstreams/h2front.py): the real SDK, a real h2 server, real sockets.
"""

from __future__ import annotations

import asyncio
import io
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from app.main import create_app
from app.settings import SettingsError
from app.settings_load import load_settings
from providers.base import ChatMessage, Finish, GenerateOptions, Provider, ProviderError, TextDelta
from providers.http2 import H2Transport
from tests.conftest import make_settings
from tests.helpers import captured_logs
from tests.upstreams import OpenAIFake, Plan, wait_for
from tests.upstreams.h2front import H2Front, h2_front
from tests.upstreams.kit import OPENAI, build, collect, provider_settings, read_sse

Server = Callable[[web.Application], Awaitable[TestServer]]


@pytest.fixture
async def fake(aiohttp_server: Server) -> tuple[OpenAIFake, str]:
    """The fake OpenAI server (HTTP/1.1, behind the front)."""
    f = OpenAIFake(key=OPENAI.key)
    server = await aiohttp_server(f.app())
    return f, str(server.make_url("")).rstrip("/")


@pytest.fixture
async def front(fake: tuple[OpenAIFake, str]) -> AsyncIterator[tuple[H2Front, str]]:
    """hypercorn speaking h2c in front of the fake."""
    async with h2_front(fake[1]) as served:
        yield served


@pytest.fixture
async def provider(front: tuple[H2Front, str]) -> AsyncIterator[Provider]:
    """The openai adapter with http2 = true, pointed at the front."""
    p = build(provider_settings(OPENAI, front[1], http2=True))
    yield p
    await p.aclose()


def _texts(events: list[object]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


async def test_streams_share_one_connection_and_arrive_byte_exact(
    fake: tuple[OpenAIFake, str], front: tuple[H2Front, str], provider: Provider
) -> None:
    """20 concurrent answers, split at awkward boundaries, over one HTTP/2 connection."""
    texts = [(f"Hé{i}", "llo,\n\n", "data: x", f" wörld 🙂 {i}") for i in range(20)]
    fake[0].enqueue(
        *(Plan(text=t, chunk=5, split_utf8=True, split_pause=0.001, delay=0.01) for t in texts)
    )
    results = await asyncio.gather(*(collect(provider, OPENAI.model) for _ in texts))
    assert sorted(_texts(r) for r in results) == sorted("".join(t) for t in texts)
    assert all(r[-2:] == [Finish("stop"), r[-1]] for r in results)
    seen = front[0].seen
    assert len(seen) == 20
    assert {s.http_version for s in seen} == {"2"}
    assert len({s.client for s in seen}) == 1  # one connection carried them all


async def test_the_servers_stream_limit_opens_more_connections(
    fake: tuple[OpenAIFake, str],
) -> None:
    """A server allowing 4 streams per connection: 10 at once need 3 connections."""
    async with h2_front(fake[1], max_streams=4) as (front, url):
        p = build(provider_settings(OPENAI, url, http2=True))
        try:
            fake[0].enqueue(*(Plan(text=("a", "b"), delay=0.1) for _ in range(10)))
            results = await asyncio.gather(*(collect(p, OPENAI.model) for _ in range(10)))
        finally:
            await p.aclose()
    assert [_texts(r) for r in results] == ["ab"] * 10
    assert len({s.client for s in front.seen}) == 3


async def test_closing_a_stream_resets_only_that_stream(
    fake: tuple[OpenAIFake, str], front: tuple[H2Front, str], provider: Provider
) -> None:
    """Stop one answer mid-stream: the provider sees it go at once, its neighbour goes on."""
    fake[0].enqueue(
        Plan(text=tuple(f"x{i} " for i in range(200)), delay=0.02),
        Plan(text=tuple(f"y{i} " for i in range(20)), delay=0.02),
    )
    stopped = provider.stream([ChatMessage("user", "a")], OPENAI.model, GenerateOptions())
    assert isinstance(await anext(stopped), TextDelta)
    other = asyncio.ensure_future(collect(provider, OPENAI.model))
    await wait_for(lambda: len(fake[0].records) == 2)
    await stopped.aclose()
    closed = asyncio.get_running_loop().time()
    await wait_for(lambda: fake[0].records[0].disconnected is not None)
    assert fake[0].records[0].frames_sent < 100
    assert _texts(await other) == "".join(f"y{i} " for i in range(20))
    assert fake[0].records[1].disconnected is None
    assert len({s.client for s in front[0].seen}) == 1
    assert asyncio.get_running_loop().time() - closed < 2.0


async def test_a_flow_controlled_answer_larger_than_the_windows(
    fake: tuple[OpenAIFake, str], provider: Provider
) -> None:
    """3 MB in one answer (the stream window is 1 MiB), read slowly: nothing lost."""
    piece = "".join(chr(0x41 + i % 26) for i in range(1000))
    fake[0].enqueue(Plan(text=(piece,) * 3000))
    got = []
    async for event in provider.stream([ChatMessage("user", "a")], OPENAI.model, GenerateOptions()):
        if isinstance(event, TextDelta):
            got.append(event.text)
            if len(got) % 500 == 0:
                await asyncio.sleep(0.05)  # the window fills while we wait
    assert "".join(got) == piece * 3000


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [(429, "rate_limit", "rate_limited"), (401, "auth", "auth"), (503, "overloaded", "overloaded")],
)
async def test_error_statuses_map_as_over_http1(
    fake: tuple[OpenAIFake, str], provider: Provider, status: int, error: str, code: str
) -> None:
    fake[0].enqueue(Plan(status=status, error=error))
    with pytest.raises(ProviderError) as info:
        await collect(provider, OPENAI.model)
    assert info.value.code == code


async def test_a_reset_mid_answer_is_a_dropped_connection(
    fake: tuple[OpenAIFake, str], provider: Provider
) -> None:
    """The fake drops its connection; hypercorn resets the stream: the text so far came."""
    fake[0].enqueue(Plan(text=("one ", "two ", "three"), reset_after=2))
    got: list[object] = []
    with pytest.raises(ProviderError) as info:
        async for event in provider.stream(
            [ChatMessage("user", "a")], OPENAI.model, GenerateOptions()
        ):
            got.append(event)
    assert _texts(got) == "one two "
    assert info.value.code == "upstream_unavailable"
    assert "during" in str(info.value) or "mid" in str(info.value).lower()


async def test_an_http1_server_gets_a_clear_log_line(
    fake: tuple[OpenAIFake, str], caplog: pytest.LogCaptureFixture
) -> None:
    """h2c to a server that only speaks HTTP/1.1: the operator is told to turn http2 off."""
    p = build(provider_settings(OPENAI, fake[1], http2=True))
    try:
        with caplog.at_level(logging.WARNING), pytest.raises(ProviderError) as info:
            await collect(p, OPENAI.model)
    finally:
        await p.aclose()
    assert info.value.code == "upstream_unavailable"
    assert "set http2 = false" in caplog.text


async def test_https_negotiates_h2_by_alpn(
    fake: tuple[OpenAIFake, str], tmp_path: Path, aiohttp_server: Server
) -> None:
    """TLS with ALPN: hypercorn agrees to h2; an HTTP/1.1-only TLS server is refused clearly."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = f"{tmp_path}/cert.pem", f"{tmp_path}/key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(certfile)
    cert.private_key_pem.write_to_path(keyfile)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    def client(url: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=url + "/v1",
            api_key=OPENAI.key,
            max_retries=0,
            http_client=openai.DefaultAsyncHttpxClient(transport=H2Transport(verify=client_ctx)),
        )

    fake[0].enqueue(Plan(text=("secure",)))
    async with h2_front(fake[1], tls=(certfile, keyfile)) as (front, url):
        c = client(url)
        stream = await c.chat.completions.create(
            model=OPENAI.model, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        await c.close()
    assert text == "secure"
    assert front.seen[0].http_version == "2"

    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    h1 = await aiohttp_server(OpenAIFake(key=OPENAI.key).app(), ssl=server_ctx)
    c = client(str(h1.make_url("")).rstrip("/").replace("http://", "https://"))
    with pytest.raises(openai.APIConnectionError) as info:
        await c.chat.completions.create(
            model=OPENAI.model, messages=[{"role": "user", "content": "hi"}], stream=True
        )
    await c.close()
    assert "does not offer HTTP/2" in str(info.value.__cause__)


async def test_an_idle_connection_is_closed_after_keepalive_expiry(
    fake: tuple[OpenAIFake, str], front: tuple[H2Front, str]
) -> None:
    transport = H2Transport(keepalive_expiry=0.2)
    c = openai.AsyncOpenAI(
        base_url=front[1] + "/v1",
        api_key=OPENAI.key,
        max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(transport=transport),
    )
    for _ in range(2):  # the second request reuses the first's connection
        stream = await c.chat.completions.create(
            model=OPENAI.model, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        async for _chunk in stream:
            pass
    assert len({s.client for s in front[0].seen}) == 1
    conns = [conn for pool in transport._pools.values() for conn in pool]
    assert len(conns) == 1 and conns[0].reserved == 0
    await wait_for(lambda: conns[0].sock is not None and conns[0].sock.is_closing(), within=2.0)
    assert not any(transport._pools.values())
    await c.close()


def test_http2_is_only_for_openai_kind(tmp_path: Path) -> None:
    cfg = tmp_path / "s.toml"
    cfg.write_text('[providers.g]\nkind = "gemini"\nhttp2 = true\n')
    with pytest.raises(SettingsError, match="http2 is only for kind 'openai'"):
        load_settings(env={}, cli={"config": str(cfg)})


async def test_a_run_through_the_app_over_http2(
    fake: tuple[OpenAIFake, str],
    front: tuple[H2Front, str],
    db_path: str,
    aiohttp_client: Callable[[web.Application], Awaitable[TestClient[Any, Any]]],
) -> None:
    """The whole server: a native SSE run whose provider speaks HTTP/2, stored complete."""
    settings = make_settings(
        db_path,
        providers={OPENAI.name: provider_settings(OPENAI, front[1], http2=True)},
        default_provider=OPENAI.name,
    )
    client = await aiohttp_client(create_app(settings))
    fake[0].enqueue(Plan(text=("over ", "h2")))
    conv = await (await client.post("/api/v1/conversations", json={})).json()
    resp = await client.post(f"/api/v1/conversations/{conv['id']}/stream", json={"content": "hi"})
    events = await read_sse(resp)
    assert "".join(e["content"] for e in events if e["type"] == "chunk") == "over h2"
    assert events[-1]["type"] == "end" and events[-1]["status"] == "complete"
    assert front[0].seen[-1].http_version == "2"


@pytest.fixture
def debug_logs() -> Iterator[io.StringIO]:
    """Logging as run.py sets it up at log_level = DEBUG, into a buffer."""
    yield from captured_logs("text", "DEBUG")


async def test_the_key_stays_out_of_debug_logs_and_errors(
    fake: tuple[OpenAIFake, str], provider: Provider, debug_logs: io.StringIO
) -> None:
    """log_level = DEBUG (hpack would log each header it encodes or decodes), and an
    upstream error that echoes the key back: the key appears in neither."""
    fake[0].enqueue(Plan(text=("fine",)), Plan(status=400, error="echo"))
    assert _texts(await collect(provider, OPENAI.model)) == "fine"
    with pytest.raises(ProviderError) as info:
        await collect(provider, OPENAI.model)
    assert fake[0].last_key == OPENAI.key  # it was sent, in the Authorization header
    logs = debug_logs.getvalue()
    assert "DEBUG openai._base_client" in logs  # DEBUG lines were written
    for text in (logs, str(info.value)):
        assert OPENAI.key not in text
        assert OPENAI.key[:12] not in text


async def test_finished_streams_hand_their_window_back_to_the_connection(
    fake: tuple[OpenAIFake, str], front: tuple[H2Front, str]
) -> None:
    """Acknowledgements are batched per stream; what a stream held when it ended (or was
    stopped) goes back to the connection, or a few answers would use up its window and
    the next one would stall. 64 KiB connection window, ~23 KB answers, 8 in a row."""
    transport = H2Transport(max_streams=1, stream_window=65535, connection_window=65535)
    assert transport.ack_every > 23_000  # no answer here is acknowledged while it runs
    c = openai.AsyncOpenAI(
        base_url=front[1] + "/v1",
        api_key=OPENAI.key,
        max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(transport=transport),
    )
    fake[0].enqueue(*(Plan(text=("x" * 1000,) * 20) for _ in range(8)))
    async with asyncio.timeout(20):
        for i in range(8):
            stream = await c.chat.completions.create(
                model=OPENAI.model, messages=[{"role": "user", "content": "hi"}], stream=True
            )
            got = 0
            async for chunk in stream:
                got += len(chunk.choices[0].delta.content or "") if chunk.choices else 0
                if i % 2 and got >= 5000:
                    break  # every other answer is stopped part-way (its stream reset)
            await stream.close()
            assert got == 20_000 or (i % 2 and got >= 5000)
    assert len({s.client for s in front[0].seen}) == 1
    await c.close()
