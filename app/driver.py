"""Drive one provider stream into a Run: timeouts, retries before the first token, fallback."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from app.runs import Run
from app.settings import ProviderSettings
from providers.base import (
    ChatMessage,
    Finish,
    GenerateOptions,
    Provider,
    ProviderError,
    ReasoningDelta,
    TextDelta,
    Usage,
)

log = logging.getLogger(__name__)

MAX_BACKOFF = 8.0
# Moving the deadline timer is a heap operation; doing it per token cost ~8% of the relay's
# CPU at full speed, so it moves only when off by more than this (seconds).
RESCHEDULE_SLACK = 0.01
# A Retry-After longer than this is not worth holding the user for: fail (or fall back).
MAX_RETRY_AFTER = 30.0


@dataclass(frozen=True)
class Target:
    """One provider of a fallback chain, with the model to ask it for."""

    provider: Provider
    settings: ProviderSettings
    model: str


class _Timeouts:
    """First-token, idle and total deadlines folded into one asyncio.Timeout."""

    def __init__(self, s: ProviderSettings) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.s = s
        self.start = loop.time()
        self.total_deadline = self.start + s.total_timeout
        self.first = True

    def next_deadline(self) -> float:
        wait = self.s.first_token_timeout if self.first else self.s.idle_timeout
        return min(self.loop.time() + wait, self.total_deadline)

    def error(self) -> ProviderError:
        if self.loop.time() >= self.total_deadline - 0.001:
            return ProviderError(
                "timeout", f"The answer took longer than {self.s.total_timeout:g} s in total."
            )
        if self.first:
            return ProviderError(
                "timeout",
                f"The model did not start answering within {self.s.first_token_timeout:g} s.",
            )
        return ProviderError(
            "timeout", f"The model stopped sending for more than {self.s.idle_timeout:g} s."
        )


async def _stream_once(
    run: Run,
    target: Target,
    messages: Sequence[ChatMessage],
    options: GenerateOptions,
    on_gap: Callable[[float], None] | None = None,
) -> None:
    """Stream one attempt into the run; raises ProviderError on failure."""
    timeouts = _Timeouts(target.settings)
    last: float | None = None  # when the previous text delta came (for on_gap)
    mid = run.message_id
    content = run.content
    publish = run.publish
    try:
        # next_deadline() is a loop time, so timeout_at (asyncio.timeout takes a delay)
        async with asyncio.timeout_at(timeouts.next_deadline()) as cm:
            agen = target.provider.stream(messages, target.model, options)
            async with aclosing(agen):  # type: ignore[type-var]
                async for ev in agen:
                    if type(ev) is TextDelta:
                        if not ev.text:
                            continue
                        now = time.monotonic()
                        if timeouts.first:
                            timeouts.first = False
                            run.first_token_at = now
                        if last is not None and on_gap is not None:
                            on_gap(now - last)  # inter-token latency metric
                        last = now
                        content.append(ev.text)
                        run.text_events += 1
                        publish({"type": "chunk", "message_id": mid, "content": ev.text})
                    elif type(ev) is ReasoningDelta:
                        if timeouts.first:
                            timeouts.first = False
                            run.first_token_at = time.monotonic()
                        run.reasoning.append(ev.text)
                        publish({"type": "reasoning", "message_id": mid, "content": ev.text})
                    elif type(ev) is Usage:
                        run.usage = {
                            "prompt_tokens": ev.prompt_tokens,
                            "completion_tokens": ev.completion_tokens,
                        }
                    elif type(ev) is Finish:
                        run.finish_reason = ev.reason
                    deadline = timeouts.next_deadline()
                    if abs(deadline - (cm.when() or deadline)) > RESCHEDULE_SLACK:
                        cm.reschedule(deadline)
    except TimeoutError as exc:
        raise timeouts.error() from exc


def _backoff(attempt: int, err: ProviderError) -> float:
    if err.retry_after is not None:
        return float(err.retry_after)
    return min(MAX_BACKOFF, 0.25 * 2.0**attempt) * (0.5 + random.random() / 2)


async def drive(
    run: Run,
    chain: Sequence[Target],
    messages: Sequence[ChatMessage],
    options: GenerateOptions,
    on_gap: Callable[[float], None] | None = None,
) -> None:
    """Stream from the first target that works; retry only before anything was sent.

    `on_gap` is called with the seconds between consecutive text deltas (metrics).
    """
    last_error: ProviderError | None = None
    for index, target in enumerate(chain):
        if index > 0:
            prev = chain[index - 1].settings.name
            log.info("run %s falls back from %s to %s", run.message_id, prev, target.settings.name)
            run.provider, run.model = target.settings.name, target.model
            run.publish(
                {
                    "type": "status",
                    "message_id": run.message_id,
                    "state": "fallback",
                    "from": prev,
                    "to": target.settings.name,
                    "model": target.model,
                    "message": f"{prev} failed; answering with {target.settings.name}.",
                }
            )
        for attempt in range(target.settings.retries + 1):
            sent_before = run.text_events + len(run.reasoning)
            try:
                await _stream_once(run, target, messages, options, on_gap)
                return
            except ProviderError as err:
                last_error = err
                nothing_sent = run.first_token_at is None and sent_before == 0
                if not nothing_sent:
                    raise
                if not err.retryable or attempt >= target.settings.retries:
                    break
                if err.retry_after is not None and err.retry_after > MAX_RETRY_AFTER:
                    break
                delay = _backoff(attempt, err)
                log.info(
                    "run %s: %s from %s, retry %d in %.2f s",
                    run.message_id,
                    err.code,
                    target.settings.name,
                    attempt + 1,
                    delay,
                )
                run.publish(
                    {
                        "type": "status",
                        "message_id": run.message_id,
                        "state": "retrying",
                        "attempt": attempt + 1,
                        "code": err.code,
                        "delay": round(delay, 2),
                        "message": f"{err.message} Retrying in {delay:.1f} s.",
                    }
                )
                await asyncio.sleep(delay)
    assert last_error is not None
    raise last_error
