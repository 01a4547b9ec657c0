"""One heartbeat for every SSE stream: a `: ping` comment after `interval` of silence.

Proxies and browsers drop a stream that stays silent too long; a comment line keeps it
open and is ignored by every SSE reader. aiohttp-sse pings with a task per response
(about 2 KB and a timer per open stream, waking every interval whether or not the
stream is busy). Here one task looks at the live runs a few times per interval and
wakes only the subscribers that have waited with nothing to write for most of it:
their run.follow() yields an empty batch, which the SSE and /v1 handlers write as a
ping (WebSocket has its own ping frames and writes nothing). A stream that is
streaming tokens is never pinged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from app.runs import Run
from app.tasks import cancel_and_wait

log = logging.getLogger(__name__)
TICKS = 4  # looks per interval: a silence lasts between (1 - 1/TICKS) and 1 interval


def quiet_after(interval: float) -> float:
    """How long a subscriber waits with nothing to write before the heartbeat wakes it."""
    return interval * (1 - 1 / TICKS)


class Heartbeat:
    """Pings the quiet subscribers of `runs` (a live mapping) every `interval` seconds."""

    def __init__(self, runs: Mapping[str, Run], interval: float) -> None:
        self.runs = runs
        self.interval = interval
        self.tick = interval / TICKS
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the heartbeat task (once)."""
        if self._task is None:
            self._task = asyncio.create_task(self._beat(), name="heartbeat")

    async def stop(self) -> None:
        """Stop the heartbeat task."""
        task, self._task = self._task, None
        await cancel_and_wait(task)

    def sweep(self, now: float) -> int:
        """Ping every run whose subscribers waited quiet_after(interval); return how many."""
        due = quiet_after(self.interval)
        pinged = 0
        for run in list(self.runs.values()):
            if not run.done and run.quiet_for(now) >= due:
                run.ping()
                pinged += 1
        return pinged

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            try:
                self.sweep(time.monotonic())
            except Exception:  # a heartbeat must outlive any one run's trouble
                log.exception("heartbeat sweep failed")
