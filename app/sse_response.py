"""aiohttp-sse's EventSourceResponse, without its ping task per response.

aiohttp-sse starts a task per response that sleeps and writes a `: ping` comment every
`ping_interval`. Each costs about 2 KB and a timer for as long as its stream is open,
wakes whether or not the stream is busy, and, once stop_streaming() cancelled it, kept
its CancelledError, whose traceback held the ping coroutine's frame, whose `self` is
the response, which held the task: a reference cycle per stream that only the garbage
collector could free (at 100 concurrent streams its collections stalled the server
10-70 ms, docs/performance.md). Here the ping coroutine returns at once: one task for
the whole server (app/heartbeat.py) pings the streams that have been quiet, and the
handlers write the comment (PING) themselves.
"""

from __future__ import annotations

from aiohttp.abc import AbstractStreamWriter
from aiohttp.web import BaseRequest
from aiohttp_sse import EventSourceResponse

PING = b": ping\n\n"  # the bytes aiohttp-sse writes with sep="\n"


class SSEResponse(EventSourceResponse):
    """An EventSourceResponse that leaves heartbeats to app/heartbeat.py."""

    async def _ping(self) -> None:
        return

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        """Send the headers, then let go of them: a stream lasts minutes and its header
        table (~2.8 KB with its case-folded keys) would be held all that time, times every
        open stream. Nothing reads a response's headers once they are sent."""
        first = not self.prepared
        writer = await super().prepare(request)
        if first:
            self.headers.clear()
            # aiohttp-sse's ping task has nothing to do (see _ping): not kept either
            self._ping_task = None
        return writer

    def stop_streaming(self) -> None:
        """Nothing to stop: there is no ping task (app/heartbeat.py pings)."""
