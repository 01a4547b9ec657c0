"""Per-user limits on runs: start rate, concurrency, max_tokens, message length, daily tokens.

Everything here is in memory and O(1) per check. The daily token quota is counted as
tokens stream (an estimate per delta, replaced by the upstream's usage at the end) and
written to SQLite once per finished run, never per token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from typing import TYPE_CHECKING, Any

from app.driver import Target
from app.errors import ApiError
from app.settings import LimitsSettings, UserLimits
from providers.base import (
    ChatMessage,
    GenerateOptions,
    ProviderError,
    ProviderInfo,
    ReasoningDelta,
    StreamEvent,
    TextDelta,
    Usage,
)

if TYPE_CHECKING:
    from app.runs import Run
    from app.store import Store
    from providers.base import Provider

log = logging.getLogger(__name__)

# For a ChatService built without limits (tests of the streaming core, benchmarks).
UNLIMITED = LimitsSettings(
    defaults=UserLimits(
        streams_per_minute=0,
        stream_burst=0,
        concurrent_runs=0,
        max_tokens=0,
        max_message_chars=0,
        max_conversations=0,
        tokens_per_day=0,
    )
)
# A concurrent-run rejection cannot know when a slot frees up; this is a hint.
CONCURRENCY_RETRY_AFTER = 5


def utc_day(now: float | None = None) -> str:
    """The UTC day (YYYY-MM-DD) quotas are counted in."""
    return datetime.datetime.fromtimestamp(
        time.time() if now is None else now, datetime.UTC
    ).strftime("%Y-%m-%d")


def seconds_to_midnight(now: float | None = None) -> int:
    """Seconds until the next UTC day, when daily quotas reset."""
    now = time.time() if now is None else now
    return int(86_400 - now % 86_400) + 1


def estimate_tokens(text: str) -> int:
    """A cheap token estimate: about four characters a token, at least one per delta."""
    return max(1, len(text) // 4)


def too_many(code: str, message: str, retry_after: float, limit: str) -> ApiError:
    """A 429 with Retry-After; also the WebSocket error event (code, retry_after)."""
    seconds = max(1, math.ceil(retry_after))
    return ApiError(
        429,
        code,
        message,
        headers={"Retry-After": str(seconds)},
        retryable=True,
        retry_after=seconds,
        limit=limit,
    )


class _UserState:
    __slots__ = ("bucket", "bucket_at", "live", "streaming")

    def __init__(self, burst: float) -> None:
        self.bucket = burst
        self.bucket_at = time.monotonic()
        self.live = 0  # admitted runs not yet finished
        self.streaming = 0  # estimated tokens of those runs, not yet committed


class Ticket:
    """One admitted run start: holds a live slot until the run ends (or is never launched)."""

    def __init__(
        self, limiter: Limiter, user_id: str, options: GenerateOptions, clamped_from: int | None
    ) -> None:
        self.limiter = limiter
        self.user_id = user_id
        self.options = options
        self.clamped_from = clamped_from
        self.launched = False
        self.settled = False
        self.streamed = 0
        self.prompt_estimate = 0
        self.usage: Usage | None = None

    def guard(self, run: Run, chain: Sequence[Target]) -> list[Target]:
        """Meter every provider of the run's chain against the user's quota."""
        self.launched = True
        self.limiter.tickets[run.message_id] = self
        quota = self.limiter.settings.for_user(self.user_id).tokens_per_day
        if not quota and self.clamped_from is None:
            return list(chain)  # nothing to meter or report: no wrapper in the relay path
        return [dataclasses.replace(t, provider=_Metered(t.provider, self, run)) for t in chain]


class _Metered:
    """Wraps a provider for one run: counts tokens, reports a clamp, ends the run at quota."""

    def __init__(self, inner: Provider, ticket: Ticket, run: Run) -> None:
        self.inner = inner
        self.ticket = ticket
        self.run = run
        self.info: ProviderInfo = inner.info

    async def stream(
        self, messages: Sequence[ChatMessage], model: str, options: GenerateOptions
    ) -> AsyncIterator[StreamEvent]:
        """The inner stream, metered."""
        ticket, limiter = self.ticket, self.ticket.limiter
        if not ticket.prompt_estimate:
            ticket.prompt_estimate = sum(estimate_tokens(m.content) for m in messages)
        if ticket.clamped_from is not None:
            self.run.publish(
                {
                    "type": "status",
                    "message_id": self.run.message_id,
                    "state": "clamped",
                    "max_tokens": ticket.options.max_tokens,
                    "requested_max_tokens": ticket.clamped_from,
                    "message": f"max_tokens lowered from {ticket.clamped_from} to "
                    f"{ticket.options.max_tokens}, this server's limit.",
                }
            )
            ticket.clamped_from = None
        uid = ticket.user_id
        quota = limiter.settings.for_user(uid).tokens_per_day
        state = limiter._state(uid)
        limiter.check_quota(uid, mid_stream=True)
        agen = self.inner.stream(messages, model, options)
        async with aclosing(agen):  # type: ignore[type-var]
            async for ev in agen:  # per token: keep this loop lean (no calls, no DB)
                if type(ev) is TextDelta or type(ev) is ReasoningDelta:
                    n = len(ev.text) >> 2 or 1  # estimate_tokens(), inlined
                    ticket.streamed += n
                    state.streaming += n
                elif type(ev) is Usage:
                    ticket.usage = ev
                yield ev
                # After the yield, so the delta that crossed the line stays with the text.
                # The sum is a cheap pre-check; check_quota decides (and rolls the day).
                if quota and state.streaming + limiter.used.get(uid, 0) >= quota:
                    limiter.check_quota(uid, mid_stream=True)

    async def aclose(self) -> None:
        """The wrapped provider belongs to the registry, which closes it."""


class QuotaStop(ProviderError):
    """A run stopped mid-answer by its user's daily token quota, not by the provider."""

    upstream = False


class Limiter:
    """Admits run starts per user and meters their tokens; one per app."""

    def __init__(self, settings: LimitsSettings, store: Store | None = None) -> None:
        self.settings = settings
        self.store = store
        self.users: dict[str, _UserState] = {}
        self.tickets: dict[str, Ticket] = {}  # by message id, while the run lives
        self.day = utc_day()
        self._day_ends = 0.0  # when self.day is over (epoch seconds)
        self.used: dict[str, int] = {}  # tokens committed today, by user
        self._writes: set[asyncio.Task[None]] = set()
        self._conversation_locks: dict[str, asyncio.Lock] = {}

    async def load(self) -> None:
        """Read today's usage so a restart does not reset the quotas."""
        if self.store is not None:
            self.used = await self.store.usage_for_day(self.day)

    async def close(self) -> None:
        """Wait for the last usage writes (before the store closes)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    def _state(self, user_id: str) -> _UserState:
        state = self.users.get(user_id)
        if state is None:
            burst = max(1, self.settings.for_user(user_id).stream_burst)
            state = self.users[user_id] = _UserState(burst)
        return state

    def _roll_day(self) -> None:
        # called per streamed token: one float comparison unless midnight (UTC) has passed
        now = time.time()
        if now >= self._day_ends:
            self._day_ends = now + seconds_to_midnight(now) - 1
            today = utc_day(now)
            if today != self.day:
                self.day, self.used = today, {}

    # -- admission -----------------------------------------------------------------------

    def admit(
        self,
        user_id: str,
        content: str | None,
        options: GenerateOptions,
        field: str = "content",
    ) -> Ticket:
        """Check a run start against the user's limits; raise ApiError 400/429 if over.

        `content` is the new message (`field` names it in the error). Nothing is stored
        before this passes. The returned ticket holds a live slot until the run ends, or
        until `settle` frees it when no run was launched.
        """
        lim = self.settings.for_user(user_id)
        if lim.max_message_chars and content is not None and len(content) > lim.max_message_chars:
            raise ApiError(
                400,
                "bad_request",
                f"Field '{field}' is longer than {lim.max_message_chars} characters"
                " (this server's limit).",
                field=field,
            )
        state = self._state(user_id)
        if lim.concurrent_runs and state.live >= lim.concurrent_runs:
            raise too_many(
                "rate_limited",
                f"You already have {state.live} answers being generated (the limit is "
                f"{lim.concurrent_runs}). Wait for one to finish or stop one.",
                CONCURRENCY_RETRY_AFTER,
                "concurrent_runs",
            )
        self.check_quota(user_id, mid_stream=False)
        if lim.streams_per_minute:
            rate = lim.streams_per_minute / 60.0
            burst = max(1, lim.stream_burst)
            now = time.monotonic()
            state.bucket = min(burst, state.bucket + (now - state.bucket_at) * rate)
            state.bucket_at = now
            if state.bucket < 1:
                raise too_many(
                    "rate_limited",
                    f"Too many answers started (the limit is {lim.streams_per_minute:g} a "
                    "minute). Try again shortly.",
                    (1 - state.bucket) / rate,
                    "streams_per_minute",
                )
            state.bucket -= 1
        clamped_from = None
        if (
            lim.max_tokens
            and options.max_tokens is not None
            and options.max_tokens > lim.max_tokens
        ):
            clamped_from = options.max_tokens
            options = dataclasses.replace(options, max_tokens=lim.max_tokens)
        state.live += 1
        return Ticket(self, user_id, options, clamped_from)

    def settle(self, ticket: Ticket | None) -> None:
        """Free an admitted ticket that no run took (the start failed after admission)."""
        if ticket is None or ticket.launched or ticket.settled:
            return
        ticket.settled = True
        state = self._state(ticket.user_id)
        state.live -= 1
        lim = self.settings.for_user(ticket.user_id)
        state.bucket = min(max(1, lim.stream_burst), state.bucket + 1)

    # -- metering ------------------------------------------------------------------------

    def check_quota(self, user_id: str, *, mid_stream: bool) -> None:
        """Raise when the user's daily tokens are used up (429 at start, an error mid-run)."""
        quota = self.settings.for_user(user_id).tokens_per_day
        if not quota:
            return
        self._roll_day()
        used = self.used.get(user_id, 0) + self._state(user_id).streaming
        if used < quota:
            return
        wait = seconds_to_midnight()
        message = (
            f"Your daily token quota ({quota}) is used up; it resets at 00:00 UTC"
            f" (in {wait // 3600} h {wait % 3600 // 60} min)."
        )
        if mid_stream:
            raise QuotaStop("quota_exceeded", message, retryable=False, retry_after=wait)
        raise too_many("quota_exceeded", message, wait, "tokens_per_day")

    def finished(self, run: Run) -> None:
        """A run ended: free its slot, commit its tokens, save them (one write per run)."""
        ticket = self.tickets.pop(run.message_id, None)
        if ticket is None or ticket.settled:
            return
        ticket.settled = True
        state = self._state(ticket.user_id)
        state.live -= 1
        state.streaming -= ticket.streamed
        if ticket.usage is not None:
            tokens = ticket.usage.prompt_tokens + ticket.usage.completion_tokens
        elif ticket.streamed:
            tokens = ticket.prompt_estimate + ticket.streamed
        else:
            tokens = 0  # nothing was generated (failed before the first token)
        if tokens <= 0:
            return
        self._roll_day()
        self.used[ticket.user_id] = self.used.get(ticket.user_id, 0) + tokens
        if self.store is not None:
            task = asyncio.create_task(self._save(ticket.user_id, self.day, tokens))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _save(self, user_id: str, day: str, tokens: int) -> None:
        assert self.store is not None
        try:
            await self.store.add_usage(user_id, day, tokens)
        except Exception:
            log.exception("could not save token usage of user %s", user_id)

    # -- conversations -------------------------------------------------------------------

    @asynccontextmanager
    async def new_conversation(self, user_id: str) -> AsyncIterator[None]:
        """Hold the user's conversation-count check and the insert together (no race)."""
        lock = self._conversation_locks.setdefault(user_id, asyncio.Lock())
        async with lock:
            cap = self.settings.for_user(user_id).max_conversations
            if (
                cap
                and self.store is not None
                and await self.store.count_conversations(user_id) >= cap
            ):
                raise ApiError(
                    403,
                    "limit_reached",
                    f"You have {cap} conversations, this server's limit. Delete some first.",
                    limit="max_conversations",
                )
            yield

    def snapshot(self, user_id: str) -> dict[str, Any]:
        """The user's current standing (for GET /api/v1/session)."""
        lim = self.settings.for_user(user_id)
        state = self._state(user_id)
        self._roll_day()
        return {
            **dataclasses.asdict(lim),
            "live_runs": state.live,
            "tokens_today": self.used.get(user_id, 0) + state.streaming,
        }
