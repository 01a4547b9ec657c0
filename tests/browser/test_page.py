"""The rest of the page: failures and Retry, regenerate, edit and resend, the conversation
list, the provider picker."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, expect

from providers.base import ProviderError
from tests.browser.conftest import open_page
from tests.browser.pages import ChatPage
from tests.fakes import ScriptedProvider, words

pytestmark = pytest.mark.browser


async def test_failed_provider_shows_error_and_retry_works(
    chat: ChatPage, fake: ScriptedProvider
) -> None:
    fake.enqueue(
        [
            # long enough that "1 s" shows for a whole second on a busy machine (at 1.6 s
            # the 0.6 s window was once missed in CI)
            ("sleep", 2.6),
            ("error", ProviderError("overloaded", "The provider is overloaded right now.")),
        ]
    )
    await chat.send("hello?")
    # waiting for the first token, with the seconds counting
    await chat.page.locator("article.msg.assistant .status", has_text="1 s").wait_for()
    status = await chat.last().locator(".status").inner_text()
    assert status.startswith("Waiting for the first token")
    assert await chat.page.is_visible("#stop")
    assert await chat.wait_status("failed") == "failed"
    status = await chat.last().locator(".status").inner_text()
    assert status == "Failed: The provider is overloaded right now."
    await chat.screenshot("failed.png")
    conv = await chat.current_conversation()
    assert conv["messages"][-1]["status"] == "failed"
    assert conv["messages"][-1]["error"]["code"] == "overloaded"

    fake.enqueue(words("Second time lucky.", 0.02))
    await chat.last().locator("button.retry").click()
    assert await chat.wait_status("complete") == "complete"
    assert (await chat.state())[0] == "Second time lucky."
    assert await chat.answers().count() == 1
    conv = await chat.current_conversation()
    assert [(m["role"], m["status"]) for m in conv["messages"]] == [
        ("user", "complete"),
        ("assistant", "complete"),
    ]
    assert conv["messages"][1]["content"] == "Second time lucky."
    assert fake.calls[-1].messages[-1].content == "hello?"


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_regenerate_then_edit_and_resend(
    chat: ChatPage, fake: ScriptedProvider, transport: str
) -> None:
    await chat.set_transport(transport)
    fake.enqueue(words("first answer", 0.01))
    await chat.send("question one")
    assert await chat.wait_status("complete") == "complete"

    fake.enqueue(words("second answer", 0.01))
    await chat.last().locator("button.regenerate").click()
    assert await chat.wait_status("complete") == "complete"
    assert (await chat.state())[0] == "second answer"
    assert await chat.answers().count() == 1
    assert fake.calls[-1].messages[-1].content == "question one"

    await chat.page.locator("article.msg.user button.edit").click()
    assert await chat.page.input_value("#input") == "question one"
    assert await chat.page.is_visible("#editing")
    fake.enqueue(words("third answer", 0.01))
    await chat.page.fill("#input", "question two")
    await chat.page.press("#input", "Enter")
    await chat.page.locator("article.msg.user .bubble", has_text="question two").wait_for()
    assert await chat.wait_status("complete") == "complete"
    assert await chat.page.locator("article.msg.user .bubble").all_inner_texts() == ["question two"]
    assert (await chat.state())[0] == "third answer"
    assert not await chat.page.is_visible("#editing")
    conv = await chat.current_conversation()
    assert [(m["role"], m["content"]) for m in conv["messages"]] == [
        ("user", "question two"),
        ("assistant", "third answer"),
    ]
    assert [m.content for m in fake.calls[-1].messages] == ["question two"]


async def test_conversation_list_new_rename_delete(chat: ChatPage) -> None:
    await chat.page.locator(".empty").wait_for()
    await chat.screenshot("empty.png")
    await chat.send("alpha")
    assert await chat.wait_status("complete") == "complete"
    await chat.page.click("#new-chat")
    assert await chat.page.locator("#conv-title").inner_text() == "New chat"
    await chat.send("beta")
    assert await chat.wait_status("complete") == "complete"
    items = chat.page.locator("#conversations .conv")
    await expect(items.locator(".conv-open")).to_have_text(["beta", "alpha"])

    alpha = items.filter(has_text="alpha")
    await alpha.hover()
    await alpha.locator("button.rename").click()
    await chat.page.fill(".rename-input", "Greek letters")
    await chat.page.press(".rename-input", "Enter")
    await items.filter(has_text="Greek letters").wait_for()
    # the list follows the server's order: a rename counts as activity
    listed = await chat.api("GET", "/api/v1/conversations")
    titles = [c["title"] for c in listed["conversations"]]
    assert sorted(titles) == ["Greek letters", "beta"]
    await expect(items.locator(".conv-open")).to_have_text(titles)

    await items.filter(has_text="Greek letters").locator(".conv-open").click()
    await chat.page.locator("#conv-title", has_text="Greek letters").wait_for()
    assert (await chat.state())[0] == "You said: alpha"

    # delete asks once more before it deletes
    greek = items.filter(has_text="Greek letters")
    await greek.locator("button.delete").click()
    assert await greek.locator("button.delete").inner_text() == "Delete?"
    await greek.locator("button.delete").click()
    await greek.wait_for(state="detached")
    await expect(items.locator(".conv-open")).to_have_text(["beta"])
    assert await chat.page.locator("#conv-title").inner_text() == "New chat"
    assert await chat.answers().count() == 0
    listed = await chat.api("GET", "/api/v1/conversations")
    assert [c["title"] for c in listed["conversations"]] == ["beta"]


async def test_provider_picker_shows_unavailable_and_switches_model(
    browser: Browser,
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]],
    make_app: Callable[..., web.Application],
    fake: ScriptedProvider,
) -> None:
    paid = ScriptedProvider(name="paid", models=("paid-large",))
    paid.info = dataclasses.replace(
        paid.info, available=False, reason="no API key: set PAID_API_KEY"
    )
    server = await aiohttp_server(make_app(providers={"paid": paid}))
    context, chat = await open_page(browser, server)
    try:
        group = chat.page.locator("#model optgroup[data-provider=paid]")
        label = await group.get_attribute("label")
        assert label == "paid (unavailable: no API key: set PAID_API_KEY)"
        assert await group.evaluate("(g) => g.disabled")
        assert await group.locator("option").evaluate("(o) => o.disabled")
        assert await chat.selected_model() == ["fake", "fake-1"]
        # chosen before the conversation exists: it is created with that model
        await chat.page.select_option("#model", label="fake / fake-2")
        await chat.send("which model?")
        assert await chat.wait_status("complete") == "complete"
        assert fake.calls[-1].model == "fake-2"
        conv = await chat.current_conversation()
        assert (conv["provider"], conv["model"]) == ("fake", "fake-2")
        assert "fake / fake-2" in await chat.last().locator(".metrics").inner_text()
        # switched in an existing conversation: saved on it, used by the next answer
        await chat.page.select_option("#model", label="fake / fake-1")
        await chat.page.wait_for_timeout(200)
        await chat.send("and now?")
        await chat.page.locator("article.msg.assistant").nth(1).wait_for()
        assert await chat.wait_status("complete") == "complete"
        assert fake.calls[-1].model == "fake-1"
        assert (await chat.current_conversation())["model"] == "fake-1"
        await chat.reload()
        assert await chat.selected_model() == ["fake", "fake-1"]
        assert len(paid.calls) == 0
    finally:
        await context.close()
    chat.watch.assert_clean()
