"""The one flusher: writes every live answer's text so far, batched, a few times a second."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from app.metrics import Metrics
from app.runs import Run
from app.store import Store
from app.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# The flusher writes at most this many live answers a second (its tick stretches beyond
# streaming.flush_interval past that): 500 answers every 250 ms.
FLUSH_ROWS_PER_S = 2000


class Flusher:
    """Saves the live runs of `live` (conversation id -> run) while any are live."""

    def __init__(
        self, store: Store, metrics: Metrics, live: Mapping[str, Run], interval: float
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.live = live
        self.interval = interval
        self.failures = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the background task."""
        self._task = asyncio.create_task(self._loop(), name="streamchat-flusher")

    def wake(self) -> None:
        """A run went live: tick until none is."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop the background task (the runs' final saves are their own)."""
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _loop(self) -> None:
        """While runs are live, write every changed one at most once per interval.

        One executemany per tick for all runs: the write count depends on time, never
        on the number of tokens. Under load the tick stretches so that at most
        FLUSH_ROWS_PER_S rows are written a second: with thousands of slow streams
        each tick would otherwise rewrite nearly every live answer for one token each
        (a fifth of the server's CPU at 6,000 streams of 1 token/s, docs/performance.md).
        """
        interval = self.interval
        while True:
            await self._wake.wait()
            await asyncio.sleep(interval)
            if not self.live:
                self._wake.clear()
                interval = self.interval
                continue
            batch = [
                (r, r.last_seq)
                for r in self.live.values()
                if r.last_seq != r.flushed_seq and not r.done
            ]
            if not batch:
                interval = self.interval
                continue
            rows = [(r.text(), r.reasoning_text(), r.message_id) for r, _ in batch]
            interval = max(self.interval, len(rows) / FLUSH_ROWS_PER_S)
            t0 = time.monotonic()
            try:
                await self.store.flush_contents(rows)
            except Exception:
                self.failures += 1
                self.metrics.flush_failures.inc()
                log.exception("flush of %d live answer(s) failed; will retry", len(rows))
                continue
            self.metrics.flush_seconds.observe(time.monotonic() - t0)
            for r, seq in batch:
                r.flushed_seq = seq
