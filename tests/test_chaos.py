"""Chaos: SIGKILL the real server mid-stream, restart it on its database, check nothing is lost.

Each round starts CLIENTS runs (half SSE, half over two WebSockets) that stream from a
paced fake upstream, kills the server at a random moment, and restarts it. After every
round: the database passes `PRAGMA integrity_check`; every answer is `complete` (with
the whole text) or `interrupted` (with a prefix of what the upstream sent before the
kill, missing at most about flush_interval of stream); and every client that was
attached gets, on resume, the saved text and the right terminal event.

Reproduce a failure with the seed and round it names: CHAOS_SEED=<seed> CHAOS_ROUNDS=<n>.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.helpers import iter_events
from tests.proc import ServerProcess, print_now, upstream_config
from tests.upstreams.openai_slow import SlowUpstream, StreamLog, expected_text, prompt

pytestmark = pytest.mark.chaos

SEED = int(os.environ.get("CHAOS_SEED", "20261124"))
ROUNDS = int(os.environ.get("CHAOS_ROUNDS", "22"))
CLIENTS = 16  # runs per round: 8 over SSE, 8 over two WebSockets
FLUSH_INTERVAL = 0.25
# The saved text may miss flush_interval of stream, plus the time a flush takes to reach
# the disk (the flusher sleeps flush_interval after each write) and a token to cross
# the loopback and the SDK on a busy 2-core machine.
LOSS_SLACK = 0.1
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=30, sock_connect=5)


@dataclass
class Client:
    """One run as its client saw it."""

    sid: str
    transport: str
    tokens: int
    pace_ms: float
    cid: str | None = None
    mid: str | None = None
    last_seq: int = 0
    text: str = ""
    terminal: dict[str, Any] | None = None

    def on_event(self, ev: dict[str, Any]) -> None:
        """Track what an event tells the client."""
        if ev["type"] == "start":
            self.mid = ev["message_id"]
        elif ev["type"] == "chunk":
            self.text += ev["content"]
        elif ev["type"] in ("end", "error"):
            self.terminal = ev
        self.last_seq = max(self.last_seq, int(ev.get("seq", 0)))


@dataclass
class Figures:
    """What the rounds measured."""

    rounds: int = 0
    complete: int = 0
    interrupted: int = 0
    resumed: int = 0
    losses_ms: list[float] = field(default_factory=list)
    worst: str = ""


async def _create(session: aiohttp.ClientSession, url: str, c: Client) -> None:
    async with session.post(url + "/api/v1/conversations", json={}) as resp:
        assert resp.status == 201, await resp.text()
        c.cid = (await resp.json())["id"]


async def _sse_client(session: aiohttp.ClientSession, url: str, c: Client) -> None:
    await _create(session, url, c)
    async with session.post(
        f"{url}/api/v1/conversations/{c.cid}/stream",
        json={"content": prompt(c.sid, c.tokens, c.pace_ms)},
    ) as resp:
        assert resp.status == 200, await resp.text()
        async for ev in iter_events(resp):
            c.on_event(ev)


async def _ws_client(session: aiohttp.ClientSession, url: str, clients: list[Client]) -> None:
    for c in clients:
        await _create(session, url, c)
    by_request = {c.sid: c for c in clients}
    by_mid: dict[str, Client] = {}
    async with session.ws_connect(url + "/ws") as ws:
        for c in clients:
            await ws.send_str(
                orjson.dumps(
                    {
                        "op": "send",
                        "request_id": c.sid,
                        "conversation_id": c.cid,
                        "content": prompt(c.sid, c.tokens, c.pace_ms),
                    }
                ).decode()
            )
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            ev = orjson.loads(msg.data)
            if ev["type"] == "start" and ev.get("request_id") in by_request:
                by_mid[ev["message_id"]] = by_request[ev["request_id"]]
            target = by_mid.get(ev.get("message_id", ""))
            assert target is not None, f"event for no run of this socket: {ev}"
            target.on_event(ev)
            if all(c.terminal is not None for c in clients):
                return


async def _swallow(coro: Any) -> None:
    """Run a client until the kill cuts it; connection errors are the expected end."""
    with contextlib.suppress(aiohttp.ClientError, ConnectionError, TimeoutError):
        await coro


def _integrity(db: Path) -> str:
    conn = sqlite3.connect(db, timeout=10)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def _loss_ms(log: StreamLog | None, saved: str, killed_at: float) -> float:
    """The lost text is what the upstream sent in the last this-many ms before the kill.

    0 when every token sent before the kill was saved; otherwise the kill time minus
    the send time of the first token that is not (wholly) in the saved text.
    """
    if log is None:
        return 0.0
    sent = [t for t in log.sent if t <= killed_at]
    covered, length = 0, 0
    for tok in log.tokens[: len(sent)]:
        if length + len(tok) > len(saved):
            break
        length += len(tok)
        covered += 1
    if covered >= len(sent):
        return 0.0
    return (killed_at - sent[covered]) * 1000


async def _replay(session: aiohttp.ClientSession, url: str, c: Client) -> list[dict[str, Any]]:
    """Resume the client where it was cut (SSE Last-Event-ID or WS resume)."""
    events: list[dict[str, Any]] = []
    if c.transport == "sse":
        async with session.get(
            f"{url}/api/v1/conversations/{c.cid}/messages/{c.mid}/stream",
            headers={"Last-Event-ID": str(c.last_seq)},
        ) as resp:
            assert resp.status == 200, await resp.text()
            async for ev in iter_events(resp):
                events.append(ev)
        return events
    async with session.ws_connect(url + "/ws") as ws:
        await ws.send_str(
            orjson.dumps({"op": "resume", "message_id": c.mid, "after": c.last_seq}).decode()
        )
        async for msg in ws:
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            ev = orjson.loads(msg.data)
            events.append(ev)
            if ev["type"] in ("end", "error"):
                break
    return events


async def _check_round(
    rnd: int,
    server: ServerProcess,
    upstream: SlowUpstream,
    clients: list[Client],
    killed_at: float,
    figures: Figures,
) -> list[str]:
    """Every invariant of one round; returns the violations found."""
    bad: list[str] = []
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        for c in clients:
            where = f"round {rnd} stream {c.sid} ({c.transport}, message {c.mid})"
            full = expected_text(c.sid, c.tokens)
            if not full.startswith(c.text):
                bad.append(f"{where}: client received text that the upstream never sent")
            if c.cid is None:
                continue
            async with session.get(f"{server.url}/api/v1/conversations/{c.cid}") as resp:
                if resp.status == 404 and c.mid is None:
                    continue  # killed before the conversation's row was committed
                assert resp.status == 200, await resp.text()
                conv = await resp.json()
            answers = [m for m in conv["messages"] if m["role"] == "assistant"]
            if c.mid is not None and c.mid not in {m["id"] for m in answers}:
                bad.append(f"{where}: the client saw a start event but the message is gone")
            if len(answers) > 1:
                bad.append(f"{where}: {len(answers)} answers for one send")
            logs = upstream.logs.get(c.sid, [])
            if len(logs) > 1:
                bad.append(f"{where}: upstream got {len(logs)} requests for one run")
            log = logs[0] if logs else None
            for m in answers:
                status, saved = m["status"], m["content"]
                if status == "complete":
                    figures.complete += 1
                    if saved != full:
                        bad.append(f"{where}: complete but the text differs from what was sent")
                elif status == "interrupted":
                    figures.interrupted += 1
                    sent = log.sent_text(before=killed_at) if log else ""
                    if not sent.startswith(saved):
                        bad.append(
                            f"{where}: saved {len(saved)} chars are not a prefix of the"
                            f" {len(sent)} chars sent before the kill"
                        )
                    loss = _loss_ms(log, saved, killed_at)
                    figures.losses_ms.append(loss)
                    if loss >= max(figures.losses_ms):
                        figures.worst = f"{where}: lost {loss:.0f} ms"
                    if loss > (FLUSH_INTERVAL + LOSS_SLACK) * 1000:
                        bad.append(
                            f"{where}: lost {loss:.0f} ms of stream (saved {len(saved)} of"
                            f" {len(sent)} chars sent before the kill)"
                        )
                else:
                    bad.append(f"{where}: status {status!r} after a restart")
                if c.terminal and c.terminal.get("status") == "complete" != status:
                    bad.append(f"{where}: client saw complete, database says {status}")
                if c.mid == m["id"] and c.terminal is None:
                    bad.extend(await _check_resume(session, server.url, c, m, where))
                    figures.resumed += 1
    return bad


async def _check_resume(
    session: aiohttp.ClientSession, url: str, c: Client, m: dict[str, Any], where: str
) -> list[str]:
    """A client cut by the kill resumes: the saved text, then the right terminal event."""
    events = await asyncio.wait_for(_replay(session, url, c), 10)
    text = "".join(e["content"] for e in events if e["type"] == "chunk")
    last = events[-1] if events else {}
    bad = []
    if text != m["content"]:
        bad.append(f"{where}: resume replayed {len(text)} chars, saved are {len(m['content'])}")
    if m["status"] == "interrupted":
        if last.get("type") != "error" or last.get("code") != "interrupted":
            bad.append(f"{where}: resume of an interrupted answer ended with {last}")
    elif last.get("type") != "end" or last.get("status") != "complete":
        bad.append(f"{where}: resume of a complete answer ended with {last}")
    return bad


async def _round(
    rnd: int, rng: random.Random, server: ServerProcess, upstream: SlowUpstream
) -> tuple[list[Client], float]:
    """Start the clients, kill the server at a random moment; returns (clients, kill time)."""
    clients = [
        Client(
            sid=f"r{rnd}c{i}",
            transport="sse" if i % 2 == 0 else "ws",
            tokens=rng.randint(30, 110),
            pace_ms=rng.choice((10, 20, 30)),
        )
        for i in range(CLIENTS)
    ]
    ws_clients = [c for c in clients if c.transport == "ws"]
    delay = rng.uniform(0.0, 2.2)
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        tasks = [
            asyncio.create_task(_swallow(_sse_client(session, server.url, c)))
            for c in clients
            if c.transport == "sse"
        ]
        half = len(ws_clients) // 2
        for group in (ws_clients[:half], ws_clients[half:]):
            tasks.append(asyncio.create_task(_swallow(_ws_client(session, server.url, group))))
        await asyncio.sleep(delay)
        killed_at = server.kill()
        done, pending = await asyncio.wait(tasks, timeout=10)
        for t in pending:
            t.cancel()
        for t in done:
            t.result()  # an assertion inside a client is a failure, not a kill
    print_now(f"round {rnd}: killed after {delay * 1000:.0f} ms")
    return clients, killed_at


@pytest.mark.timeout(240)  # about 55 s alone; leave room on a busy 2-core machine
async def test_sigkill_rounds(tmp_path: Path) -> None:
    """At least 20 seeded SIGKILL rounds; the invariants hold after every one."""
    rng = random.Random(SEED)
    figures = Figures()
    started = time.monotonic()
    async with SlowUpstream() as upstream:
        streaming = {"shutdown_grace": 2.0, "flush_interval": FLUSH_INTERVAL}
        config = upstream_config(upstream.base_url, streaming=streaming)
        server = ServerProcess(tmp_path, config)
        try:
            await server.start()
            for rnd in range(ROUNDS):
                clients, killed_at = await _round(rnd, rng, server, upstream)
                integrity = _integrity(server.db)
                assert integrity == "ok", f"seed {SEED} round {rnd}: integrity_check {integrity}"
                await server.start()
                bad = await _check_round(rnd, server, upstream, clients, killed_at, figures)
                assert not bad, f"seed {SEED}:\n" + "\n".join(bad)
                figures.rounds += 1
            conn = sqlite3.connect(server.db, timeout=10)
            try:
                left = conn.execute(
                    "SELECT status, COUNT(*) FROM messages WHERE role = 'assistant'"
                    " AND status NOT IN ('complete', 'interrupted') GROUP BY status"
                ).fetchall()
            finally:
                conn.close()
            assert left == [], f"seed {SEED}: answers left in {left}"
            assert await server.terminate() == 0, server.log_tail()
            assert _integrity(server.db) == "ok"
        finally:
            server.stop()
    losses = figures.losses_ms or [0.0]
    print_now(
        f"chaos seed={SEED}: {figures.rounds} SIGKILL rounds in {time.monotonic() - started:.0f} s,"
        f" {figures.complete} complete + {figures.interrupted} interrupted answers,"
        f" {figures.resumed} resumes; text loss after a kill: max {max(losses):.0f} ms,"
        f" median {sorted(losses)[len(losses) // 2]:.0f} ms ({figures.worst})"
    )
    assert figures.rounds == ROUNDS >= 1
    assert figures.interrupted > 0, "no round killed a run mid-stream: the test proved nothing"
