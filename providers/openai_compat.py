"""OpenAI and every OpenAI-compatible API (DeepSeek, Ollama, vLLM, llama.cpp) via the openai SDK."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
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
from providers.errors import (
    connection_failed,
    content_filtered,
    from_status,
    timed_out,
    unexpected,
)
from providers.http2 import H2Transport

log = logging.getLogger(__name__)


# The SDK tells the provider this machine's OS, CPU architecture, Python version and SDK
# version on every request, and the attempt's retry count and read timeout (our driver
# retries, not the SDK): 8 of its 12 headers, none of them the provider's business, and
# kept with the request for as long as the answer streams (10,000 streams hold 10,000).
NO_SDK_HEADERS: dict[str, str | openai.Omit] = {
    name: openai.Omit()
    for name in (
        "X-Stainless-Lang",
        "X-Stainless-Package-Version",
        "X-Stainless-OS",
        "X-Stainless-Arch",
        "X-Stainless-Runtime",
        "X-Stainless-Runtime-Version",
        "X-Stainless-Async",
        "X-Stainless-Retry-Count",
        "X-Stainless-Read-Timeout",
    )
}


class ChunkStream(openai.AsyncStream[object]):
    """The SDK's stream of parsed JSON chunks, as a concrete class: instantiating the
    generic alias `AsyncStream[object]` also stores it on every stream (`__orig_class__`)."""


# The SDK's read timeout is only a backstop: the driver's first-token and idle timeouts
# fire first (with a clearer message) because this margin keeps the SDK's later.
SDK_TIMEOUT_MARGIN = 5.0


def sdk_timeout(settings: ProviderSettings) -> httpx2.Timeout:
    """The httpx2 timeout for an SDK client: connect from settings, read as a backstop."""
    return httpx2.Timeout(
        connect=settings.connect_timeout,
        read=max(settings.first_token_timeout, settings.idle_timeout) + SDK_TIMEOUT_MARGIN,
        write=settings.connect_timeout,
        pool=settings.connect_timeout,
    )


def _error_fields(body: object) -> tuple[str, str]:
    """(message, code-or-type) from an OpenAI-style error body."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            msg = str(inner.get("message") or "")
            etype = str(inner.get("code") or inner.get("type") or "")
            return msg, etype
    return "", ""


def _timed_out(exc: BaseException) -> bool:
    """Whether a timeout error really is one.

    The SDK's aiohttp transport maps every aiohttp connection error, a refused or dropped
    connection included, to ConnectTimeout; the aiohttp error underneath tells them apart.
    """
    cause = exc.__cause__ or exc.__context__
    while cause is not None:
        if isinstance(cause, aiohttp.ClientConnectionError):
            return isinstance(cause, aiohttp.ServerTimeoutError)
        cause = cause.__cause__ or cause.__context__
    return True


class OpenAICompatProvider:
    """Streams chat.completions; closing the stream closes the upstream HTTP response."""

    def __init__(
        self, settings: ProviderSettings, *, base_url: str | None = None, keepalive: bool = True
    ) -> None:
        """`keepalive=False`: a new connection per request (see LocalProvider)."""
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
            # No read timeout: the driver's deadlines bound every read, and aiohttp would
            # re-arm a read timer on each packet (~6% of the CPU at 10,000 slow streams).
            timeout=httpx2.Timeout(
                connect=settings.connect_timeout,
                read=None,
                write=settings.connect_timeout,
                pool=settings.connect_timeout,
            ),
            http_client=self._http_client(settings, keepalive),
        )
        self.info = ProviderInfo(
            name=settings.name,
            kind=settings.kind,
            models=settings.models,
            default_model=settings.default_model,
        )

    @staticmethod
    def _http_client(settings: ProviderSettings, keepalive: bool) -> httpx2.AsyncClient:
        """The SDK's HTTP client: HTTP/2 if the settings ask for it, else aiohttp's HTTP/1.1."""
        if settings.http2:
            # streams share connections: 10,000 runs need 100 sockets to the provider,
            # not 10,000 (see providers/http2.py)
            return openai.DefaultAsyncHttpxClient(transport=H2Transport())
        # The SDK's aiohttp backend: httpcore's pool rescans every connection on each
        # request and response (quadratic at thousands of streams) and its default stops
        # at 1,000. limit 0 = unbounded: runs already bound concurrency.
        return openai.DefaultAioHttpClient(
            limits=httpx2.Limits(
                max_connections=0,
                max_keepalive_connections=100 if keepalive else 0,
                # the aiohttp backend's keep-alive timeout: at 0 no idle connection
                # is ever reused (aiohttp reuses one idle for at most this long)
                keepalive_expiry=5.0 if keepalive else 0.0,
            )
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

    def map_error(self, exc: Exception, model: str, *, mid_stream: bool = False) -> ProviderError:
        """Translate an SDK or transport exception into our error codes."""
        if isinstance(exc, openai.APIStatusError):
            msg, etype = _error_fields(exc.body)
            return from_status(
                exc.status_code,
                msg or str(exc.message),
                provider=self.name,
                model=model,
                headers=exc.response.headers,
                error_type=etype,
                secrets=self._secrets,
            )
        if isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException) and _timed_out(exc):
            return timed_out(self.name)
        if isinstance(exc, openai.APIConnectionError | httpx2.TransportError):
            return connection_failed(
                self.name, mid_stream=mid_stream, cause=exc, secrets=self._secrets
            )
        if isinstance(exc, openai.APIError):
            # an {"error": ...} object inside the 200 stream
            msg, etype = _error_fields({"error": exc.body})
            return from_status(
                0,
                msg or str(exc.message),
                provider=self.name,
                model=model,
                error_type=etype,
                secrets=self._secrets,
            )
        log.warning("unexpected %s from %s", type(exc).__name__, self.name)
        return unexpected(self.name)

    async def stream(
        self, messages: Sequence[ChatMessage], model: str, options: GenerateOptions
    ) -> AsyncIterator[StreamEvent]:
        """Translate the chunk stream into normalized events (second half)."""
        body = self.build_request(messages, model, options)
        try:
            # The SDK's generic post with cast_to=object: it still authenticates, sends,
            # raises status errors, decodes the SSE and raises in-stream errors, but yields
            # each chunk as parsed JSON instead of building pydantic models (half the
            # server's CPU when relaying) and skips re-walking our body against its
            # TypedDicts (~0.3 ms per request). See docs/performance.md.
            upstream = await self.client.post(
                "/chat/completions",
                body=body,
                cast_to=object,
                stream=True,
                stream_cls=ChunkStream,
                options={"headers": NO_SDK_HEADERS},
            )
        except (openai.OpenAIError, httpx2.HTTPError) as exc:
            raise self.map_error(exc, model) from None
        answering = False  # a dropped connection reads differently once text went out
        # The stream's own __anext__ rather than `async for`, whose __aiter__ is one more
        # async generator (and weak reference, and pending asend) held per open stream
        next_chunk = upstream.__anext__
        try:
            while True:
                try:
                    chunk = await next_chunk()
                except StopAsyncIteration:
                    break
                if not isinstance(chunk, dict):
                    continue
                usage = chunk.get("usage")
                if isinstance(usage, dict):
                    yield Usage(
                        int(usage.get("prompt_tokens") or 0),
                        int(usage.get("completion_tokens") or 0),
                    )
                choices = chunk.get("choices")
                if not choices or not isinstance(choices, list):
                    continue
                choice = choices[0]
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    # DeepSeek's `reasoning_content` (and `reasoning` of some other servers)
                    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                    if isinstance(reasoning, str) and reasoning:
                        answering = True
                        yield ReasoningDelta(reasoning)
                    content = delta.get("content")
                    if isinstance(content, str) and content:
                        answering = True
                        yield TextDelta(content)
                finish_reason = choice.get("finish_reason")
                if finish_reason:
                    if finish_reason == "content_filter":
                        raise content_filtered(self.name)
                    yield Finish(str(finish_reason))
        except (openai.OpenAIError, httpx2.HTTPError) as exc:
            raise self.map_error(exc, model, mid_stream=answering) from None
        finally:
            await upstream.close()

    async def aclose(self) -> None:
        """Close the SDK client's connection pool."""
        await self.client.close()
