"""Runs: a generation owned by the server, sequenced, fanned out, persisted, cancellable."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from app.events import TERMINAL, encode

log = logging.getLogger(__name__)


def _joined(pieces: list[str]) -> str:
    """Join text pieces and keep the result as the only piece.

    Called at every flush, so a long answer is held as one string rather than an
    object per token (~60 bytes each; 10 KB at 180 tokens, times every open stream).
    """
    if len(pieces) == 1:
        return pieces[0]
    text = "".join(pieces)
    pieces[:] = (text,) if text else ()
    return text


class Run:
    """One live generation: its event log (seq = index + 1) and the text so far.

    Subscribers are cursors into the log, so a slow one costs no memory and never
    holds the run back; resuming is reading from a later cursor.
    """

    __slots__ = (
        "_finished",
        "_waiters",
        "cancel_requested",
        "client_message_id",
        "content",
        "conversation_id",
        "done",
        "error",
        "events",
        "final_status",
        "finish_reason",
        "finished_at",
        "first_token_at",
        "flushed_seq",
        "message_id",
        "model",
        "persist",
        "provider",
        "reasoning",
        "started_at",
        "subscribers",
        "task",
        "text_events",
        "usage",
        "user_id",
        "user_message_id",
    )

    def __init__(
        self,
        *,
        conversation_id: str,
        message_id: str,
        user_message_id: str | None,
        user_id: str,
        provider: str,
        model: str,
        prefix: str = "",
        prefix_reasoning: str = "",
        persist: bool = True,
        client_message_id: str | None = None,
    ) -> None:
        self.persist = persist
        self.client_message_id = client_message_id
        self.conversation_id = conversation_id
        self.message_id = message_id
        self.user_message_id = user_message_id
        self.user_id = user_id
        self.provider = provider
        self.model = model
        self.events: list[str] = []
        self.content: list[str] = [prefix] if prefix else []
        self.reasoning: list[str] = [prefix_reasoning] if prefix_reasoning else []
        self.done = False
        self.final_status = "streaming"
        self.cancel_requested = False
        self.task: asyncio.Task[None] | None = None
        self.subscribers: dict[str, int] = {}
        self.started_at = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.usage: dict[str, int | None] = {"prompt_tokens": None, "completion_tokens": None}
        self.finish_reason: str | None = None
        self.error: dict[str, Any] | None = None
        self.text_events = 0
        self.flushed_seq = 0
        # one future per waiting subscriber: a shared one would need asyncio.shield (so one
        # subscriber leaving cannot cancel it for all), which costs every wake-up a loop turn
        self._waiters: list[asyncio.Future[None]] = []
        self._finished = asyncio.Event()

    @property
    def last_seq(self) -> int:
        """The sequence number of the newest event."""
        return len(self.events)

    def text(self) -> str:
        """The answer so far."""
        return _joined(self.content)

    def reasoning_text(self) -> str:
        """The reasoning so far."""
        return _joined(self.reasoning)

    def publish(self, event: dict[str, Any]) -> int:
        """Append an event (assigning its seq) and wake every waiting subscriber."""
        if self.done:
            raise RuntimeError("run already ended")
        seq = len(self.events) + 1
        event["seq"] = seq
        self.events.append(encode(event))
        if event["type"] in TERMINAL:
            self.done = True
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():  # a subscriber that left cancelled its own
                    waiter.set_result(None)
        return seq

    def mark_finished(self) -> None:
        """Called once the final state is saved and the terminal event published."""
        self.finished_at = time.monotonic()
        self._finished.set()

    async def wait_finished(self) -> None:
        """Wait until the run has ended and its final state is saved."""
        await self._finished.wait()

    async def _wait_for_more(self, after: int) -> None:
        if len(self.events) > after or self.done:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:  # this subscriber left
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    async def follow(self, after: int = 0) -> AsyncIterator[list[tuple[int, str]]]:
        """Yield batches of (seq, json) after `after` until the terminal event.

        Everything that accumulated while the subscriber was busy writing comes as
        one batch, so slow readers coalesce naturally instead of buffering.
        """
        while True:
            end = len(self.events)
            if end > after:
                batch = [(seq, self.events[seq - 1]) for seq in range(after + 1, end + 1)]
                after = end
                yield batch
                continue
            if self.done:
                return
            await self._wait_for_more(after)

    def subscribe(self, transport: str) -> None:
        """Count a subscriber (for metrics and on_disconnect)."""
        self.subscribers[transport] = self.subscribers.get(transport, 0) + 1

    def unsubscribe(self, transport: str) -> int:
        """Uncount a subscriber; return how many remain."""
        self.subscribers[transport] = max(0, self.subscribers.get(transport, 0) - 1)
        return sum(self.subscribers.values())
