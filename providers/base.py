"""The narrow provider interface: one streaming method yielding normalized events."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of the prompt sent upstream."""

    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True, slots=True)
class GenerateOptions:
    """Per-request generation options; None means the provider's default."""

    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Text the assistant already produced; adapters that support prefill continue it.
    prefill: str | None = None


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of the answer."""

    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """A piece of the model's visible reasoning, kept apart from the answer."""

    text: str


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts reported by the upstream."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Finish:
    """The upstream's finish reason (normalized to OpenAI's vocabulary where known)."""

    reason: str


StreamEvent = TextDelta | ReasoningDelta | Usage | Finish

# Stable error codes carried by error events; the value says whether a retry may help.
ERROR_CODES: dict[str, bool] = {
    "auth": False,
    "not_found": False,
    "rate_limited": True,
    "quota_exceeded": False,
    "bad_request": False,
    "context_length": False,
    "content_filtered": False,
    "overloaded": True,
    "upstream_unavailable": True,
    "timeout": True,
    "internal": False,
    "interrupted": True,
    "shutdown": True,
}


class ProviderError(Exception):
    """An upstream failure mapped to one of ERROR_CODES, with a user-facing message."""

    # False for a stop this server imposes inside the provider's stream (a user's daily
    # quota): the provider itself did not fail (metrics count only real upstream failures)
    upstream = True

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retryable: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        self.code = code
        self.message = message
        self.retryable = ERROR_CODES[code] if retryable is None else retryable
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class ProviderInfo:
    """What GET /providers says about a provider."""

    name: str
    kind: str
    models: tuple[str, ...]
    default_model: str
    available: bool = True
    reason: str | None = None


class Provider(Protocol):
    """A chat model source. `stream` is an async generator; closing it aborts upstream."""

    info: ProviderInfo

    def stream(
        self, messages: Sequence[ChatMessage], model: str, options: GenerateOptions
    ) -> AsyncIterator[StreamEvent]:
        """Stream normalized events for the prompt; raise ProviderError on failure."""
        ...

    async def aclose(self) -> None:
        """Release clients and connections."""
        ...
