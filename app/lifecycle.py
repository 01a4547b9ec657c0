"""Graceful shutdown: SIGTERM/SIGINT drain live runs, tell every client, then exit 0."""

from __future__ import annotations

import asyncio
import logging
import signal
import weakref

from aiohttp import WSCloseCode, web
from aiohttp.web_runner import GracefulExit

from app.keys import SERVICE, SETTINGS, SOCKETS

log = logging.getLogger(__name__)


async def drain_and_close(app: web.Application, grace: float) -> None:
    """Drain runs (grace, then interrupt), let sockets deliver the events, close them 1001."""
    await app[SERVICE].drain(grace)
    open_sockets = app[SOCKETS]
    sockets = list(open_sockets)
    for sock in sockets:
        await sock.flush(2.0)
    for sock in sockets:
        await sock.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")


def install_signal_handlers(app: web.Application) -> None:
    """SIGTERM/SIGINT start a graceful drain; a second signal exits at once."""
    loop = asyncio.get_running_loop()
    state = {"draining": False}
    tasks: set[asyncio.Task[None]] = set()

    def _exit() -> None:
        raise GracefulExit()

    async def _graceful() -> None:
        grace = app[SETTINGS].streaming.shutdown_grace
        log.info("shutting down: no new runs, %.0f s grace for live ones", grace)
        try:
            await drain_and_close(app, grace)
        finally:
            loop.call_soon(_exit)

    def _on_signal() -> None:
        if state["draining"]:
            loop.call_soon(_exit)
            return
        state["draining"] = True
        task = loop.create_task(_graceful())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal)


async def on_startup(app: web.Application) -> None:
    """Register the socket set (and signal handlers when running as the server process)."""
    app[SOCKETS] = weakref.WeakSet()
