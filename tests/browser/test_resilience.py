"""Nothing lost or repeated when the network drops mid-answer or the user switches away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, expect

from tests.browser.conftest import open_page
from tests.browser.pages import LIVE, ChatPage
from tests.browser.proxy import CuttableProxy
from tests.browser.test_streaming import FULL, assert_prefixes
from tests.fakes import ScriptedProvider, words

pytestmark = pytest.mark.browser


@pytest.fixture
async def proxy(server: TestServer) -> AsyncIterator[CuttableProxy]:
    """A proxy in front of the server whose link the test can cut."""
    p = CuttableProxy(server.port or 0)
    await p.start()
    yield p
    await p.close()


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_network_loss_mid_stream_reconnects_without_gaps(
    browser: Browser,
    server: TestServer,
    proxy: CuttableProxy,
    fake: ScriptedProvider,
    transport: str,
) -> None:
    assert proxy.server is not None
    port = proxy.server.sockets[0].getsockname()[1]
    context, chat = await open_page(browser, server, base=f"http://127.0.0.1:{port}")
    try:
        await chat.set_transport(transport)
        fake.enqueue(words(FULL, 0.04))
        await chat.send("go")
        await chat.wait_text(30)
        proxy.cut()
        # the page notices and says so
        deadline = time.monotonic() + 5
        while "reconnecting" not in await chat.last().locator(".status").inner_text():
            assert time.monotonic() < deadline, "the page did not notice the lost connection"
            await asyncio.sleep(0.02)
        during, status = await chat.state()
        assert status in LIVE
        await asyncio.sleep(0.8)
        proxy.restore()
        seen, status = await chat.watch_until_done(within=20)
        assert status == "complete"
        assert seen[-1] == FULL
        assert_prefixes([during, *seen], FULL)
        assert len(fake.calls) == 1 and not fake.calls[0].closed_early
    finally:
        await context.close()
    # refused connections are logged by chromium as console errors; nothing else may be
    chat.watch.errors = [
        e for e in chat.watch.errors if "net::ERR_" not in e and "WebSocket connection" not in e
    ]
    chat.watch.assert_clean()


async def test_switching_conversations_mid_stream_and_back(
    chat: ChatPage, fake: ScriptedProvider
) -> None:
    fake.enqueue(words(FULL, 0.04))
    await chat.send("long one")
    await chat.wait_text(20)
    first_hash = await chat.page.evaluate("() => location.hash")
    # another conversation meanwhile (the fake echoes without a script)
    await chat.page.click("#new-chat")
    await chat.page.locator(".empty").wait_for()
    await chat.send("short one")
    assert await chat.wait_status("complete") == "complete"
    assert (await chat.state())[0] == "You said: short one"
    titles = chat.page.locator("#conversations .conv-open")
    await expect(titles).to_have_text(["short one", "long one"])  # newest first
    # back to the first, still streaming: it picks up where the server is
    await chat.page.locator("#conversations .conv-open", has_text="long one").click()
    await chat.page.wait_for_function(f"() => location.hash === {first_hash!r}")
    seen, status = await chat.watch_until_done()
    assert status == "complete"
    assert seen[-1] == FULL
    assert_prefixes(seen, FULL)
    assert len([t for t in seen if 0 < len(t) < len(FULL)]) >= 2, "it was not still streaming"
