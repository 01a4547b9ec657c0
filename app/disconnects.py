"""Noticing that a streaming client has gone while nothing is being written to it.

aiohttp does not cancel a handler when its client disconnects (handler_cancellation is
off, and turning it on would cancel run starts half-way), and a closed connection is
otherwise only noticed at the next write: for an SSE stream that may be a heartbeat 15 s
away, or a provider's slow first token. Until then the dead client counts as a
subscriber, and with streaming.on_disconnect = "cancel" the provider keeps generating.

One task for the whole app looks at every open stream's transport a few times a
second (a dictionary walk: about 0.2 µs a stream) and calls the stream's callback once
its connection is closing. A task and a timer per stream would cost each stream a
kilobyte and a wake-up per poll.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from aiohttp import web

POLL = 0.25  # seconds between looks; the most a disconnect goes unnoticed


class DisconnectWatch:
    """Calls `on_gone()` once for each watched request whose connection has closed."""

    def __init__(self, poll: float = POLL) -> None:
        self.poll = poll
        self._watched: dict[Callable[[], object], Any] = {}  # on_gone -> its transport
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._watched)

    def add(self, request: web.BaseRequest, on_gone: Callable[[], object]) -> None:
        """Watch `request`'s connection until `discard(on_gone)` or until it closes."""
        self._watched[on_gone] = request.transport
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def discard(self, on_gone: Callable[[], object]) -> None:
        """Stop watching (the stream ended on its own)."""
        self._watched.pop(on_gone, None)

    def sweep(self) -> int:
        """Call back every stream whose connection is closing; returns how many."""
        gone = [
            on_gone
            for on_gone, transport in self._watched.items()
            if transport is None or transport.is_closing()
        ]
        for on_gone in gone:
            del self._watched[on_gone]
            on_gone()
        return len(gone)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll)
            self.sweep()

    async def close(self) -> None:
        """Stop the watching task (at app cleanup)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
