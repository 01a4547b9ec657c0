"""Gemini through the official google-genai SDK (`generate_content_stream`)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import aiohttp
import httpx2
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

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

log = logging.getLogger(__name__)

# Gemini finish reasons that mean "stopped by policy"; the rest map to OpenAI's words.
_BLOCKED = frozenset(
    {
        "SAFETY",
        "PROHIBITED_CONTENT",
        "BLOCKLIST",
        "SPII",
        "RECITATION",
        "IMAGE_SAFETY",
        "MODEL_ARMOR",
    }
)
_FINISH = {"STOP": "stop", "MAX_TOKENS": "length"}
_DELAY = re.compile(r"^\s*([0-9.]+)s\s*$")

_Item = types.GenerateContentResponse | BaseException | None


def _retry_delay(details: object) -> float | None:
    """The wait from a google.rpc.RetryInfo in an error body, e.g. "retryDelay": "3s"."""
    error = details.get("error", details) if isinstance(details, dict) else None
    infos = error.get("details") if isinstance(error, dict) else None
    for info in infos if isinstance(infos, list) else []:
        if isinstance(info, dict) and "retryDelay" in info:
            m = _DELAY.match(str(info["retryDelay"]))
            if m:
                return float(m.group(1))
    return None


def _reason(details: object) -> str:
    """The ErrorInfo reason (e.g. API_KEY_INVALID) from an error body, if any."""
    error = details.get("error", details) if isinstance(details, dict) else None
    infos = error.get("details") if isinstance(error, dict) else None
    for info in infos if isinstance(infos, list) else []:
        if isinstance(info, dict) and info.get("reason"):
            return str(info["reason"])
    return ""


def _name(value: object) -> str:
    """An enum member's name or a plain string, upper-cased."""
    return str(getattr(value, "value", value) or "").upper()


class GeminiProvider:
    """Streams Gemini answers; closing the stream closes the upstream HTTP response."""

    def __init__(self, settings: ProviderSettings) -> None:
        self.settings = settings
        self.name = settings.name
        key = settings.api_key.get() if settings.api_key else ""
        self._secrets = (key,)
        self.client = genai.Client(
            api_key=key,
            vertexai=False,
            http_options=types.HttpOptions(
                base_url=settings.base_url,
                # One attempt: the driver owns retries (before the first token only) and
                # Retry-After; the SDK's own retries and its 1-10 s reconnect sleep would
                # hide our timeouts. The SDK's timeout is a total-only backstop in ms.
                retry_options=types.HttpRetryOptions(attempts=1),
                timeout=int((settings.total_timeout + 5) * 1000),
            ),
        )
        self.info = ProviderInfo(
            name=settings.name,
            kind=settings.kind,
            models=settings.models,
            default_model=settings.default_model,
        )

    def build_request(
        self, messages: Sequence[ChatMessage], options: GenerateOptions
    ) -> tuple[list[types.Content], types.GenerateContentConfig]:
        """Contents and config (first half): system prompt apart, assistant turns as "model"."""
        system = "\n\n".join(m.content for m in messages if m.role == "system")
        contents = [
            types.Content(
                role="model" if m.role == "assistant" else "user",
                parts=[types.Part(text=m.content)],
            )
            for m in messages
            if m.role != "system"
        ]
        if options.prefill:
            contents.append(types.Content(role="model", parts=[types.Part(text=options.prefill)]))
            contents.append(
                types.Content(
                    role="user",
                    parts=[
                        types.Part(
                            text="Continue your previous answer exactly where it stopped, "
                            "without repeating any of it."
                        )
                    ],
                )
            )
        config = types.GenerateContentConfig(
            system_instruction=system or None,
            temperature=options.temperature,
            max_output_tokens=options.max_tokens,
            top_p=options.top_p,
            stop_sequences=list(options.stop) or None,
            seed=options.seed,
            # one request per stream: no tool-calling loop, no resume-on-drop hops
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
            automatic_continuation=False,
        )
        return contents, config

    def map_error(
        self, exc: BaseException, model: str, *, mid_stream: bool = False
    ) -> ProviderError:
        """Translate a google-genai, aiohttp or httpx2 exception into our error codes."""
        if isinstance(exc, genai_errors.APIError):
            headers = getattr(exc.response, "headers", None)
            return from_status(
                int(exc.code or 0),
                str(exc.message or exc.status or ""),
                provider=self.name,
                model=model,
                headers=headers,
                error_type=_reason(exc.details) or str(exc.status or ""),
                retry_after=_retry_delay(exc.details),
                secrets=self._secrets,
            )
        if isinstance(exc, TimeoutError | httpx2.TimeoutException):
            return timed_out(self.name)
        if isinstance(exc, aiohttp.ClientError | httpx2.TransportError | OSError):
            return connection_failed(
                self.name, mid_stream=mid_stream, cause=exc, secrets=self._secrets
            )
        if isinstance(exc, genai_errors.UnknownApiResponseError):
            return connection_failed(
                self.name, mid_stream=mid_stream, cause=exc, secrets=self._secrets
            )
        log.warning("unexpected %s from %s", type(exc).__name__, self.name)
        return unexpected(self.name)

    def translate(self, chunk: types.GenerateContentResponse) -> Iterator[StreamEvent]:
        """One response chunk as normalized events (second half); raises on a block.

        A generator, so a chunk's text still goes out before its SAFETY stop raises.
        """
        if not chunk.candidates:
            feedback = chunk.prompt_feedback
            if feedback is not None and feedback.block_reason:
                raise content_filtered(self.name, prompt=True)
        for cand in (chunk.candidates or [])[:1]:
            for part in (cand.content.parts if cand.content else None) or []:
                if part.text:
                    yield ReasoningDelta(part.text) if part.thought else TextDelta(part.text)
            reason = _name(cand.finish_reason)
            if reason in _BLOCKED:
                raise content_filtered(self.name)
            if reason and reason != "FINISH_REASON_UNSPECIFIED":
                if chunk.usage_metadata is not None:
                    yield self._usage(chunk.usage_metadata)
                yield Finish(_FINISH.get(reason, reason.lower()))

    @staticmethod
    def _usage(u: types.GenerateContentResponseUsageMetadata) -> Usage:
        completion = (u.candidates_token_count or 0) + (u.thoughts_token_count or 0)
        return Usage(u.prompt_token_count or 0, completion)

    async def stream(
        self, messages: Sequence[ChatMessage], model: str, options: GenerateOptions
    ) -> AsyncIterator[StreamEvent]:
        """Stream a Gemini answer.

        The SDK nests async generators that release the HTTP response only when a read
        inside them is cancelled, not when they are closed at a yield. So a reader task
        iterates the SDK stream, and closing this generator cancels that task: the
        upstream connection closes at once, however the consumer stops.
        """
        contents, config = self.build_request(messages, options)
        queue: asyncio.Queue[_Item] = asyncio.Queue()

        async def read() -> None:
            try:
                sdk_stream: Any = await self.client.aio.models.generate_content_stream(
                    model=model, contents=contents, config=config
                )
                async for chunk in sdk_stream:
                    queue.put_nowait(chunk)  # unbounded: the reader never waits here
                queue.put_nowait(None)
            except Exception as exc:  # handed to the consumer, which maps it
                queue.put_nowait(exc)

        reader = asyncio.create_task(read(), name=f"gemini-read-{model}")
        answering = False
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise self.map_error(item, model, mid_stream=answering) from None
                for event in self.translate(item):
                    answering = answering or isinstance(event, TextDelta | ReasoningDelta)
                    yield event
        finally:
            reader.cancel()
            await asyncio.wait({reader})

    async def aclose(self) -> None:
        """Close the SDK's HTTP sessions."""
        await self.client.aio.aclose()
