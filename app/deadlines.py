"""One loop timer for the deadlines of every live run (timeouts, the waiting status).

A timer per run costs about 0.5 KB for as long as the run lasts (uvloop's handle, its
libuv timer, a bound method and a copy of the context), times every open stream, and
a run had two. Here a run's deadline is an entry in one heap (a tuple), and a single
loop timer is armed for the earliest. Entries are never removed early: a deadline that
no longer matters is dropped when it comes due (`Due.due` returns at once), so moving
or cancelling one costs nothing.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Protocol


class Due(Protocol):
    """Something with a deadline: called once the loop's time has reached it."""

    def due(self) -> None:
        """The deadline came; re-add it to be called again later."""


class Deadlines:
    """A heap of (loop time, order, item) and one timer for its earliest entry."""

    __slots__ = ("_armed", "_handle", "_heap", "_order")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Due]] = []
        self._order = itertools.count()  # ties are called in the order they were added
        self._handle: asyncio.TimerHandle | None = None
        self._armed = 0.0  # when the timer fires

    def add(self, when: float, item: Due) -> None:
        """Call `item.due()` once the loop's time reaches `when`."""
        heapq.heappush(self._heap, (when, next(self._order), item))
        if self._handle is None or when < self._armed:
            self._arm(when)

    def __len__(self) -> int:
        return len(self._heap)

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed = when
        self._handle = asyncio.get_running_loop().call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        heap = self._heap
        now = asyncio.get_running_loop().time()
        while heap and heap[0][0] <= now:
            item = heapq.heappop(heap)[2]
            try:
                item.due()
            except Exception as exc:  # one item's failure must not stall the others
                asyncio.get_running_loop().call_exception_handler(
                    {"message": "deadline callback failed", "exception": exc}
                )
        if heap:
            self._arm(heap[0][0])

    def close(self) -> None:
        """Forget every deadline (shutdown)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._heap.clear()
