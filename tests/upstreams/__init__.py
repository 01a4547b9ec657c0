"""Fake upstream servers that speak each provider's real wire protocol on loopback."""

from tests.upstreams.anthropic import AnthropicFake
from tests.upstreams.base import FakeUpstream, Plan, Record, wait_for
from tests.upstreams.gemini import GeminiFake
from tests.upstreams.openai import OpenAIFake

__all__ = [
    "AnthropicFake",
    "FakeUpstream",
    "GeminiFake",
    "OpenAIFake",
    "Plan",
    "Record",
    "wait_for",
]
