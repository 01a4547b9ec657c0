"""A page object for the chat page, and a watcher for dialogs, requests and errors."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.test_utils import TestServer
from playwright.async_api import ConsoleMessage, Dialog, Locator, Page, Request

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
LIVE = ("waiting", "streaming")

# The answer's raw state as the user sees it: its rendered text and its status.
_STATE_JS = """() => {
  const a = [...document.querySelectorAll('article.msg.assistant')].pop();
  return a ? [a.querySelector('.md').textContent, a.dataset.status || ''] : ['', ''];
}"""


@dataclass
class Watch:
    """What the page did that a test may forbid: dialogs, off-host requests, errors."""

    dialogs: list[str] = field(default_factory=list)
    external: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    websockets: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        """Start recording on `page`."""
        page.on("dialog", self._dialog)
        page.on("request", self._request)
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("websocket", lambda ws: self.websockets.append(ws.url))

    async def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        await dialog.dismiss()

    def _request(self, request: Request) -> None:
        self.requests.append(f"{request.method} {request.url}")
        host = urlsplit(request.url).hostname
        if request.url.startswith(("http", "ws")) and host != "127.0.0.1":
            self.external.append(request.url)

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":
            self.errors.append(f"console: {msg.text}")

    def assert_clean(self) -> None:
        """No console error (a CSP violation is one), page error, dialog or off-host request."""
        assert self.errors == []
        assert self.dialogs == []
        assert self.external == []


class ChatPage:
    """Drives the page the way a user does, and reads what the user sees."""

    def __init__(self, page: Page, server: TestServer, watch: Watch, base: str) -> None:
        self.page = page
        self.server = server
        self.watch = watch
        self.base = base.rstrip("/")

    async def goto(self, path: str = "/") -> None:
        """Open the page and wait until it has loaded its data."""
        await self.page.goto(self.base + path)
        await self.page.wait_for_selector("body[data-ready]")

    async def reload(self) -> None:
        """Reload, as a user pressing F5."""
        await self.page.reload()
        await self.page.wait_for_selector("body[data-ready=true]")

    async def send(self, text: str) -> None:
        """Type a message and press Enter."""
        await self.page.fill("#input", text)
        await self.page.press("#input", "Enter")

    def answers(self) -> Locator:
        """Every assistant answer in the open conversation."""
        return self.page.locator("article.msg.assistant")

    def last(self) -> Locator:
        """The newest answer."""
        return self.answers().last

    async def state(self) -> tuple[str, str]:
        """(text, status) of the newest answer."""
        text, status = await self.page.evaluate(_STATE_JS)
        return str(text), str(status)

    async def wait_status(self, *statuses: str, within: float = 10.0) -> str:
        """Wait until the newest answer's status is one of `statuses`; return it."""
        deadline = time.monotonic() + within
        while True:
            _, status = await self.state()
            if status in statuses:
                return status
            assert time.monotonic() < deadline, f"status stayed {status!r}, wanted {statuses}"
            await asyncio.sleep(0.02)

    async def wait_text(self, min_chars: int, within: float = 10.0) -> str:
        """Wait until the newest answer shows at least `min_chars` characters."""
        deadline = time.monotonic() + within
        while True:
            text, _ = await self.state()
            if len(text) >= min_chars:
                return text
            assert time.monotonic() < deadline, f"answer stayed at {text!r}"
            await asyncio.sleep(0.02)

    async def watch_until_done(self, within: float = 15.0) -> tuple[list[str], str]:
        """Sample the newest answer while it streams: (distinct texts seen, final status)."""
        seen: list[str] = []
        deadline = time.monotonic() + within
        while True:
            text, status = await self.state()
            if not seen or seen[-1] != text:
                seen.append(text)
            if status and status not in LIVE:
                return seen, status
            assert time.monotonic() < deadline, f"still {status!r} after {within} s"
            await asyncio.sleep(0.015)

    async def selected_model(self) -> list[str]:
        """[provider, model] chosen in the picker."""
        value: list[str] = await self.page.evaluate(
            "() => JSON.parse(document.querySelector('#model').value)"
        )
        return value

    async def set_transport(self, name: str) -> None:
        """Pick SSE or WebSocket in the sidebar."""
        await self.page.select_option("#transport", name)

    async def api(self, method: str, path: str, body: Any = None) -> Any:
        """Call the server's API directly (to check what the server has stored)."""
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, str(self.server.make_url(path)), json=body) as resp,
        ):
            if resp.status == 204:
                return None
            return await resp.json()

    async def current_conversation(self) -> dict[str, Any]:
        """The open conversation as the API returns it."""
        cid = await self.page.evaluate("() => location.hash.slice(4)")
        assert len(cid) == 32, f"no conversation open (hash {cid!r})"
        conv: dict[str, Any] = await self.api("GET", f"/api/v1/conversations/{cid}")
        return conv

    async def screenshot(self, name: str) -> Path:
        """Save a screenshot under test-artifacts/ (gitignored) and return its path."""
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        await self.page.screenshot(path=str(path))
        return path
