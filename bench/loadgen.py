"""The load generator: concurrent streams against streamchat (SSE, WebSocket) or the upstream.

Every stream is checked on arrival: events in order (seq = SSE id, contiguous), a
complete end, and the text byte-identical to what the spec says the upstream sent.
Times are CLOCK_MONOTONIC (time.monotonic), comparable with the upstream's records.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from bench.spec import StreamSpec


@dataclass
class StreamResult:
    """One stream as the client saw it."""

    id: str = ""
    ok: bool = False
    error: str | None = None
    sent_at: float = 0.0
    ttft: float | None = None  # seconds from sending the request to the first token
    gaps: list[float] = field(default_factory=list)  # seconds between reads carrying tokens
    tokens: int = 0
    elapsed: float = 0.0
    message_id: str | None = None


OnToken = Callable[[StreamResult], None]


async def _frames(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[float, list[bytes]]]:
    """SSE frames as they arrive, with the arrival time of the read that completed them."""
    buf = b""
    async for data in resp.content.iter_any():
        now = time.monotonic()
        buf += data
        if b"\n\n" not in buf:
            continue
        *frames, buf = buf.split(b"\n\n")
        yield now, frames


def _note_tokens(res: StreamResult, now: float, last: float | None, count: int) -> float:
    if res.ttft is None:
        res.ttft = now - res.sent_at
    elif last is not None:
        res.gaps.append(now - last)
    res.tokens += count
    return now


def _check_text(res: StreamResult, spec: StreamSpec, parts: list[str]) -> None:
    text = "".join(parts)
    expected = spec.expected()
    if text == expected:
        res.ok = True
        return
    at = next(
        (i for i, (a, b) in enumerate(zip(text, expected, strict=False)) if a != b),
        min(len(text), len(expected)),
    )
    res.error = f"content mismatch at char {at} (got {len(text)} chars, want {len(expected)})"


async def sse_stream(
    session: aiohttp.ClientSession,
    base: str,
    conversation_id: str,
    spec: StreamSpec,
    on_first: OnToken | None = None,
    on_open: OnToken | None = None,
    options: dict[str, Any] | None = None,
    check: bool = True,
) -> StreamResult:
    """Send `spec` to streamchat's SSE endpoint and read the answer to its end.

    `check=False` (a real model, whose text is unknown) only requires a complete end.
    """
    res = StreamResult(id=spec.id, sent_at=time.monotonic())
    parts: list[str] = []
    last: float | None = None
    seq = 0
    end: dict[str, Any] | None = None
    try:
        async with session.post(
            f"{base}/api/v1/conversations/{conversation_id}/stream",
            json={"content": spec.prompt(), **({"options": options} if options else {})},
        ) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            if on_open is not None:
                on_open(res)
            async for now, frames in _frames(resp):
                count = 0
                for frame in frames:
                    if frame.startswith(b":"):
                        continue  # heartbeat comment
                    head, sep, data = frame.partition(b"\ndata: ")
                    if not sep or not head.startswith(b"id: "):
                        res.error = f"bad frame {frame[:80]!r}"
                        return res
                    event = orjson.loads(data)
                    seq += 1
                    if int(head[4:]) != seq or event.get("seq") != seq:
                        res.error = f"seq gap: want {seq}, got id {head[4:]!r}"
                        return res
                    kind = event["type"]
                    if kind == "chunk":
                        parts.append(event["content"])
                        count += 1
                    elif kind == "start":
                        res.message_id = event["message_id"]
                    elif kind in ("end", "error"):
                        end = event
                if count:
                    first = res.ttft is None
                    last = _note_tokens(res, now, last, count)
                    if first and on_first is not None:
                        on_first(res)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:200]
        return res
    res.elapsed = time.monotonic() - res.sent_at
    if end is None:
        res.error = "stream ended without an end event"
    elif end["type"] == "error" or end.get("status") != "complete":
        res.error = f"run ended {end.get('status')}: {end.get('code', '')}"
    elif check:
        _check_text(res, spec, parts)
    else:
        res.ok = True
    return res


async def direct_stream(
    session: aiohttp.ClientSession,
    base: str,
    spec: StreamSpec,
    on_first: OnToken | None = None,
    on_open: OnToken | None = None,
    max_tokens: int | None = None,
    check: bool = True,
) -> StreamResult:
    """Send `spec` straight to the OpenAI-compatible upstream and read the answer."""
    res = StreamResult(id=spec.id, sent_at=time.monotonic())
    parts: list[str] = []
    last: float | None = None
    finish = None
    done = False
    try:
        async with session.post(
            f"{base}/v1/chat/completions",
            json={
                "model": "bench",
                "messages": [{"role": "user", "content": spec.prompt()}],
                "stream": True,
                **({"max_tokens": max_tokens} if max_tokens else {}),
            },
        ) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}"
                return res
            if on_open is not None:
                on_open(res)
            async for now, frames in _frames(resp):
                count = 0
                for frame in frames:
                    if not frame.startswith(b"data: "):
                        continue
                    if frame == b"data: [DONE]":
                        done = True
                        continue
                    chunk = orjson.loads(frame[6:])
                    for choice in chunk["choices"]:
                        content = choice["delta"].get("content")
                        if content:
                            parts.append(content)
                            count += 1
                        finish = choice.get("finish_reason") or finish
                if count:
                    first = res.ttft is None
                    last = _note_tokens(res, now, last, count)
                    if first and on_first is not None:
                        on_first(res)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:200]
        return res
    res.elapsed = time.monotonic() - res.sent_at
    if not done or finish not in (("stop",) if check else ("stop", "length")):
        res.error = f"stream ended without [DONE]/stop (finish={finish})"
    elif check:
        _check_text(res, spec, parts)
    else:
        res.ok = True
    return res


OneStream = Callable[[int, OnToken], Awaitable[StreamResult]]


async def run_streams(
    one: OneStream,
    concurrency: int,
    total: int,
    time_limit: float,
    max_starting: int | None = None,
    ramp_s: float = 0.0,
) -> tuple[list[StreamResult], float]:
    """Run `total` streams, `concurrency` at a time; return the results and the wall time.

    `one(i, on_open)` runs stream i and calls on_open once its response has begun.
    `max_starting` bounds how many streams may be connecting and waiting for their
    response at once (a ramp, so 10,000 connections do not overflow the accept queue).
    `ramp_s` spreads the workers' first starts evenly over that many seconds, so a
    closed loop of equal-length streams measures steady state, not one thundering herd.
    """
    results: list[StreamResult] = []
    indexes = iter(range(total))
    starting = asyncio.Semaphore(max_starting or max(1, concurrency))

    async def worker(k: int) -> None:
        await asyncio.sleep(ramp_s * k / max(1, concurrency))
        for i in indexes:  # one iterator shared by all workers
            await starting.acquire()
            held = True

            def release(_: StreamResult) -> None:
                nonlocal held
                if held:
                    held = False
                    starting.release()

            try:
                res = await one(i, release)
            finally:
                release(StreamResult())
            results.append(res)

    t0 = time.monotonic()
    workers = [asyncio.create_task(worker(k)) for k in range(min(concurrency, total))]
    try:
        async with asyncio.timeout(time_limit):
            await asyncio.gather(*workers)
    except TimeoutError:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        missing = total - len(results)
        results.extend(StreamResult(error="benchmark timeout") for _ in range(missing))
    return results, time.monotonic() - t0


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of unsorted values; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 3)


def summarize(
    results: Sequence[StreamResult], wall: float, upstream: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Counts, byte-exact failures, tokens/s and TTFT / inter-token percentiles (ms)."""
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    tokens = sum(r.tokens for r in ok)
    errors = Counter(r.error for r in results if not r.ok)
    out = {
        "streams": len(results),
        "ok": len(ok),
        "failed": len(results) - len(ok),
        "errors": dict(errors.most_common(5)),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
        "ttft_ms": {f"p{p}": _ms(percentile(ttfts, p)) for p in (50, 90, 99, 100)},
        "itl_ms": {f"p{p}": _ms(percentile(gaps, p)) for p in (50, 90, 99, 100)},
    }
    if upstream is not None:
        # split TTFT: request sent -> upstream has it; upstream's first token -> client has it
        to_up = [upstream["received"][r.id] - r.sent_at for r in ok if r.id in upstream["received"]]
        back = [
            r.sent_at + r.ttft - upstream["first_sent"][r.id]
            for r in ok
            if r.ttft is not None and r.id in upstream["first_sent"]
        ]
        out["to_upstream_ms"] = {f"p{p}": _ms(percentile(to_up, p)) for p in (50, 99)}
        out["first_token_back_ms"] = {f"p{p}": _ms(percentile(back, p)) for p in (50, 99)}
    return out
