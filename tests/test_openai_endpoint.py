"""The OpenAI-compatible API, driven by the official openai SDK and by raw aiohttp.

The SDK is the client OpenAI users bring; the raw client checks the exact frames the SDK
would be lenient about.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from app.auth import hash_secret, new_api_key
from app.keys import STORE
from app.main import create_app
from app.settings import (
    AuthSettings,
    LimitsSettings,
    LocalSettings,
    ProviderSettings,
    UserLimits,
)
from app.settings_load import LOCAL_PROVIDER
from providers.base import ProviderError
from tests.conftest import make_settings
from tests.fakes import ScriptedProvider, fallback_settings, words
from tests.helpers import ProductionServer

ServerFactory = Callable[..., Awaitable[TestServer]]

OTHER = ProviderSettings(name="other", kind="fake", models=("o-1",), default_model="o-1", retries=0)
# configured, but its key env var is unset: listed by /api/v1/providers as unavailable
GONE = ProviderSettings(
    name="gone",
    kind="openai",
    api_key_env="STREAMCHAT_TEST_UNSET_KEY",
    models=("g-1",),
    default_model="g-1",
)


@pytest.fixture
def other() -> ScriptedProvider:
    """A second scripted provider, `other`."""
    return ScriptedProvider(name="other", models=("o-1",))


@pytest.fixture
async def start_server(
    db_path: str, fake: ScriptedProvider, other: ScriptedProvider
) -> AsyncIterator[ServerFactory]:
    """Start streamchat on loopback with `fake` (default), `other` and unavailable `gone`."""
    servers: list[TestServer] = []

    async def factory(app: web.Application | None = None, **overrides: Any) -> TestServer:
        if app is None:
            settings = make_settings(db_path, providers={"other": OTHER, "gone": GONE}, **overrides)
            app = create_app(settings, providers={"fake": fake, "other": other})
        server = ProductionServer(app)
        await server.start_server()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        await server.close()


@pytest.fixture
async def server(start_server: ServerFactory) -> TestServer:
    """streamchat with default test settings."""
    return await start_server()


def sdk_for(server: TestServer) -> openai.AsyncOpenAI:
    """The official SDK pointed at streamchat (no SDK retries: tests see every answer)."""
    return openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="x", max_retries=0)


@pytest.fixture
async def sdk(server: TestServer) -> AsyncIterator[openai.AsyncOpenAI]:
    """An SDK client for `server`."""
    client = sdk_for(server)
    yield client
    await client.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp client for raw frames and the native API."""
    async with aiohttp.ClientSession() as session:
        yield session


USER = [{"role": "user", "content": "hi"}]


def sse_data(raw: str) -> list[str]:
    """The data payloads of an SSE body, asserting every frame is exactly one data line."""
    assert raw.endswith("\n\n")
    out = []
    for frame in raw.split("\n\n")[:-1]:
        if frame.startswith(":"):  # a keep-alive comment
            continue
        assert frame.startswith("data: ") and "\n" not in frame, frame
        out.append(frame[6:])
    return out


async def until(check: Callable[[], bool], seconds: float = 5.0) -> None:
    """Wait (bounded) until `check()` holds."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def last_message(
    http: aiohttp.ClientSession, server: TestServer, cid: str, status: str
) -> dict[str, Any]:
    """The conversation's last message once it has `status` (waiting at most 5 s)."""
    deadline = asyncio.get_running_loop().time() + 5.0
    while True:
        resp = await http.get(server.make_url(f"/api/v1/conversations/{cid}"))
        message: dict[str, Any] = (await resp.json())["messages"][-1]
        if message["status"] == status:
            return message
        assert asyncio.get_running_loop().time() < deadline, message["status"]
        await asyncio.sleep(0.02)


# -- models ------------------------------------------------------------------------------


async def test_models_lists_available_providers_and_plain_default_names(
    sdk: openai.AsyncOpenAI,
) -> None:
    page = await sdk.models.list()
    ids = [m.id for m in page.data]
    assert ids == ["fake/fake-1", "fake/fake-2", "other/o-1", "fake-1", "fake-2"]
    assert all(m.object == "model" and isinstance(m.created, int) for m in page.data)
    assert {m.id: m.owned_by for m in page.data}["other/o-1"] == "other"
    assert (await sdk.models.retrieve("other/o-1")).id == "other/o-1"
    with pytest.raises(openai.NotFoundError) as err:
        await sdk.models.retrieve("gone/g-1")
    assert err.value.code == "model_not_found"


# -- non-streaming -------------------------------------------------------------------------


async def test_non_streaming_completion(sdk: openai.AsyncOpenAI, fake: ScriptedProvider) -> None:
    fake.enqueue(words("Hello there friend", finish="length"))
    resp = await sdk.chat.completions.create(
        model="fake-2",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "one"}]},
            {"role": "assistant", "content": "two"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ],
        max_completion_tokens=20,
        temperature=0.5,
        top_p=0.9,
        stop=["END", "STOP"],
        seed=42,
        user="someone",
    )
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == "fake/fake-2"
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.index == 0 and choice.finish_reason == "length"
    assert choice.message.role == "assistant" and choice.message.content == "Hello there friend"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (7, 3)
    assert resp.usage.total_tokens == 10
    call = fake.calls[0]
    assert call.model == "fake-2"
    assert [(m.role, m.content) for m in call.messages] == [
        ("system", "Be brief."),
        ("user", "one"),
        ("assistant", "two"),
        ("user", "a\nb"),
    ]
    opts = call.options
    assert (opts.max_tokens, opts.temperature, opts.top_p, opts.seed) == (20, 0.5, 0.9, 42)
    assert opts.stop == ("END", "STOP")


async def test_provider_prefix_and_echoed_answers(
    sdk: openai.AsyncOpenAI, other: ScriptedProvider
) -> None:
    first = await sdk.chat.completions.create(model="other/o-1", messages=USER, max_tokens=5)
    assert first.model == "other/o-1" and first.choices[0].message.content == "You said: hi"
    assert other.calls[0].options.max_tokens == 5
    # the common pattern of appending the SDK's own message object (nulls included)
    history = [*USER, first.choices[0].message.model_dump(), {"role": "user", "content": "more"}]
    second = await sdk.chat.completions.create(model="other", messages=history)
    assert second.choices[0].message.content == "You said: more"
    assert [m.role for m in other.calls[1].messages] == ["user", "assistant", "user"]


# -- streaming -------------------------------------------------------------------------------


async def test_streaming_with_usage(sdk: openai.AsyncOpenAI, fake: ScriptedProvider) -> None:
    fake.enqueue(words("one two three", delay=0.01, finish="length"))
    stream = await sdk.chat.completions.create(
        model="fake/fake-1",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[:-1] == [None] * (len(finishes) - 1) and finishes[-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == {
        "prompt_tokens": 7,
        "completion_tokens": 3,
        "total_tokens": 10,
        "completion_tokens_details": None,
        "prompt_tokens_details": None,
    }
    assert all(c.usage is None for c in chunks[:-1])


async def test_stream_names_the_model_that_answered_after_a_fallback(
    start_server: ServerFactory, db_path: str, fake: ScriptedProvider, other: ScriptedProvider
) -> None:
    fake.enqueue([("error", ProviderError("auth", "fake rejected the API key."))])
    other.enqueue(words("from other", delay=0.01))
    providers = fallback_settings(retries=0, to="other", model="o-1")
    settings = make_settings(db_path, providers=providers)
    server = await start_server(create_app(settings, providers={"fake": fake, "other": other}))
    sdk = sdk_for(server)
    try:
        stream = await sdk.chat.completions.create(model="fake/fake-1", messages=USER, stream=True)
        chunks = [c async for c in stream]
    finally:
        await sdk.close()
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "from other"
    assert {c.model for c in chunks} == {"other/o-1"}  # named when the first text came


async def test_raw_stream_frames(
    server: TestServer, http: aiohttp.ClientSession, fake: ScriptedProvider
) -> None:
    fake.enqueue(
        [("text", "Hel"), ("sleep", 0.05), ("text", "lo"), ("usage", 3, 2), ("finish", "stop")]
    )
    resp = await http.post(
        server.make_url("/v1/chat/completions"),
        json={"model": "fake-1", "messages": USER, "stream": True},
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert "X-Conversation-Id" not in resp.headers
    data = sse_data(await resp.text())
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    head = {k: chunks[0][k] for k in ("id", "object", "created", "model")}
    assert head["object"] == "chat.completion.chunk" and head["model"] == "fake/fake-1"
    assert head["id"].startswith("chatcmpl-") and isinstance(head["created"], int)

    def frame(delta: dict[str, Any], finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return json.dumps({**head, "choices": [choice]}, separators=(",", ":"))

    # exact bytes: role first, text pieces (which may coalesce), then the finish reason
    assert data[0] == frame({"role": "assistant", "content": ""})
    middle = data[1:-2]
    pieces = [json.loads(d)["choices"][0]["delta"]["content"] for d in middle]
    assert "".join(pieces) == "Hello"
    assert middle == [frame({"content": p}) for p in pieces]
    assert data[-2] == frame({}, "stop")


async def test_raw_stream_usage_chunk(
    server: TestServer, http: aiohttp.ClientSession, fake: ScriptedProvider
) -> None:
    fake.enqueue([("text", "ok"), ("usage", 4, 1), ("finish", "stop")])
    resp = await http.post(
        server.make_url("/v1/chat/completions"),
        json={
            "model": "fake-1",
            "messages": USER,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    data = sse_data(await resp.text())
    chunks = [json.loads(d) for d in data[:-1]]
    assert data[-1] == "[DONE]"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}
    assert set(chunks[-1]) == {"id", "object", "created", "model", "choices", "usage"}


# -- errors --------------------------------------------------------------------------------

BAD_REQUESTS: list[tuple[dict[str, Any], type[openai.APIStatusError], str | None]] = [
    ({"model": "nope"}, openai.NotFoundError, "model"),
    ({"model": "gone/g-1"}, openai.NotFoundError, "model"),
    ({"model": "nope/x"}, openai.NotFoundError, "model"),
    ({"frequency_penalty": 0.5}, openai.BadRequestError, "frequency_penalty"),
    ({"n": 2}, openai.BadRequestError, "n"),
    ({"n": True}, openai.BadRequestError, "n"),
    ({"logprobs": True}, openai.BadRequestError, "logprobs"),
    ({"tools": []}, openai.BadRequestError, "tools"),
    ({"messages": []}, openai.BadRequestError, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, openai.BadRequestError, "messages[0].role"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        openai.BadRequestError,
        "messages[0].content[0].type",
    ),
    (
        {"messages": [{"role": "user", "content": "x", "name": "bob"}]},
        openai.BadRequestError,
        "messages[0].name",
    ),
    ({"messages": [{"role": "user", "content": 5}]}, openai.BadRequestError, "messages[0].content"),
    ({"temperature": 3}, openai.BadRequestError, "temperature"),
    ({"top_p": "high"}, openai.BadRequestError, "top_p"),
    ({"max_tokens": 0}, openai.BadRequestError, "max_tokens"),
    (
        {"max_tokens": 5, "max_completion_tokens": 6},
        openai.BadRequestError,
        "max_completion_tokens",
    ),
    ({"stop": ["a", "b", "c", "d", "e"]}, openai.BadRequestError, "stop"),
    ({"seed": 1.5}, openai.BadRequestError, "seed"),
    ({"stream_options": {"include_usage": True}}, openai.BadRequestError, "stream_options"),
    ({"stream": True, "stream_options": {"x": 1}}, openai.BadRequestError, "stream_options.x"),
]


@pytest.mark.parametrize(("change", "exc_type", "param"), BAD_REQUESTS)
async def test_bad_requests_raise_sdk_exceptions(
    sdk: openai.AsyncOpenAI,
    fake: ScriptedProvider,
    change: dict[str, Any],
    exc_type: type[openai.APIStatusError],
    param: str,
) -> None:
    body: dict[str, Any] = {"model": "fake-1", "messages": USER, **change}
    model, messages = body.pop("model"), body.pop("messages")
    with pytest.raises(exc_type) as err:
        # everything else goes through extra_body so the SDK sends it untouched
        await sdk.chat.completions.create(model=model, messages=messages, extra_body=body)
    assert err.value.param == param
    assert isinstance(err.value.body, dict)
    assert set(err.value.body) == {"message", "type", "param", "code"}
    assert err.value.type == "invalid_request_error"
    assert fake.calls == []


async def test_error_json_shape_on_every_v1_path(
    server: TestServer, http: aiohttp.ClientSession
) -> None:
    url = server.make_url
    cases = [
        (await http.get(url("/v1/nothing-here")), 404),
        (await http.get(url("/v1/chat/completions")), 405),
        (await http.post(url("/v1/chat/completions"), data="{}"), 415),
        (
            await http.post(
                url("/v1/chat/completions"),
                data="{not json",
                headers={"Content-Type": "application/json"},
            ),
            400,
        ),
        (await http.post(url("/v1/chat/completions"), json={"model": "fake-1"}), 400),
    ]
    for resp, status in cases:
        assert resp.status == status
        body = await resp.json()
        assert list(body) == ["error"]
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["type"] == "invalid_request_error"
    # the native API keeps its own shape
    resp = await http.get(url("/api/v1/nothing-here"))
    assert set((await resp.json())["error"]) == {"code", "message"}


UPSTREAM: list[tuple[ProviderError, type[openai.APIStatusError], int, str]] = [
    (ProviderError("rate_limited", "Slow down.", retry_after=2.0), openai.RateLimitError, 429,
     "rate_limit_exceeded"),
    (ProviderError("quota_exceeded", "No quota."), openai.RateLimitError, 429,
     "insufficient_quota"),
    (ProviderError("not_found", "No such model upstream."), openai.NotFoundError, 404,
     "model_not_found"),
    (ProviderError("auth", "Bad upstream key."), openai.AuthenticationError, 401, "upstream_auth"),
    (ProviderError("context_length", "Too long."), openai.BadRequestError, 400,
     "context_length_exceeded"),
    (ProviderError("overloaded", "Busy."), openai.InternalServerError, 503, "overloaded"),
    (ProviderError("internal", "Broke."), openai.InternalServerError, 500, "internal"),
]  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("error", "exc_type", "status", "code"), UPSTREAM)
async def test_upstream_errors_before_any_text_are_http_errors(
    sdk: openai.AsyncOpenAI,
    fake: ScriptedProvider,
    stream: bool,
    error: ProviderError,
    exc_type: type[openai.APIStatusError],
    status: int,
    code: str,
) -> None:
    fake.enqueue([("sleep", 0.02), ("error", error)])
    with pytest.raises(exc_type) as err:
        await sdk.chat.completions.create(model="fake-1", messages=USER, stream=stream)
    assert err.value.status_code == status
    assert err.value.code == code
    assert isinstance(err.value.body, dict) and err.value.body["message"] == error.message
    if error.retry_after is not None:
        assert err.value.response.headers["Retry-After"] == "2"


async def test_error_mid_stream_sdk(sdk: openai.AsyncOpenAI, fake: ScriptedProvider) -> None:
    fake.enqueue(
        [
            ("text", "partial "),
            ("sleep", 0.05),
            ("error", ProviderError("upstream_unavailable", "Upstream dropped.")),
        ]
    )
    stream = await sdk.chat.completions.create(model="fake-1", messages=USER, stream=True)
    got = []
    with pytest.raises(openai.APIError) as err:
        async for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")
    assert "".join(got) == "partial "
    assert not isinstance(err.value, openai.APIStatusError)
    assert err.value.message == "Upstream dropped."
    assert err.value.code == "upstream_unavailable" and err.value.type == "server_error"


async def test_error_mid_stream_raw_frames(
    server: TestServer, http: aiohttp.ClientSession, fake: ScriptedProvider
) -> None:
    fake.enqueue([("text", "abc"), ("sleep", 0.05), ("error", ProviderError("timeout", "Slow."))])
    resp = await http.post(
        server.make_url("/v1/chat/completions"),
        json={"model": "fake-1", "messages": USER, "stream": True},
    )
    assert resp.status == 200
    data = sse_data(await resp.text())
    assert json.loads(data[0])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert json.loads(data[1])["choices"][0]["delta"] == {"content": "abc"}
    assert data[2] == (
        '{"error":{"message":"Slow.","type":"server_error","param":null,"code":"timeout"}}'
    )
    assert data[3:] == ["[DONE]"]


async def test_slow_first_token_sends_headers_then_errors_in_stream(
    start_server: ServerFactory, http: aiohttp.ClientSession, fake: ScriptedProvider
) -> None:
    server = await start_server(streaming={"heartbeat": 0.2})
    fake.enqueue([("sleep", 0.6), ("error", ProviderError("overloaded", "Busy."))])
    resp = await http.post(
        server.make_url("/v1/chat/completions"),
        json={"model": "fake-1", "messages": USER, "stream": True},
    )
    # headers come after the hold (heartbeat), well before the failure, then heartbeats
    assert resp.status == 200
    raw = await resp.text()
    assert ": ping\n\n" in raw  # a comment line, which SSE readers skip
    data = sse_data(raw)
    assert json.loads(data[0])["choices"][0]["delta"]["role"] == "assistant"
    assert json.loads(data[-2])["error"]["code"] == "overloaded"
    assert data[-1] == "[DONE]"


async def test_a_long_wait_for_the_first_token_is_kept_alive_with_pings(
    start_server: ServerFactory, http: aiohttp.ClientSession, fake: ScriptedProvider
) -> None:
    """While the provider is slow the run publishes `status` events, which /v1 has no
    chunk for: the stream must still not go silent for longer than the heartbeat."""
    server = await start_server(streaming={"heartbeat": 0.2, "status_interval": 0.05})
    fake.enqueue([("sleep", 1.0), ("text", "late"), ("finish", "stop")])
    resp = await http.post(
        server.make_url("/v1/chat/completions"),
        json={"model": "fake-1", "messages": USER, "stream": True},
    )
    assert resp.status == 200
    raw = await resp.text()
    assert raw.count(": ping\n\n") >= 2  # headers after ~0.2 s, then a ping about every 0.2 s
    data = sse_data(raw)
    assert json.loads(data[1])["choices"][0]["delta"] == {"content": "late"}
    assert data[-1] == "[DONE]"


async def test_streaming_disabled(start_server: ServerFactory, fake: ScriptedProvider) -> None:
    server = await start_server(streaming={"enabled": False})
    client = sdk_for(server)
    try:
        with pytest.raises(openai.InternalServerError) as err:
            await client.chat.completions.create(model="fake-1", messages=USER, stream=True)
        assert err.value.status_code == 503 and err.value.code == "streaming_disabled"
        resp = await client.chat.completions.create(model="fake-1", messages=USER)
        assert resp.choices[0].message.content == "You said: hi"
    finally:
        await client.close()


async def test_user_limits_apply(start_server: ServerFactory, fake: ScriptedProvider) -> None:
    limits = LimitsSettings(defaults=UserLimits(concurrent_runs=1, max_conversations=1))
    server = await start_server(limits=limits)
    client = sdk_for(server)
    try:
        fake.enqueue([("text", "x"), ("hang",)])
        stream = await client.chat.completions.create(model="fake-1", messages=USER, stream=True)
        with pytest.raises(openai.RateLimitError) as err:
            await client.chat.completions.create(model="fake-1", messages=USER)
        assert err.value.response.headers["Retry-After"]
        assert err.value.type == "rate_limit_error"
        await stream.close()
        new = {"X-Conversation-Id": "new"}
        deadline = asyncio.get_running_loop().time() + 5
        while True:  # the closed stream's run frees its slot as it ends
            try:
                await client.chat.completions.create(
                    model="fake-1", messages=USER, extra_headers=new
                )
                break
            except openai.RateLimitError:  # (its conversation is removed again)
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.02)
        with pytest.raises(openai.PermissionDeniedError):
            await client.chat.completions.create(model="fake-1", messages=USER, extra_headers=new)
    finally:
        await client.close()


async def test_fields_at_their_defaults_are_accepted(
    sdk: openai.AsyncOpenAI, fake: ScriptedProvider
) -> None:
    """LangChain and others send n=1 and zero penalties: they ask for nothing, so they pass."""
    fake.enqueue([("text", "fine")])
    out = await sdk.chat.completions.create(
        model="fake-1",
        messages=USER,
        n=1,
        presence_penalty=0,
        frequency_penalty=0.0,
        logprobs=False,
    )
    assert out.choices[0].message.content == "fine"
    assert len(fake.calls) == 1


async def test_message_length_limit_applies_to_every_stateless_message(
    start_server: ServerFactory, fake: ScriptedProvider
) -> None:
    limits = LimitsSettings(defaults=UserLimits(max_message_chars=10))
    server = await start_server(limits=limits)
    client = sdk_for(server)
    try:
        long = [
            {"role": "system", "content": "short"},
            {"role": "user", "content": "x" * 11},
        ]
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(model="fake-1", messages=long)  # type: ignore[arg-type]
        assert err.value.param == "messages[1].content"
        assert "10 characters" in err.value.message
        assert fake.calls == []
        fake.enqueue([("text", "ok")])
        fits = [{"role": "system", "content": "short"}, {"role": "user", "content": "x" * 10}]
        out = await client.chat.completions.create(model="fake-1", messages=fits)  # type: ignore[arg-type]
        assert out.choices[0].message.content == "ok"
    finally:
        await client.close()


async def test_api_keys_and_users(start_server: ServerFactory, fake: ScriptedProvider) -> None:
    server = await start_server(auth=AuthSettings(mode="api_key"))
    store = server.app[STORE]
    keys = {}
    for name in ("alice", "bob"):
        await store.create_user(name)
        keys[name] = new_api_key()
        await store.create_api_key(name, hash_secret(keys[name]), keys[name][:8])
    url = str(server.make_url("/v1"))
    clients = {
        name: openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0)
        for name, key in {**keys, "nobody": "sc_not-a-key"}.items()
    }
    try:
        with pytest.raises(openai.AuthenticationError) as err:
            await clients["nobody"].models.list()
        assert err.value.type == "authentication_error" and err.value.param is None
        raw = await clients["alice"].chat.completions.with_raw_response.create(
            model="fake-1", messages=USER, extra_headers={"X-Conversation-Id": "new"}
        )
        cid = raw.headers["X-Conversation-Id"]
        assert raw.parse().choices[0].message.content == "You said: hi"
        # another user cannot continue (or even see) alice's conversation
        with pytest.raises(openai.NotFoundError):
            await clients["bob"].chat.completions.create(
                model="fake-1", messages=USER, extra_headers={"X-Conversation-Id": cid}
            )
        assert len(fake.calls) == 1
    finally:
        for client in clients.values():
            await client.close()


# -- disconnects ---------------------------------------------------------------------------


async def test_closing_the_stream_aborts_a_stateless_run(
    sdk: openai.AsyncOpenAI, fake: ScriptedProvider
) -> None:
    # after the first piece nothing is written, so only noticing the closed socket helps
    fake.enqueue([("text", "first"), ("hang",)])
    stream = await sdk.chat.completions.create(model="fake-1", messages=USER, stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    await stream.close()
    await until(lambda: fake.calls[0].ended is not None)
    assert fake.calls[0].closed_early


async def test_non_streaming_client_gone_aborts_a_stateless_run(
    server: TestServer, http: aiohttp.ClientSession, fake: ScriptedProvider
) -> None:
    fake.enqueue([("text", "x"), ("hang",)])
    request = asyncio.ensure_future(
        http.post(
            server.make_url("/v1/chat/completions"), json={"model": "fake-1", "messages": USER}
        )
    )
    await until(lambda: bool(fake.calls))
    request.cancel()
    await until(lambda: fake.calls[0].ended is not None)
    assert fake.calls[0].closed_early


async def test_leaving_before_the_headers_aborts_a_stateless_stream(
    server: TestServer, http: aiohttp.ClientSession, fake: ScriptedProvider
) -> None:
    """The headers are held for the first text; a client that gives up meanwhile is
    noticed without any write, and its stateless run stops the provider."""
    fake.enqueue([("hang",)])
    request = asyncio.ensure_future(
        http.post(
            server.make_url("/v1/chat/completions"),
            json={"model": "fake-1", "messages": USER, "stream": True},
        )
    )
    await until(lambda: bool(fake.calls))
    request.cancel()
    await until(lambda: fake.calls[0].ended is not None)
    assert fake.calls[0].closed_early


async def _open_stored_stream(
    sdk: openai.AsyncOpenAI,
) -> tuple[str, str, openai.AsyncStream[Any]]:
    raw = await sdk.chat.completions.with_raw_response.create(
        model="fake-1", messages=USER, stream=True, extra_headers={"X-Conversation-Id": "new"}
    )
    stream = raw.parse()
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    return raw.headers["X-Conversation-Id"], raw.headers["X-Message-Id"], stream


async def test_closing_a_stored_stream_continues_by_default(
    sdk: openai.AsyncOpenAI, http: aiohttp.ClientSession, server: TestServer, fake: ScriptedProvider
) -> None:
    fake.enqueue(words("a b c d e f g h", delay=0.05))
    cid, mid, stream = await _open_stored_stream(sdk)
    await stream.close()
    await until(lambda: fake.calls[0].ended is not None)
    assert not fake.calls[0].closed_early
    answer = await last_message(http, server, cid, "complete")
    assert answer["id"] == mid and answer["content"] == "a b c d e f g h"


async def test_closing_a_stored_stream_cancels_with_on_disconnect_cancel(
    start_server: ServerFactory, http: aiohttp.ClientSession, fake: ScriptedProvider
) -> None:
    server = await start_server(streaming={"on_disconnect": "cancel"})
    client = sdk_for(server)
    try:
        fake.enqueue(words(" ".join(["w"] * 100), delay=0.05))
        cid, _, stream = await _open_stored_stream(client)
        await stream.close()
        await until(lambda: fake.calls[0].ended is not None)
        assert fake.calls[0].closed_early
        answer = await last_message(http, server, cid, "cancelled")
        assert answer["content"].startswith("w") and len(answer["content"]) < 199
    finally:
        await client.close()


# -- conversations -------------------------------------------------------------------------


async def test_conversation_bound_requests_are_stored(
    sdk: openai.AsyncOpenAI, http: aiohttp.ClientSession, server: TestServer, fake: ScriptedProvider
) -> None:
    raw = await sdk.chat.completions.with_raw_response.create(
        model="fake-2",
        messages=[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "first"}],
        extra_headers={"X-Conversation-Id": "new"},
    )
    cid, mid = raw.headers["X-Conversation-Id"], raw.headers["X-Message-Id"]
    first = raw.parse()
    assert first.id == f"chatcmpl-{mid}"
    conv = await (await http.get(server.make_url(f"/api/v1/conversations/{cid}"))).json()
    assert conv["system_prompt"] == "Be kind." and conv["provider"] == "fake"
    assert conv["model"] == "fake-2" and conv["title"] == "first"
    assert [(m["role"], m["content"]) for m in conv["messages"]] == [
        ("user", "first"),
        ("assistant", "You said: first"),
    ]
    assert conv["messages"][1]["id"] == mid

    # continuing: the stored history is the context, the last message is the new one
    second = await sdk.chat.completions.create(
        model="fake-2",
        messages=[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "again"}],
        extra_headers={"X-Conversation-Id": cid},
    )
    assert second.choices[0].message.content == "You said: again"
    assert [(m.role, m.content) for m in fake.calls[1].messages] == [
        ("system", "Be kind."),
        ("user", "first"),
        ("assistant", "You said: first"),
        ("user", "again"),
    ]
    conv = await (await http.get(server.make_url(f"/api/v1/conversations/{cid}"))).json()
    assert [m["content"] for m in conv["messages"]][-2:] == ["again", "You said: again"]


async def test_conversation_bound_stream_is_live_and_resumable(
    sdk: openai.AsyncOpenAI, http: aiohttp.ClientSession, server: TestServer, fake: ScriptedProvider
) -> None:
    fake.enqueue(words("one two three four five", delay=0.05))
    raw = await sdk.chat.completions.with_raw_response.create(
        model="fake-1", messages=USER, stream=True, extra_headers={"X-Conversation-Id": "new"}
    )
    cid, mid = raw.headers["X-Conversation-Id"], raw.headers["X-Message-Id"]
    stream = raw.parse()
    conv = await (await http.get(server.make_url(f"/api/v1/conversations/{cid}"))).json()
    assert conv["live_message_id"] == mid
    resumed = await http.get(server.make_url(f"/api/v1/conversations/{cid}/messages/{mid}/stream"))
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "one two three four five"
    events = [
        json.loads(line[6:]) for line in (await resumed.text()).split("\n") if line[:6] == "data: "
    ]
    assert "".join(e["content"] for e in events if e["type"] == "chunk") == text
    assert events[-1]["type"] == "end"


async def test_conversation_header_errors(sdk: openai.AsyncOpenAI, fake: ScriptedProvider) -> None:
    create = sdk.chat.completions.create
    with pytest.raises(openai.NotFoundError):
        await create(model="fake-1", messages=USER, extra_headers={"X-Conversation-Id": "0" * 32})
    with pytest.raises(openai.NotFoundError):
        await create(model="fake-1", messages=USER, extra_headers={"X-Conversation-Id": "../x"})
    history = [*USER, {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(openai.BadRequestError) as err:
        await create(model="fake-1", messages=history, extra_headers={"X-Conversation-Id": "new"})
    assert err.value.param == "messages"
    with pytest.raises(openai.BadRequestError):
        await create(
            model="fake-1",
            messages=[*USER, {"role": "assistant", "content": "a"}],
            extra_headers={"X-Conversation-Id": "new"},
        )
    assert fake.calls == []


async def test_second_request_while_a_stored_run_is_live_conflicts(
    sdk: openai.AsyncOpenAI, fake: ScriptedProvider
) -> None:
    fake.enqueue(words("slow answer here", delay=0.1))
    cid, _, stream = await _open_stored_stream(sdk)
    with pytest.raises(openai.ConflictError):
        await sdk.chat.completions.create(
            model="fake-1", messages=USER, extra_headers={"X-Conversation-Id": cid}
        )
    await stream.close()


# -- the real local model ------------------------------------------------------------------


@pytest.mark.local_model
async def test_local_model_through_the_sdk(start_server: ServerFactory, db_path: str) -> None:
    local = LOCAL_PROVIDER
    settings = dataclasses.replace(
        make_settings(db_path),
        default_provider="local",
        local=LocalSettings(enabled=True, parallel=2, n_ctx=2048),
        providers={"local": local},
    )
    server = await start_server(create_app(settings))
    client = sdk_for(server)
    try:
        models = [m.id for m in (await client.models.list()).data]
        assert models == ["local/smollm2-135m-instruct", "smollm2-135m-instruct"]
        messages: Any = [{"role": "user", "content": "Name three colours."}]
        resp = await client.chat.completions.create(
            model="smollm2-135m-instruct", messages=messages, max_tokens=8, seed=1
        )
        assert resp.choices[0].message.content
        assert resp.choices[0].finish_reason == "length"
        assert resp.usage is not None and resp.usage.completion_tokens == 8
        assert resp.usage.prompt_tokens > 0

        stream = await client.chat.completions.create(
            model="local/smollm2-135m-instruct",
            messages=messages,
            max_tokens=8,
            seed=1,  # as above: unseeded, the model may end its answer within 8 tokens
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    finally:
        await client.close()
