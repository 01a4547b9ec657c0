"""A paced fake OpenAI chat.completions upstream that logs when it sent each token.

The answer is a deterministic function of a spec in the last user message
(`slow id=<id> n=<tokens> ms=<pace>`), so a test knows exactly what the provider
sent. Every stream records the CLOCK_MONOTONIC time just before each token was
written (shared by every process on the machine) and when the stream ended:
completed, or cut because the client went away (the app runs with
handler_cancellation, so a closed connection is noticed at once).
"""

from __future__ import annotations

import asyncio
import re
import time
import zlib
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web

# Word-like tokens plus the ones a relay gets wrong: multi-byte UTF-8, an emoji,
# newlines, an SSE look-alike, quotes, a backslash.
VOCAB: tuple[str, ...] = (
    " the",
    " answer",
    " token",
    ",",
    " é",
    "中文",
    " 🙂",
    "\n",
    "\n\ndata: x\n\n",
    ' "q"',
    " b\\s",
    " of",
    " ok",
)

_SPEC_RE = re.compile(r"slow id=(\S+) n=(\d+) ms=(\d+(?:\.\d+)?)")


def prompt(stream_id: str, tokens: int, pace_ms: float) -> str:
    """The user message that asks the upstream for this stream."""
    return f"slow id={stream_id} n={tokens} ms={pace_ms:g}"


def tokens_for(stream_id: str, n: int) -> list[str]:
    """The n tokens the upstream sends for this stream id."""
    seed = zlib.crc32(stream_id.encode())
    return [VOCAB[(seed + i * 7) % len(VOCAB)] for i in range(n)]


def expected_text(stream_id: str, n: int) -> str:
    """The whole answer for this stream id."""
    return "".join(tokens_for(stream_id, n))


@dataclass
class StreamLog:
    """One streamed request as the upstream saw it."""

    id: str
    tokens: list[str]
    started: float
    sent: list[float] = field(default_factory=list)  # monotonic time before each token write
    ended: float | None = None
    completed: bool = False
    disconnected: bool = False

    def sent_text(self, before: float | None = None) -> str:
        """The text written (before monotonic time `before`, if given)."""
        n = len(self.sent) if before is None else sum(1 for t in self.sent if t <= before)
        return "".join(self.tokens[:n])


class SlowUpstream:
    """The fake upstream served in-process on 127.0.0.1; `async with` starts and stops it."""

    def __init__(self) -> None:
        self.logs: dict[str, list[StreamLog]] = {}
        self.active = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI base URL to configure (ends in /v1)."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def open_connections(self) -> int:
        """TCP connections currently open to the upstream (idle keep-alive ones included)."""
        server = self._runner.server if self._runner is not None else None
        return len(server.connections) if server is not None else 0

    def all_logs(self) -> list[StreamLog]:
        """Every stream served so far."""
        return [log for logs in self.logs.values() for log in logs]

    def clear(self) -> None:
        """Forget the streams served so far."""
        self.logs.clear()

    async def start(self) -> None:
        """Listen on a free loopback port."""
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SlowUpstream:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        user = [m for m in body.get("messages") or [] if m.get("role") == "user"]
        match = _SPEC_RE.search(str(user[-1].get("content", ""))) if user else None
        sid, n, pace = (match[1], int(match[2]), float(match[3])) if match else ("none", 4, 0.0)
        model = str(body.get("model", ""))
        tokens = tokens_for(sid, n)
        if not body.get("stream"):
            return web.json_response(_completion(sid, model, "".join(tokens), n))
        log = StreamLog(sid, tokens, time.monotonic())
        self.logs.setdefault(sid, []).append(log)
        self.active += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            await resp.prepare(request)
            await resp.write(_frame(sid, model, {"role": "assistant", "content": ""}))
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            for i, tok in enumerate(tokens):
                delay = t0 + (i + 1) * pace / 1000 - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                log.sent.append(time.monotonic())
                await resp.write(_frame(sid, model, {"content": tok}))
            await resp.write(_frame(sid, model, {}, finish="stop"))
            usage = {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": n + 5}
            await resp.write(_frame(sid, model, None, usage=usage) + b"data: [DONE]\n\n")
            await resp.write_eof()
            log.completed = True
            return resp
        except ConnectionResetError:
            log.disconnected = True  # the write noticed first: nothing more to send
            return resp
        except asyncio.CancelledError:
            log.disconnected = True
            raise
        finally:
            log.ended = time.monotonic()
            self.active -= 1


def _frame(
    sid: str,
    model: str,
    delta: dict[str, Any] | None,
    *,
    finish: str | None = None,
    usage: dict[str, int] | None = None,
) -> bytes:
    chunk: dict[str, Any] = {
        "id": f"chatcmpl-{sid}",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage is not None:
        chunk["usage"] = usage
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _completion(sid: str, model: str, text: str, n: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{sid}",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": n + 5},
    }
