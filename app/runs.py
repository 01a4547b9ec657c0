"""Runs: a generation owned by the server, sequenced, fanned out, persisted, cancellable."""

from __future__ import annotations

import asyncio
import logging
import time
from array import array
from collections.abc import AsyncGenerator
from typing import Any

from app.events import TERMINAL, encode

log = logging.getLogger(__name__)

# What each entry of a run's event log is (Run._kinds)
_STORED, _CHUNK, _REASONING = 0, 1, 2
_TEXT_TYPES = ("", "chunk", "reasoning")


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

    The log is compact, because it lives as long as the run and is kept whole for exact
    resumes: a text delta (nearly every event) is a span of the answer's text, 9 bytes,
    rather than its JSON (~170 bytes each; 15 KB per open stream after 90 tokens). Other
    events are kept as JSON. Events are encoded when read, byte for byte as published.
    """

    __slots__ = (
        "_batch",
        "_finished",
        "_kinds",
        "_reasoning_len",
        "_spans",
        "_stored",
        "_text_len",
        "_waiters",
        "cancel_requested",
        "client_message_id",
        "content",
        "conversation_id",
        "done",
        "error",
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
        "waiting_since",
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
        self._kinds = bytearray()  # per event: _STORED, _CHUNK or _REASONING
        self._spans = array("I")  # per event: (start, end) in the text, or (index, 0)
        self._stored: list[str] = []  # JSON of the events that are not text deltas
        self._text_len = len(prefix)
        self._reasoning_len = len(prefix_reasoning)
        # the last batch read while several subscribers follow: the others reuse it
        self._batch: tuple[int, int, list[tuple[int, str]]] | None = None
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
        self._waiters: list[asyncio.Future[bool]] = []
        self.waiting_since = 0.0  # when the oldest waiting subscriber began to wait
        self._finished: asyncio.Event | None = None  # made by the first wait_finished()

    @property
    def last_seq(self) -> int:
        """The sequence number of the newest event."""
        return len(self._kinds)

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
        seq = event["seq"] = len(self._kinds) + 1
        self._kinds.append(_STORED)
        self._spans.extend((len(self._stored), 0))
        self._stored.append(encode(event))
        self.done = event["type"] in TERMINAL
        self._wake()
        return seq

    def publish_text(self, text: str) -> int:
        """Append a piece of the answer and its `chunk` event."""
        start = self._text_len
        self._text_len += len(text)
        self.content.append(text)
        return self._publish_span(_CHUNK, start, self._text_len)

    def publish_reasoning(self, text: str) -> int:
        """Append a piece of the reasoning and its `reasoning` event."""
        start = self._reasoning_len
        self._reasoning_len += len(text)
        self.reasoning.append(text)
        return self._publish_span(_REASONING, start, self._reasoning_len)

    def _publish_span(self, kind: int, start: int, end: int) -> int:
        if self.done:
            raise RuntimeError("run already ended")
        self._kinds.append(kind)
        self._spans.extend((start, end))
        self._wake()
        return len(self._kinds)

    def events(self, after: int = 0, end: int | None = None) -> list[tuple[int, str]]:
        """(seq, json) of the events after `after` up to `end` (default: the newest)."""
        end = len(self._kinds) if end is None else end
        kinds, spans, stored = self._kinds, self._spans, self._stored
        wanted = kinds[after:end]
        text = self.text() if _CHUNK in wanted else ""
        reasoning = self.reasoning_text() if _REASONING in wanted else ""
        mid = self.message_id
        out = []
        for seq in range(after + 1, end + 1):
            kind = kinds[seq - 1]
            a, b = spans[2 * seq - 2], spans[2 * seq - 1]
            if kind == _STORED:
                out.append((seq, stored[a]))
            else:
                # the keys and their order of a published event's JSON
                piece = text[a:b] if kind == _CHUNK else reasoning[a:b]
                event: dict[str, str | int] = {
                    "type": _TEXT_TYPES[kind],
                    "message_id": mid,
                    "content": piece,
                    "seq": seq,
                }
                out.append((seq, encode(event)))
        return out

    def last_event(self) -> str:
        """The newest event's JSON."""
        return self.events(len(self._kinds) - 1)[0][1]

    def _wake(self, ping: bool = False) -> None:
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():  # a subscriber that left cancelled its own
                    waiter.set_result(ping)

    def quiet_for(self, now: float) -> float:
        """How long (time.monotonic) a subscriber has waited with nothing to write; 0 if none."""
        return now - self.waiting_since if self._waiters else 0.0

    def ping(self) -> None:
        """Wake the waiting subscribers with an empty batch: time for a heartbeat."""
        self._wake(ping=True)

    def mark_finished(self) -> None:
        """Called once the final state is saved and the terminal event published."""
        self.finished_at = time.monotonic()
        if self._finished is not None:
            self._finished.set()

    async def wait_finished(self) -> None:
        """Wait until the run has ended and its final state is saved."""
        if self.finished_at is not None:
            return
        if self._finished is None:
            self._finished = asyncio.Event()  # an Event is 1 KB: only for runs awaited
        await self._finished.wait()

    async def follow(self, after: int = 0) -> AsyncGenerator[list[tuple[int, str]], None]:
        """Yield batches of (seq, json) after `after` until the terminal event.

        Everything that accumulated while the subscriber was busy writing comes as
        one batch, so slow readers coalesce naturally instead of buffering. An empty
        batch is the heartbeat (app/heartbeat.py): nothing was written for a while.
        The wait is inline (no coroutine per wait): a subscriber holds one frame and
        one future while its stream is quiet, times every open stream.
        """
        while True:
            end = len(self._kinds)
            if end > after:
                start, after = after, end
                # yielded straight from the call: no local keeps the batch (and its JSON)
                # alive while this subscriber then waits, times every open stream
                yield self._batch_between(start, end)
                continue
            if self.done:
                return
            waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            if not self._waiters:
                self.waiting_since = time.monotonic()
            self._waiters.append(waiter)
            try:
                pinged = await waiter
            except asyncio.CancelledError:  # this subscriber left
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise
            if pinged and len(self._kinds) == after:
                yield []

    def _batch_between(self, after: int, end: int) -> list[tuple[int, str]]:
        cached = self._batch
        if cached is not None and cached[0] == after and cached[1] == end:
            return cached[2]
        batch = self.events(after, end)
        # another subscriber at the same place reuses this encoding
        shared = sum(self.subscribers.values()) > 1
        self._batch = (after, end, batch) if shared else None
        return batch

    def subscribe(self, transport: str) -> None:
        """Count a subscriber (for metrics and on_disconnect)."""
        self.subscribers[transport] = self.subscribers.get(transport, 0) + 1

    def unsubscribe(self, transport: str) -> int:
        """Uncount a subscriber; return how many remain."""
        self.subscribers[transport] = max(0, self.subscribers.get(transport, 0) - 1)
        return sum(self.subscribers.values())
