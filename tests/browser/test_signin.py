"""With auth.mode = api_key the page signs in with a key; the session cookie then carries
fetch, EventSource (which cannot send headers) and the WebSocket."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser

from app.auth import hash_secret, new_api_key
from app.keys import STORE
from app.settings import AuthSettings
from tests.browser.conftest import open_page
from tests.browser.test_streaming import FULL, assert_prefixes
from tests.fakes import ScriptedProvider, words

pytestmark = pytest.mark.browser


async def test_sign_in_then_stream_resume_and_sign_out(
    browser: Browser,
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]],
    make_app: Callable[..., web.Application],
    fake: ScriptedProvider,
) -> None:
    server = await aiohttp_server(make_app(auth=AuthSettings(mode="api_key")))
    store = server.app[STORE]
    await store.create_user("alice")
    key = new_api_key()
    await store.create_api_key("alice", hash_secret(key), key[:8])
    context, chat = await open_page(browser, server)
    try:
        page = chat.page
        assert await page.is_visible("#signin")
        await page.fill("#signin-key", "sc_wrong")
        await page.press("#signin-key", "Enter")
        await page.locator("#signin-error", has_text="Invalid or revoked API key.").wait_for()
        await chat.screenshot("signin.png")
        await page.fill("#signin-key", key)
        await page.press("#signin-key", "Enter")
        await page.wait_for_selector("body[data-ready=true]")
        assert not await page.is_visible("#signin")
        assert await page.locator("#who-name").inner_text() == "Signed in as alice"
        # the key is not kept by the page, and the cookie is out of script's reach
        assert key not in await page.evaluate("() => JSON.stringify(localStorage)")
        assert "streamchat_session" not in await page.evaluate("() => document.cookie")

        # POST stream, then a reload resumes through EventSource: both on the cookie
        fake.enqueue(words(FULL, 0.03))
        await chat.send("go")
        await chat.wait_text(40)
        await chat.reload()
        seen, status = await chat.watch_until_done()
        assert (seen[-1], status) == (FULL, "complete")
        assert_prefixes(seen, FULL)
        # the WebSocket too
        await chat.set_transport("ws")
        await chat.send("again")
        await page.locator("article.msg.assistant").nth(1).wait_for()
        assert await chat.wait_status("complete") == "complete"
        assert (await chat.state())[0] == "You said: again"
        assert chat.watch.websockets

        await page.click("#signout")
        await page.locator("#signin").wait_for()
        resp = await page.request.get(chat.base + "/api/v1/conversations")
        assert resp.status == 401
    finally:
        await context.close()
    # the 401s before signing in are logged by chromium as failed loads
    chat.watch.errors = [e for e in chat.watch.errors if "401" not in e]
    chat.watch.assert_clean()
