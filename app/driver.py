"""Drive one provider stream into a Run: timeouts, retries before the first token, fallback."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from app.deadlines import Deadlines
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
# A Retry-After longer than this is not worth holding the user for: fail (or fall back).
MAX_RETRY_AFTER = 30.0


@dataclass(frozen=True)
class Target:
    """One provider of a fallback chain, with the model to ask it for."""

    provider: Provider
    settings: ProviderSettings
    model: str


class _Timeouts:
    """First-token, idle and total deadlines, one entry in the runner's Deadlines that
    moves lazily.

    Moving a deadline per token is a heap operation each (5% of the server's CPU at
    10,000 slow streams). Instead each event only records the time (`seen`); the entry
    is added for the earliest possible deadline and, when it comes due, re-adds itself
    for the real one if events came meanwhile, so it moves about once per idle_timeout.
    On expiry it cancels the streaming task, as asyncio.timeout does, and `expired()`
    tells that cancellation apart from any other.
    """

    __slots__ = (
        "_cancelling",
        "_closed",
        "_deadlines",
        "_fired",
        "first",
        "last",
        "loop",
        "s",
        "start",
        "task",
        "total_deadline",
    )

    def __init__(self, s: ProviderSettings, deadlines: Deadlines) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.s = s
        self.start = self.last = loop.time()
        self.total_deadline = self.start + s.total_timeout
        self.first = True
        self.task = asyncio.current_task()
        assert self.task is not None
        self._cancelling = self.task.cancelling()
        self._fired = False
        self._closed = False
        self._deadlines = deadlines
        deadlines.add(self.deadline(), self)

    def deadline(self) -> float:
        if self.first:
            return min(self.start + self.s.first_token_timeout, self.total_deadline)
        return min(self.last + self.s.idle_timeout, self.total_deadline)

    def seen(self, now: float) -> None:
        """An event arrived (`now` is the loop's time)."""
        self.last = now

    def due(self) -> None:
        """The entry came due: cancel the stream if a deadline passed, else re-add it."""
        if self._closed:
            return
        deadline = self.deadline()
        if self.loop.time() < deadline:
            self._deadlines.add(deadline, self)
            return
        self._fired = True
        assert self.task is not None
        self.task.cancel()

    def expired(self) -> bool:
        """Whether the cancellation being handled is this timer's (and consume it)."""
        assert self.task is not None
        return self._fired and self.task.uncancel() <= self._cancelling

    def close(self) -> None:
        # the entry stays in the heap until it comes due: it must not cancel anything
        self._closed = True

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
    deadlines: Deadlines,
    on_gap: Callable[[float], None] | None = None,
) -> None:
    """Stream one attempt into the run; raises ProviderError on failure."""
    timeouts = _Timeouts(target.settings, deadlines)
    last: float | None = None  # when the previous text delta came (for on_gap)
    publish_text = run.publish_text
    clock = timeouts.loop.time
    try:
        agen = target.provider.stream(messages, target.model, options)
        # try/finally rather than contextlib.aclosing: no context manager and bound
        # __aexit__ held for as long as the stream is open, times every open stream
        try:
            async for ev in agen:
                now = clock()
                timeouts.seen(now)
                if type(ev) is TextDelta:
                    if not ev.text:
                        continue
                    if timeouts.first:
                        timeouts.first = False
                        run.first_token_at = time.monotonic()
                    if last is not None and on_gap is not None:
                        on_gap(now - last)  # inter-token latency metric
                    last = now
                    run.text_events += 1
                    publish_text(ev.text)
                elif type(ev) is ReasoningDelta:
                    if timeouts.first:
                        timeouts.first = False
                        run.first_token_at = time.monotonic()
                    run.publish_reasoning(ev.text)
                elif type(ev) is Usage:
                    run.usage = {
                        "prompt_tokens": ev.prompt_tokens,
                        "completion_tokens": ev.completion_tokens,
                    }
                elif type(ev) is Finish:
                    run.finish_reason = ev.reason
        finally:
            await agen.aclose()  # type: ignore[attr-defined]
    except asyncio.CancelledError:
        if timeouts.expired():
            raise timeouts.error() from None
        raise
    finally:
        timeouts.close()


def _backoff(attempt: int, err: ProviderError) -> float:
    if err.retry_after is not None:
        return float(err.retry_after)
    return min(MAX_BACKOFF, 0.25 * 2.0**attempt) * (0.5 + random.random() / 2)


def _announce_fallback(run: Run, prev: str, target: Target) -> None:
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


def _announce_retry(
    run: Run, target: Target, err: ProviderError, attempt: int, delay: float
) -> None:
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


async def drive(
    run: Run,
    chain: Sequence[Target],
    messages: Sequence[ChatMessage],
    options: GenerateOptions,
    deadlines: Deadlines,
    on_gap: Callable[[float], None] | None = None,
    on_failure: Callable[[str, str, str], None] | None = None,
) -> None:
    """Stream from the first target that works; retry only before anything was sent.

    `deadlines` watches each attempt's first-token, idle and total timeouts.
    `on_gap` is called with the seconds between consecutive text deltas, and `on_failure`
    with (provider, error code, what happens next: retry, fallback or fail) for every
    attempt the provider failed (not for a stop of this server's, such as a user's quota).
    """
    last_error: ProviderError | None = None
    for index, target in enumerate(chain):
        if index > 0:
            _announce_fallback(run, chain[index - 1].settings.name, target)
        for attempt in range(target.settings.retries + 1):
            sent_before = run.text_events + len(run.reasoning)
            try:
                await _stream_once(run, target, messages, options, deadlines, on_gap)
                return
            except ProviderError as err:
                last_error = err
                nothing_sent = run.first_token_at is None and sent_before == 0
                retry = (
                    nothing_sent
                    and err.retryable
                    and attempt < target.settings.retries
                    and (err.retry_after is None or err.retry_after <= MAX_RETRY_AFTER)
                )
                fallback = nothing_sent and not retry and index + 1 < len(chain)
                if on_failure is not None and err.upstream:
                    then = "retry" if retry else "fallback" if fallback else "fail"
                    on_failure(target.settings.name, err.code, then)
                if not nothing_sent:
                    raise
                if not retry:
                    break
                delay = _backoff(attempt, err)
                _announce_retry(run, target, err, attempt, delay)
                await asyncio.sleep(delay)
    assert last_error is not None
    raise last_error
