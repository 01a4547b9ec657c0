"""Markdown rendering and how the page looks (screenshots saved to test-artifacts/)."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser

from tests.browser.conftest import open_page
from tests.browser.pages import ChatPage
from tests.fakes import ScriptedProvider, words

pytestmark = pytest.mark.browser

CODE = 'async def main():\n    async with aiohttp.ClientSession() as s:\n        print("hi <b>")'
RICH = f"""Here is a **quick summary** of the *streamchat* transports, with `inline code` and \
a [link to the spec](https://html.spec.whatwg.org/multipage/server-sent-events.html).

## Options

1. **SSE**: one HTTP response per answer
2. _WebSocket_: many runs over one socket
   - resumable with `after=<seq>`
   - works behind most proxies

| Transport | Resume | Browser API |
|-----------|:------:|------------:|
| SSE | `Last-Event-ID` | EventSource |
| WebSocket | resume op | WebSocket |

```python
{CODE}
```

> Tip: press Esc to stop an answer."""


async def test_markdown_renders_and_looks_right(
    browser: Browser, server: TestServer, chat: ChatPage, fake: ScriptedProvider
) -> None:
    await chat.page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    fake.enqueue(words(RICH, 0.005))
    await chat.send("Compare SSE and WebSocket for me, with a table and a code sample")
    assert await chat.wait_status("complete") == "complete"
    md = chat.last().locator(".md")
    assert await md.locator("h2").inner_text() == "Options"
    assert await md.locator("strong").first.inner_text() == "quick summary"
    assert await md.locator("em").first.inner_text() == "streamchat"
    assert await md.locator("p code").first.inner_text() == "inline code"
    link = md.locator("a")
    assert await link.count() == 1
    assert await link.get_attribute("href") == (
        "https://html.spec.whatwg.org/multipage/server-sent-events.html"
    )
    assert await link.get_attribute("rel") == "noopener noreferrer"
    assert await md.locator("ol > li").count() == 2
    assert await md.locator("ol > li ul > li").count() == 2
    assert await md.locator("table th").all_inner_texts() == ["Transport", "Resume", "Browser API"]
    assert await md.locator("table td").count() == 6
    assert await md.locator("th.align-center").count() == 1
    assert await md.locator("th.align-right").count() == 1
    assert await md.locator("pre code").text_content() == CODE
    assert await md.locator(".codebar .lang").inner_text() == "python"
    assert await md.locator("blockquote").inner_text() == "Tip: press Esc to stop an answer."
    # the copy button puts the code, exactly, on the clipboard
    await md.locator(".codeblock .copy").click()
    assert await chat.page.evaluate("() => navigator.clipboard.readText()") == CODE
    await chat.screenshot("conversation.png")

    conv_path = "/" + await chat.page.evaluate("() => location.hash")
    looks: dict[str, dict[str, Any]] = {
        "phone-light.png": {"viewport": {"width": 390, "height": 844}, "is_mobile": True},
        "phone-dark.png": {
            "viewport": {"width": 390, "height": 844},
            "is_mobile": True,
            "color_scheme": "dark",
        },
        "dark.png": {"viewport": {"width": 1200, "height": 800}, "color_scheme": "dark"},
    }
    for name, options in looks.items():
        context, other = await open_page(browser, server, conv_path, **options)
        try:
            assert (await other.state())[1] == "complete"
            await other.screenshot(name)
            if name == "phone-light.png":
                # the conversation list slides in from the menu button
                await other.page.click("#menu")
                await other.page.locator(".sidebar").wait_for()
                await other.page.wait_for_timeout(300)
                await other.screenshot("phone-sidebar.png")
        finally:
            await context.close()
        other.watch.assert_clean()
