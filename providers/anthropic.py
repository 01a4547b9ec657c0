"""Anthropic through the official anthropic SDK (`messages.stream`)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anthropic
import anthropic.types as at
import httpx2

from app.settings import ProviderSettings
from providers.base import (
    ChatMessage,
    Finish,
    GenerateOptions,
    ProviderError,
    ProviderInfo,
    ReasoningDelta,
    StreamEvent,
    TextDelta,
    Usage,
)
from providers.errors import (
    connection_failed,
    content_filtered,
    from_status,
    make,
    timed_out,
    unexpected,
)
from providers.openai_compat import sdk_timeout

log = logging.getLogger(__name__)

# Anthropic requires max_tokens; this is the answer length when the request gives none.
DEFAULT_MAX_TOKENS = 4096
_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "pause_turn": "stop",
}


class AnthropicProvider:
    """Streams Claude answers; closing the stream closes the upstream HTTP response."""

    def __init__(self, settings: ProviderSettings) -> None:
        self.settings = settings
        self.name = settings.name
        key = settings.api_key.get() if settings.api_key else ""
        self._secrets = (key,)
        self.client = anthropic.AsyncAnthropic(
            api_key=key,
            base_url=settings.base_url,
            # The driver retries (before the first token only) and honours Retry-After;
            # SDK retries would hide our first-token timeout.
            max_retries=0,
            timeout=sdk_timeout(settings),
        )
        self.info = ProviderInfo(
            name=settings.name,
            kind=settings.kind,
            models=settings.models,
            default_model=settings.default_model,
        )

    def build_request(
        self, messages: Sequence[ChatMessage], model: str, options: GenerateOptions
    ) -> dict[str, Any]:
        """The messages.stream arguments (first half): system prompt in `system`."""
        system = "\n\n".join(m.content for m in messages if m.role == "system")
        turns: list[dict[str, str]] = []
        for m in messages:
            if m.role == "system":
                continue
            if turns and turns[-1]["role"] == m.role:
                # the API wants alternating turns; join two in a row (a skipped answer)
                turns[-1]["content"] += "\n\n" + m.content
            else:
                turns.append({"role": m.role, "content": m.content})
        if options.prefill:
            # Anthropic continues a trailing assistant turn natively
            turns.append({"role": "assistant", "content": options.prefill.rstrip()})
        body: dict[str, Any] = {
            "model": model,
            "messages": turns,
            "max_tokens": options.max_tokens or DEFAULT_MAX_TOKENS,
        }
        if system:
            body["system"] = system
        if options.temperature is not None:
            body["temperature"] = options.temperature
        if options.top_p is not None:
            body["top_p"] = options.top_p
        if options.stop:
            body["stop_sequences"] = list(options.stop)
        return body

    def map_error(self, exc: Exception, model: str, *, mid_stream: bool = False) -> ProviderError:
        """Translate an SDK or transport exception into our error codes."""
        if isinstance(exc, anthropic.APIStatusError):
            # An `error` event inside the stream arrives as a status error on the 200.
            status = exc.status_code if exc.status_code >= 400 else 0
            return from_status(
                status,
                str(exc.api_message or exc.message),
                provider=self.name,
                model=model,
                headers=exc.response.headers,
                error_type=str(exc.type or ""),
                secrets=self._secrets,
            )
        if isinstance(exc, anthropic.APITimeoutError | httpx2.TimeoutException):
            return timed_out(self.name)
        if isinstance(exc, anthropic.APIConnectionError | httpx2.TransportError):
            return connection_failed(
                self.name, mid_stream=mid_stream, cause=exc, secrets=self._secrets
            )
        log.warning("unexpected %s from %s", type(exc).__name__, self.name)
        return unexpected(self.name)

    async def stream(
        self, messages: Sequence[ChatMessage], model: str, options: GenerateOptions
    ) -> AsyncIterator[StreamEvent]:
        """Translate the typed events (second half); ping and unknown types are skipped."""
        body = self.build_request(messages, model, options)
        prompt_tokens = 0
        answering = False
        try:
            async with self.client.messages.stream(**body) as events:
                async for event in events:
                    # The SDK builds an event of an unknown type as the first model of
                    # its union (a message_start with no message), so check the type too.
                    kind = getattr(event, "type", None)
                    if isinstance(event, at.RawMessageStartEvent) and kind == "message_start":
                        prompt_tokens = event.message.usage.input_tokens or 0
                    elif (
                        isinstance(event, at.RawContentBlockDeltaEvent)
                        and kind == "content_block_delta"
                    ):
                        delta = event.delta
                        if isinstance(delta, at.TextDelta) and delta.text:
                            answering = True
                            yield TextDelta(delta.text)
                        elif isinstance(delta, at.ThinkingDelta) and delta.thinking:
                            answering = True
                            yield ReasoningDelta(delta.thinking)
                    elif isinstance(event, at.RawMessageDeltaEvent) and kind == "message_delta":
                        usage = event.usage
                        if usage.input_tokens is not None:
                            prompt_tokens = usage.input_tokens
                        yield Usage(prompt_tokens, usage.output_tokens or 0)
                        reason = event.delta.stop_reason
                        if reason == "refusal":
                            raise content_filtered(self.name)
                        if reason == "model_context_window_exceeded":
                            raise make("context_length", provider=self.name, model=model)
                        if reason:
                            yield Finish(_FINISH.get(reason, reason))
                    # ping is dropped by the SDK; unknown and other event types are skipped
        except (anthropic.AnthropicError, httpx2.HTTPError) as exc:
            raise self.map_error(exc, model, mid_stream=answering) from None

    async def aclose(self) -> None:
        """Close the SDK client's connection pool."""
        await self.client.close()
