"""OpenAI and every OpenAI-compatible API (DeepSeek, Ollama, vLLM, llama.cpp) via the openai SDK."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx2
import openai

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
from providers.errors import connection_failed, from_status, scrub, timed_out

log = logging.getLogger(__name__)


class OpenAICompatProvider:
    """Streams chat.completions; closing the stream closes the upstream HTTP response."""

    def __init__(self, settings: ProviderSettings, *, base_url: str | None = None) -> None:
        self.settings = settings
        self.name = settings.name
        key = settings.api_key.get() if settings.api_key else "none"
        self._secrets = (key,)
        self.client = openai.AsyncOpenAI(
            api_key=key,
            base_url=base_url or settings.base_url,
            # Our driver retries with backoff before the first token and enforces the
            # first-token/idle/total timeouts itself; SDK retries would hide them.
            max_retries=0,
            timeout=httpx2.Timeout(
                connect=settings.connect_timeout,
                read=max(settings.first_token_timeout, settings.idle_timeout),
                write=settings.connect_timeout,
                pool=settings.connect_timeout,
            ),
        )
        self.info = ProviderInfo(
            name=settings.name,
            kind=settings.kind,
            models=settings.models,
            default_model=settings.default_model,
            supports_prefill=False,
        )

    def build_request(
        self, messages: Sequence[ChatMessage], model: str, options: GenerateOptions
    ) -> dict[str, Any]:
        """The chat.completions request body (first half of the adapter)."""
        msgs: list[dict[str, str]] = [{"role": m.role, "content": m.content} for m in messages]
        if options.prefill:
            msgs.append({"role": "assistant", "content": options.prefill})
            msgs.append(
                {
                    "role": "user",
                    "content": "Continue your previous answer exactly where it stopped, "
                    "without repeating any of it.",
                }
            )
        body: dict[str, Any] = {
            "model": model,
            "messages": msgs,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if options.temperature is not None:
            body["temperature"] = options.temperature
        if options.max_tokens is not None:
            body["max_tokens"] = options.max_tokens
        if options.top_p is not None:
            body["top_p"] = options.top_p
        if options.stop:
            body["stop"] = list(options.stop)
        if options.seed is not None:
            body["seed"] = options.seed
        return body

    def map_error(self, exc: Exception, model: str) -> ProviderError:
        """Translate an SDK or transport exception into our error codes."""
        if isinstance(exc, openai.APIStatusError):
            detail = scrub(str(getattr(exc, "message", "") or exc), self._secrets)
            body = exc.body if isinstance(exc.body, dict) else {}
            etype = str(body.get("code") or body.get("type") or "")
            return from_status(
                exc.status_code,
                detail,
                provider=self.name,
                model=model,
                headers=exc.response.headers,
                error_type=etype,
            )
        if isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException):
            return timed_out(self.name)
        if isinstance(exc, openai.APIConnectionError | httpx2.TransportError):
            return connection_failed(self.name)
        if isinstance(exc, openai.APIError):
            # an error object inside the stream
            detail = scrub(str(exc.message), self._secrets)
            body = exc.body if isinstance(exc.body, dict) else {}
            etype = str(body.get("code") or body.get("type") or "")
            low = (detail + etype).lower()
            if "overloaded" in low:
                return from_status(529, detail, provider=self.name, model=model)
            if "rate" in low and "limit" in low:
                return from_status(429, detail, provider=self.name, model=model)
            return ProviderError(
                "upstream_unavailable", f"{self.name} failed mid-answer: {detail[:200]}"
            )
        log.warning("unexpected %s from %s", type(exc).__name__, self.name)
        return ProviderError("internal", f"Unexpected failure talking to {self.name}.")

    async def stream(
        self, messages: Sequence[ChatMessage], model: str, options: GenerateOptions
    ) -> AsyncIterator[StreamEvent]:
        """Translate the chunk stream into normalized events (second half)."""
        body = self.build_request(messages, model, options)
        try:
            upstream = await self.client.chat.completions.create(**body)
        except (openai.OpenAIError, httpx2.HTTPError) as exc:
            raise self.map_error(exc, model) from None
        try:
            async for chunk in upstream:
                if chunk.usage is not None:
                    yield Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                delta = choice.delta
                if delta is not None:
                    extra = delta.model_extra
                    if extra:
                        reasoning = extra.get("reasoning_content") or extra.get("reasoning")
                        if reasoning:
                            yield ReasoningDelta(reasoning)
                    if delta.content:
                        yield TextDelta(delta.content)
                if choice.finish_reason:
                    if choice.finish_reason == "content_filter":
                        raise ProviderError(
                            "content_filtered",
                            f"{self.name} stopped the answer under its content policy.",
                        )
                    yield Finish(choice.finish_reason)
        except (openai.OpenAIError, httpx2.HTTPError) as exc:
            raise self.map_error(exc, model) from None
        finally:
            await upstream.close()

    async def aclose(self) -> None:
        """Close the SDK client's connection pool."""
        await self.client.close()
