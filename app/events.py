"""Run events: one JSON encoding per event, shared by every subscriber and transport."""

from __future__ import annotations

from typing import Any

import orjson

TERMINAL = frozenset({"end", "error"})


def encode(event: dict[str, Any]) -> str:
    """Encode an event as compact JSON (newlines inside strings are escaped)."""
    return orjson.dumps(event).decode()


def replay_finished(message: dict[str, Any], conversation_id: str) -> list[tuple[int, str]]:
    """The events a finished message replays: start, one chunk with its text, terminal."""
    mid = message["id"]
    events: list[dict[str, Any]] = [
        {
            "type": "start",
            "conversation_id": conversation_id,
            "message_id": mid,
            "user_message_id": None,
            "provider": message["provider"],
            "model": message["model"],
            "replay": True,
        }
    ]
    if message["reasoning"]:
        events.append({"type": "reasoning", "message_id": mid, "content": message["reasoning"]})
    if message["content"]:
        events.append({"type": "chunk", "message_id": mid, "content": message["content"]})
    if message["status"] in ("complete", "cancelled"):
        events.append(
            {
                "type": "end",
                "message_id": mid,
                "status": message["status"],
                "finish_reason": message["finish_reason"],
                "usage": {
                    "prompt_tokens": message["prompt_tokens"],
                    "completion_tokens": message["completion_tokens"],
                },
            }
        )
    else:
        code = message["error_code"] or (
            "interrupted" if message["status"] == "interrupted" else "internal"
        )
        events.append(
            {
                "type": "error",
                "message_id": mid,
                "code": code,
                "message": message["error_message"] or "The answer did not finish.",
                "retryable": message["status"] == "interrupted",
                "status": message["status"],
            }
        )
    out = []
    for seq, event in enumerate(events, start=1):
        event["seq"] = seq
        out.append((seq, encode(event)))
    return out
