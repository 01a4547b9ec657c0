"""Helpers shared by the provider tests: settings for a fake, building adapters, reading SSE."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import ClientResponse

from app.settings import ProviderSettings, Secret
from providers.base import ChatMessage, GenerateOptions, Provider, StreamEvent
from providers.registry import KINDS
from tests.upstreams.anthropic import AnthropicFake
from tests.upstreams.base import FakeUpstream
from tests.upstreams.gemini import GeminiFake
from tests.upstreams.openai import OpenAIFake

# A key shaped like a real one, so the scrubber cannot rely on its shape alone.
CANARY = "sk-canary-7f3a9c2e51d84b6f"
GEMINI_CANARY = "AIzaCanary7f3a9c2e51d84b6f0a1b2c3d4e5f6"


@dataclass(frozen=True)
class Kind:
    """How to fake and configure one provider."""

    name: str  # the provider's name in settings (and in messages)
    kind: str  # the adapter kind
    fake: type[FakeUpstream]
    path: str  # appended to the fake's URL to make the base URL the SDK expects
    model: str
    key: str = CANARY


OPENAI = Kind("openai", "openai", OpenAIFake, "/v1", "gpt-4o-mini")
DEEPSEEK = Kind("deepseek", "openai", OpenAIFake, "", "deepseek-reasoner")
GEMINI = Kind("gemini", "gemini", GeminiFake, "", "gemini-2.5-flash", GEMINI_CANARY)
ANTHROPIC = Kind("anthropic", "anthropic", AnthropicFake, "", "claude-haiku-4-5")
ALL = (OPENAI, DEEPSEEK, GEMINI, ANTHROPIC)


def provider_settings(k: Kind, url: str, **overrides: Any) -> ProviderSettings:
    """ProviderSettings pointing the real adapter at a fake, with short timeouts."""
    values: dict[str, Any] = {
        "name": k.name,
        "kind": k.kind,
        "base_url": url.rstrip("/") + k.path,
        "api_key_env": None,
        "api_key": Secret(k.key),
        "models": (k.model,),
        "default_model": k.model,
        "connect_timeout": 2.0,
        "first_token_timeout": 1.0,
        "idle_timeout": 0.5,
        "total_timeout": 10.0,
        "retries": 2,
    }
    values.update(overrides)
    return ProviderSettings(**values)


def build(settings: ProviderSettings) -> Provider:
    """The adapter the registry builds for these settings."""
    factory = KINDS[settings.kind][0]
    return factory(settings)


async def collect(
    provider: Provider,
    model: str,
    messages: Sequence[ChatMessage] = (ChatMessage("user", "hi"),),
    options: GenerateOptions | None = None,
) -> list[StreamEvent]:
    """Every event of one stream."""
    return [ev async for ev in provider.stream(messages, model, options or GenerateOptions())]


async def read_sse(resp: ClientResponse) -> list[dict[str, Any]]:
    """The events of an SSE response, read to its end."""
    body = await resp.text()
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]


async def next_event(resp: ClientResponse) -> dict[str, Any]:
    """The next event of an SSE response being read incrementally."""
    while True:
        line = await resp.content.readline()
        if not line:
            raise AssertionError("stream ended")
        if line.startswith(b"data: "):
            event: dict[str, Any] = json.loads(line[6:])
            return event
