"""app/deadlines.py: one loop timer for many deadlines, on a real event loop."""

from __future__ import annotations

import asyncio
import itertools

from app.deadlines import Deadlines


class Recorder:
    """Records when it came due; re-adds itself `again` more times, `step` apart."""

    def __init__(self, name: str, log: list[tuple[str, float]], deadlines: Deadlines) -> None:
        self.name, self.log, self.deadlines = name, log, deadlines
        self.again = 0
        self.step = 0.0

    def due(self) -> None:
        loop = asyncio.get_running_loop()
        self.log.append((self.name, loop.time()))
        if self.again:
            self.again -= 1
            self.deadlines.add(loop.time() + self.step, self)


class Broken:
    def due(self) -> None:
        raise RuntimeError("boom")


async def test_items_come_due_in_order_and_not_before_their_time() -> None:
    loop = asyncio.get_running_loop()
    d = Deadlines()
    log: list[tuple[str, float]] = []
    t0 = loop.time()
    d.add(t0 + 0.15, Recorder("late", log, d))
    d.add(t0 + 0.05, Recorder("early", log, d))  # earlier than the armed timer: re-armed
    d.add(t0 + 0.05, Recorder("tie", log, d))  # same time: in the order added
    await asyncio.sleep(0.1)
    assert [name for name, _ in log] == ["early", "tie"]
    await asyncio.sleep(0.15)
    assert [name for name, _ in log] == ["early", "tie", "late"]
    for name, when in log:
        assert when >= t0 + (0.15 if name == "late" else 0.05)
    assert len(d) == 0


async def test_an_item_can_re_add_itself() -> None:
    loop = asyncio.get_running_loop()
    d = Deadlines()
    log: list[tuple[str, float]] = []
    r = Recorder("r", log, d)
    r.again, r.step = 2, 0.02
    d.add(loop.time() + 0.02, r)
    await asyncio.sleep(0.2)
    assert [name for name, _ in log] == ["r", "r", "r"]
    times = [t for _, t in log]
    assert all(b - a >= 0.019 for a, b in itertools.pairwise(times))  # ms clocks round


async def test_a_failing_item_does_not_stall_the_others() -> None:
    loop = asyncio.get_running_loop()
    seen: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))
    try:
        d = Deadlines()
        log: list[tuple[str, float]] = []
        d.add(loop.time() + 0.01, Broken())
        d.add(loop.time() + 0.01, Recorder("after", log, d))
        d.add(loop.time() + 0.05, Recorder("later", log, d))
        await asyncio.sleep(0.12)
    finally:
        loop.set_exception_handler(None)
    assert [name for name, _ in log] == ["after", "later"]
    assert len(seen) == 1 and isinstance(seen[0]["exception"], RuntimeError)


async def test_close_forgets_everything() -> None:
    loop = asyncio.get_running_loop()
    d = Deadlines()
    log: list[tuple[str, float]] = []
    d.add(loop.time() + 0.02, Recorder("r", log, d))
    d.close()
    await asyncio.sleep(0.06)
    assert log == [] and len(d) == 0


async def test_many_deadlines_come_due_in_time_order() -> None:
    """1,000 entries added latest first, spread over 50 ms: each comes due, earliest first."""
    n = 1000
    loop = asyncio.get_running_loop()
    d = Deadlines()
    log: list[tuple[str, float]] = []
    t0 = loop.time()
    for i in range(n):
        d.add(t0 + 0.05 * (n - i) / n, Recorder(str(i), log, d))
    await asyncio.sleep(0.15)
    assert len(log) == n
    assert [int(name) for name, _ in log] == list(range(n - 1, -1, -1))
