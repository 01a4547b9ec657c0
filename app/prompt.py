"""The prompt of a run: the conversation's system prompt and the history that fits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from providers.base import ChatMessage


def build_prompt(
    conversation: Mapping[str, Any], history: Sequence[Mapping[str, Any]], budget: int
) -> list[ChatMessage]:
    """System prompt plus the newest history within `budget` characters (oldest dropped).

    Unfinished and empty answers are left out, and a prompt never begins with an
    assistant turn.
    """
    picked: list[ChatMessage] = []
    used = 0
    for msg in reversed(history):
        if msg["role"] == "assistant" and (msg["status"] == "streaming" or not msg["content"]):
            continue
        cost = len(msg["content"])
        if picked and used + cost > budget:
            break
        picked.append(ChatMessage(msg["role"], msg["content"]))
        used += cost
    picked.reverse()
    while picked and picked[0].role == "assistant":
        picked.pop(0)
    if conversation.get("system_prompt"):
        picked.insert(0, ChatMessage("system", conversation["system_prompt"]))
    return picked
