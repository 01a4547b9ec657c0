"""The one error table (providers/errors.py) and the driver's retry and fallback policy."""

from __future__ import annotations

import email.utils
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from app.main import create_app
from app.settings import ProviderSettings
from providers.base import ERROR_CODES, ProviderError
from providers.errors import MESSAGES, classify, from_status, retry_after_seconds, scrub
from tests.conftest import make_settings
from tests.fakes import ScriptedProvider, fallback_settings, words
from tests.upstreams.kit import read_sse


@pytest.mark.parametrize(
    ("status", "detail", "etype", "retry_after", "code"),
    [
        (401, "Incorrect API key provided", "invalid_api_key", None, "auth"),
        (403, "forbidden", "", None, "auth"),
        (400, "API key not valid. Please pass a valid API key.", "API_KEY_INVALID", None, "auth"),
        (404, "The model `x` does not exist", "model_not_found", None, "not_found"),
        (429, "Rate limit reached for requests", "rate_limit_exceeded", 1.0, "rate_limited"),
        (
            429,
            "Resource has been exhausted (e.g. check quota).",
            "RESOURCE_EXHAUSTED",
            3.0,
            "rate_limited",
        ),
        (429, "You exceeded your current quota", "insufficient_quota", None, "quota_exceeded"),
        (
            429,
            "You exceeded your current quota, check billing",
            "RESOURCE_EXHAUSTED",
            None,
            "quota_exceeded",
        ),
        (402, "Insufficient Balance", "", None, "quota_exceeded"),
        (400, "Your credit balance is too low", "invalid_request_error", None, "quota_exceeded"),
        (
            400,
            "maximum context length is 8192 tokens",
            "context_length_exceeded",
            None,
            "context_length",
        ),
        (
            400,
            "request (931 tokens) exceeds the available context size (512 tokens)",
            "exceed_context_size_error",
            None,
            "context_length",
        ),
        (
            400,
            "prompt is too long: 210000 tokens > 200000 maximum",
            "invalid_request_error",
            None,
            "context_length",
        ),
        (400, "filtered: content management policy", "content_filter", None, "content_filtered"),
        (400, "messages.0.content: field required", "invalid_request_error", None, "bad_request"),
        (529, "Overloaded", "overloaded_error", None, "overloaded"),
        (0, "Overloaded", "overloaded_error", None, "overloaded"),
        (
            503,
            "The model is overloaded. Please try again later.",
            "UNAVAILABLE",
            None,
            "overloaded",
        ),
        (503, "That model is currently overloaded", "server_error", None, "overloaded"),
        (500, "Internal server error", "api_error", None, "upstream_unavailable"),
        (502, "Bad gateway", "", None, "upstream_unavailable"),
        (504, "Deadline exceeded", "DEADLINE_EXCEEDED", None, "timeout"),
        (0, "something broke", "", None, "upstream_unavailable"),
        (418, "teapot", "", None, "internal"),
    ],
)
def test_classify(
    status: int, detail: str, etype: str, retry_after: float | None, code: str
) -> None:
    assert classify(status, detail, etype, retry_after) == code


def test_every_code_has_a_message_and_a_retry_rule() -> None:
    for code in MESSAGES:
        assert code in ERROR_CODES
    assert {c for c, retry in ERROR_CODES.items() if retry} >= {
        "rate_limited",
        "overloaded",
        "upstream_unavailable",
        "timeout",
    }


def test_rate_limited_message_says_how_long() -> None:
    err = from_status(429, "slow down", provider="openai", model="m", headers={"retry-after": "7"})
    assert (err.code, err.retryable, err.retry_after) == ("rate_limited", True, 7.0)
    assert err.message == "openai is rate limiting requests. Try again in 7 s."


def test_bad_request_quotes_the_upstream_scrubbed_and_short() -> None:
    key = "sk-proj-abcdefghijklmnop1234"
    err = from_status(
        400,
        f"bad 'temperature' with key {key} " + "x" * 1000,
        provider="openai",
        model="m",
        secrets=(key,),
    )
    assert err.code == "bad_request"
    assert err.message.startswith("openai rejected the request: bad 'temperature' with key ***")
    assert key not in err.message and len(err.message) < 400


@pytest.mark.parametrize(
    "text",
    [
        "GET https://generativelanguage.googleapis.com/v1beta/models/x?key=AIzaSyD-abc_123&alt=sse",
        "Authorization: Bearer sk-ant-api03-abcdefghijklmnopqrstuvwxyz",
        '{"x-goog-api-key": "AIzaSyD-abc_123def456ghi789"}',
        "api_key=supersecretvalue",
        "leaked sk-proj-abcdefghijklmnopqrst in the text",
        "a Google key AIzaSyA1234567890abcdefghijklmnop in the text",
    ],
)
def test_scrub_removes_key_shaped_strings(text: str) -> None:
    out = scrub(text)
    assert "***" in out
    for secret in ("AIzaSy", "sk-ant-api03-abc", "supersecret", "sk-proj-abc"):
        assert secret not in out


def test_scrub_removes_a_known_secret_of_any_shape() -> None:
    assert scrub("the key hunter2hunter2 failed", ("hunter2hunter2",)) == "the key *** failed"


def test_retry_after_forms() -> None:
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None
    date = email.utils.formatdate(time.time() + 20, usegmt=True)
    assert 17 <= (retry_after_seconds({"retry-after": date}) or 0) <= 21


# -- the driver's policy (app/driver.py), with the scripted fake provider ------------------


async def test_fallback_before_first_token_is_announced(
    db_path: str, aiohttp_client: Any, fake: ScriptedProvider
) -> None:
    backup = ScriptedProvider("backup", models=("b-1",))
    backup.enqueue(words("from backup"))
    fake.enqueue([("error", ProviderError("auth", "fake rejected the API key."))])
    settings = make_settings(db_path, providers=fallback_settings(retries=2))
    client: TestClient[Any, Any] = await aiohttp_client(
        create_app(settings, providers={"fake": fake, "backup": backup})
    )
    conv = await (await client.post("/api/v1/conversations", json={})).json()
    events = await read_sse(
        await client.post(f"/api/v1/conversations/{conv['id']}/stream", json={"content": "x"})
    )
    status = [e for e in events if e["type"] == "status"]
    assert len(status) == 1 and status[0]["state"] == "fallback"
    assert (status[0]["from"], status[0]["to"]) == ("fake", "backup")
    assert "fake" in status[0]["message"] and "backup" in status[0]["message"]
    assert events[-1]["type"] == "end"
    assert "".join(e["content"] for e in events if e["type"] == "chunk") == "from backup"
    assert len(fake.calls) == 1  # auth is not retried


async def test_long_retry_after_is_not_waited_for(
    db_path: str, aiohttp_client: Any, fake: ScriptedProvider
) -> None:
    fake.enqueue([("error", ProviderError("rate_limited", "slow down", retry_after=3600))])
    providers = {
        "fake": ProviderSettings(
            name="fake", kind="fake", models=("fake-1",), default_model="fake-1", retries=3
        )
    }
    settings = make_settings(db_path, providers=providers)
    client: TestClient[Any, Any] = await aiohttp_client(
        create_app(settings, providers={"fake": fake})
    )
    conv = await (await client.post("/api/v1/conversations", json={})).json()
    t0 = time.monotonic()
    events = await read_sse(
        await client.post(f"/api/v1/conversations/{conv['id']}/stream", json={"content": "x"})
    )
    assert time.monotonic() - t0 < 2
    assert events[-1]["type"] == "error" and events[-1]["retry_after"] == 3600
    assert len(fake.calls) == 1


async def test_total_timeout_ends_a_slow_answer_keeping_it(
    db_path: str, aiohttp_client: Any, fake: ScriptedProvider
) -> None:
    fake.enqueue(words("one two three four five six seven eight nine ten", delay=0.1))
    providers = {
        "fake": ProviderSettings(
            name="fake",
            kind="fake",
            models=("fake-1",),
            default_model="fake-1",
            total_timeout=0.35,
            idle_timeout=1.0,
        )
    }
    settings = make_settings(db_path, providers=providers)
    client: TestClient[Any, Any] = await aiohttp_client(
        create_app(settings, providers={"fake": fake})
    )
    conv = await (await client.post("/api/v1/conversations", json={})).json()
    events = await read_sse(
        await client.post(f"/api/v1/conversations/{conv['id']}/stream", json={"content": "x"})
    )
    err = events[-1]
    assert err["type"] == "error" and err["code"] == "timeout"
    assert err["message"] == "The answer took longer than 0.35 s in total."
    assert fake.calls[0].closed_early
    stored = await (await client.get(f"/api/v1/conversations/{conv['id']}")).json()
    assert stored["messages"][-1]["status"] == "failed"
    assert stored["messages"][-1]["content"].startswith("one two three ")
    assert len(fake.calls) == 1  # tokens went out: not retried


async def test_providers_lists_unconfigured_ones_with_the_reason(
    db_path: str, aiohttp_client: Any
) -> None:
    providers = {
        "gemini": ProviderSettings(
            name="gemini", kind="gemini", api_key_env="GEMINI_API_KEY", models=("g",)
        ),
        "anthropic": ProviderSettings(
            name="anthropic", kind="anthropic", api_key_env="ANTHROPIC_API_KEY", models=("c",)
        ),
    }
    client: TestClient[Any, Any] = await aiohttp_client(
        create_app(make_settings(db_path, providers=providers), providers={})
    )
    listed = {
        p["name"]: p for p in (await (await client.get("/api/v1/providers")).json())["providers"]
    }
    assert listed["gemini"]["available"] is False
    assert listed["gemini"]["reason"] == "no API key: set GEMINI_API_KEY"
    assert listed["anthropic"]["reason"] == "no API key: set ANTHROPIC_API_KEY"
