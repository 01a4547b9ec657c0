"""A scripted fake provider for tests of the streaming service (a fake, not a mock)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from app.settings import ProviderSettings
from providers.base import (
    ChatMessage,
    Finish,
    GenerateOptions,
    ProviderError,
    ProviderInfo,
    StreamEvent,
    TextDelta,
    Usage,
)


@dataclass
class Call:
    """One stream() call as the fake saw it."""

    messages: list[ChatMessage]
    model: str
    options: GenerateOptions
    started: float
    ended: float | None = None
    closed_early: bool = False


# Script steps: ("text", str) | ("sleep", seconds) | ("error", ProviderError)
#               | ("usage", prompt, completion) | ("finish", reason) | ("hang",)
Step = tuple[object, ...]


def words(text: str, delay: float = 0.0, finish: str = "stop") -> list[Step]:
    """A script streaming `text` word by word (spaces kept), then usage and finish."""
    steps: list[Step] = []
    parts = text.split(" ")
    for i, w in enumerate(parts):
        steps.append(("text", w + (" " if i < len(parts) - 1 else "")))
        if delay:
            steps.append(("sleep", delay))
    steps.append(("usage", 7, len(parts)))
    steps.append(("finish", finish))
    return steps


class ScriptedProvider:
    """Plays queued scripts; with none queued it echoes the last user message."""

    def __init__(
        self, name: str = "fake", models: tuple[str, ...] = ("fake-1", "fake-2"), delay: float = 0.0
    ) -> None:
        self.info = ProviderInfo(name=name, kind="fake", models=models, default_model=models[0])
        self.scripts: deque[list[Step]] = deque()
        self.delay = delay
        self.calls: list[Call] = []
        self.active = 0
        self.closed = False

    def enqueue(self, steps: list[Step]) -> None:
        """Queue the script for the next stream() call."""
        self.scripts.append(list(steps))

    def _default(self, messages: Sequence[ChatMessage]) -> list[Step]:
        last = next((m.content for m in reversed(messages) if m.role == "user"), "")
        return words(f"You said: {last}", self.delay)

    async def stream(
        self, messages: Sequence[ChatMessage], model: str, options: GenerateOptions
    ) -> AsyncIterator[StreamEvent]:
        """Play a script."""
        script = self.scripts.popleft() if self.scripts else self._default(messages)
        call = Call(list(messages), model, options, time.monotonic())
        self.calls.append(call)
        self.active += 1
        finished = False
        try:
            for step in script:
                kind = step[0]
                if kind == "text":
                    yield TextDelta(str(step[1]))
                elif kind == "sleep":
                    await asyncio.sleep(float(step[1]))  # type: ignore[arg-type]
                elif kind == "error":
                    err = step[1]
                    assert isinstance(err, ProviderError)
                    raise err
                elif kind == "usage":
                    yield Usage(int(step[1]), int(step[2]))  # type: ignore[call-overload]
                elif kind == "finish":
                    yield Finish(str(step[1]))
                elif kind == "hang":
                    await asyncio.Event().wait()
            finished = True
        finally:
            call.ended = time.monotonic()
            call.closed_early = not finished
            self.active -= 1

    async def aclose(self) -> None:
        """Nothing to release."""
        self.closed = True


def fallback_settings(
    retries: int, to: str = "backup", model: str = "b-1"
) -> dict[str, ProviderSettings]:
    """Settings of the fake provider (`retries` retries) falling back to the fake `to`."""
    return {
        "fake": ProviderSettings(
            name="fake",
            kind="fake",
            models=("fake-1",),
            default_model="fake-1",
            retries=retries,
            fallback=(to,),
        ),
        to: ProviderSettings(name=to, kind="fake", models=(model,), default_model=model, retries=0),
    }
