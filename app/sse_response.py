"""aiohttp-sse's EventSourceResponse, without the reference cycle each stream left behind.

stop_streaming() cancels the response's ping task. A cancelled task keeps its
CancelledError, whose traceback holds the ping coroutine's frame, whose `self` is the
response, which holds the task: a cycle of 14 objects per stream (the response, its
headers, the task, its timer, the exception, frames and contexts) that only the garbage
collector could free. At 100 concurrent streams the collections it set off took 10-70 ms
at a time, and the streams starting meanwhile saw it in their time to first token
(docs/performance.md). Here the ping loop ends by returning, so nothing keeps the
exception and reference counting frees each response as its stream ends.
"""

from __future__ import annotations

import asyncio

from aiohttp_sse import EventSourceResponse


class SSEResponse(EventSourceResponse):
    """An EventSourceResponse whose ping task ends without storing a CancelledError."""

    async def _ping(self) -> None:
        try:
            await super()._ping()
        except asyncio.CancelledError:
            # stop_streaming() (or shutdown) ended the pings; nothing awaits this task's
            # outcome but aiohttp-sse's wait(), which returns either way
            return
