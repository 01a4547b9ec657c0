"""The run's compact event log: what subscribers and resumes read is what was published."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from app.runs import Run

# the pieces relays get wrong: multi-byte UTF-8, emoji, line breaks, quotes, SSE look-alikes
PIECES = ["Hel", "lo", " wörld", " 🎉", "\n\ndata: [DONE]\n\n", 'say "hi"\\', "\u2028", "末"]


def _run(prefix: str = "", prefix_reasoning: str = "") -> Run:
    return Run(
        conversation_id="c1",
        message_id="m1",
        user_message_id="u1",
        user_id="alice",
        provider="fake",
        model="echo",
        prefix=prefix,
        prefix_reasoning=prefix_reasoning,
    )


def _expected(kind: str, text: str, seq: int) -> str:
    return orjson.dumps({"type": kind, "message_id": "m1", "content": text, "seq": seq}).decode()


def test_every_event_reads_back_as_published() -> None:
    run = _run()
    want: list[tuple[int, str]] = []
    start: dict[str, Any] = {"type": "start", "message_id": "m1"}
    seq = run.publish(start)
    want.append((seq, orjson.dumps(start).decode()))
    for i, piece in enumerate(PIECES):
        if i % 3 == 1:
            seq = run.publish_reasoning(piece)
            want.append((seq, _expected("reasoning", piece, seq)))
        else:
            seq = run.publish_text(piece)
            want.append((seq, _expected("chunk", piece, seq)))
        if i == 4:  # a save in between merges the text pieces; the spans still hold
            run.text()
    end: dict[str, Any] = {"type": "end", "message_id": "m1", "status": "complete"}
    seq = run.publish(end)
    want.append((seq, orjson.dumps(end).decode()))

    assert run.events() == want
    assert run.events(3, 6) == want[3:6]  # a resume from the middle
    assert run.last_event() == want[-1][1]
    assert run.last_seq == len(want)
    assert run.text() == "".join(p for i, p in enumerate(PIECES) if i % 3 != 1)
    assert run.reasoning_text() == "".join(p for i, p in enumerate(PIECES) if i % 3 == 1)


def test_a_continued_answer_streams_only_the_new_text() -> None:
    run = _run(prefix="Once upon", prefix_reasoning="think")
    first = run.publish_text(" a time")
    second = run.publish_reasoning(" more")
    assert run.events() == [
        (first, _expected("chunk", " a time", first)),
        (second, _expected("reasoning", " more", second)),
    ]
    assert run.text() == "Once upon a time"
    assert run.reasoning_text() == "think more"


async def test_followers_read_the_same_batches_and_end_together() -> None:
    run = _run()

    async def follow() -> list[tuple[int, str]]:
        run.subscribe("sse")
        got: list[tuple[int, str]] = []
        try:
            async for batch in run.follow(0):
                got.extend(batch)
        finally:
            run.unsubscribe("sse")
        return got

    readers = [asyncio.create_task(follow()) for _ in range(3)]
    await asyncio.sleep(0)
    for piece in PIECES:
        run.publish_text(piece)
        await asyncio.sleep(0)
    run.publish({"type": "end", "message_id": "m1", "status": "complete"})
    results = await asyncio.wait_for(asyncio.gather(*readers), 5)
    assert results[0] == results[1] == results[2] == run.events()
    assert [seq for seq, _ in results[0]] == list(range(1, len(PIECES) + 2))


async def test_wait_finished_returns_once_marked() -> None:
    run = _run()
    waiter = asyncio.create_task(run.wait_finished())
    await asyncio.sleep(0)
    assert not waiter.done()
    run.mark_finished()
    await asyncio.wait_for(waiter, 5)
    await asyncio.wait_for(run.wait_finished(), 5)  # after the end: at once
