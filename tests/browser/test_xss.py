"""Model output (and user text) can never run script, inject markup or send a request."""

from __future__ import annotations

import pytest

from tests.browser.pages import ChatPage
from tests.fakes import ScriptedProvider, Step

pytestmark = pytest.mark.browser

# Each payload would set window.__pwned, open a dialog or load something off the page.
# Several are split across chunks, so they are whole only in the final text.
CHUNKS = [
    "Intro.\n\n<scr",
    "ipt>window.__pwned = 'script'</scr",
    "ipt>\n\n",
    "<img src=x onerror=\"window.__pwned='img'\">\n\n",
    "[click me](javas",
    "cript:window.__pwned='link')\n\n",
    "[upper](JaVaScRiPt:alert(1)) [spaced]( javascript:alert(2)) ",
    "[entity](javascript&#58;alert(3)) [tab](java\tscript:alert(4))\n\n",
    "[data](data:text/html;base64,PHNjcmlwdD5hbGVydCg1KTwvc2NyaXB0Pg==) ",
    "[vb](vbscript:msgbox(6))\n\n",
    '<a href="javascript:alert(7)">raw anchor</a> <svg onload=alert(8)> ',
    '<iframe src="javascript:alert(9)"></iframe> <object data="x"></object>\n\n',
    '![pixel](http://evil.example/pixel.png) <img src="http://evil.example/a.png">\n\n',
    "<style>body{background:url(http://evil.example/bg)}</style>\n\n",
    "**<img src=x onerror=alert(10)>** `<script>alert(11)</script>` ",
    "[<b onmouseover=alert(12)>hover</b>](https://example.com/ok)\n\n",
    "```html\n<script>window.__pwned='fence'</script>\n```\n\n",
    "| a | b |\n|---|---|\n| <img src=x onerror=alert(13)> | [x](javascript:alert(14)) |\n\n",
    "<",
    "img src=x one",
    "rror=alert(15)>",
]
USER_TEXT = "<img src=x onerror=\"window.__pwned='user'\"> hello"

CHECK_JS = """() => {
  const bad = [];
  for (const root of document.querySelectorAll('#thread, #conversations, #conv-title')) {
    for (const el of root.querySelectorAll('*')) {
      const tag = el.tagName.toLowerCase();
      if (['script', 'img', 'svg', 'iframe', 'object', 'embed', 'style', 'link', 'form',
           'input', 'video', 'audio', 'math'].includes(tag) && !el.closest('.composer')) {
        bad.push('element ' + tag);
      }
      for (const attr of el.getAttributeNames()) {
        if (attr.startsWith('on') || attr === 'style' || attr === 'src') {
          bad.push('attribute ' + attr + ' on ' + tag);
        }
      }
      if (tag === 'a' && !/^(https?:|mailto:)/.test(el.getAttribute('href') || '')) {
        bad.push('link ' + el.getAttribute('href'));
      }
    }
  }
  return {bad, pwned: window.__pwned, links: [...document.querySelectorAll('#thread a')]
    .map((a) => [a.getAttribute('href'), a.rel, a.target])};
}"""


def script() -> list[Step]:
    steps: list[Step] = []
    for chunk in CHUNKS:
        steps += [("text", chunk), ("sleep", 0.02)]
    return [*steps, ("usage", 5, len(CHUNKS)), ("finish", "stop")]


async def assert_inert(chat: ChatPage) -> None:
    result = await chat.page.evaluate(CHECK_JS)
    assert result["bad"] == []
    assert result["pwned"] is None
    for href, rel, target in result["links"]:
        assert href.startswith(("http://", "https://")), href
        assert (rel, target) == ("noopener noreferrer", "_blank")
    text = await chat.last().locator(".md").inner_text()
    # the payloads are shown as text, not dropped
    assert "<script>window.__pwned = 'script'</script>" in text
    assert "<img src=x onerror=\"window.__pwned='img'\">" in text
    assert "click me" in text and "raw anchor" in text
    assert await chat.page.locator("article.msg.user .bubble").inner_text() == USER_TEXT


async def test_xss_corpus_renders_inert(chat: ChatPage, fake: ScriptedProvider) -> None:
    await chat.page.evaluate("() => { window.__pwned = undefined; }")
    fake.enqueue(script())
    await chat.send(USER_TEXT)
    # check while it streams too, when payloads are half-written
    await chat.wait_text(20)
    assert (await chat.page.evaluate(CHECK_JS))["bad"] == []
    assert await chat.wait_status("complete") == "complete"
    await assert_inert(chat)
    await chat.screenshot("xss.png")
    # only http(s) URLs became links (inert until clicked); javascript: ones are plain text
    assert [h for h, _, _ in (await chat.page.evaluate(CHECK_JS))["links"]] == [
        "http://evil.example/pixel.png",
        "http://evil.example/a.png",
        "http://evil.example/bg",
        "https://example.com/ok",
    ]
    # poking at what were links and handlers does nothing
    url = chat.page.url
    removed = chat.last().locator(".md .unsafe-link")
    # ("tab" is no link at all: a destination with a space in it stays plain text)
    assert await removed.all_inner_texts() == [
        "click me",
        "upper",
        "spaced",
        "entity",
        "data",
        "vb",
        "x",
    ]
    for i in range(await removed.count()):
        await removed.nth(i).click()
    await chat.last().locator(".md p", has_text="raw anchor").click()
    await chat.last().locator("strong").hover()
    assert chat.page.url == url
    assert len(chat.page.context.pages) == 1
    # the same after a reload, rendered from what the server stored
    await chat.reload()
    await assert_inert(chat)
    # the CSP forbids inline script even if something slipped through
    csp = (await chat.page.request.get(chat.base + "/")).headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    # chat.watch.assert_clean() at teardown: no dialog, no off-host request, no error
