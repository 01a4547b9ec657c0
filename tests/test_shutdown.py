"""Graceful shutdown of the real server process: SIGTERM with live SSE and WebSocket runs."""

from __future__ import annotations

import asyncio
import json
import resource
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.proc import ServerProcess, upstream_config
from tests.upstreams.openai_slow import SlowUpstream, expected_text, prompt

pytestmark = pytest.mark.chaos


async def _sse_events(resp: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    events = []
    async for line in resp.content:
        if line.startswith(b"data: "):
            events.append(json.loads(line[6:]))
    return events


async def test_sigterm_drains_then_interrupts_and_exits_zero(tmp_path: Path) -> None:
    async with SlowUpstream() as up:
        server = ServerProcess(
            tmp_path, upstream_config(up.base_url, streaming={"shutdown_grace": 1.0})
        )
        await server.start()
        try:
            async with aiohttp.ClientSession(server.url) as s:
                cids = []
                for _ in range(3):
                    conv = await (await s.post("/api/v1/conversations", json={})).json()
                    cids.append(conv["id"])
                # a short run that finishes inside the grace period, over SSE
                short = await s.post(
                    f"/api/v1/conversations/{cids[0]}/stream",
                    json={"content": prompt("short", 8, 50)},
                )
                # a long run over SSE and one over WebSocket, both outliving the grace
                long_sse = await s.post(
                    f"/api/v1/conversations/{cids[1]}/stream",
                    json={"content": prompt("longsse", 400, 20)},
                )
                ws = await s.ws_connect("/ws")
                await ws.send_json(
                    {
                        "op": "send",
                        "request_id": "r",
                        "conversation_id": cids[2],
                        "content": prompt("longws", 400, 20),
                    }
                )
                await ws.receive(timeout=5)
                await asyncio.sleep(0.3)
                assert server.proc is not None
                exit_task = asyncio.ensure_future(server.terminate(timeout=15))
                await asyncio.sleep(0.2)
                # during the grace period new runs are refused with a retryable 503
                # (or the connection is refused once the listener has closed)
                try:
                    refused = await s.post(
                        f"/api/v1/conversations/{cids[0]}/stream", json={"content": "x"}
                    )
                    assert refused.status in (409, 503)
                    if refused.status == 503:
                        assert (await refused.json())["error"]["retryable"] is True
                except aiohttp.ClientConnectionError:
                    pass
                ws_events = []
                while True:
                    msg = await ws.receive(timeout=10)
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    ws_events.append(json.loads(msg.data))
                short_events = await _sse_events(short)
                long_events = await _sse_events(long_sse)
                exit_code = await exit_task
        finally:
            server.stop()
    assert exit_code == 0
    assert ws.close_code == 1001
    assert short_events[-1]["type"] == "end" and short_events[-1]["status"] == "complete"
    for events in (long_events, ws_events):
        assert events[-1]["type"] == "error"
        assert events[-1]["code"] == "shutdown" and events[-1]["retryable"] is True
    with sqlite3.connect(server.db) as db:
        rows = dict(
            db.execute(
                "SELECT conversation_id, status || '|' || content FROM messages"
                " WHERE role = 'assistant'"
            ).fetchall()
        )
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert rows[cids[0]] == "complete|" + expected_text("short", 8)
    for cid, sid, events in ((cids[1], "longsse", long_events), (cids[2], "longws", ws_events)):
        status, content = rows[cid].split("|", 1)
        assert status == "interrupted"
        streamed = "".join(e["content"] for e in events if e["type"] == "chunk")
        assert content == streamed and expected_text(sid, 400).startswith(content)
        assert content  # something was generated and kept
    assert "streaming" not in {r.split("|", 1)[0] for r in rows.values()}


async def test_server_raises_its_open_files_limit(tmp_path: Path) -> None:
    """Started with a soft limit of 512 open files (about 250 streams), the server raises it
    to the hard limit, which needs no privilege, and says so in its log."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 512:
        pytest.skip(f"this machine's hard limit ({hard}) leaves nothing to raise")
    server = ServerProcess(tmp_path, upstream_config("http://127.0.0.1:9/v1"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))  # the child inherits it
    try:
        server.spawn()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        await server.wait_healthy()
        with open(f"/proc/{server.pid}/limits") as fh:  # noqa: ASYNC230 - a /proc read
            limits = fh.read()
        row = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        want = "1048576" if hard == resource.RLIM_INFINITY else str(hard)  # run.py ceiling
        assert row.split()[3] == want, row
        assert "open files limit" in server.log_tail()
    finally:
        server.stop()
