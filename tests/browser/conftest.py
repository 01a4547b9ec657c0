"""Browser fixtures: Debian's chromium driven by Playwright's async API against a real server.

The server is the real app on a loopback port (pytest-aiohttp's `aiohttp_server`) with
the scripted fake provider from tests/fakes.py; nothing on the page is mocked.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, BrowserContext, Route, async_playwright

from tests.browser.pages import ChatPage, Watch

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags chromium keeps trying to reach the internet.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
NOT_LOOPBACK = re.compile(r"^(?!(?:https?|wss?)://127\.0\.0\.1[:/]).+", re.IGNORECASE)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """A headless Debian chromium (Playwright's own browser download does not work here)."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `make chromium` installs it")
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def server(
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]],
    make_app: Callable[..., web.Application],
) -> TestServer:
    """The real app on 127.0.0.1 with the scripted fake provider."""
    return await aiohttp_server(make_app(streaming={"flush_interval": 0.1}))


async def _block(route: Route) -> None:
    await route.abort()


async def open_page(
    browser: Browser,
    server: TestServer,
    path: str = "/",
    base: str | None = None,
    **context_args: Any,
) -> tuple[BrowserContext, ChatPage]:
    """A fresh browser context on the server's page, watching dialogs, requests and errors.

    `base` loads the page from another origin than the server's (a proxy in front of it).
    """
    context = await browser.new_context(**context_args)
    context.set_default_timeout(5000)  # fail fast; nothing here should take longer
    # anything not on loopback is recorded (by the page watcher) and never sent
    await context.route(NOT_LOOPBACK, _block)
    page = await context.new_page()
    chat = ChatPage(page, server, Watch(), base or str(server.make_url("/")))
    chat.watch.attach(page)
    await chat.goto(path)
    return context, chat


@pytest.fixture
async def chat(browser: Browser, server: TestServer) -> AsyncIterator[ChatPage]:
    """The chat page at desktop size; fails the test on any console error or page error."""
    context, page = await open_page(browser, server, viewport={"width": 1200, "height": 800})
    try:
        yield page
    finally:
        await context.close()
    page.watch.assert_clean()
