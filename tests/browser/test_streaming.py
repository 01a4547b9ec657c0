"""Streaming in a real browser over both transports: growth, stop, reload mid-stream."""

from __future__ import annotations

import asyncio

import pytest

from tests.browser.pages import ChatPage
from tests.fakes import ScriptedProvider, words

pytestmark = pytest.mark.browser

# Numbered words: a repeated or missing piece breaks the prefix checks below.
FULL = " ".join(f"w{i:03d}" for i in range(1, 61))
DELAY = 0.04


def assert_prefixes(seen: list[str], full: str) -> None:
    """Every state the user saw is a prefix of the provider's text (nothing repeated)."""
    for text in seen:
        assert full.startswith(text), f"{text!r} is not a prefix of the answer"


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_answer_grows_then_completes_and_survives_reload(
    chat: ChatPage, fake: ScriptedProvider, transport: str
) -> None:
    await chat.set_transport(transport)
    fake.enqueue(words(FULL, DELAY))
    await chat.send("count for me")
    await chat.page.locator("article.msg.user .bubble").filter(has_text="count for me").wait_for()
    seen, status = await chat.watch_until_done()
    assert status == "complete"
    assert seen[-1] == FULL
    growing = [t for t in seen if 0 < len(t) < len(FULL)]
    assert len(growing) >= 5, f"only {len(growing)} intermediate states: {seen}"
    assert_prefixes(seen, FULL)
    # the transport picked is the one used
    if transport == "ws":
        assert chat.watch.websockets, "no WebSocket was opened"
        assert not [r for r in chat.watch.requests if r.endswith("/stream")]
    else:
        assert not chat.watch.websockets
        assert [r for r in chat.watch.requests if r.startswith("POST") and r.endswith("/stream")]
    meta = await chat.last().locator(".meta").inner_text()
    assert "TTFT" in meta and "tok/s" in meta and "7 prompt + 60 completion tokens" in meta

    await chat.reload()
    assert await chat.page.input_value("#transport") == transport  # the choice persists
    text, status = await chat.state()
    assert (text, status) == (FULL, "complete")
    assert await chat.page.locator("article.msg.user .bubble").inner_text() == "count for me"
    assert "TTFT" in await chat.last().locator(".meta").inner_text()
    assert await chat.page.locator("#conv-title").inner_text() == "count for me"


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_stop_keeps_partial_and_cancels_the_run(
    chat: ChatPage, fake: ScriptedProvider, transport: str
) -> None:
    await chat.set_transport(transport)
    fake.enqueue(words(FULL, DELAY))
    await chat.send("go")
    await chat.wait_text(40)
    if transport == "sse":
        await chat.screenshot("streaming.png")
    if transport == "ws":
        await chat.page.keyboard.press("Escape")  # Esc stops
    else:
        await chat.page.click("#stop")
    assert await chat.wait_status("cancelled") == "cancelled"
    partial, _ = await chat.state()
    assert FULL.startswith(partial) and 40 <= len(partial) < len(FULL)
    assert "Stopped" in await chat.last().locator(".status").inner_text()
    await chat.screenshot(f"stopped-{transport}.png")
    # the server's run is cancelled: the provider's stream was closed early...
    assert fake.calls[-1].closed_early
    # ...and the database holds the same partial text, marked cancelled
    conv = await chat.current_conversation()
    answer = conv["messages"][-1]
    assert answer["status"] == "cancelled"
    assert answer["content"].rstrip() == partial
    assert conv["live_message_id"] is None
    await asyncio.sleep(0.3)  # nothing more arrives
    assert (await chat.state()) == (partial, "cancelled")
    await chat.reload()
    assert (await chat.state()) == (partial, "cancelled")
    assert await chat.page.is_visible("#send") and not await chat.page.is_visible("#stop")


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_reload_mid_stream_continues_without_gaps(
    chat: ChatPage, fake: ScriptedProvider, transport: str
) -> None:
    await chat.set_transport(transport)
    fake.enqueue(words(FULL, DELAY))
    await chat.send("go")
    before = await chat.wait_text(60)
    assert FULL.startswith(before)
    await chat.reload()
    seen, status = await chat.watch_until_done()
    assert status == "complete"
    assert seen[-1] == FULL
    assert_prefixes(seen, FULL)
    # it picked up mid-way: the first state after the reload already had text, and more came
    assert len(seen[0]) >= len(before)
    assert len([t for t in seen if len(t) < len(FULL)]) >= 2
    assert len(fake.calls) == 1  # resumed, not re-asked


async def test_stopped_answer_continues_in_place(chat: ChatPage, fake: ScriptedProvider) -> None:
    fake.enqueue(words(FULL, DELAY))
    await chat.send("go")
    await chat.wait_text(40)
    await chat.page.click("#stop")
    await chat.wait_status("cancelled")
    partial, _ = await chat.state()
    rest = FULL[len(partial) :].lstrip()
    fake.enqueue(words(rest, 0.01))
    await chat.last().locator("button.continue").click()
    await chat.wait_status("waiting", "streaming")
    seen, status = await chat.watch_until_done()
    assert status == "complete"
    assert seen[-1] == FULL  # the old text kept, the new text appended once
    assert_prefixes(seen, FULL)
    assert fake.calls[-1].options.prefill is not None
    assert FULL.startswith(fake.calls[-1].options.prefill)
    conv = await chat.current_conversation()
    assert [m["status"] for m in conv["messages"]] == ["complete", "complete"]
    assert conv["messages"][-1]["content"] == FULL
    assert await chat.answers().count() == 1
